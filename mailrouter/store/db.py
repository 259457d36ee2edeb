"""Database handle: engine, SQLite pragmas, transactions, migrations, and the store's errors.

Owns the transaction boundary (`Store.transaction`, `Store.reading`), the turn to write
an SQLite file, the turn for large mails, and schema migrations (Alembic, run on start).
Database errors leave as the store's own `Conflict` and `Unavailable`, so that the code
that retries or quarantines a mail never names SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    LargeBinary,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    true,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import (
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as DBTimeoutError
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.sql.expression import Executable

from mailrouter.model import TemporaryFailure, is_large
from mailrouter.store.tables import (
    BODIES,
    CASES,
    MESSAGES,
    Case,
    Event,
    Message,
)

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A database error, in the store's words."""


class Conflict(StoreError):
    """Another worker wrote the same thing first (a unique key): look again."""


class Unavailable(StoreError, TemporaryFailure):
    """The database is down, locked or gone: the work is not at fault; retry it later."""


class InUse(StoreError):
    """An SQLite file already has its daemon: SQLite serves one."""


# The database is down, locked or gone: the mail is not at fault, it must be retried.
_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, DBTimeoutError)


# PostgreSQL's "could not serialize", "deadlock detected" and "lock not available" (a lock
# asked for with NOWAIT, see `repo.GroupLocks`): the transaction lost a race to another and
# was rolled back; running it again sees the winner's work.
_LOST_RACE = {"40001", "40P01", "55P03"}


@contextlib.contextmanager
def _in_store_terms() -> Iterator[None]:
    try:
        yield
    except IntegrityError as exc:
        raise Conflict(str(exc.orig or exc)) from exc
    except _UNAVAILABLE as exc:
        driver_error = getattr(exc, "orig", None)
        if getattr(driver_error, "sqlstate", None) in _LOST_RACE:
            raise Conflict(str(driver_error)) from exc
        raise Unavailable(_one_line(getattr(exc, "orig", None) or exc)) from exc


def _one_line(error: object) -> str:
    """The driver's message without its continuation lines (libpq adds hints)."""
    return " ".join(str(error).split())


# PostgreSQL advisory lock keys: "mr" in the high half; the migrations' is one key, and
# the decisions' keys (`repo.SqlCaseBook._hold`) are (LOCK_KEYS, a hash of what is decided on).
LOCK_MIGRATIONS = 0x6D72_0000_0001
LOCK_KEYS = 0x6D72


MIGRATIONS_DIR = Path(__file__).parent / "migrations"


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


def on_postgresql(session: Session) -> bool:
    """Whether `session` talks to PostgreSQL (several daemons: locks, NOTIFY, one-statement
    inserts) rather than SQLite (one writer)."""
    return session.get_bind().dialect.name == "postgresql"


