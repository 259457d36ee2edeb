"""What PostgreSQL adds: its types and indexes, `mailrouter db`, migrations raced by daemons
starting together, outbox claims with SKIP LOCKED beside other senders, IMAP claims, and a
database that goes away. On the session's private cluster (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text

from mailrouter.cli import main
from mailrouter.config import load_config
from mailrouter.core.parse import normalize
from mailrouter.model import ImapSource, OutgoingMail
from mailrouter.service import Pipeline
from mailrouter.store.db import (
    LOCK_KEYS,
    SCHEMA_REVISION,
    Conflict,
    Store,
    Unavailable,
    put_message,
)
from mailrouter.store.outbox import Outbox, queue_mail
from mailrouter.store.repo import (
    _HOLD_IN_ORDER,
    GroupLocks,
    SqlCaseBook,
    claim_uids,
    release_uids,
)
from mailrouter.store.tables import IMAP_CLAIMS, Message
from mailrouter.testing.factory import reply
from mailrouter.testing.postgres import PostgresCluster
from tests.conftest import PROJECT, escalation

pytestmark = pytest.mark.postgresql_only

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


@pytest.fixture
def empty_database(postgres: PostgresCluster) -> str:
    """A database with no schema at all (not a copy of the migrated template)."""
    return postgres.new_database()


def _columns(url: str) -> dict[tuple[str, str], str]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.exec_driver_sql(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'public'"
            ).all()
            return {(table, column): kind for table, column, kind in rows}
    finally:
        engine.dispose()


def test_the_schema_uses_postgresqls_types_and_a_partial_outbox_index(empty_database: str) -> None:
    Store(empty_database).close()
    columns = _columns(empty_database)
    assert columns["cases", "follow_up_due"] == "timestamp with time zone"
    assert columns["address_log", "at"] == "timestamp with time zone"
    assert columns["messages", "recipients"] == "jsonb"
    assert columns["cases", "fields"] == "jsonb"
    assert columns["messages", "imap_uidvalidity"] == "bigint"
    assert columns["imap_claims", "uid"] == "bigint"
    engine = create_engine(empty_database)
    with engine.connect() as connection:
        (definition,) = connection.exec_driver_sql(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_messages_outbox'"
        ).one()
    engine.dispose()
    assert "WHERE" in definition and "pending" in definition and "sending" in definition


def test_times_and_big_imap_numbers_read_back_as_written(write_config: Callable[..., Path]) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    from mailrouter.model import ImapSource

    pipeline = Pipeline(config, store, lambda: NOW)
    source = ImapSource("imap://x@y/INBOX", 3_000_000_000, 4_000_000_000)
    result = pipeline.process(escalation("01-hibot-basic.eml"), source)
    assert result.outcome == "routed"
    known = pipeline.known_outcomes("imap://x@y/INBOX", 3_000_000_000, [4_000_000_000])
    assert known[4_000_000_000].case_id == result.case_id
    (case,) = store.cases()
    assert case.created_at == NOW and case.created_at.tzinfo is not None
    store.close()


def test_db_current_and_upgrade(
    empty_database: str, write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config({"database": empty_database})
    assert main(["--config", str(config), "db", "current"]) == 1
    assert f"schema none; this version's is {SCHEMA_REVISION}" in capsys.readouterr().out
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    assert main(["--config", str(config), "db", "current"]) == 0
    assert f"schema {SCHEMA_REVISION} (this version's)" in capsys.readouterr().out


def test_daemons_starting_together_migrate_once(empty_database: str) -> None:
    """Four processes upgrade one empty database at the same moment: the advisory lock makes
    them take turns, the first migrates, the others find it done."""
    script = "import sys; from mailrouter.store.db import Store; Store(sys.argv[1]).close()"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, empty_database],
            cwd=PROJECT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    engine = create_engine(empty_database)
    with engine.connect() as connection:
        versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    engine.dispose()
    assert [tuple(v) for v in versions] == [(SCHEMA_REVISION,)]


def test_a_database_that_cannot_be_reached_is_one_line(
    postgres: PostgresCluster,
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = postgres.url("no_such_database")
    config = write_config({"database": missing.replace("postgres@", "postgres:s3cret@")})
    assert main(["--config", str(config), "cases"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mailrouter: Unavailable: ") and "no_such_database" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["--config", str(config), "db", "current"]) == 1
    assert "s3cret" not in capsys.readouterr().err
    with pytest.raises(Unavailable):
        Store(missing)


def _mail(n: int) -> OutgoingMail:
    return OutgoingMail(
        "forward", f"m{n}@example.com", "router@example.com", [f"vendor{n}@example.com"],
        f"mail {n}", b"Subject: x\r\n\r\nbody\r\n",
    )  # fmt: skip


def test_senders_on_several_daemons_claim_each_row_once_and_keep_a_cases_order(
    postgres: PostgresCluster,
) -> None:
    """Three senders (three engines: three daemons) claim at once, over and over: no row is
    claimed twice, and a case's rows are never held by two senders at the same time."""
    url = postgres.new_database("mailrouter_template")
    stores = [Store(url) for _ in range(3)]
    with stores[0].transaction() as session:
        from mailrouter.store.db import add_case
        from mailrouter.store.tables import Case

        for case_number in range(40):
            case = Case(
                created_at=NOW, updated_at=NOW, status="open", provider="hibot", route="r",
                priority="MEDIA", agent_address="a@example.com",
            )  # fmt: skip
            add_case(session, case)
            for n in range(3):
                queue_mail(session, case.id, NOW, _mail(case_number * 3 + n))
    claimed: dict[int, str] = {}
    by_sender: dict[int, int] = defaultdict(int)
    holders: dict[int, set[str]] = defaultdict(set)  # case -> senders holding its rows now
    problems: list[str] = []
    guard = threading.Lock()

    def sender(number: int) -> None:
        outbox = Outbox(stores[number])
        for attempt in range(200):
            token = f"host:{number}:0:{attempt}"
            rows = outbox.claim_due(token, NOW, timedelta(minutes=5), limit=7)
            if not rows:
                if not outbox.any_claimed() and outbox.next_wakeup() is None:
                    return
                continue
            with guard:
                for row_id, case_id in rows:
                    if row_id in claimed:
                        problems.append(f"row {row_id} claimed twice")
                    claimed[row_id] = token
                    by_sender[number] += 1
                    holders[case_id or 0].add(token)
                    if len(holders[case_id or 0]) > 1:
                        problems.append(f"case {case_id} held by {holders[case_id or 0]}")
            time.sleep(0.005)  # sending; another sender may claim meanwhile, not these cases
            with guard:  # sent: the case's rows are let go (still "sending" in the database)
                for _, case_id in rows:
                    holders[case_id or 0].discard(token)
            outbox.mark_sent([(row_id, NOW) for row_id, _ in rows])

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert problems == []
    assert len(claimed) == 120
    assert len(by_sender) > 1, by_sender  # the work was shared
    for store in stores:
        store.close()


