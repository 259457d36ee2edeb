"""Repo: every statement of the mail path, behind `SqlCaseBook`, and the reads reports use.

`SqlCaseBook(session)` is the core's `CaseBook` over one transaction: each method is one
question or one write the decision paths need. Cases it hands out are ORM objects, live
until the transaction commits (what a handler sets on them is saved then). The hot
statements are built once, at import: composing one from ORM attributes costs more than
SQLite takes to run it, and the ORM's unit of work more again for rows that are written
and never changed in the session.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    TableValuedAlias,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy import case as sql_case
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, selectinload

from mailrouter.model import (
    LISTED_STATUSES,
    OPEN_STATUSES,
    REMINDED_STATUSES,
    SET_ASIDE,
    Arrival,
    CaseRecord,
    DigestCase,
    ImapSource,
    OutgoingMail,
    Result,
)
from mailrouter.store.db import (
    LOCK_KEYS,
    Conflict,
    defer,
    deferred,
    deferred_messages,
    on_postgresql,
    put_message,
    write_deferred,
)
from mailrouter.store.outbox import queue_mail
from mailrouter.store.tables import (
    ADDRESS_LOG,
    CASES,
    EVENTS,
    IMAP_CLAIMS,
    IMAP_STATE,
    ROTATIONS,
    AddressLog,
    Case,
    DigestRecord,
    Event,
    Message,
    MessageBody,
    is_open,
)

# Longer than a worker takes from committing a fetch batch's first mail to moving the batch.
MOVE_GRACE_SECONDS = 5.0

# What a committed inbound message tells about itself.
_OUTCOME = (Message.outcome, Message.reason, Message.case_id)

_EARLIER_BY_KEY = select(*_OUTCOME).where(Message.dedupe_key == bindparam("key")).limit(1)
_EARLIER_BY_KEY_OR_UID = (
    select(*_OUTCOME, Message.imap_mailbox, Message.imap_uidvalidity, Message.imap_uid)
    .where(
        or_(
            Message.dedupe_key == bindparam("key"),
            (Message.imap_mailbox == bindparam("box"))
            & (Message.imap_uidvalidity == bindparam("validity"))
            & (Message.imap_uid == bindparam("uid")),
        )
    )
    .limit(1)
)
# `_EARLIER_BY_KEY_OR_UID` for a group of mails of one folder: one statement, not one each.
_EARLIER_OF_GROUP = select(
    *_OUTCOME, Message.imap_mailbox, Message.imap_uidvalidity, Message.imap_uid, Message.dedupe_key
).where(
    or_(
        Message.dedupe_key.in_(bindparam("keys", expanding=True)),
        (Message.imap_mailbox == bindparam("box"))
        & (Message.imap_uidvalidity == bindparam("validity"))
        & Message.imap_uid.in_(bindparam("uids", expanding=True)),
    )
)
# Run as Core: the ORM's bulk-update path cost more than the write itself.
_ADVANCE_LAST_UID = (
    update(IMAP_STATE)
    .where(IMAP_STATE.c.mailbox == bindparam("box"))
    .values(
        uidvalidity=bindparam("validity"),
        last_uid=sql_case(
            (
                (IMAP_STATE.c.uidvalidity == bindparam("validity"))
                & (IMAP_STATE.c.last_uid > bindparam("uid")),
                IMAP_STATE.c.last_uid,
            ),
            else_=bindparam("uid"),
        ),
    )
)
_CASE_OF_MESSAGE_IDS = (
    select(Message.case_id)
    .where(Message.message_id.in_(bindparam("ids", expanding=True)), Message.case_id.is_not(None))
    .order_by(Message.id.desc())
    .limit(1)
)
_OF_CLIENT = (
    Case.provider == bindparam("provider"),
    Case.client_key == bindparam("client"),
    Case.status.in_((*OPEN_STATUSES, "needs_info")),
)
_CASES_OF_CLIENT = select(Case).where(*_OF_CLIENT).order_by(Case.id)
# Most escalations are of a client with no case in progress: a plain lookup says so in
# about half the time loading case objects takes (the ORM around the same query).
_ANY_CASE_OF_CLIENT = select(Case.id).where(*_OF_CLIENT).limit(1)
_CASES_OF_CLIENT_LOCKED = _CASES_OF_CLIENT.with_for_update(of=Case)
_CASES_OF_CLIENT_NOWAIT = _CASES_OF_CLIENT.with_for_update(of=Case, nowait=True)
_LOGGED = select(func.count(AddressLog.id)).where(
    AddressLog.address == bindparam("address"),
    AddressLog.kind == bindparam("kind"),
    AddressLog.at >= bindparam("since"),
)
# `inline`: no RETURNING of the new id, which nobody reads.
_LOG_ADDRESS = insert(AddressLog).inline()
_REPEATED = (
    select(Message.id)
    .where(
        Message.direction == "in",
        Message.sender == bindparam("sender"),
        Message.created_at >= bindparam("since"),
        Message.content_digest == bindparam("digest"),
        Message.dedupe_key != bindparam("key"),
        Message.outcome.not_in(SET_ASIDE),
    )
    .limit(1)
)
# What a decision is about, locked to the commit (see SqlCaseBook): hashtext is PostgreSQL's.
_HOLD = select(func.pg_advisory_xact_lock(LOCK_KEYS, func.hashtext(bindparam("key"))))
_HOLD_WITH_SENDER = select(
    func.pg_advisory_xact_lock(LOCK_KEYS, func.hashtext(bindparam("key"))),
    func.pg_advisory_xact_lock(LOCK_KEYS, func.hashtext(bindparam("sender"))),
)
_TRY_HOLD = select(func.pg_try_advisory_xact_lock(LOCK_KEYS, func.hashtext(bindparam("key"))))
# A group's locks (`GroupLocks`) in one statement, in the order of the locks themselves (two
# keys may share one hash): PostgreSQL computes a query's output after its ORDER BY (since
# 9.6), so the locks are taken in that order, the same in every daemon.
_HOLD_IN_ORDER = text(
    "SELECT pg_advisory_xact_lock(:space, h)"
    " FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(CAST(:keys AS text[])) AS k) AS locks"
    " ORDER BY h"
)
_INSERT_CASE = insert(CASES).returning(CASES.c.id)
_NEXT_TURN_PG = select(func.nextval("escalation_turns"))
_NEXT_TURN = (
    update(ROTATIONS)
    .where(ROTATIONS.c.name == "escalation")
    .values(turns=ROTATIONS.c.turns + 1)
    .returning(ROTATIONS.c.turns)
)
# Cases not closed, by owner (of every owner; `_OPEN_OF_OWNERS`: of those asked about).
_OPEN_BY_OWNER = (
    select(CASES.c.owner, func.count())
    .where(CASES.c.status.in_(LISTED_STATUSES), CASES.c.owner.is_not(None))
    .group_by(CASES.c.owner)
)
_OPEN_OF_OWNERS = _OPEN_BY_OWNER.where(CASES.c.owner.in_(bindparam("owners", expanding=True)))
_INSERT_EVENT = insert(EVENTS).inline()


def _address_key(address: str) -> str:
    """What an address's decisions lock (`SqlCaseBook._hold`)."""
    return f"address\x1f{address.lower()}"


