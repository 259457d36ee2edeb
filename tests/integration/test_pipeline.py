"""The pipeline on a real SQLite file: outcomes, the outbox, idempotency, quarantine."""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import logging
import random
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, update

from mailrouter.config import load_config
from mailrouter.core.render import _base64_lines
from mailrouter.model import ImapSource
from mailrouter.service import Followup, Pipeline
from mailrouter.store.db import Store
from mailrouter.store.outbox import Outbox
from mailrouter.store.repo import SqlCaseBook, outbox_backlog
from mailrouter.store.tables import Base, Case
from mailrouter.testing.factory import escalations
from tests.conftest import PROJECT, escalation

NOW = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)


@pytest.fixture
def pipeline(write_config: Callable[..., Path]) -> Pipeline:
    config = load_config(write_config())
    return Pipeline(config, Store(config.database_url), lambda: NOW)


def test_escalation_opens_case_and_queues_forward_and_ack(pipeline: Pipeline) -> None:
    result = pipeline.process(escalation("01-hibot-basic.eml"))
    assert result.outcome == "routed" and result.case_id == 1 and not result.duplicate
    (case,) = pipeline.store.cases()
    assert (case.provider, case.priority, case.status) == ("hibot", "ALTA", "open")
    assert case.agent_address == "laura.gomez@example.com"
    assert case.client == "Lafise Nicaragua"
    assert case.follow_up_due == NOW + timedelta(hours=24)
    forward, ack = pipeline.store.outbound(case.id)
    assert (forward.kind, forward.recipients, forward.delivery) == (
        "forward",
        ["soporte@hibot.us"],
        "pending",
    )
    assert (ack.kind, ack.recipients) == ("acknowledgement", ["laura.gomez@example.com"])
    # The Message-ID is fixed at decision time and is the one in the stored bytes.
    stored = email.message_from_bytes(forward.raw, policy=email.policy.default)
    assert stored["Message-ID"] == f"<{forward.message_id}>"
    assert stored["Subject"].startswith("[ESC-000001] ")
    ack_text = ack.raw.decode()
    assert "ESC-000001" in ack_text and "ALTA" in ack_text
    assert (
        "martes, 17 de noviembre de 2026, 2:05\u202fp.\u202fm."
        in cast(bytes, email.message_from_bytes(ack.raw).get_payload(decode=True)).decode()
    )  # due time shown in the configured time zone, in the team's language (es_CO)
    (inbound,) = pipeline.store.inbound()
    assert inbound.raw == escalation("01-hibot-basic.eml")
    assert inbound.case_id == case.id and inbound.outcome == "routed"
    assert [e.kind for e in pipeline.store.events(case.id)] == ["opened"]