def add_message(
    session: Session, raw: bytes, *, wake: bool = False, row_id: int | None = None, **columns: Any
) -> int:
    """Insert a message (`columns` of the messages table) and its bytes in the session's
    transaction; return its id. `wake`: on PostgreSQL, also NOTIFY the senders (heard at
    the commit, `Store.listen`), in the same statement. `row_id`: on SQLite, the id to
    give it (`_next_message_id`)."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        # One statement for the row and its bytes: each statement costs PostgreSQL's client
        # several times what it costs SQLite's (bench/RESULTS.md, issue 21).
        statement = _message_with_body(tuple(sorted(columns)), returning=True)
        params = {**columns, "raw": raw, "wake": wake}
        return int(connection.execute(statement, params).scalar_one())
    if row_id is not None:
        columns = {**columns, "id": row_id}
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


def put_message(session: Session, raw: bytes, *, wake: bool = False, **columns: Any) -> None:
    """`add_message` for a caller that needs no id: deferred where writes are (`defer`),
    so that the mails of a decision go in one call per statement."""
    if not session.info.get(_DEFERS):
        add_message(session, raw, wake=wake, **columns)
        return
    # Every nullable column named (None unless given): then the mail in and the mails out
    # of a decision have one shape, and go in one call.
    values = {**_NULLABLE_MESSAGE_COLUMNS, **columns}
    keys = tuple(sorted(values))
    if on_postgresql(session):
        statement = _message_with_body(keys, returning=False)
        defer(session, statement, {**values, "raw": raw, "wake": wake})
        return
    row_id = _next_message_id(session)
    if is_large(len(raw)):  # its bytes go in slices, not bound in a batch
        add_message(session, raw, row_id=row_id, **columns)
        return
    row, body = _SQLITE_MESSAGES.get(keys) or _SQLITE_MESSAGES.setdefault(
        keys, (insert(MESSAGES).inline(), insert(BODIES).inline())
    )
    defer(session, row, {**values, "id": row_id})
    # A statement of the shape's own: deferred writes go statement by statement in the
    # order each was first deferred, and a body must follow its row (a foreign key).
    defer(session, body, {"id": row_id, "raw": raw})


# SQLite: the statements that write a message and its body later, for each shape of row.
_SQLITE_MESSAGES: dict[tuple[str, ...], tuple[Executable, Executable]] = {}
_NEXT_MESSAGE_ID = "mailrouter.next_message_id"
_MAX_MESSAGE_ID = select(func.coalesce(func.max(MESSAGES.c.id), 0))


def _next_message_id(session: Session) -> int:
    """The id of the transaction's next message on SQLite, given by us, not by the insert:
    then its body can be written in the same later call as the other bodies, without
    reading each row's id back one insert at a time. The transaction holds SQLite's one
    write lock from its start (`_sqlite_begin`), so nobody else adds a message meanwhile;
    every message of the transaction is numbered here (`put_message`)."""
    known = session.info.get(_NEXT_MESSAGE_ID)
    if known is None:
        known = int(session.connection().execute(_MAX_MESSAGE_ID).scalar_one()) + 1
    session.info[_NEXT_MESSAGE_ID] = known + 1
    return int(known)


# Writes deferred in a transaction (`defer`), kept in its session's `info`; `_DEFERS`
# marks the sessions that write them (Store.transaction's).
_DEFERRED = "mailrouter.deferred"
_DEFERS = "mailrouter.defers"


def defer(session: Session, statement: Executable, params: dict[str, Any]) -> None:
    """Make a write whose answer nobody waits for later in the session's transaction: just
    before its next read through the session or a `CaseBook`, or before its commit, with
    the other deferred writes of the same statement in one call (`write_deferred`).

    Each statement costs PostgreSQL's client about 0.3 ms (SQLAlchemy's execution, then
    psycopg's), SQLite's about 0.1 ms; a decision's closing writes (the mail in, the
    mails it queues, the address log, the case's events) were most of its statements.
    Only a store whose sessions call `write_deferred` defers (Store.transaction's): any
    other session makes the write at once."""
    if not session.info.get(_DEFERS):
        session.connection().execute(statement, params)
        return
    session.info.setdefault(_DEFERRED, []).append((statement, params))


def deferred(session: Session, statement: Executable) -> list[dict[str, Any]]:
    """The rows of `statement` deferred in the session's transaction and not written yet:
    a question about them is answered without writing them first (`repo.SqlCaseBook`)."""
    return [params for pending, params in session.info.get(_DEFERRED, ()) if pending is statement]


def deferred_messages(session: Session) -> list[dict[str, Any]]:
    """The message rows `put_message` deferred and not written yet, in its columns (the
    only deferred rows with a direction)."""
    return [params for _, params in session.info.get(_DEFERRED, ()) if "direction" in params]


def write_deferred(session: Session) -> None:
    """Make the session's deferred writes now: each statement once, with all its rows, in
    the order the statements were first deferred (a case's queued mails keep theirs)."""
    pending: list[tuple[Executable, dict[str, Any]]] | None = session.info.pop(_DEFERRED, None)
    if not pending:
        return
    batches: dict[int, tuple[Executable, list[dict[str, Any]]]] = {}
    for statement, params in pending:
        batches.setdefault(id(statement), (statement, []))[1].append(params)
    connection = session.connection()
    for statement, rows in batches.values():
        connection.execute(statement, rows)


def _write_deferred_first(state: ORMExecuteState) -> None:
    write_deferred(state.session)


_MESSAGES_WITH_BODIES: dict[tuple[tuple[str, ...], bool], Executable] = {}
_NULLABLE_MESSAGE_COLUMNS = {
    column.key: None
    for column in MESSAGES.columns
    if column.nullable and column.default is None and not column.primary_key
}


def _message_with_body(keys: tuple[str, ...], returning: bool) -> Executable:
    """PostgreSQL: insert a message row (the columns `keys`) and its body in one statement,
    a data-modifying WITH, joined to a pg_notify said only when the `wake` parameter is
    true (a transaction's identical notifications are delivered once): one statement
    fewer for the transaction that queues mail, and one shape for the mail in and the
    mails out. `returning`: the new id (not with a deferred executemany). Built once per
    shape."""
    statement = _MESSAGES_WITH_BODIES.get((keys, returning))
    if statement is None:
        row = (
            insert(MESSAGES)
            .values({key: bindparam(key) for key in keys})
            .returning(MESSAGES.c.id)
            .cte("row")
        )
        notify = (
            select(func.pg_notify(OUTBOX_CHANNEL, "").label("woken"))
            .where(bindparam("wake", type_=Boolean()))
            .cte("wake")
        )
        body = select(row.c.id, bindparam("raw", type_=LargeBinary())).select_from(
            row.outerjoin(notify, true())
        )
        statement = insert(BODIES).from_select(["id", "raw"], body)
        if returning:
            statement = statement.returning(BODIES.c.id)
        _MESSAGES_WITH_BODIES[keys, returning] = statement
    return statement


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


# Most cases have no labels: a digest over 100,000 open cases read 100,000 "[]", and
# json.loads spent a third of the read on them.
_EMPTY_JSON: dict[str, Callable[[], Any]] = {"[]": list, "{}": dict}


def _json_document(text: str) -> Any:
    """SQLite's JSON text as Python (PostgreSQL's jsonb is decoded by its driver)."""
    empty = _EMPTY_JSON.get(text)
    return empty() if empty is not None else json.loads(text)


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for `url`; on SQLite, a `read_only` one begins deferred transactions, which
    WAL lets run beside a writer instead of queueing behind its lock."""
    database_file = sqlite_path(url)
    if database_file is not None:
        database_file.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("postgresql"):
        # No pre-ping (a round trip per transaction): after a restart or a fail-over, the
        # first use of a dropped connection fails as `Unavailable`, which the work already
        # waits out and retries, and SQLAlchemy then replaces the whole pool.
        return create_engine(url, pool_size=5, max_overflow=10)
    engine = create_engine(url, json_deserializer=_json_document)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        if not read_only:
            event.listen(engine, "begin", _sqlite_begin)
    return engine


# The newest migration's revision (a test checks it is Alembic's head): a database already
# there is opened without importing Alembic, which would stay in the daemon's memory (12 MB).
SCHEMA_REVISION = "0010"


def schema_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None: no schema yet)."""
    with _in_store_terms(), engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    return ",".join(str(row[0]) for row in versions) or None


def schema_is_current(engine: Engine) -> bool:
    return schema_revision(engine) == SCHEMA_REVISION


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision. Daemons starting together take
    turns (SQLite's write lock; an advisory lock on PostgreSQL): the second finds the work
    done."""
    if schema_is_current(engine):
        return
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _in_store_terms(), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_MIGRATIONS})")
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


# Said by each PostgreSQL transaction that queues outgoing mail; heard at its commit by every
# daemon's `Store.listen` (identical notices of one transaction arrive as one).
OUTBOX_CHANNEL = "mailrouter_outbox"


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

    def __init__(
        self, url: str, *, run_migrations: bool = True, state_dir: Path | None = None
    ) -> None:
        """`state_dir`: this host's folder for the senders' journals when the database is
        not a local file (see `journal_dir`)."""
        self.engine = make_engine(url)
        if run_migrations:
            migrate(self.engine)
        self.postgresql = self.engine.dialect.name == "postgresql"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, info={_DEFERS: True})
        self.database_file = sqlite_path(url)
        self._write_turn: WriteTurn | None = None
        if self.engine.dialect.name == "sqlite":
            self._write_turn = WriteTurn(self.beside("-writer"))
        # Where senders journal what the relay took (deliver.journal): beside an SQLite
        # file, or in this host's state folder; none, and a kill may repeat one mail.
        self.journal_dir = self.beside("-sent") or (state_dir / "sent" if state_dir else None)
        separate = self.database_file is not None
        self._read_engine = make_engine(url, read_only=True) if separate else self.engine
        self._readers = sessionmaker(self._read_engine, expire_on_commit=False)
        event.listen(self._sessions, "do_orm_execute", _write_deferred_first)
        event.listen(self._sessions, "before_commit", write_deferred)
        # Memory, not storage: a large mail costs a few copies of itself wherever it is
        # handled (parse, render, the database driver, the relay connection), so the
        # intake and the sender take turns with large mails rather than add them up.
        self.large_mail_turn = threading.Lock()

    @contextlib.contextmanager
    def one_daemon(self) -> Iterator[None]:
        """Held by a daemon for its life. On an SQLite file, a second daemon is refused
        (its sender process and the CLI beside it are not daemons); PostgreSQL serves as
        many as are started. The kernel drops a killed daemon's `flock`."""
        path = self.beside("-daemon")
        if path is None:
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InUse(
                    f"another mailrouter daemon is running on {self.database_file}: SQLite "
                    "serves one daemon; to run several, use PostgreSQL (README: Running "
                    "several daemons)"
                ) from None
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def large_mail(self, size: int) -> Iterator[None]:
        """Hold the process's one turn for large mails while handling `size` bytes, if that
        is over `LARGE_MAIL_BYTES`."""
        with self.large_mail_turn if is_large(size) else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any exception. On SQLite
        one at a time (its one writer); on PostgreSQL side by side, the decisions meeting
        on the locks `repo.SqlCaseBook` takes (see ARCHITECTURE.md, "Several daemons")."""
        with (
            _in_store_terms(),
            self._write_turn or contextlib.nullcontext(),
            self._sessions.begin() as session,
        ):
            yield session

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only snapshot: never waits for, nor holds up, the writers."""
        with _in_store_terms(), self._readers.begin() as session:
            yield session

    @contextlib.contextmanager
    def dry_run(self) -> Iterator[Session]:
        """A snapshot that changes may be made to in memory and are never written: it never
        flushes, and is rolled back at the end (`mailrouter route --db`)."""
        with _in_store_terms(), self._readers() as session:
            session.autoflush = False
            try:
                yield session
            finally:
                session.rollback()

    def write(
        self, statement: Executable, params: dict[str, Any] | list[dict[str, Any]] | None = None
    ) -> None:
        """Run one Core statement (once per item of a list of `params`) in a transaction of
        its own: the cheapest durable write."""
        with (
            _in_store_terms(),
            self._write_turn or contextlib.nullcontext(),
            self.engine.begin() as connection,
        ):
            connection.execute(statement, params)

    def listen(
        self, stop: threading.Event, on_notice: Callable[[], None], retry_max: float = 30.0
    ) -> None:
        """Until `stop` is set, call `on_notice` whenever a transaction that queued outgoing
        mail commits, on any daemon or CLI on this PostgreSQL database (LISTEN/NOTIFY), and
        once after each (re)connection, for what was queued meanwhile. A connection of its
        own for as long as it runs (a pooler in transaction mode would break it); lost, it
        is made again with backoff. On SQLite there is nothing to hear: returns at once."""
        if not self.postgresql:
            return
        import psycopg

        args, params = self.engine.dialect.create_connect_args(self.engine.url)
        params.pop("context", None)
        delay = 0.5
        while not stop.is_set():
            try:
                with psycopg.connect(*args, autocommit=True, **params) as connection:
                    connection.execute(f"LISTEN {OUTBOX_CHANNEL}")
                    if delay > 0.5:
                        log.info("listening for new outgoing mail again")
                    delay = 0.5
                    on_notice()
                    while not stop.is_set():
                        for _ in connection.notifies(timeout=1.0, stop_after=1):
                            on_notice()
            except psycopg.Error as exc:
                if delay == 0.5:
                    log.warning(
                        "not hearing of new outgoing mail (%s); the senders poll meanwhile",
                        _one_line(exc),
                    )
                stop.wait(delay)
                delay = min(delay * 2, retry_max)

    def read_raw(self, row_id: int) -> bytes:
        """One message's bytes. On SQLite through blob I/O: a SELECT holds the value twice
        (SQLite's copy, then the driver's), this once."""
        return self.read_raw_slice(row_id, 0, -1)

    def read_raw_slice(self, row_id: int, offset: int, length: int) -> bytes:
        """`length` bytes of one message from `offset` (fewer at its end; all of them when
        `length` is negative): a large mail goes out a slice at a time, and the sender never
        holds it whole. A database that cannot answer is `Unavailable`."""
        with _in_store_terms(), self._read_engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                driver = _sqlite_driver(connection)
                try:
                    with driver.blobopen("message_bodies", "raw", row_id, readonly=True) as blob:
                        blob.seek(min(offset, len(blob)))
                        return bytes(blob.read(length))
                except sqlite3.Error as exc:  # the driver's own, not SQLAlchemy's
                    raise Unavailable(f"cannot read message {row_id}: {exc}") from exc
            # SQL counts from 1; on bytea, substr counts bytes (to the end without a count).
            count = [length] if length >= 0 else []
            query = select(func.substr(BODIES.c.raw, offset + 1, *count)).where(
                BODIES.c.id == row_id
            )
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

    # What reports and tests read; the statements are in `repo` (which imports this module,
    # hence the imports inside).

    def cases(self, limit: int = 200, **filters: Any) -> list[Case]:
        """The newest cases (see `repo.cases` for the filters)."""
        from mailrouter.store import repo

        with self.reading() as session:
            return repo.cases(session, limit, **filters)

    def case(self, case_id: int) -> tuple[Case, list[tuple[datetime, str, str]]] | None:
        """A case and its timeline (`repo.case_timeline`), or None."""
        from mailrouter.store import repo

        with self.reading() as session:
            case = session.get(Case, case_id)
            return None if case is None else (case, repo.case_timeline(session, case_id))

    def events(self, case_id: int) -> list[Event]:
        from mailrouter.store import repo

        with self.reading() as session:
            return repo.events(session, case_id)

    def outbound(self, case_id: int | None = None) -> list[Message]:
        from mailrouter.store import repo

        with self.reading() as session:
            return repo.messages(session, "out", case_id)

    def quarantined(self, limit: int, message_id: int | None = None) -> list[Message]:
        """The newest `limit` quarantined mails, oldest first, without their bytes (or the
        one numbered `message_id`, if it is quarantined)."""
        from mailrouter.store import repo

        with self.reading() as session:
            return repo.quarantined(session, limit, message_id)

    def inbound(self) -> list[Message]:
        from mailrouter.store import repo

        with self.reading() as session:
            return repo.messages(session, "in")