class GroupLocks:
    """The locks of a group of decisions committed in one transaction on PostgreSQL
    (`Pipeline.process_group`): every one of them is held to the group's end.

    A group that waited for a lock while holding others could wait for a second group
    waiting for it in turn: a deadlock, which PostgreSQL breaks only after a second. So
    what a group knows before deciding, its senders' addresses (the lock nearly every
    decision takes), it takes first, all at once, in one order for everyone; any other lock
    a decision asks for later (a client, another address, a case's row) it takes only if it
    is free at once, and otherwise raises `Conflict`: the group is rolled back, and its
    mails are decided one at a time, waiting like any other decision."""

    def __init__(self, session: Session, senders: Sequence[str]) -> None:
        self.held = {_address_key(sender) for sender in senders}
        if self.held:
            session.connection().execute(
                _HOLD_IN_ORDER, {"space": LOCK_KEYS, "keys": sorted(self.held)}
            )


def _earlier(found: tuple[Any, ...], source: ImapSource) -> Result:
    """The outcome of an earlier message `found` (outcome, reason, case, and where it was
    in IMAP), as a duplicate; in another's hands when it was this very message."""
    outcome, reason, case_id, *where = found
    this_message = where == [source.mailbox, source.uidvalidity, source.uid]
    return replace(result_of(outcome, reason, case_id, duplicate=True), in_other_hands=this_message)


def result_of(
    outcome: str | None, reason: str | None, case_id: int | None, duplicate: bool = False
) -> Result:
    return Result(outcome or "quarantined", reason or "", case_id, duplicate)