def test_an_imap_mail_is_claimed_by_one_daemon_until_its_claim_runs_out(
    postgres: PostgresCluster,
) -> None:
    store = Store(postgres.new_database("mailrouter_template"))
    box, validity = "imap://u@h/INBOX", 7

    def claim(
        owner: str, uids: list[int], now: datetime, dead: frozenset[str] = frozenset()
    ) -> list[int]:
        with store.transaction() as session:
            until = now + timedelta(seconds=60)
            return claim_uids(session, box, validity, uids, owner, until, now, dead.__contains__)

    assert claim("a:1:1", [1, 2, 3], NOW) == [1, 2, 3]
    assert claim("b:2:2", [1, 2, 3, 4], NOW) == [4]
    assert claim("a:1:1", [1, 2], NOW + timedelta(seconds=10)) == [1, 2]  # its own, renewed
    assert claim("b:2:2", [3], NOW + timedelta(seconds=61)) == [3]  # a's ran out
    assert claim("c:3:3", [1, 2], NOW + timedelta(seconds=20), dead=frozenset({"a:1:1"})) == [1, 2]

    def release(uids: list[int], before: datetime) -> list[int]:
        with store.transaction() as session:
            release_uids(session, box, validity, uids, before)
        with store.reading() as session:
            return sorted(session.execute(select(IMAP_CLAIMS.c.uid)).scalars())

    assert release([1], NOW) == [2, 3, 4]  # moved: its claim goes
    assert release([], NOW + timedelta(hours=2)) == []  # ran out long ago: pruned
    store.close()


