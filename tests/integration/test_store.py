"""The store: message bodies apart from their rows, large ones written and read in slices,
and the migration that moved the bodies of an existing database."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import JSON, Column, Integer, MetaData, Table, event, insert, select, update

from mailrouter import model
from mailrouter.model import OutgoingMail
from mailrouter.store import db as store_module
from mailrouter.store.db import MIGRATIONS_DIR, Conflict, Store, add_message, make_engine
from mailrouter.store.outbox import queue_mail
from mailrouter.store.repo import SqlCaseBook
from mailrouter.store.tables import MESSAGES, Message
from tests.conftest import PROJECT

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def _add(store: Store, raw: bytes, direction: str = "out") -> int:
    with store.transaction() as session:
        return add_message(session, raw, created_at=NOW, direction=direction, kind="forward")


@pytest.mark.parametrize("size", [0, 1, 5000, 3 * 1024 * 1024 + 7])
def test_a_body_comes_back_byte_for_byte_whatever_its_size(tmp_path: Path, size: int) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    raw = os.urandom(size)
    row_id = _add(store, raw)
    assert store.read_raw(row_id) == raw
    (stored,) = store.outbound()
    assert stored.raw == raw
    store.close()


def test_a_body_is_read_a_slice_at_a_time(database_url: str) -> None:
    """What the sender reads of a large mail while it goes out: any slice, the last one
    short, none past the end."""
    store = Store(database_url)
    raw = os.urandom(3 * 1024 * 1024 + 7)
    row_id = _add(store, raw)
    size = 1024 * 1024
    slices = [store.read_raw_slice(row_id, offset, size) for offset in range(0, len(raw), size)]
    assert [len(piece) for piece in slices] == [size, size, size, 7]
    assert b"".join(slices) == raw
    assert store.read_raw_slice(row_id, 5, 3) == raw[5:8]
    assert store.read_raw_slice(row_id, len(raw), size) == b""
    assert store.read_raw_slice(row_id, len(raw) - 9, -1) == raw[-9:]  # to the end
    store.close()


def test_a_large_body_is_written_in_slices_not_bound_whole(tmp_path: Path) -> None:
    # Bound whole, SQLite copies a value twice on its way in (27 MB for a 14 MB mail):
    # a large body is inserted as a zeroblob and its bytes written after.
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    bound: list[int] = []

    def record(
        conn: object, cursor: object, statement: str, params: Any, context: object, many: bool
    ) -> None:
        for row in params if many else [params]:
            items = row.values() if isinstance(row, dict) else row
            bound.extend(len(v) for v in items if isinstance(v, (bytes, memoryview)))

    event.listen(store.engine, "before_cursor_execute", record)
    raw = os.urandom(model.LARGE_MAIL_BYTES + 1)
    row_id = _add(store, raw)
    event.remove(store.engine, "before_cursor_execute", record)
    assert max(bound, default=0) < 1024
    assert store.read_raw(row_id) == raw
    small = b"x" * 100
    assert store.read_raw(_add(store, small)) == small
    store.close()


def test_a_transactions_mails_are_written_in_one_call_per_statement_before_a_read(
    tmp_path: Path,
) -> None:
    """On SQLite too the mails a transaction queues wait for its next read or its commit,
    then go in one call for their rows and one for their bodies; a large one goes at once,
    in slices, numbered in its turn. A deferred write that fails fails the commit."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    calls: list[tuple[str, bool]] = []
    bound: list[int] = []

    def record(*args: Any) -> None:
        statement, params, many = args[2], args[3], args[5]
        calls.append((" ".join(statement.split()[:3]), many))
        for row in params if many else [params]:
            items = row.values() if isinstance(row, dict) else row
            bound.extend(len(v) for v in items if isinstance(v, (bytes, memoryview)))

    def mail(n: int, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> OutgoingMail:
        return OutgoingMail(
            "forward", f"m{n}@example.com", "router@example.com", ["vendor@example.com"],
            f"mail {n}", data,
        )  # fmt: skip

    large = os.urandom(model.LARGE_MAIL_BYTES + 1)
    event.listen(store.engine, "before_cursor_execute", record)
    with store.transaction() as session:
        queue_mail(session, None, NOW, mail(0))
        queue_mail(session, None, NOW, mail(1))
        written_at_once = len(calls)
        queue_mail(session, None, NOW, mail(2, large))
        queue_mail(session, None, NOW, mail(3))
        assert [c for c, _ in calls[written_at_once:]] == [
            "INSERT INTO messages",
            "INSERT INTO message_bodies",
        ]  # the large one: its row, its zeroblob (then its bytes, through the blob)
        ids = session.scalars(select(Message.id).where(Message.direction == "out")).all()
        assert len(ids) == 4
    assert ("INSERT INTO messages", True) in calls
    assert ("INSERT INTO message_bodies", True) in calls
    assert max(bound) < 1024
    assert [m.subject for m in sorted(store.outbound(), key=lambda m: m.id)] == [
        f"mail {n}" for n in range(4)
    ]
    assert [store.read_raw(i) for i in sorted(ids)][2] == large
    with pytest.raises(Conflict), store.transaction() as session:
        queue_mail(session, None, NOW, mail(4))
        SqlCaseBook(session).event(999_999, NOW, "note", "a case that does not exist")
    assert len(store.outbound()) == 4
    store.close()


def test_a_state_change_of_an_outbox_row_leaves_its_body_alone(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    store = Store(f"sqlite:///{db}")
    raw = os.urandom(2 * 1024 * 1024)
    row_id = _add(store, raw)
    store.write(update(MESSAGES).where(MESSAGES.c.id == row_id).values(delivery="sent"))
    with sqlite3.connect(db) as c:
        columns = [row[1] for row in c.execute("PRAGMA table_info(messages)")]
        assert "raw" not in columns  # so an UPDATE of a row never rewrites the mail
        (size,) = c.execute(
            "SELECT length(raw) FROM message_bodies WHERE id = ?", (row_id,)
        ).fetchone()
    assert size == len(raw)
    assert store.read_raw(row_id) == raw
    store.close()


def test_upgrading_moves_each_mail_into_its_body_row(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    engine = make_engine(url)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "0005")
        bodies = [os.urandom(n) for n in (10, 2 * 1024 * 1024)]
        for index, raw in enumerate(bodies):
            connection.exec_driver_sql(
                "INSERT INTO messages (created_at, direction, kind, source, sender, recipients,"
                " subject, raw, attempts) VALUES (?, 'in', 'escalation', 'smtp', ?, '[]', '', ?,"
                " 0)",
                (NOW.replace(tzinfo=None), f"agent{index}@example.com", raw),
            )
    engine.dispose()
    store = Store(url)  # migrates to the newest revision
    assert [m.raw for m in store.inbound()] == bodies
    assert [m.sender for m in store.inbound()] == ["agent0@example.com", "agent1@example.com"]
    store.close()


def test_the_schema_revision_the_store_expects_is_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(cfg).get_current_head() == store_module.SCHEMA_REVISION


def test_a_current_database_is_opened_without_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Store(url).close()  # new: migrated
    probe = (
        "import sys; from mailrouter.store.db import Store; Store(sys.argv[1]).close(); "
        "print(any(name.split('.')[0] == 'alembic' for name in sys.modules))"
    )
    opened = subprocess.run(
        [sys.executable, "-c", probe, url], capture_output=True, text=True, check=True
    )
    assert opened.stdout.strip() == "False"
    with sqlite3.connect(tmp_path / "db.sqlite") as c:
        c.execute("UPDATE alembic_version SET version_num = '0005'")
    # Behind the head: Alembic runs 0006 again (and finds its table already there).
    with pytest.raises(Exception, match="message_bodies"):
        Store(url)


def test_times_read_back_from_sqlite_are_the_times_written(tmp_path: Path) -> None:
    from datetime import timedelta

    from sqlalchemy import select

    from mailrouter.store.tables import Case

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    moments = [
        NOW,
        NOW.replace(microsecond=0),
        NOW + timedelta(microseconds=1),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 1, 30, tzinfo=UTC).astimezone(ZoneInfo("Europe/Madrid")),
    ]
    with store.transaction() as session:
        for moment in moments:
            session.add(
                Case(
                    created_at=moment,
                    updated_at=moment,
                    status="open",
                    provider="hibot",
                    route="r",
                    priority="MEDIA",
                    agent_address="a@example.com",
                    follow_up_due=None,
                )
            )
    with store.reading() as session:
        rows = session.execute(select(Case.created_at, Case.follow_up_due).order_by(Case.id))
        read = list(rows)
    assert [created for created, _ in read] == moments
    assert all(created.tzinfo is UTC for created, _ in read)
    assert {due for _, due in read} == {None}
    # Written by hand in other shapes SQLite accepts: still read as UTC.
    with sqlite3.connect(tmp_path / "db.sqlite") as c:
        c.execute("UPDATE cases SET follow_up_due = '2026-11-23T09:00:00' WHERE id = 1")
        c.execute("UPDATE cases SET follow_up_due = '2026-11-23 10:00:00+01:00' WHERE id = 2")
    with store.reading() as session:
        dues = list(session.scalars(select(Case.follow_up_due).order_by(Case.id).limit(2)))
    assert dues == [NOW, NOW]
    store.close()


def test_the_quarantine_lists_the_newest_without_their_bytes(tmp_path: Path) -> None:
    from sqlalchemy import inspect as orm_state

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with store.transaction() as session:
        ids = [
            add_message(
                session,
                b"x" * 10,
                created_at=NOW,
                direction="in",
                kind="quarantined",
                outcome=outcome,
            )
            for outcome in ("quarantined", "routed", "quarantined", "quarantined")
        ]
    listed = store.quarantined(2)
    assert [m.id for m in listed] == [ids[2], ids[3]]  # the newest two, oldest first
    assert all("body" not in orm_state(m).dict for m in listed)  # bytes not loaded
    assert [m.id for m in store.quarantined(1, message_id=ids[0])] == [ids[0]]
    assert store.quarantined(1, message_id=ids[1]) == []
    store.close()


@pytest.mark.parametrize(
    "modules",
    [
        ("inscriptis", "lxml"),  # the HTML parser: until an HTML-only mail needs it
        ("requests",),  # until a chat or webhook target is posted to
        ("aiosmtpd",),  # until the SMTP listener is started (an IMAP daemon never does)
    ],
)
def test_the_daemon_does_not_load_what_it_may_never_use(modules: tuple[str, ...]) -> None:
    # Each weighs several MB of the daemon's memory, and of its sender process's.
    probe = (
        f"import sys, mailrouter.cli, mailrouter.daemon; print(set({modules!r}) & set(sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert loaded.stdout.strip() == "set()", loaded.stderr


_HOLD_A_WRITE = """
import sys
from mailrouter.store.db import Store
store = Store(sys.argv[1])
with store.transaction() as session:
    print("holding", flush=True)
    sys.stdin.readline()
print("done", flush=True)
"""


def _turn_is_free(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock if we got it
    return True


@pytest.mark.parametrize("ending", ["commit", "kill -9"])
def test_processes_queue_for_the_write_turn_and_a_killed_one_frees_it(
    tmp_path: Path, ending: str
) -> None:
    """Writers in different processes wait for one another in the kernel (flock on
    `<db>-writer`) rather than in SQLite's sleep-and-poll; a writer killed mid-transaction
    leaves the turn free for the next."""
    db = tmp_path / "db.sqlite"
    url = f"sqlite:///{db}"
    Store(url).close()  # migrated before the writer starts
    lock = tmp_path / "db.sqlite-writer"
    with subprocess.Popen(  # closes its pipes (and waits for it) at the end
        [sys.executable, "-c", _HOLD_A_WRITE, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT,
    ) as writer:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "holding"
        assert not _turn_is_free(lock)
        if ending == "commit":
            writer.stdin.write("go\n")
            writer.stdin.flush()
            assert writer.stdout.readline().strip() == "done"
        else:
            writer.kill()
        writer.wait(30)
    assert _turn_is_free(lock)
    # And this process writes at once after it.
    store = Store(url)
    assert store.read_raw(_add(store, b"after")) == b"after"
    store.close()


def test_two_stores_of_one_process_take_turns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first, second = Store(url), Store(url)
    with first.transaction():
        assert not _turn_is_free(tmp_path / "db.sqlite-writer")
    assert _turn_is_free(tmp_path / "db.sqlite-writer")
    assert second.read_raw(_add(second, b"x")) == b"x"
    first.close()
    second.close()


def test_json_documents_come_back_as_objects_of_their_own(tmp_path: Path) -> None:
    """SQLite's JSON text, the empty documents most cases hold ("[]" labels) included: each
    row gets its own list, so changing one changes no other."""
    engine = make_engine(f"sqlite:///{tmp_path / 'documents.sqlite'}")
    meta = MetaData()
    table = Table("t", meta, Column("id", Integer, primary_key=True), Column("doc", JSON))
    meta.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(table), [{"doc": []}, {"doc": []}, {"doc": {}}, {"doc": ["a", {"b": 1}]}]
        )
    with engine.connect() as connection:
        docs = connection.execute(select(table.c.doc).order_by(table.c.id)).scalars().all()
    assert docs == [[], [], {}, ["a", {"b": 1}]]
    assert docs[0] is not docs[1]
    engine.dispose()