class SqlCaseBook:
    """The `CaseBook` of one transaction: what the decision paths ask and write.

    On PostgreSQL, where several daemons decide side by side, a question whose answer a
    decision rests on first takes the lock of what it is about, held to the commit: an
    address (the replies counted to it, the text it sent before, the leads told about it),
    a client at a destination (is there a case already?), a case (its row, FOR UPDATE).
    Two mails about different people and cases go on at once; two about the same take
    turns, and the second sees what the first committed. SQLite has one writer at a time
    and needs none of it.

    `sender`: the address of the mail decided on. Its lock is taken with the first other
    lock the decision takes, in the same statement: a decision that takes a lock (an
    escalation, about its client) nearly always asks about its sender next (may it be
    answered?), and a statement costs PostgreSQL's client more than a lock held a little
    longer costs the others.

    `group`: the decision is one of a group's (see `GroupLocks`), whose locks it shares and
    which never waits for a lock after its first."""

    def __init__(
        self, session: Session, sender: str | None = None, group: GroupLocks | None = None
    ) -> None:
        self.session = session
        self._locking = on_postgresql(session)
        self._held: set[str] = group.held if group else set()
        self._wait = group is None
        self._sender = _address_key(sender) if sender else None

    def _hold(self, *about: str) -> None:
        """Take the lock of what `about` names (see the class), held to the commit."""
        self._take("\x1f".join(about))

    def _address(self, address: str) -> None:
        self._take(_address_key(address))

    def _take(self, key: str) -> None:
        if not self._locking or key in self._held:  # held to the commit: once is enough
            return
        if not self._wait:
            if not self.session.connection().execute(_TRY_HOLD, {"key": key}).scalar():
                raise Conflict("a lock the group needs is held by another decision")
            self._held.add(key)
            return
        sender = self._sender
        if sender is None or sender in self._held or sender == key:
            self.session.connection().execute(_HOLD, {"key": key})
        else:
            self.session.connection().execute(_HOLD_WITH_SENDER, {"key": key, "sender": sender})
            self._held.add(sender)
        self._held.add(key)

    def _one_case(self, query: Select[Case]) -> Case | None:
        if self._locking:
            query = query.with_for_update(of=Case, nowait=not self._wait)
        return self.session.scalars(query).first()

    def _connection(self) -> Connection:
        """The transaction's connection, for a read or a write that waits for its answer:
        the deferred writes are made first (see `db.defer`)."""
        write_deferred(self.session)
        return self.session.connection()

    def _cases(self) -> Connection:
        """The transaction's connection, for a read or a write of the cases and the turns
        alone, which are never deferred: the deferred writes wait for the next read of
        what they write, or the commit (a group's decisions make them all in one call)."""
        return self.session.connection()

    # --- this mail, seen before? ---------------------------------------------------------

    def earlier_outcome(self, key: str, source: ImapSource | None) -> Result | None:
        """The outcome committed for this mail before (same Message-ID or content, or the
        same IMAP UID), as a duplicate. This very IMAP message, committed since the intake
        looked it up, was committed by another worker: in its hands."""
        if source is None:
            by_key = self._connection().execute(_EARLIER_BY_KEY, {"key": key}).first()
            return result_of(*by_key, duplicate=True) if by_key is not None else None
        found = (
            self._connection()
            .execute(
                _EARLIER_BY_KEY_OR_UID,
                {
                    "key": key,
                    "box": source.mailbox,
                    "validity": source.uidvalidity,
                    "uid": source.uid,
                },
            )
            .first()
        )
        return None if found is None else _earlier(tuple(found), source)

    def earlier_outcomes(self, keyed: Sequence[tuple[str, ImapSource]]) -> list[Result | None]:
        """`earlier_outcome` of each of a group of IMAP mails of one folder, in one
        statement. Only for mails whose keys differ: a copy in the group is committed by
        the group itself, after this was asked."""
        box, validity = keyed[0][1].mailbox, keyed[0][1].uidvalidity
        assert all((s.mailbox, s.uidvalidity) == (box, validity) for _, s in keyed), keyed
        params = {
            "keys": [key for key, _ in keyed],
            "box": box,
            "validity": validity,
            "uids": [source.uid for _, source in keyed],
        }
        by_key: dict[str, tuple[Any, ...]] = {}
        by_uid: dict[int, tuple[Any, ...]] = {}
        for row in self._connection().execute(_EARLIER_OF_GROUP, params):
            found = tuple(row)[:6]
            by_key[row.dedupe_key] = found
            if (row.imap_mailbox, row.imap_uidvalidity) == (box, validity):
                by_uid[row.imap_uid] = found
        # This very message before a copy of it: committed by another worker, in its hands.
        return [
            _earlier(found, source) if found else None
            for key, source in keyed
            for found in [by_uid.get(source.uid) or by_key.get(key)]
        ]

    def repeated(self, address: str, digest: str, since: datetime, other_than: str) -> bool:
        """Whether `address` sent this same text (`digest`) since `since`, in a mail other
        than the one keyed `other_than` (this one), that was not kept aside."""
        self._address(address)
        sender, key = address[:320], other_than[:1024]
        # Asked of the deferred rows (the mails before this one in a group) and of the
        # table, not writing them first: then they go in one call at the commit.
        if any(
            row["direction"] == "in"
            and row["sender"] == sender
            and row["content_digest"] == digest
            and row["created_at"] >= since
            and row["dedupe_key"] != key
            and row["outcome"] not in SET_ASIDE
            for row in deferred_messages(self.session)
        ):
            return True
        params = {"sender": sender, "since": since, "digest": digest, "key": key}
        return self.session.connection().execute(_REPEATED, params).first() is not None

    def logged(self, address: str, kind: str, since: datetime) -> int:
        """How many times `kind` was logged for `address` since `since` (see AddressLog)."""
        self._address(address)
        params = {"address": address[:320], "kind": kind, "since": since}
        # The deferred rows counted apart, as in `repeated`.
        waiting = sum(
            1
            for row in deferred(self.session, _LOG_ADDRESS)
            if (row["address"], row["kind"]) == (params["address"], kind) and row["at"] >= since
        )
        return waiting + int(self.session.connection().execute(_LOGGED, params).scalar() or 0)

    def case(self, case_id: int) -> Case | None:
        if not self._locking:
            return self.session.get(Case, case_id)
        return self._one_case(select(Case).where(Case.id == case_id))

    def case_by_thread(self, message_ids: list[str]) -> Case | None:
        """The case of the newest of our stored mails among `message_ids`."""
        if not message_ids:
            return None
        case_id = self.session.scalar(_CASE_OF_MESSAGE_IDS, {"ids": message_ids})
        return self.case(case_id) if case_id is not None else None

    def case_by_ticket(self, provider: str, ticket: str) -> Case | None:
        """The newest case of `provider` that carries the vendor's ticket number `ticket`."""
        return self._one_case(
            select(Case)
            .where(Case.provider == provider, Case.vendor_ticket == ticket)
            .order_by(Case.id.desc())
            .limit(1)
        )

    def cases_of_client(self, provider: str, client_key: str) -> list[Case]:
        """The cases in progress (open or waiting for fields) of one client at one
        destination, oldest first."""
        self._hold("client", provider, client_key)  # a second escalation waits to see ours
        keys = {"provider": provider, "client": client_key}
        if self._cases().execute(_ANY_CASE_OF_CLIENT, keys).first() is None:
            return []
        query = _CASES_OF_CLIENT
        if self._locking:
            query = _CASES_OF_CLIENT_LOCKED if self._wait else _CASES_OF_CLIENT_NOWAIT
        return list(self.session.scalars(query, keys).all())

    def case_of_bounced(self, message_ids: list[str]) -> Case | None:
        """The case of the first of our mails to a vendor among `message_ids`."""
        bounced = self.session.scalars(
            select(Message).where(
                Message.direction == "out",
                Message.message_id.in_(message_ids or [""]),
                Message.kind.in_(("forward", "relay_to_vendor")),
            )
        ).first()
        if bounced is None or bounced.case_id is None:
            return None
        return self.case(bounced.case_id)

    # --- what a case holds ----------------------------------------------------------------

    def inbound_raws(self, case_id: int) -> list[bytes]:
        """The bytes of every mail the case received."""
        return list(
            self.session.scalars(
                select(MessageBody.raw)
                .join(Message, Message.id == MessageBody.id)
                .where(Message.case_id == case_id, Message.direction == "in")
            )
        )

    def has_written(self, case_id: int, address: str) -> bool:
        """Whether `address` wrote on the case (a mail of theirs was taken into it)."""
        found = self.session.scalar(
            select(Message.id)
            .where(
                Message.case_id == case_id,
                Message.direction == "in",
                Message.sender == address[:320],
                Message.outcome.not_in(SET_ASIDE),
            )
            .limit(1)
        )
        return found is not None

    def thread_ids(self, case_id: int, ours: str, theirs: str) -> list[str]:
        """Message-IDs, oldest first, of our `ours` mails and their `theirs` mails on a case."""
        ids = self.session.scalars(
            select(Message.message_id)
            .where(
                Message.case_id == case_id,
                Message.message_id.is_not(None),
                ((Message.direction == "out") & (Message.kind == ours))
                | ((Message.direction == "in") & (Message.kind == theirs)),
            )
            .order_by(Message.id)
        )
        return [i for i in ids if i]

    def forward_subject(self, case_id: int) -> str | None:
        """The subject of the case's first forward to the vendor."""
        return self.session.scalar(
            select(Message.subject)
            .where(Message.case_id == case_id, Message.kind == "forward")
            .order_by(Message.id)
            .limit(1)
        )

    def relays_of(self, case_id: int, since: datetime) -> int:
        """How many relays (either way) the case sent since `since`."""
        count = self.session.scalar(
            select(func.count(Message.id)).where(
                Message.case_id == case_id,
                Message.kind.in_(("relay_to_agent", "relay_to_vendor")),
                Message.created_at >= since,
            )
        )
        return int(count or 0)

    def last_vendor_mail(self, case_id: int) -> tuple[datetime, bytes] | None:
        """When the vendor last wrote on the case, and that mail's bytes."""
        last = self.session.scalars(
            select(Message)
            .where(Message.case_id == case_id, Message.direction == "in", Message.kind == "vendor")
            .order_by(Message.id.desc())
            .limit(1)
        ).first()
        return (last.created_at, last.raw) if last is not None else None

    # --- writes ---------------------------------------------------------------------------

    def open_case(self, case: CaseRecord) -> int:
        """Store a new case as it is now and give it its id. The record does not become
        live: set everything before (the in-memory book behaves the same way)."""
        values = {
            column.key: getattr(case, column.key)
            for column in CASES.columns
            if column.key != "id" and getattr(case, column.key) is not None
        }
        case.id = int(self._cases().execute(_INSERT_CASE, values).scalar_one())
        return case.id

    def record_inbound(
        self, arrival: Arrival, outcome: str, reason: str, kind: str, case_id: int | None
    ) -> None:
        """Store the inbound mail with its outcome (kind: escalation, agent_reply, vendor,
        machine, bounce, quarantined), on its case when it has one."""
        mail, source = arrival.mail, arrival.source
        put_message(
            self.session,
            arrival.raw,
            case_id=case_id,
            created_at=arrival.now,
            direction="in",
            kind=kind,
            message_id=mail.message_id[:998] if mail and mail.message_id else None,
            dedupe_key=arrival.key[:1024],
            source="imap" if source else "smtp",
            imap_mailbox=source.mailbox if source else None,
            imap_uidvalidity=source.uidvalidity if source else None,
            imap_uid=source.uid if source else None,
            sender=mail.from_address[:320] if mail else "",
            recipients=mail.to if mail else [],
            subject=mail.subject if mail else "",
            content_digest=mail.content_digest if mail else None,
            outcome=outcome,
            reason=reason,
            attempts=0,
        )

    def log_address(self, address: str, kind: str, at: datetime) -> None:
        self._address(address)
        defer(self.session, _LOG_ADDRESS, {"address": address[:320], "kind": kind, "at": at})

    def event(self, case_id: int, at: datetime, kind: str, detail: str) -> None:
        """One line of a case's history."""
        defer(
            self.session,
            _INSERT_EVENT,
            {"case_id": case_id, "at": at, "kind": kind, "detail": detail},
        )

    def queue(self, case_id: int | None, now: datetime, mail: OutgoingMail) -> None:
        """Put one mail in the outbox: it leaves only if this transaction commits."""
        queue_mail(self.session, case_id, now, mail)

    def cancel_pending_acks(self, case_id: int, reason: str) -> None:
        """Acknowledgements of the case not sent yet are not sent at all."""
        pending = self.session.scalars(
            select(Message).where(
                Message.case_id == case_id,
                Message.kind == "acknowledgement",
                is_open(Message.delivery),
            )
        )
        for ack in pending:
            ack.delivery, ack.last_error = "cancelled", reason
            ack.claimed_by = ack.claimed_until = None

    def next_turn(self) -> int:
        """The escalation team's next turn: on PostgreSQL a sequence, never locked (a row
        updated by each new case would make every decision of every daemon wait for the
        one before to commit); on SQLite, with its one writer, a row."""
        if self._locking:
            return int(self._cases().execute(_NEXT_TURN_PG).scalar_one())
        return int(self._cases().execute(_NEXT_TURN).scalar_one()) - 1

    def open_counts(self, owners: Sequence[str]) -> dict[str, int]:
        """How many cases in progress (not closed) each of `owners` has."""
        if not owners:
            return {}
        rows = self._cases().execute(_OPEN_OF_OWNERS, {"owners": list(owners)})
        return {owner: int(count) for owner, count in rows}

    def record_digest(self, recipient: str, period: str, now: datetime, message_id: str) -> None:
        """Note a digest as sent to `recipient` for `period`; raises (`Conflict`, at commit
        or here) when one was already."""
        self.session.add(
            DigestRecord(recipient=recipient, period=period, created_at=now, message_id=message_id)
        )
        self.session.flush()  # the unique (recipient, period) says if it was sent