def test_message_ids_are_never_folded(write_config: Callable[..., Path]) -> None:
    # A long intake domain and a long vendor id push the id headers past 78 columns; folding
    # them is legal but breaks naive threading on the other side, so they stay on one line.
    domain = "soporte-clientes.departamento-de-escalaciones.example.com"
    config = load_config(write_config({"intake": {"address": f"escalaciones@{domain}"}}))
    pipeline = Pipeline(config, Store(config.database_url), lambda: NOW)
    long_id = "<" + "x" * 90 + "@mail.example.com>"
    raw = escalation("01-hibot-basic.eml").replace(
        b"Message-ID:", b"Message-ID: " + long_id.encode() + b"\r\nX-Old-Id:", 1
    )
    pipeline.process(raw)
    (case,) = pipeline.store.cases()
    for row in pipeline.store.outbound(case.id):
        head = row.raw.split(b"\r\n\r\n", 1)[0].decode()
        lines = head.split("\r\n")
        assert f"Message-ID: <{row.message_id}>" in lines
        assert len(f"<{row.message_id}>") > 78 - len("Message-ID: ")
        if row.kind == "acknowledgement":
            assert f"In-Reply-To: {long_id}" in lines


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 300_000])
def test_forwarded_attachments_arrive_byte_for_byte(pipeline: Pipeline, size: int) -> None:
    # The forward's base64 is written outside the stdlib generator (see render._splice):
    # it must still decode to the very bytes the agent attached, in 76-column CRLF lines.
    payloads = [bytes(range(256)) * (size // 256) + bytes(size % 256), b"\x00\xff" * 40]
    msg = email.message_from_bytes(escalation("01-hibot-basic.eml"), policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    msg.make_mixed()
    for index, payload in enumerate(payloads):
        msg.add_attachment(
            payload, maintype="image", subtype="png", filename=f"pantallazo-{index}.png"
        )
    pipeline.process(msg.as_bytes())
    forward = next(r for r in pipeline.store.outbound() if r.kind == "forward")
    assert b"mailrouter-attachment-" not in forward.raw
    assert all(len(line) <= 78 for line in forward.raw.split(b"\r\n"))
    assert b"\n" not in forward.raw.replace(b"\r\n", b"")
    sent = email.message_from_bytes(forward.raw, policy=email.policy.default)
    files = {part.get_filename(): part.get_payload(decode=True) for part in sent.iter_attachments()}
    assert files == {f"pantallazo-{i}.png": payload for i, payload in enumerate(payloads)}


def test_same_mail_twice_is_processed_once(pipeline: Pipeline) -> None:
    first = pipeline.process(escalation("01-hibot-basic.eml"))
    # Same Message-ID arriving again, e.g. through IMAP after the SMTP listener.
    again = pipeline.process(
        escalation("01-hibot-basic.eml").replace(b"\n", b"\r\n"), ImapSource("imap://x", 1, 7)
    )
    assert again.duplicate and again.case_id == first.case_id
    assert len(pipeline.store.cases()) == 1
    assert len(pipeline.store.outbound()) == 2


def test_an_imap_message_another_worker_committed_is_left_for_it_to_move(
    pipeline: Pipeline,
) -> None:
    """Two daemons on one mailbox fetch the same UIDs; the one that commits a mail moves
    it. The other, finding this very message committed since it looked, leaves it alone
    (two MOVEs of one message at once can copy it twice); the same mail under another UID
    is an ordinary duplicate, which its own intake moves."""
    raw = escalation("01-hibot-basic.eml")
    source = ImapSource("imap://x", 1, 7)
    assert not pipeline.process(raw, source).in_other_hands
    same_message = pipeline.process(raw, source)
    assert same_message.duplicate and same_message.in_other_hands
    for elsewhere in (ImapSource("imap://x", 1, 8), ImapSource("imap://x", 2, 7)):
        another_copy = pipeline.process(raw, elsewhere)  # another UID, or a recreated mailbox
        assert another_copy.duplicate and not another_copy.in_other_hands
    # Looked up before processing: in other hands while fresh, then ours to move.
    (known,) = pipeline.known_outcomes("imap://x", 1, [7]).values()
    assert known.in_other_hands and known.outcome == "routed"
    later = Pipeline(pipeline.config, pipeline.store, lambda: NOW + timedelta(seconds=60))
    (stale,) = later.known_outcomes("imap://x", 1, [7]).values()
    assert not stale.in_other_hands and stale.outcome == "routed"
    assert len(pipeline.store.outbound()) == 2


def test_mail_without_message_id_dedupes_on_content(pipeline: Pipeline) -> None:
    raw = b"\n".join(
        line
        for line in escalation("02-panda-basic.eml").split(b"\n")
        if not line.startswith(b"Message-ID")
    )
    assert not pipeline.process(raw).duplicate
    assert pipeline.process(raw).duplicate
    assert len(pipeline.store.cases()) == 1


def test_missing_fields_answer_agent_and_send_nothing_to_vendor(pipeline: Pipeline) -> None:
    result = pipeline.process(escalation("06-hibot-missing-correo.eml"))
    assert result.outcome == "needs_info"
    (case,) = pipeline.store.cases()
    assert case.status == "needs_info" and case.follow_up_due is None
    (reply,) = pipeline.store.outbound()
    assert reply.recipients == ["andres.perez@example.com"]
    body = cast(bytes, email.message_from_bytes(reply.raw).get_payload(decode=True)).decode()
    assert "- Correo asociado al usuario" in body
    # The template to fill, with the gap where the missing value goes.
    assert "Correo asociado al usuario:" in [line.rstrip() for line in body.splitlines()]
    assert "Cliente: Claro" in body


@pytest.mark.parametrize(
    ("name", "outcome", "reason"),
    [
        ("09-agent-out-of-office.eml", "ignored", "Auto-Submitted: auto-replied"),
        ("10-spoofed-sender.eml", "quarantined", "not in allowed_senders"),
    ],
)
def test_no_reply_to_machines_or_strangers(
    pipeline: Pipeline, name: str, outcome: str, reason: str
) -> None:
    result = pipeline.process(escalation(name))
    assert result.outcome == outcome and reason in result.reason
    assert pipeline.store.cases() == [] and pipeline.store.outbound() == []
    (kept,) = pipeline.store.inbound()
    assert kept.raw == escalation(name) and kept.outcome == outcome


def test_poison_message_is_quarantined_with_reason(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    for source in (PROJECT / "templates").iterdir():
        (templates / source.name).write_text(source.read_text())
    (templates / "forward_hibot.j2").write_text("Subject: {{ fields.no_such_field }}\n\nx\n")
    config = load_config(write_config({"templates_dir": str(templates)}))
    pipeline = Pipeline(config, Store(config.database_url), lambda: NOW)

    bad = pipeline.process(escalation("01-hibot-basic.eml"))
    assert bad.outcome == "quarantined"
    assert "UndefinedError" in bad.reason and "no_such_field" in bad.reason
    # Nothing half-done survives the failure, and the next mail still flows.
    assert pipeline.store.cases() == [] and pipeline.store.outbound() == []
    assert pipeline.process(escalation("02-panda-basic.eml")).outcome == "routed"
    # The poison is remembered: seeing it again does not retry it forever.
    assert pipeline.process(escalation("01-hibot-basic.eml")).duplicate


def _from_imap(*names: str) -> list[tuple[bytes, ImapSource]]:
    return [(escalation(name), ImapSource("INBOX", 7, uid)) for uid, name in enumerate(names, 1)]


def test_a_group_of_mails_is_committed_in_one_transaction(pipeline: Pipeline) -> None:
    """One commit; and the writes nobody waits for (the mails in and out, the cases'
    events), one call each for the whole group, at its end."""
    commits: list[object] = []
    record = commits.append
    statements: list[str] = []

    def executed(*args: Any) -> None:
        statements.append(args[2].split("(")[0].strip())

    event.listen(pipeline.store.engine, "commit", record)
    event.listen(pipeline.store.engine, "before_cursor_execute", executed)
    mails = _from_imap("01-hibot-basic.eml", "02-panda-basic.eml", "04-tech-endoso.eml")
    results = pipeline.process_group(mails)
    event.remove(pipeline.store.engine, "before_cursor_execute", executed)
    event.remove(pipeline.store.engine, "commit", record)
    assert len(commits) == 1
    assert statements.count("INSERT INTO events") == 1, statements
    assert statements[-1] == "INSERT INTO events"  # after the last decision's reads
    operaciones = escalation("03-operaciones-encuestas.eml")
    copies = [(operaciones, ImapSource("INBOX", 7, 5)), (operaciones, ImapSource("INBOX", 7, 6))]
    results = pipeline.process_group(copies)
    assert [r.outcome for r in results] == ["routed"] * 2
    # The copy sees the first one's writes, made earlier in the same transaction.
    assert results[1].duplicate and results[1].case_id == results[0].case_id
    assert [c.provider for c in pipeline.store.cases()] == ["operaciones", "tech", "panda", "hibot"]
    kinds = [m.kind for m in pipeline.store.outbound()]
    assert len(pipeline.store.inbound()) == 4
    assert kinds.count("forward") == kinds.count("acknowledgement") == 4


def test_a_group_asks_once_whether_its_mails_were_seen_before(pipeline: Pipeline) -> None:
    """One statement says which of a group's mails were committed before: by content or
    Message-ID (a duplicate), or this very IMAP message (committed by another worker, in
    its hands; the same UID in another folder is another message). A copy of a mail of
    the group itself is asked about after the group wrote its first."""
    hibot, panda = escalation("01-hibot-basic.eml"), escalation("02-panda-basic.eml")
    tech, operaciones = escalation("04-tech-endoso.eml"), escalation("03-operaciones-encuestas.eml")
    first = pipeline.process(hibot, ImapSource("INBOX", 7, 1))
    committed = pipeline.process(operaciones, ImapSource("INBOX", 7, 5))
    archived = pipeline.process(tech, ImapSource("Archive", 7, 6))
    asked: list[str] = []

    def lookups(*args: Any) -> None:
        if args[2].startswith("SELECT") and "messages.imap_uid" in args[2]:
            asked.append(args[2])

    event.listen(pipeline.store.engine, "before_cursor_execute", lookups)
    results = pipeline.process_group(
        [
            (hibot, ImapSource("INBOX", 7, 2)),
            (operaciones, ImapSource("INBOX", 7, 5)),
            (panda, ImapSource("INBOX", 7, 6)),
            (tech, ImapSource("INBOX", 7, 8)),
            (panda, ImapSource("INBOX", 7, 7)),
        ]
    )
    event.remove(pipeline.store.engine, "before_cursor_execute", lookups)
    seen = [(r.outcome, r.case_id, r.duplicate, r.in_other_hands) for r in results]
    assert seen == [
        ("routed", first.case_id, True, False),
        ("routed", committed.case_id, True, True),
        ("routed", 4, False, False),
        ("routed", archived.case_id, True, False),
        ("routed", 4, True, False),
    ]
    assert len(asked) == 2 and " IN " in asked[0]  # the group's, then the copy's


def test_a_poison_mail_in_a_group_is_kept_aside_and_the_others_go_through(
    write_config: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(PROJECT / "templates", templates)
    (templates / "forward_panda.j2").write_text("Subject: {{ fields.no_such_field }}\n\nx\n")
    config = load_config(write_config({"templates_dir": str(templates)}))
    pipeline = Pipeline(config, Store(config.database_url), lambda: NOW)
    caplog.set_level(logging.INFO, logger="mailrouter.core.handle")
    results = pipeline.process_group(
        _from_imap("01-hibot-basic.eml", "02-panda-basic.eml", "03-operaciones-encuestas.eml")
    )
    assert [r.outcome for r in results] == ["routed", "quarantined", "routed"]
    assert "no_such_field" in results[1].reason
    # Nothing of the failed group's attempt stays: each mail is recorded once.
    assert [c.provider for c in pipeline.store.cases()] == ["operaciones", "hibot"]
    assert [m.outcome for m in pipeline.store.inbound()] == ["routed", "quarantined", "routed"]
    assert len(pipeline.store.outbound()) == 4
    # What the rolled-back attempt said is not said: each mail's line once.
    said = [r.getMessage() for r in caplog.records if r.name == "mailrouter.core.handle"]
    assert len([line for line in said if "-> hibot" in line]) == 1, said
    assert len([line for line in said if line.startswith("quarantined:")]) == 1, said


def test_oversized_mail_is_quarantined(write_config: Callable[..., Path]) -> None:
    config = load_config(write_config({"intake": {"max_message_bytes": 500}}))
    pipeline = Pipeline(config, Store(config.database_url), lambda: NOW)
    result = pipeline.process(escalation("01-hibot-basic.eml"))
    assert result.outcome == "quarantined" and "over the 500-byte limit" in result.reason


def test_unparseable_bytes_are_kept(pipeline: Pipeline) -> None:
    raw = b"\xff\xfe\x00garbage without headers\x00\r\n\r\n\xff"
    result = pipeline.process(raw)
    assert result.outcome in {"quarantined", "ignored"}
    (kept,) = pipeline.store.inbound()
    assert kept.raw == raw


def test_database_failure_is_retried_not_quarantined(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from mailrouter.store.db import Unavailable

    def locked(*args: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr("mailrouter.core.handle.decide", locked)
    with pytest.raises(Unavailable):  # the store's word for it
        pipeline.process(escalation("01-hibot-basic.eml"))
    assert pipeline.store.inbound() == []  # nothing recorded: the next try starts afresh
    monkeypatch.undo()
    assert pipeline.process(escalation("01-hibot-basic.eml")).outcome == "routed"


def test_reads_do_not_wait_for_a_writer(pipeline: Pipeline) -> None:
    # The sender reads the outbox while intake holds the write lock; it sees the last
    # committed state instead of queueing behind the writer.
    import threading

    pipeline.process(escalation("01-hibot-basic.eml"))
    writing, read_done = threading.Event(), threading.Event()

    def writer() -> None:
        with pipeline.store.transaction() as session:
            session.execute(update(Case).values(priority="BAJA"))
            writing.set()
            read_done.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    assert writing.wait(10)
    (case,) = pipeline.store.cases()  # a reading() session
    read_done.set()
    thread.join()
    assert case.priority == "ALTA"  # the committed value, not the writer's pending one
    assert pipeline.store.cases()[0].priority == "BAJA"


def test_schema_from_migrations_is_the_models_schema(pipeline: Pipeline) -> None:
    with pipeline.store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert compare_metadata(context, Base.metadata) == []


# SQLite's plans: PostgreSQL's planner scans a small table by choice, whatever the indexes.
@pytest.mark.sqlite_only
def test_mail_path_lookups_use_an_index_not_a_scan(
    pipeline: Pipeline, write_config: Callable[..., Path]
) -> None:
    # With 100,000 cases a scan costs more than the rest of the mail's handling: every
    # lookup the mail path and the reminder pass make must search an index.
    statements: list[tuple[str, Any]] = []
    engines = {pipeline.store.engine, pipeline.store.engine_for_reading()}

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, params))

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    for _, raw in escalations(8, seed=4):
        pipeline.process(raw)
    duplicate = escalation("08-hibot-duplicate.eml")
    pipeline.process(escalation("01-hibot-basic.eml"))
    pipeline.process(duplicate)
    Followup(pipeline.config, pipeline.store, lambda: NOW + timedelta(days=30)).remind()
    # The sender's claims (the rows due, none of a case with an earlier one held back),
    # the release of stale claims, and the backlog /metrics reads: the outbox's index.
    outbox = Outbox(pipeline.store)
    claimed, _ = outbox.claim_and_read("bench", NOW + timedelta(days=30), timedelta(minutes=5))
    assert claimed
    outbox.release_stale(NOW + timedelta(days=31), lambda owner: False, lambda owners: set())
    with pipeline.store.reading() as session:
        assert outbox_backlog(session)[0] > 0
    for engine in engines:
        event.remove(engine, "before_cursor_execute", record)
    assert any("cases.client_key" in sql for sql, _ in statements)
    assert any("earlier.case_id" in sql for sql, _ in statements)
    assert any("messages.content_digest =" in sql for sql, _ in statements)
    with pipeline.store.engine.connect() as connection:
        raw_connection = connection.connection.driver_connection
        assert raw_connection is not None
        for sql, params in statements:
            plan = raw_connection.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
            steps = [str(row[3]) for row in plan]
            assert not [s for s in steps if s.startswith("SCAN ")], f"{sql}\n{steps}"
            if "cases.client_key =" in sql:  # not the few-valued provider or status alone,
                # nor every case the client ever had there
                assert any(
                    "ix_cases_duplicates (client_key=? AND provider=? AND status=?)" in s
                    for s in steps
                ), f"{sql}\n{steps}"
            if "messages.delivery IN" in sql:  # the few rows still to send, not all mail
                assert any("ix_messages_outbox" in s for s in steps), f"{sql}\n{steps}"
            if "messages.content_digest =" in sql:  # not every mail of the sender's day
                assert any(
                    "ix_messages_repeats (sender=? AND content_digest=?" in s for s in steps
                ), f"{sql}\n{steps}"


@pytest.mark.sqlite_only
def test_least_open_counts_a_members_cases_in_progress_not_their_history(
    pipeline: Pipeline,
) -> None:
    # Over a year a member owns thousands of closed cases; each new case counts the open ones.
    for _, raw in escalations(6, seed=5):
        pipeline.process(raw)
    with pipeline.store.transaction() as session:
        session.execute(update(Case).values(owner="ana@example.com"))
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        statements.append((statement, params))

    event.listen(pipeline.store.engine, "before_cursor_execute", record)
    with pipeline.store.transaction() as session:
        counts = SqlCaseBook(session).open_counts(["ana@example.com", "luis@example.com"])
    event.remove(pipeline.store.engine, "before_cursor_execute", record)
    assert counts == {"ana@example.com": 6}
    [(sql, params)] = [(sql, p) for sql, p in statements if "cases.owner" in sql]
    with pipeline.store.engine.connect() as connection:
        raw_connection = connection.connection.driver_connection
        assert raw_connection is not None
        plan = raw_connection.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    steps = [str(row[3]) for row in plan]
    assert any("ix_cases_owner_status (owner=? AND status=?)" in s for s in steps), steps


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 57 * 1024 - 1, 57 * 1024, 57 * 1024 + 1, 10**6])
def test_attachments_are_encoded_in_slices_exactly_as_whole(size: int) -> None:
    """A forwarded attachment is base64-encoded a slice at a time (memory); the lines must
    be those of encoding it whole, with CRLF, as the generator would have written them."""
    payload = random.Random(size).randbytes(size)
    whole = base64.encodebytes(payload).replace(b"\n", b"\r\n")[:-2]
    assert b"".join(_base64_lines(payload)) == whole


def test_a_mail_over_its_deadline_is_quarantined_and_the_next_goes_on(
    write_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(write_config())
    # The stopwatch jumps 100 s while the first mail is read; then time stands still.
    ticks = itertools.chain([0.0, 100.0], itertools.repeat(100.0))
    pipeline = Pipeline(config, Store(config.database_url), lambda: NOW, lambda: next(ticks))
    first = pipeline.process(escalation("01-hibot-basic.eml"))
    assert first.outcome == "quarantined"
    assert first.reason.startswith("reading the mail took over 30 s (stopped at MIME")
    assert pipeline.process(escalation("02-panda-basic.eml")).outcome == "routed"
    (kept,) = [m for m in pipeline.store.inbound() if m.outcome == "quarantined"]
    assert kept.raw == escalation("01-hibot-basic.eml")
    assert not [r for r in caplog.records if r.exc_info]


def test_a_mail_our_code_cannot_parse_is_quarantined_without_a_traceback(
    pipeline: Pipeline, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(raw: bytes) -> None:
        raise LookupError("a bug of ours, on this mail")

    monkeypatch.setattr(pipeline, "parse", broken)
    result = pipeline.process(escalation("01-hibot-basic.eml"))
    assert result.outcome == "quarantined"
    assert result.reason.startswith("parse error: LookupError: a bug of ours")
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]
