"""Tables: the database schema (SQLAlchemy 2 declarative), and the column types it needs.

Outgoing mail is a `messages` row with direction "out" and a delivery state: that table
*is* the transactional outbox, so a case change and the mails it causes are committed
together or not at all. A change here needs a migration in `migrations/versions/`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    BindParameter,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SQLColumnExpression,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeEngine

from mailrouter.model import case_tag


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend: `timestamptz` on
    PostgreSQL; on SQLite, which has no zones, UTC written without one."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(DateTime(timezone=dialect.name == "postgresql"))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; pass an aware one")
        utc = value.astimezone(UTC)
        return utc if dialect.name == "postgresql" else utc.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any] | None:
        """On SQLite, which stores UTC as ISO text without a zone: the text with "+00:00"
        added, parsed by `datetime.fromisoformat` straight into an aware datetime (0.4 us
        here), instead of parsed naive and then given its zone by `replace` (2.5 us). A
        digest over 100,000 open cases reads 200,000 of them."""
        standard = super().result_processor(dialect, coltype)
        if dialect.name != "sqlite":
            return standard

        def process(value: Any) -> Any:
            if not isinstance(value, str):
                return standard(value) if standard is not None else value
            try:
                return datetime.fromisoformat(value + "+00:00")
            except ValueError:  # written by hand: with a zone, or in another shape
                moment = datetime.fromisoformat(value)
            return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)

        return process


# JSON documents are `jsonb` on PostgreSQL (compact, comparable); JSON text on SQLite.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# IMAP UIDs and UIDVALIDITY are unsigned 32-bit: over PostgreSQL's signed `integer`.
ImapNumber = Integer().with_variant(BigInteger(), "postgresql")

# The outbox's working set (rows still to send): what the sender's queries look at, kept
# apart from the ever-growing sent rows. The queries repeat this condition (`OPEN_DELIVERY`)
# so that both SQLite and PostgreSQL may use the partial index.
OPEN_STATES = ("pending", "sending")


def is_open(delivery: SQLColumnExpression[str | None]) -> ColumnElement[bool]:
    """`delivery` is one of the `OPEN_STATES`, written into the SQL as constants, not bound:
    only then can SQLite (and PostgreSQL's generic plans) see that the query wants the
    rows of the partial index on those states (`ix_messages_outbox`). Bound, the planner
    cannot know, and reads the whole table."""
    states: BindParameter[tuple[str, ...]] = bindparam(
        "open_states", OPEN_STATES, expanding=True, literal_execute=True
    )
    return delivery.in_(states)


class Base(DeclarativeBase):
    pass


class Case(Base):
    __tablename__ = "cases"
    # No index on status or provider alone: a handful of values each, they only mislead
    # the planner into scanning every open case (see migration 0005).
    __table_args__ = (
        # The duplicate check asks for a client's cases in progress: with the status in the
        # index, a client's years of closed cases are not read for each escalation.
        Index("ix_cases_duplicates", "client_key", "provider", "status"),
        # `least_open` counts each member's cases in progress: by owner alone it read every
        # case the member ever had, closed ones included (migration 0010).
        Index("ix_cases_owner_status", "owner", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # open | needs_info | undeliverable | closed
    status: Mapped[str] = mapped_column(String(32))
    provider: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(128))
    priority: Mapped[str] = mapped_column(String(16))
    agent_address: Mapped[str] = mapped_column(String(320), index=True)
    agent_name: Mapped[str] = mapped_column(String(320), default="")
    client: Mapped[str] = mapped_column(String(320), default="")
    # The client normalised (case, accents, spacing): what duplicate detection compares.
    client_key: Mapped[str] = mapped_column(String(320), default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    fields: Mapped[dict[str, str]] = mapped_column(JSONDocument, default=dict)
    follow_up_due: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    vendor_ticket: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    # The due time an overdue reminder (to the agent) and its escalation (to the lead) were
    # sent for: one of each per overdue period, whatever the scheduler does.
    reminded_due: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    escalated_due: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Who on the escalation team follows the case up (team.escalation), if anyone.
    owner: Mapped[str | None] = mapped_column(String(320), nullable=True)
    # Given by the route and by the case's people (#etiqueta); the automatic ones (urgente,
    # sin-acuse, undeliverable) are not stored: they follow the case's state.
    labels: Mapped[list[str]] = mapped_column(
        JSONDocument, default=list, server_default=text("'[]'")
    )

    def tag(self, prefix: str) -> str:
        return case_tag(prefix, self.id)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_imap", "imap_mailbox", "imap_uidvalidity", "imap_uid", unique=True),
        Index(
            "ix_messages_outbox",
            "delivery",
            "next_attempt_at",
            sqlite_where=text("delivery IN ('pending', 'sending')"),
            postgresql_where=text("delivery IN ('pending', 'sending')"),
        ),
        # The repeated-text check (`repo.SqlCaseBook.repeated`): its equalities first.
        Index("ix_messages_repeats", "sender", "content_digest", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), nullable=True, index=True)
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    # in: escalation | machine | ... ; out: forward | acknowledgement | needs_info | ...
    kind: Mapped[str] = mapped_column(String(32))
    message_id: Mapped[str | None] = mapped_column(String(998), nullable=True, index=True)
    # Inbound identity independent of where the mail came from: Message-ID or content hash.
    dedupe_key: Mapped[str | None] = mapped_column(String(1024), nullable=True, unique=True)
    source: Mapped[str] = mapped_column(String(32), default="")
    imap_mailbox: Mapped[str | None] = mapped_column(String(512), nullable=True)
    imap_uidvalidity: Mapped[int | None] = mapped_column(ImapNumber, nullable=True)
    imap_uid: Mapped[int | None] = mapped_column(ImapNumber, nullable=True)
    sender: Mapped[str] = mapped_column(String(320), default="")
    recipients: Mapped[list[str]] = mapped_column(JSONDocument, default=list)
    # in: a digest of the sender's own words (`ParsedMail.content_digest`): a robot that
    # sends the same text again is not answered again.
    content_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    # in: routed | needs_info | threaded | ignored | quarantined
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # out (the outbox): pending | sending (claimed by a sender) | sent | failed | cancelled
    delivery: Mapped[str | None] = mapped_column(String(16), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(256), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    body: Mapped[MessageBody] = relationship()

    @property
    def raw(self) -> bytes:
        """The mail's bytes, exactly as received or as they go out."""
        return self.body.raw


class MessageBody(Base):
    """A message's bytes, in a table of their own: SQLite rewrites a whole row, blob
    included, on every UPDATE, and an outbox row changes state (claimed, sent) after it is
    written. Apart, those changes touch a few bytes instead of the whole mail."""

    __tablename__ = "message_bodies"

    id: Mapped[int] = mapped_column(ForeignKey("messages.id"), primary_key=True)
    # Last column: a zeroblob at a record's end is not written out (see add_message).
    raw: Mapped[bytes] = mapped_column(LargeBinary)


# The outbox's table for Core statements on the sender's hot path (no ORM bookkeeping).
CASES = cast(Table, Case.__table__)
MESSAGES = cast(Table, Message.__table__)
BODIES = cast(Table, MessageBody.__table__)


class AddressLog(Base):
    """What the router did about one address, and when: each automatic reply to it
    ("reply", counted against `loop_protection.max_replies_per_address_per_hour`), and
    each time the leads were told about it, once a day: the router stopped answering it
    ("leads_told"), or mail came in its name without proof ("leads_told_forged")."""

    __tablename__ = "address_log"
    __table_args__ = (Index("ix_address_log", "address", "kind", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320))
    kind: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")


class DigestRecord(Base):
    """A digest sent (queued) to one recipient for one scheduled period: never twice."""

    __tablename__ = "digests"
    __table_args__ = (Index("ix_digests_once", "recipient", "period", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    recipient: Mapped[str] = mapped_column(String(320))
    period: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    message_id: Mapped[str] = mapped_column(String(998))


class Rotation(Base):
    """How many turns a round robin has given (the escalation team's: "escalation"). On
    PostgreSQL the sequence `escalation_turns` counts instead: a row updated by every new
    case would make all decisions of all daemons wait for each other's commits."""

    __tablename__ = "rotations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    turns: Mapped[int] = mapped_column(BigInteger, default=0)


class ImapState(Base):
    """Per mailbox: the UIDVALIDITY we know and the highest UID whose outcome is committed."""

    __tablename__ = "imap_state"

    mailbox: Mapped[str] = mapped_column(String(512), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(ImapNumber)
    last_uid: Mapped[int] = mapped_column(ImapNumber, default=0)


class ImapClaim(Base):
    """A mail in the intake folder that one daemon has taken to process: the others leave
    it alone until `claimed_until`, then may take it over (its claimant died). Every daemon
    polls the folder; only the claimant fetches and processes the mail."""

    __tablename__ = "imap_claims"

    mailbox: Mapped[str] = mapped_column(String(512), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(ImapNumber, primary_key=True)
    uid: Mapped[int] = mapped_column(ImapNumber, primary_key=True)
    claimed_by: Mapped[str] = mapped_column(String(256))
    claimed_until: Mapped[datetime] = mapped_column(UTCDateTime)


IMAP_CLAIMS = cast(Table, ImapClaim.__table__)
IMAP_STATE = cast(Table, ImapState.__table__)
EVENTS = cast(Table, Event.__table__)
ROTATIONS = cast(Table, Rotation.__table__)
ADDRESS_LOG = cast(Table, AddressLog.__table__)