class RecordingBook(SqlCaseBook):
    """A `SqlCaseBook` over `Store.dry_run` that answers from the real database and keeps
    every write as a note instead of making it: what a mail would do, done by nobody."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.opened: list[CaseRecord] = []
        self.inbound: list[tuple[str, str, str, int | None]] = []
        self.events: list[tuple[int, str, str]] = []
        self.queued: list[tuple[int | None, OutgoingMail]] = []

    def open_case(self, case: CaseRecord) -> int:
        # The number it would get if nothing else arrives first.
        case.id = int(self.session.scalar(select(func.max(Case.id))) or 0) + 1
        self.opened.append(case)
        return case.id

    def record_inbound(
        self, arrival: Arrival, outcome: str, reason: str, kind: str, case_id: int | None
    ) -> None:
        self.inbound.append((outcome, reason, kind, case_id))

    def log_address(self, address: str, kind: str, at: datetime) -> None:
        return None

    def event(self, case_id: int, at: datetime, kind: str, detail: str) -> None:
        self.events.append((case_id, kind, detail))

    def next_turn(self) -> int:
        """The turn the next case would get, the count left as it is."""
        if self._locking:
            last, called = self.session.execute(
                text("SELECT last_value, is_called FROM escalation_turns")
            ).one()
            return int(last) + 1 if called else int(last)
        return int(
            self.session.scalar(select(ROTATIONS.c.turns).where(ROTATIONS.c.name == "escalation"))
            or 0
        )

    def queue(self, case_id: int | None, now: datetime, mail: OutgoingMail) -> None:
        self.queued.append((case_id, mail))

    def cancel_pending_acks(self, case_id: int, reason: str) -> None:
        self.events.append((case_id, "acknowledgement_cancelled", reason))


# --- reads outside the mail path: the IMAP intake's check, the scheduler, reports ----------


def known_outcomes(
    session: Session, mailbox: str, uidvalidity: int, uids: list[int], now: datetime
) -> dict[int, Result]:
    """The committed outcomes of a batch of IMAP messages, looked up by their UIDs alone.
    One committed under `MOVE_GRACE_SECONDS` ago is in the hands of whoever committed it
    (that worker moves it at the end of its batch); an older one was left by a worker
    that stopped before moving it (a crash, a lost connection): ours to move."""
    if not uids:
        return {}
    rows = session.execute(
        select(Message.imap_uid, Message.created_at, *_OUTCOME).where(
            Message.imap_mailbox == mailbox,
            Message.imap_uidvalidity == uidvalidity,
            Message.imap_uid.in_(uids),
        )
    ).all()
    recent = now - timedelta(seconds=MOVE_GRACE_SECONDS)
    return {
        uid: replace(result_of(outcome, reason, case_id), in_other_hands=created > recent)
        for uid, created, outcome, reason, case_id in rows
        if uid is not None
    }


def claim_uids(
    session: Session,
    mailbox: str,
    uidvalidity: int,
    uids: list[int],
    owner: str,
    until: datetime,
    now: datetime,
    is_dead: Callable[[str], bool],
) -> list[int]:
    """Claim IMAP messages for `owner` until `until`: those nobody holds, those whose claim
    ran out, and those of a claimant that `is_dead`. Returns the UIDs now `owner`'s; the
    others are another daemon's to process."""
    if not uids:
        return []
    held = _live_claims(session, mailbox, uidvalidity, uids, now)
    taken = {uid for uid, claimant in held if claimant != owner and not is_dead(claimant)}
    wanted = [uid for uid in uids if uid not in taken]
    if not wanted:
        return []
    insert_for = postgresql_insert if on_postgresql(session) else sqlite_insert
    statement = insert_for(IMAP_CLAIMS).values(
        [
            {"mailbox": mailbox, "uidvalidity": uidvalidity, "uid": uid}
            | {"claimed_by": owner, "claimed_until": until}
            for uid in wanted
        ]
    )
    # Taken over only if it is still as we saw it (run out, or its claimant dead): another
    # daemon claiming the same mail at this moment wins or loses as a whole row.
    excluded = statement.excluded
    stale = (IMAP_CLAIMS.c.claimed_until < now) | (IMAP_CLAIMS.c.claimed_by == owner)
    dead = {claimant for _, claimant in held if claimant != owner and is_dead(claimant)}
    if dead:
        stale = stale | IMAP_CLAIMS.c.claimed_by.in_(dead)
    claiming = statement.on_conflict_do_update(
        index_elements=["mailbox", "uidvalidity", "uid"],
        set_={"claimed_by": excluded.claimed_by, "claimed_until": excluded.claimed_until},
        where=stale,
    ).returning(IMAP_CLAIMS.c.uid)
    return sorted(session.scalars(claiming))