def test_a_mail_queued_on_one_daemon_wakes_the_senders_of_the_others(
    postgres: PostgresCluster,
) -> None:
    """LISTEN/NOTIFY: the notice is heard at the commit, not before; and again after the
    listener's connection is cut (a database restart), without anyone's help."""
    url = postgres.new_database("mailrouter_template")
    queuing, listening = Store(url), Store(url)
    heard = threading.Semaphore(0)
    stop = threading.Event()
    listener = threading.Thread(target=listening.listen, args=(stop, heard.release, 1.0))
    listener.start()
    try:
        assert heard.acquire(timeout=10)  # once on connecting: whatever was queued meanwhile
        with queuing.transaction() as session:  # a mail in, none out: no notice
            put_message(session, b"x", created_at=NOW, direction="in", kind="quarantined")
        assert not heard.acquire(timeout=1)
        with queuing.transaction() as session:
            put_message(session, b"y", created_at=NOW, direction="in", kind="escalation")
            queue_mail(session, None, NOW, _mail(1))
            assert not heard.acquire(timeout=0.5)  # not committed yet
        assert heard.acquire(timeout=5)
        postgres.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        )
        assert heard.acquire(timeout=10)  # reconnected
        with queuing.transaction() as session:
            queue_mail(session, None, NOW, _mail(2))
        assert heard.acquire(timeout=5)
    finally:
        stop.set()
        listener.join(10)
        queuing.close()
        listening.close()
    assert not listener.is_alive()


