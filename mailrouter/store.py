"""Store: the database schema and the few queries the other steps share.

Owns cases, messages and the per-case event log (SQLAlchemy 2), schema
migrations (Alembic, run on start), and the transaction boundary. Outgoing
mail is a `messages` row with direction "out" and a delivery state: that
table *is* the transactional outbox, so a case change and the mails it causes
are committed together or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.sql.expression import Executable

from mailrouter.model import case_tag, is_large

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend (SQLite drops zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; pass an aware one")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None

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


class Base(DeclarativeBase):
    pass


class Case(Base):
    __tablename__ = "cases"
    # No index on status or provider alone: a handful of values each, they only mislead
    # the planner into scanning every open case (see migration 0005).
    __table_args__ = (Index("ix_cases_duplicates", "client_key", "provider"),)

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
    fields: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    follow_up_due: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)
    vendor_ticket: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    # The due time an overdue reminder (to the agent) and its escalation (to the lead) were
    # sent for: one of each per overdue period, whatever the scheduler does.
    reminded_due: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    escalated_due: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def tag(self, prefix: str) -> str:
        return case_tag(prefix, self.id)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_imap", "imap_mailbox", "imap_uidvalidity", "imap_uid", unique=True),
        Index("ix_messages_outbox", "delivery", "next_attempt_at"),
        Index("ix_messages_sender_time", "sender", "created_at"),
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
    imap_uidvalidity: Mapped[int | None] = mapped_column(Integer, nullable=True)
    imap_uid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sender: Mapped[str] = mapped_column(String(320), default="")
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
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


class ImapState(Base):
    """Per mailbox: the UIDVALIDITY we know and the highest UID whose outcome is committed."""

    __tablename__ = "imap_state"

    mailbox: Mapped[str] = mapped_column(String(512), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(Integer)
    last_uid: Mapped[int] = mapped_column(Integer, default=0)


IMAP_STATE = cast(Table, ImapState.__table__)
EVENTS = cast(Table, Event.__table__)


BLOB_SLICE_BYTES = 1024 * 1024


def _sqlite_driver(connection: Connection) -> sqlite3.Connection:
    driver = connection.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


# Built once: composing a statement costs more than running it on the mail path, and the
# ORM's unit of work costs more again (these rows are written, never changed in the session).
_INSERT_CASE = insert(CASES).returning(CASES.c.id)
_INSERT_MESSAGE = insert(MESSAGES).returning(MESSAGES.c.id)
_INSERT_BODY = insert(BODIES)
_INSERT_EVENT = insert(EVENTS)


def add_case(session: Session, case: Case) -> int:
    """Insert a new case in the session's transaction and give `case` its id. The object
    is not added to the session: a change made to it afterwards is not saved."""
    values = {
        column.key: getattr(case, column.key)
        for column in CASES.columns
        if getattr(case, column.key) is not None  # unset: the column's default
    }
    case.id = int(session.connection().execute(_INSERT_CASE, values).scalar_one())
    return case.id


def add_message(session: Session, raw: bytes, **columns: Any) -> int:
    """Insert a message (`columns` of the messages table) and its bytes in the session's
    transaction; return its id."""
    connection = session.connection()
    row_id = int(connection.execute(_INSERT_MESSAGE, columns).scalar_one())
    if connection.dialect.name == "sqlite" and is_large(len(raw)):
        # Bound whole, SQLite copies a value twice on its way into the file (the driver's
        # bind, then the record it builds): 27 MB for a 14 MB mail. Written into a zeroblob
        # a slice at a time, it is not copied whole at all.
        connection.execute(insert(BODIES).values(id=row_id, raw=func.zeroblob(len(raw))))
        view = memoryview(raw)
        with _sqlite_driver(connection).blobopen("message_bodies", "raw", row_id) as blob:
            for start in range(0, len(raw), BLOB_SLICE_BYTES):
                blob.write(view[start : start + BLOB_SLICE_BYTES])
    else:
        connection.execute(_INSERT_BODY, {"id": row_id, "raw": raw})
    return row_id


def add_event(session: Session, case_id: int, at: datetime, kind: str, detail: str) -> None:
    """One line of a case's history."""
    session.connection().execute(
        _INSERT_EVENT, {"case_id": case_id, "at": at, "kind": kind, "detail": detail}
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, say when transactions begin (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    # WAL lets the sender read while intake writes; busy_timeout rides out short locks.
    _switch_to_wal(cursor)
    # FULL: a commit is on disk before we move the mail out of INBOX or answer the SMTP
    # client 250, so even a power cut cannot lose an escalation (about 0.3 ms a commit here).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor: Any, attempts: int = 100) -> None:
    """Set WAL mode. SQLite answers "database is locked" at once, without waiting on the
    busy timeout, when another process is creating or switching the same file: two
    processes starting together (two daemons, a CLI command beside the daemon) must
    both come up, so wait that moment out. WAL is stored in the file: later opens find it."""
    for attempt in range(attempts):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05 + random.random() * 0.05)


def _sqlite_begin(connection: Any) -> None:
    # Take the write lock up front: a read transaction that later writes would fail at
    # once (SQLITE_BUSY, no waiting) when another process committed in between.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for anything else, in-memory included)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///") :])
    return None


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for `url`; on SQLite, a `read_only` one begins deferred transactions, which
    WAL lets run beside a writer instead of queueing behind its lock."""
    database_file = sqlite_path(url)
    if database_file is not None:
        database_file.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        if not read_only:
            event.listen(engine, "begin", _sqlite_begin)
    return engine


# The newest migration's revision (a test checks it is Alembic's head): a database already
# there is opened without importing Alembic, which would stay in the daemon's memory (12 MB).
SCHEMA_REVISION = "0006"


def schema_is_current(engine: Engine) -> bool:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    return [tuple(row) for row in versions] == [(SCHEMA_REVISION,)]


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    if schema_is_current(engine):
        return
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


class WriteTurn:
    """The one turn to write an SQLite file, queued for by this process's threads and, with
    `lock_path`, by every process using the file. SQLite lets one writer in at a time and
    makes the others poll with growing sleeps (1 ms, 2, 5 ... up to 100 ms each); a thread
    waiting here sleeps in the kernel instead and wakes the moment the turn is free. The
    kernel drops a dead process's `flock`, so a killed writer never leaves the turn taken.
    Re-entrant within a thread."""

    def __init__(self, lock_path: Path | None = None) -> None:
        self._threads = threading.RLock()
        self._depth = 0
        self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600) if lock_path else None

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        self._depth += 1

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """The database handle passed to every step that reads or writes state."""

    def __init__(self, url: str, *, run_migrations: bool = True) -> None:
        self.engine = make_engine(url)
        if run_migrations:
            migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.database_file = sqlite_path(url)
        self._write_turn: WriteTurn | None = None
        if self.engine.dialect.name == "sqlite":
            self._write_turn = WriteTurn(self.beside("-writer"))
        separate = self.database_file is not None
        self._read_engine = make_engine(url, read_only=True) if separate else self.engine
        self._readers = sessionmaker(self._read_engine, expire_on_commit=False)
        # Memory, not storage: a large mail costs a few copies of itself wherever it is
        # handled (parse, render, the database driver, the relay connection), so the
        # intake and the sender take turns with large mails rather than add them up.
        self.large_mail_turn = threading.Lock()

    @contextlib.contextmanager
    def large_mail(self, size: int) -> Iterator[None]:
        """Hold the process's one turn for large mails while handling `size` bytes, if that
        is over `LARGE_MAIL_BYTES`."""
        with self.large_mail_turn if is_large(size) else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any exception."""
        with self._write_turn or contextlib.nullcontext(), self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only snapshot: never waits for, nor holds up, the writers."""
        with self._readers.begin() as session:
            yield session

    def write(
        self, statement: Executable, params: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> None:
        """Run one Core statement (once per item of a list of `params`) in a transaction of
        its own: the cheapest durable write."""
        with self._write_turn or contextlib.nullcontext(), self.engine.begin() as connection:
            connection.execute(statement, params)

    def read_raw(self, row_id: int) -> bytes:
        """One message's bytes. On SQLite through blob I/O: a SELECT holds the value twice
        (SQLite's copy, then the driver's), this once."""
        with self._read_engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                driver = _sqlite_driver(connection)
                with driver.blobopen("message_bodies", "raw", row_id, readonly=True) as blob:
                    return bytes(blob.read())
            query = select(BODIES.c.raw).where(BODIES.c.id == row_id)
            return bytes(connection.execute(query).scalar_one())

    def engine_for_reading(self) -> Engine:
        """For Core reads on the hot path: connections that never wait for the writers."""
        return self._read_engine

    def beside(self, suffix: str) -> Path | None:
        """A path next to the SQLite file (`<file><suffix>`), as SQLite's own -wal and
        -shm are; None when the database is not a local file."""
        if self.database_file is None:
            return None
        return self.database_file.with_name(self.database_file.name + suffix)

    def close(self) -> None:
        self.engine.dispose()
        self._read_engine.dispose()
        if self._write_turn is not None:
            self._write_turn.close()

    def cases(self, limit: int = 200) -> list[Case]:
        with self.reading() as session:
            query = select(Case).order_by(Case.id.desc()).limit(limit)
            return list(session.scalars(query))

    def events(self, case_id: int) -> list[Event]:
        with self.reading() as session:
            query = select(Event).where(Event.case_id == case_id).order_by(Event.id)
            return list(session.scalars(query))

    def outbound(self, case_id: int | None = None) -> list[Message]:
        with self.reading() as session:
            query = (
                select(Message)
                .options(selectinload(Message.body))
                .where(Message.direction == "out")
                .order_by(Message.id)
            )
            if case_id is not None:
                query = query.where(Message.case_id == case_id)
            return list(session.scalars(query))

    def quarantined(self, limit: int, message_id: int | None = None) -> list[Message]:
        """The newest `limit` quarantined mails, oldest first, without their bytes (or the
        one numbered `message_id`, if it is quarantined)."""
        with self.reading() as session:
            query = select(Message).where(Message.outcome == "quarantined")
            if message_id is not None:
                query = query.where(Message.id == message_id)
            rows = session.scalars(query.order_by(Message.id.desc()).limit(limit))
            return list(reversed(list(rows)))

    def inbound(self) -> list[Message]:
        with self.reading() as session:
            query = (
                select(Message)
                .options(selectinload(Message.body))
                .where(Message.direction == "in")
                .order_by(Message.id)
            )
            return list(session.scalars(query))