def held_by_others(
    session: Session,
    mailbox: str,
    uidvalidity: int,
    uids: list[int],
    owner: str,
    now: datetime,
    is_dead: Callable[[str], bool],
) -> set[int]:
    """Of `uids`, those another live daemon holds a claim on (see `claim_uids`)."""
    held = _live_claims(session, mailbox, uidvalidity, uids, now)
    return {uid for uid, claimant in held if claimant != owner and not is_dead(claimant)}


def _live_claims(
    session: Session, mailbox: str, uidvalidity: int, uids: list[int], now: datetime
) -> list[tuple[int, str]]:
    """(UID, claimant) of the claims on `uids` that have not run out."""
    rows = session.execute(
        select(IMAP_CLAIMS.c.uid, IMAP_CLAIMS.c.claimed_by).where(
            IMAP_CLAIMS.c.mailbox == mailbox,
            IMAP_CLAIMS.c.uidvalidity == uidvalidity,
            IMAP_CLAIMS.c.uid.in_(uids),
            IMAP_CLAIMS.c.claimed_until >= now,
        )
    )
    return [(int(uid), str(claimant)) for uid, claimant in rows]


def _advance_last_uid(session: Session, mailbox: str, uidvalidity: int, uid: int) -> None:
    connection = session.connection()
    params = {"box": mailbox, "validity": uidvalidity, "uid": uid}
    if connection.execute(_ADVANCE_LAST_UID, params).rowcount == 0:
        connection.execute(
            insert(IMAP_STATE), {"mailbox": mailbox, "uidvalidity": uidvalidity, "last_uid": uid}
        )