def test_daemons_deciding_at_once_about_one_client_open_one_case(
    write_config: Callable[..., Path],
) -> None:
    """Four daemons take four agents' escalations of one client to one destination at the
    same moment: the client's lock makes them take turns, so one case is opened and the
    others are told it is a duplicate, as one writer would have decided."""
    config = load_config(write_config())
    pipelines = [Pipeline(config, Store(config.database_url), lambda: NOW) for _ in range(4)]
    mails = [
        reply(
            f"Agente {n} <agente{n}@example.com>",
            "Proveedor: HIBOT\nCliente: Clínica Sol\nUsuario que tiene el problema: u1\n"
            "Correo asociado al usuario: u1@cliente.example\nPrioridad: MEDIA\n"
            f"Descripción del problema: no puede ingresar ({n})\n",
            subject="Escalamiento HIBOT - Clínica Sol",
        )
        for n in range(4)
    ]
    start = threading.Barrier(4)
    results: list[str] = []

    def decide(n: int) -> None:
        start.wait()
        results.append(pipelines[n].process(mails[n]).outcome)

    threads = [threading.Thread(target=decide, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(pipelines[0].store.cases()) == 1, results
    assert sorted(results).count("routed") == 1, results
    for pipeline in pipelines:
        pipeline.store.close()


def test_writes_nobody_waits_for_go_in_one_call_each_before_a_read_or_the_commit(
    postgres: PostgresCluster,
) -> None:
    """The mails a transaction queues and the events it writes are deferred: each statement
    is then made once with all its rows (psycopg's executemany), just before the
    transaction's next read, which sees them, or before its commit. A deferred write that
    fails fails the commit, and nothing of the transaction stays."""
    url = postgres.new_database("mailrouter_template")
    store = Store(url)
    calls: list[tuple[str, bool]] = []

    def count(*args: Any) -> None:
        statement, executemany = args[2], args[5]
        calls.append((statement.split()[0], executemany))

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        with store.transaction() as session:
            for n in range(3):
                queue_mail(session, None, NOW, _mail(n))
            assert calls == []
            queued = session.scalars(select(Message.id).where(Message.direction == "out"))
            assert len(queued.all()) == 3
            assert calls == [("WITH", True), ("SELECT", False)]  # the three mails in one call
        calls.clear()
        with store.transaction() as session:
            book = SqlCaseBook(session)
            book.queue(None, NOW, _mail(3))
            book.queue(None, NOW, _mail(4))
        assert calls == [("WITH", True)]
        assert len(store.outbound()) == 5
        with pytest.raises(Conflict), store.transaction() as session:
            queue_mail(session, None, NOW, _mail(5))
            SqlCaseBook(session).event(999_999, NOW, "note", "a case that does not exist")
        assert len(store.outbound()) == 5
    finally:
        store.close()


def _lock_is_free(url: str, key: str) -> bool:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            taken = connection.execute(
                text("SELECT pg_try_advisory_xact_lock(:keys, hashtext(:key))"),
                {"keys": LOCK_KEYS, "key": key},
            ).scalar_one()
        return bool(taken)
    finally:
        engine.dispose()


def test_a_decisions_first_lock_takes_its_senders_in_the_same_statement(
    postgres: PostgresCluster,
) -> None:
    """An escalation locks its client; its sender's lock (asked for next: may the agent be
    answered?) comes with it, in one statement, and both are held to the commit."""
    url = postgres.new_database("mailrouter_template")
    store = Store(url)
    client, sender = "client\x1fhibot\x1fclinica sol", "address\x1fagente@example.com"
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        with store.transaction() as session:
            book = SqlCaseBook(session, "Agente@Example.com")
            assert book.cases_of_client("hibot", "clinica sol") == []
            assert not _lock_is_free(url, client)
            assert not _lock_is_free(url, sender)
            statements.clear()
            assert book.logged("agente@example.com", "reply", NOW - timedelta(hours=1)) == 0
            assert len(statements) == 1 and "address_log" in statements[0]
        assert _lock_is_free(url, client) and _lock_is_free(url, sender)
    finally:
        store.close()


def _holding(url: str, statement: str, params: dict[str, Any]) -> tuple[Any, Any]:
    """A transaction of another connection that holds what `statement` locks, until its
    connection is closed (returned with its engine)."""
    engine = create_engine(url)
    connection = engine.connect()
    connection.begin()
    connection.execute(text(statement), params)
    return engine, connection


def test_a_group_takes_its_senders_locks_first_and_any_other_only_if_free(
    write_config: Callable[..., Path],
) -> None:
    """A group of decisions holds its senders' locks, taken first and at once; a lock it
    asks for later that someone else holds (a client, a case's row) raises `Conflict` at
    once rather than waiting, holding the group's, for it (two groups could wait for each
    other)."""
    config = load_config(write_config())
    url = config.database_url
    store = Store(url)
    client = "client\x1fhibot\x1fclinica sol"
    engine, other = _holding(
        url,
        "SELECT pg_advisory_xact_lock(:keys, hashtext(:key))",
        {"keys": LOCK_KEYS, "key": client},
    )
    try:
        with store.transaction() as session:
            # A wait, were there one, would end in 10 s with PostgreSQL's own message.
            session.execute(text("SET LOCAL lock_timeout = '10s'"))
            group = GroupLocks(session, ["Agente@Example.com", "otra@example.com"])
            assert not _lock_is_free(url, "address\x1fagente@example.com")
            assert not _lock_is_free(url, "address\x1fotra@example.com")
            book = SqlCaseBook(session, "agente@example.com", group)
            book.logged("agente@example.com", "reply", NOW)  # its own: no statement to lock
            with pytest.raises(Conflict, match="held by another decision"):
                book.cases_of_client("hibot", "clinica sol")
        opened = Pipeline(config, store, lambda: NOW).process(escalation("01-hibot-basic.eml"))
        other.execute(
            text("SELECT id FROM cases WHERE id = :id FOR UPDATE"), {"id": opened.case_id}
        )
        with (
            pytest.raises(Conflict, match="could not obtain lock"),
            store.transaction() as session,
        ):
            session.execute(text("SET LOCAL lock_timeout = '10s'"))
            book = SqlCaseBook(session, "agente@example.com", GroupLocks(session, []))
            book.case(opened.case_id)  # type: ignore[arg-type]
    finally:
        other.close()
        engine.dispose()
        store.close()


def test_a_groups_locks_are_taken_in_the_order_of_their_hashes(postgres: PostgresCluster) -> None:
    """Two groups whose senders overlap never each hold a lock the other waits for: each
    takes its locks in one order, that of the locks (hashes), sorted before any is taken."""
    engine = create_engine(postgres.new_database("mailrouter_template"))
    try:
        with engine.begin() as connection:
            plan = [
                line
                for (line,) in connection.execute(
                    text(f"EXPLAIN (VERBOSE, COSTS OFF) {_HOLD_IN_ORDER}"),
                    {"space": LOCK_KEYS, "keys": ["b", "a", "c"]},
                )
            ]
    finally:
        engine.dispose()
    taken = [n for n, line in enumerate(plan) if "pg_advisory_xact_lock" in line]
    sorted_at = [n for n, line in enumerate(plan) if "Sort Key: (hashtext" in line]
    assert taken and sorted_at and max(taken) < min(sorted_at), plan  # the sort runs first


def test_a_group_that_meets_another_decisions_lock_is_committed_one_by_one(
    write_config: Callable[..., Path],
) -> None:
    """A group of IMAP mails is one transaction on PostgreSQL too; when another decision
    holds a lock one of its mails needs, the group gives way and its mails are committed
    each alone, the one that needs the lock waiting for it: every mail goes through."""
    config = load_config(write_config())
    pipeline = Pipeline(config, Store(config.database_url), lambda: NOW)
    commits: list[object] = []
    event.listen(pipeline.store.engine, "commit", commits.append)
    names = ("01-hibot-basic.eml", "02-panda-basic.eml", "03-operaciones-encuestas.eml")
    mails = [(escalation(name), ImapSource("INBOX", 7, uid)) for uid, name in enumerate(names)]
    try:
        assert [r.outcome for r in pipeline.process_group(mails[:2])] == ["routed"] * 2
        assert len(commits) == 1
        # Another decision about the third mail's client, under way.
        engine, other = _holding(
            config.database_url,
            "SELECT pg_advisory_xact_lock(:keys, hashtext(:key))",
            {"keys": LOCK_KEYS, "key": f"client\x1foperaciones\x1f{normalize('Compensar')}"},
        )
        threading.Timer(0.5, other.close).start()  # it ends while the third mail waits
        again = [(raw, ImapSource("INBOX", 7, uid + 10)) for uid, (raw, _) in enumerate(mails)]
        commits.clear()
        results = pipeline.process_group([again[0], mails[2]])
        engine.dispose()
        assert [(r.outcome, r.duplicate) for r in results] == [("routed", True), ("routed", False)]
        assert len(commits) == 2  # the group gave way: each alone
        assert len(pipeline.store.cases()) == 3
    finally:
        pipeline.store.close()


def test_daemons_deciding_groups_about_the_same_clients_open_one_case_each(
    write_config: Callable[..., Path],
) -> None:
    """Four daemons take groups of escalations at the same moment, each from an agent of
    its own, each about the same six clients in its own order: a group that needs a
    client another holds gives way rather than wait holding its own (which could wait
    for good), its mails are decided one by one, and each client ends with one case."""
    config = load_config(write_config())
    pipelines = [Pipeline(config, Store(config.database_url), lambda: NOW) for _ in range(4)]

    def mail(agent: int, client: int) -> bytes:
        return reply(
            f"Agente {agent} <agente{agent}@example.com>",
            f"Proveedor: HIBOT\nCliente: Cliente {client}\nUsuario que tiene el problema: u1\n"
            "Correo asociado al usuario: u1@cliente.example\nPrioridad: MEDIA\n"
            f"Descripción del problema: no puede ingresar ({agent})\n",
            subject=f"Escalamiento HIBOT - Cliente {client}",
        )

    groups = []
    for daemon in range(4):
        clients = list(range(6))[daemon:] + list(range(6))[:daemon]
        mails = [mail(daemon, client) for client in clients]
        groups.append(
            [(raw, ImapSource("INBOX", 7, 10 * daemon + n)) for n, raw in enumerate(mails)]
        )
    start = threading.Barrier(4)
    outcomes: list[list[str]] = []

    def decide(daemon: int) -> None:
        start.wait()
        results = pipelines[daemon].process_group(groups[daemon])
        outcomes.append([r.outcome for r in results])

    threads = [threading.Thread(target=decide, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        said = sorted(outcome for results in outcomes for outcome in results)
        assert said == ["routed"] * 6 + ["threaded"] * 18, outcomes  # the others attached
        cases = pipelines[0].store.cases()
        assert sorted(case.client for case in cases) == [f"Cliente {n}" for n in range(6)]
    finally:
        for pipeline in pipelines:
            pipeline.store.close()