def forget_address_log(session: Session, before: datetime, chunk: int) -> int:
    """Delete up to `chunk` of the address log's rows older than `before` (the oldest
    first); return how many went. A chunk at a time, one short transaction each: the
    first run on a log of years must not hold the database for long."""
    oldest = select(ADDRESS_LOG.c.id).where(ADDRESS_LOG.c.at < before)
    oldest = oldest.order_by(ADDRESS_LOG.c.id).limit(chunk)
    gone = session.connection().execute(delete(ADDRESS_LOG).where(ADDRESS_LOG.c.id.in_(oldest)))
    return int(gone.rowcount or 0)


def release_uids(
    session: Session, mailbox: str, uidvalidity: int, uids: list[int], before: datetime
) -> None:
    """Forget the claims on messages moved out of the intake folder, and any of the mailbox
    that ran out `before` (a dead daemon's, whose mails another daemon then moved); and
    record the highest of `uids` as the mailbox's last UID handled (`imap_state`, for the
    admin: once a batch, not once a mail)."""
    if uids:
        _advance_last_uid(session, mailbox, uidvalidity, max(uids))
    session.execute(
        delete(IMAP_CLAIMS).where(
            IMAP_CLAIMS.c.mailbox == mailbox,
            or_(
                (IMAP_CLAIMS.c.uidvalidity == uidvalidity) & IMAP_CLAIMS.c.uid.in_(uids),
                IMAP_CLAIMS.c.claimed_until < before,
            ),
        )
    )


def overdue_case_ids(session: Session, statuses: tuple[str, ...], now: datetime) -> list[int]:
    """Ids of the cases in `statuses` whose follow-up was due before `now`, in order."""
    # Sorted here: "ORDER BY id" makes SQLite walk every case in id order rather than
    # search the due-time index for the few overdue ones.
    return sorted(
        session.scalars(select(Case.id).where(Case.status.in_(statuses), Case.follow_up_due < now))
    )


def cases_by_id(session: Session, ids: list[int]) -> list[Case]:
    """The cases numbered `ids`; on PostgreSQL locked to the commit (FOR UPDATE), as the
    book locks a case it hands out, so that a reminder pass and a mail take turns on one."""
    query = select(Case).where(Case.id.in_(ids)).order_by(Case.id)
    if on_postgresql(session):
        query = query.with_for_update(of=Case)
    return list(session.scalars(query))


DIGEST_COLUMNS = [CASES.c[name] for name in DigestCase.__annotations__]
# A digest's row as a named tuple: reading a field of SQLAlchemy's Row goes through its
# key mapping, and sorting and counting 100,000 of them took three times as long.
_DigestRow = collections.namedtuple("_DigestRow", list(DigestCase.__annotations__))  # type: ignore[misc]


def digest_rows(connection: Connection) -> list[DigestCase]:
    """Every case a digest lists, as plain rows (a team's whole backlog is read for the
    counts: ORM objects would cost several times more)."""
    rows = connection.execute(
        select(*DIGEST_COLUMNS).where(CASES.c.status.in_(LISTED_STATUSES)).order_by(CASES.c.id)
    )
    return list(map(_DigestRow._make, rows))  # type: ignore[arg-type]


def last_digests(connection: Connection) -> dict[str, datetime]:
    """When each recipient (lower case) last got a digest: what is new to them since."""
    last: dict[str, datetime] = {}
    rows = connection.execute(
        select(DigestRecord.recipient, func.max(DigestRecord.created_at)).group_by(
            DigestRecord.recipient
        )
    )
    # Grouped by the address as written; two spellings of one address count as one.
    for recipient, sent in rows:
        key = recipient.lower()
        last[key] = max(sent, last.get(key, sent))
    return last


def cases(
    session: Session,
    limit: int,
    *,
    status: str | None = None,
    provider: str | None = None,
    agent: str | None = None,
    since: datetime | None = None,
    now: datetime | None = None,
    owner: str | None = None,
    label: str | None = None,
    ack_providers: Sequence[str] = (),
    ack_before: datetime | None = None,
) -> list[Case]:
    """The newest `limit` cases, filtered: `status` is a case status, or `open` (being
    worked on) or `overdue` (being worked on, follow-up past due at `now`); `label` a
    stored label or an automatic one (`core.team`: for `sin-acuse`, the destinations that
    send ticket numbers and the time before which a case should have had one)."""
    query = select(Case)
    if owner is not None:
        query = query.where(Case.owner == owner.lower())
    if label == "urgente":
        query = query.where(Case.priority == "URGENTE", Case.status != "closed")
    elif label == "undeliverable":
        query = query.where(Case.status == "undeliverable")
    elif label == "sin-acuse":
        query = query.where(
            Case.provider.in_(list(ack_providers)),
            Case.vendor_ticket.is_(None),
            Case.status.not_in(("needs_info", "undeliverable", "closed")),
            Case.created_at < (ack_before or datetime.min.replace(tzinfo=UTC)),
        )
    elif label is not None:
        query = query.where(_has_label(session, label))
    if status == "open":
        query = query.where(Case.status.in_(OPEN_STATUSES))
    elif status == "overdue":
        query = query.where(Case.status.in_(REMINDED_STATUSES), Case.follow_up_due < now)
    elif status is not None:
        query = query.where(Case.status == status)
    if provider is not None:
        query = query.where(Case.provider == provider)
    if agent is not None:
        query = query.where(Case.agent_address == agent.lower())
    if since is not None:
        query = query.where(Case.created_at >= since)
    return list(session.scalars(query.order_by(Case.id.desc()).limit(limit)))


def _each_label(session: Session) -> TableValuedAlias:
    """A case's stored labels as rows of `value` (a JSON array: jsonb, or SQLite's text)."""
    elements = func.jsonb_array_elements_text if on_postgresql(session) else func.json_each
    return elements(Case.labels).table_valued("value")


def _has_label(session: Session, label: str) -> ColumnElement[bool]:
    each = _each_label(session)
    return select(each.c.value).where(each.c.value == label).exists()


def open_by_label(session: Session, limit: int) -> list[tuple[str, int]]:
    """Cases not closed, by stored label: the `limit` most used labels."""
    each = _each_label(session)
    count = func.count()
    rows = session.execute(
        select(each.c.value, count)
        .select_from(CASES.join(each, true()))
        .where(CASES.c.status.in_(LISTED_STATUSES))
        .group_by(each.c.value)
        .order_by(count.desc(), each.c.value)
        .limit(limit)
    )
    return [(str(label), int(n)) for label, n in rows]


def open_by_owner(session: Session) -> list[tuple[str, int]]:
    """Cases not closed, by owner."""
    rows = session.execute(_OPEN_BY_OWNER)
    return [(str(owner), int(n)) for owner, n in rows]


def case_timeline(session: Session, case_id: int) -> list[tuple[datetime, str, str]]:
    """Everything that happened to a case, oldest first, without the mails' bytes: each
    mail in (its kind, sender, outcome), each mail out (kind, recipients, delivery), each
    event. (time, what, detail)."""
    rows: list[tuple[datetime, str, str]] = []
    mails = session.execute(
        select(
            Message.created_at,
            Message.direction,
            Message.kind,
            Message.sender,
            Message.recipients,
            Message.subject,
            Message.outcome,
            Message.delivery,
            Message.last_error,
        ).where(Message.case_id == case_id)
    )
    for at, direction, kind, sender, recipients, subject, outcome, delivery, error in mails:
        if direction == "in":
            rows.append((at, f"in: {kind}", f"from {sender}: {outcome}; {subject}"[:300]))
        else:
            result = delivery or ""
            if error and delivery != "sent":
                result += f" ({error})"
            rows.append((at, f"out: {kind}", f"to {', '.join(recipients)}: {result}"[:300]))
    for event in session.scalars(select(Event).where(Event.case_id == case_id)):
        rows.append((event.at, f"event: {event.kind}", event.detail[:300]))
    return sorted(rows, key=lambda row: row[0])


def events(session: Session, case_id: int) -> list[Event]:
    return list(session.scalars(select(Event).where(Event.case_id == case_id).order_by(Event.id)))


def messages(session: Session, direction: str, case_id: int | None = None) -> list[Message]:
    """Every message of one direction (with its bytes), oldest first."""
    query = (
        select(Message)
        .options(selectinload(Message.body))
        .where(Message.direction == direction)
        .order_by(Message.id)
    )
    if case_id is not None:
        query = query.where(Message.case_id == case_id)
    return list(session.scalars(query))


def quarantined(
    session: Session, limit: int, message_id: int | None = None, reason: str | None = None
) -> list[Message]:
    """The newest `limit` quarantined mails, oldest first, without their bytes (or the one
    numbered `message_id`, if it is quarantined); with `reason`, only those whose reason
    holds that text (ignoring case)."""
    query = select(Message).where(Message.outcome == "quarantined")
    if message_id is not None:
        query = query.where(Message.id == message_id)
    if reason:
        query = query.where(func.lower(Message.reason).contains(reason.lower(), autoescape=True))
    rows = session.scalars(query.order_by(Message.id.desc()).limit(limit))
    return list(reversed(list(rows)))


# --- working the quarantine: a lead releases, attaches or drops a mail ----------------------


def inbound_message(session: Session, message_id: int) -> Message | None:
    """The inbound message numbered `message_id`, without its bytes."""
    return session.scalar(
        select(Message).where(Message.id == message_id, Message.direction == "in")
    )


def settle_quarantined(
    session: Session, message_id: int, outcome: str, note: str, *, forget_key: bool
) -> bool:
    """Take a quarantined mail out of the quarantine: its outcome becomes `outcome` and
    `note` is added to its reason; its bytes stay. With `forget_key`, it no longer answers
    for its mail (`dedupe_key` NULL), so the same mail can be stored again. False when the
    row is not (or no longer) quarantined: someone else settled it first."""
    values: dict[str, object] = {
        "outcome": outcome,
        "reason": func.coalesce(Message.reason, "") + note,
    }
    if forget_key:
        values["dedupe_key"] = None
    done = session.connection().execute(
        update(Message)
        .where(
            Message.id == message_id,
            Message.direction == "in",
            Message.outcome == "quarantined",
        )
        .values(values)
    )
    return bool(done.rowcount == 1)


def requarantine(
    session: Session, message_id: int, outcome: str, reason: str, dedupe_key: str | None
) -> bool:
    """Undo `settle_quarantined` of a mail whose settling could not be carried through
    (its reason and key as they were), if the row still has outcome `outcome`."""
    done = session.connection().execute(
        update(Message)
        .where(Message.id == message_id, Message.outcome == outcome)
        .values(outcome="quarantined", reason=reason, dedupe_key=dedupe_key)
    )
    return bool(done.rowcount == 1)


# --- what the daemon's /metrics and /readyz read, at each scrape ----------------------------


def outbox_backlog(session: Session) -> tuple[int, datetime | None]:
    """How many outgoing mails have not left yet (pending, or being sent), and when the
    oldest of them was queued (None when there are none)."""
    count, oldest = session.execute(
        select(func.count(), func.min(Message.created_at)).where(is_open(Message.delivery))
    ).one()
    return int(count), oldest


def case_counts(session: Session, statuses: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(provider, priority, how many) of the cases in `statuses`."""
    rows = session.execute(
        select(Case.provider, Case.priority, func.count())
        .where(Case.status.in_(statuses))
        .group_by(Case.provider, Case.priority)
    ).all()
    return [(provider, priority, int(count)) for provider, priority, count in rows]


def overdue_counts(
    session: Session, statuses: tuple[str, ...], now: datetime
) -> list[tuple[str, int]]:
    """(provider, how many) of the cases in `statuses` whose follow-up was due before `now`."""
    rows = session.execute(
        select(Case.provider, func.count())
        .where(Case.status.in_(statuses), Case.follow_up_due < now)
        .group_by(Case.provider)
    ).all()
    return [(provider, int(count)) for provider, count in rows]
