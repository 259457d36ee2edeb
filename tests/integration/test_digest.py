"""Reminders, lead escalation, URGENTE alerts and digests, with an injected clock."""

from __future__ import annotations

import email
import email.policy
import gc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailrouter.cli import main
from mailrouter.config import load_config
from mailrouter.core.digests import build_digests
from mailrouter.deliver.sender import Sender
from mailrouter.deliver.transports import SmtpTransport
from mailrouter.service import Followup, Pipeline, paused_gc
from mailrouter.store.db import Store
from mailrouter.store.tables import Message
from mailrouter.testing.factory import escalations
from mailrouter.testing.servers import RecordingRelay, wait_until
from tests.conftest import DaemonThread, deliver_due, escalation

LEAD = "lider.soporte@example.com"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)  # Monday 14:05 in Bogotá

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def setup(write_config: Callable[..., Path], clock: Clock) -> tuple[Pipeline, Followup]:
    config = load_config(write_config())
    store = Store(config.database_url)
    return Pipeline(config, store, clock), Followup(config, store, clock)


def sent(store: Store, kind: str) -> list[Message]:
    return [m for m in store.outbound() if m.kind == kind]


def text_of(message: Message) -> str:
    parsed = email.message_from_bytes(message.raw, policy=email.policy.default)
    part = parsed.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def test_overdue_reminder_once_then_lead_after_second_window(
    setup: tuple[Pipeline, Followup], clock: Clock
) -> None:
    pipeline, followup = setup
    pipeline.process(escalation("01-hibot-basic.eml"))  # ALTA: 24 h
    clock.now += timedelta(hours=23)
    assert followup.remind() == 0
    clock.now += timedelta(hours=2)
    assert followup.remind() == 1
    assert followup.remind() == 0  # one reminder per overdue period, never a flood
    (reminder,) = sent(pipeline.store, "reminder")
    assert reminder.recipients == ["laura.gomez@example.com"]
    body = text_of(reminder)
    assert "ESC-000001" in body and "#seguimiento" in body and "1 d 1 h" in body
    clock.now += timedelta(hours=24)  # a second window overdue: the lead hears of it
    assert followup.remind() == 1
    assert followup.remind() == 0
    (escalated,) = sent(pipeline.store, "reminder_lead")
    assert escalated.recipients == [LEAD]


def test_follow_up_moves_due_and_starts_a_new_period(
    setup: tuple[Pipeline, Followup], clock: Clock
) -> None:
    pipeline, followup = setup
    pipeline.process(escalation("01-hibot-basic.eml"))
    clock.now += timedelta(hours=25)
    followup.remind()
    (ack,) = sent(pipeline.store, "acknowledgement")
    note = (
        "From: laura.gomez@example.com\r\nTo: escalaciones@example.com\r\n"
        f"Subject: Re: x\r\nMessage-ID: <f1@example.com>\r\nIn-Reply-To: <{ack.message_id}>\r\n"
        "\r\n#seguimiento llamé al cliente, esperamos respuesta el jueves\r\n"
    ).encode()
    pipeline.process(note)
    (case,) = pipeline.store.cases()
    assert case.follow_up_due == clock.now + timedelta(hours=24)
    assert sent(pipeline.store, "relay_to_vendor") == []  # a follow-up note is not relayed
    assert "follow_up" in [e.kind for e in pipeline.store.events(case.id)]
    clock.now += timedelta(hours=25)
    assert followup.remind() == 1  # the new period's reminder
    assert len(sent(pipeline.store, "reminder")) == 2


def test_closed_cases_are_never_reminded(setup: tuple[Pipeline, Followup], clock: Clock) -> None:
    pipeline, followup = setup
    pipeline.process(escalation("01-hibot-basic.eml"))
    (ack,) = sent(pipeline.store, "acknowledgement")
    pipeline.process(
        "From: laura.gomez@example.com\r\nSubject: Re\r\nMessage-ID: <c1@example.com>\r\n"
        f"In-Reply-To: <{ack.message_id}>\r\n\r\n#resuelto\r\n".encode()
    )
    clock.now += timedelta(days=10)
    assert followup.remind() == 0


def test_urgente_alerts_the_lead_at_open(setup: tuple[Pipeline, Followup]) -> None:
    pipeline, _ = setup
    pipeline.process(escalation("04-tech-endoso.eml"))
    (alert,) = sent(pipeline.store, "urgent_alert")
    assert alert.recipients == [LEAD]
    assert "URGENTE" in alert.subject and "Juan Salas" in alert.subject


def test_digests_list_overdue_first_and_flag_missing_vendor_ack(
    setup: tuple[Pipeline, Followup], clock: Clock
) -> None:
    pipeline, followup = setup
    for name in ("01-hibot-basic.eml", "02-panda-basic.eml", "04-tech-endoso.eml"):
        pipeline.process(escalation(name))
    clock.now += timedelta(hours=30)  # 04 (4 h) and 01 (24 h) overdue; 02 (48 h) not
    digests = {d.recipient: d for d in followup.digests_now()}
    lead = digests[LEAD]
    assert lead.subject == "Escalaciones: 2 vencidas, 3 abiertas"
    # By urgency across destinations: the URGENTE 04 before the ALTA 01; 02 is due Wednesday.
    assert [(g.name, [x.tag for x in g.lines]) for g in lead.groups] == [
        ("Vencidas", ["ESC-000003", "ESC-000001"]),
        ("Más adelante", ["ESC-000002"]),
    ]
    assert {(p.name, p.open, p.overdue) for p in lead.providers} == {
        ("HIBOT", 1, 1),
        ("PANDA", 1, 0),
        ("Tech", 1, 1),
    }
    laura = digests["laura.gomez@example.com"]
    (line,) = laura.groups[0].lines
    assert line.overdue and line.no_vendor_ack  # HIBOT opens tickets and sent none in 2 h
    andres = [x for group in digests["andres.perez@example.com"].groups for x in group.lines]
    assert [x.tag for x in andres] == ["ESC-000003", "ESC-000002"]  # overdue 04 first
    assert not andres[1].no_vendor_ack  # Panda never sends tickets


def test_no_digest_without_cases(setup: tuple[Pipeline, Followup]) -> None:
    _, followup = setup
    assert followup.digests_now() == []
    assert build_digests([], followup.config, followup.clock()) == []


def test_digest_sent_once_per_period_across_restart(
    write_config: Callable[..., Path], clock: Clock
) -> None:
    config = load_config(write_config({"digest": {"schedule": "0 8 * * mon-fri"}}))
    Pipeline(config, Store(config.database_url), clock).process(escalation("01-hibot-basic.eml"))
    clock.now = datetime(2026, 11, 17, 13, 30, tzinfo=UTC)  # Tuesday 08:30 in Bogotá
    first = Followup(config, Store(config.database_url), clock).scheduled_digests()
    assert sorted(first.queued) == sorted([LEAD, "laura.gomez@example.com"])
    # The daemon restarts (new store, new scheduler) and catches up on the same run.
    again = Followup(config, Store(config.database_url), clock).scheduled_digests()
    assert again.queued == [] and sorted(again.already_sent) == sorted(first.queued)
    assert len(sent(Store(config.database_url), "digest")) == 2
    clock.now += timedelta(days=2)  # Thursday 08:30: a new period, new digests
    Pipeline(config, Store(config.database_url), clock).process(escalation("02-panda-basic.eml"))
    followup = Followup(config, Store(config.database_url), clock)
    # New to each recipient: what was opened since their last digest (Tuesday's).
    news = {d.recipient: (d.new, d.open, bool(d.since)) for d in followup.digests_now()}
    assert news == {
        LEAD: (1, 2, True),
        "laura.gomez@example.com": (0, 1, True),
        "andres.perez@example.com": (1, 1, False),  # his first digest: all of it is new
    }
    assert len(followup.scheduled_digests().queued) == 3


def test_digest_end_to_end_to_the_relay(
    write_config: Callable[..., Path], relay: RecordingRelay, clock: Clock
) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, clock)
    for name in ("01-hibot-basic.eml", "02-panda-basic.eml", "04-tech-endoso.eml"):
        pipeline.process(escalation(name))
    clock.now += timedelta(hours=30)
    Followup(config, store, clock).queue_digests("test")
    settings = config.settings.outbound.smtp.model_copy(
        update={"host": relay.host, "port": relay.port, "security": "none"}
    )
    sender = Sender(store, SmtpTransport(settings), config.settings.outbound.retry, clock)
    deliver_due(sender)
    (lead_mail,) = relay.to(LEAD)[-1:]
    msg = email.message_from_bytes(lead_mail.data, policy=email.policy.default)
    assert msg["Subject"] == "Escalaciones: 2 vencidas, 3 abiertas"
    assert msg.get_content_type() == "multipart/alternative"
    html = str(msg.get_body(preferencelist=("html",)).get_content())  # type: ignore[union-attr]
    text = str(msg.get_body(preferencelist=("plain",)).get_content())  # type: ignore[union-attr]
    assert "ESC-000001" in text and "ESC-000001" in html
    assert 'style="' in html and "<style" not in html  # inline CSS only
    # Within Tech and HIBOT the overdue cases come first; in the agent's digest, 04 first.
    andres = email.message_from_bytes(
        relay.to("andres.perez@example.com")[-1].data, policy=email.policy.default
    )
    andres_html = str(andres.get_body(preferencelist=("html",)).get_content())  # type: ignore[union-attr]
    assert andres_html.index("ESC-000003") < andres_html.index("ESC-000002")
    assert "VENCIDO" in andres_html


def test_digest_commands(
    write_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config()
    config = load_config(config_path)
    Pipeline(config, Store(config.database_url), lambda: datetime.now(UTC)).process(
        escalation("02-panda-basic.eml")
    )
    preview = tmp_path / "preview"
    assert main(["--config", str(config_path), "digest", "--preview", str(preview)]) == 0
    assert (preview / "andres.perez@example.com.html").read_text().startswith("<!DOCTYPE html>")
    assert "ESC-000001" in (preview / f"{LEAD}.txt").read_text()
    capsys.readouterr()
    assert (
        main(
            [
                "--config",
                str(config_path),
                "digest",
                "--now",
                "--dry-run",
                "--to",
                "andres.perez@example.com",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "andres.perez@example.com: Escalaciones: 0 vencidas, 1 abiertas" in out
    assert LEAD not in out.split("\n")[0]
    assert sent(Store(config.database_url), "digest") == []  # dry: nothing queued
    assert main(["--config", str(config_path), "digest", "--now"]) == 0
    assert "2 digests queued; 4 mails sent" in capsys.readouterr().out  # + the case's 2
    assert len(list(config.outbox_dir.glob("*-digest.eml"))) == 2


@pytest.mark.integration
def test_daemon_catches_up_on_a_missed_digest(
    write_config: Callable[..., Path],
    relay: RecordingRelay,
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    from mailrouter.testing.servers import free_port

    config_path = write_config(
        {
            "intake": {"source": "smtp", "listen": {"port": free_port()}},
            "outbound": {
                "transport": "smtp",
                "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
            },
            "digest": {"schedule": "* * * * *"},  # it fired this minute, while we were "down"
        }
    )
    config = load_config(config_path)
    Pipeline(config, Store(config.database_url), lambda: datetime.now(UTC)).process(
        escalation("02-panda-basic.eml")
    )
    daemon = run_daemon(config_path)
    assert wait_until(lambda: len(relay.to(LEAD)) >= 1, timeout=20)
    daemon.stop()
    assert len(relay.to("andres.perez@example.com")) == 2  # acknowledgement and digest


def test_long_digests_list_the_most_urgent_cases_and_count_the_rest(
    write_config: Callable[..., Path], clock: Clock
) -> None:
    config = load_config(write_config({"digest": {"max_cases": 2}}))
    store = Store(config.database_url)
    pipeline, followup = Pipeline(config, store, clock), Followup(config, store, clock)
    mails = [raw for kind, raw in escalations(24, seed=9) if kind == "tech"]
    for raw in mails[:3]:
        pipeline.process(raw)
    clock.now += timedelta(days=30)  # those three are past any window
    for raw in mails[3:]:
        pipeline.process(raw)
    overdue = {c.id for c in store.cases() if c.follow_up_due and c.follow_up_due < clock.now}
    digests = {d.recipient: d for d in followup.digests_now()}
    groups = digests[LEAD].groups
    lines = [line for group in groups for line in group.lines]
    # The digest's two most pressing cases are lines; every section counts the rest.
    assert (sum(g.total for g in groups), len(lines), sum(g.more for g in groups)) == (6, 2, 4)
    assert all(line.overdue for line in lines)
    assert {int(line.tag.split("-")[1]) for line in lines} <= overdue
    assert digests[LEAD].subject == f"Escalaciones: {len(overdue)} vencidas, 6 abiertas"
    mail = email.message_from_bytes(
        followup.render_digest(digests[LEAD]).data, policy=email.policy.default
    )
    text = str(mail.get_body(preferencelist=("plain",)).get_content())  # type: ignore[union-attr]
    for group in groups:
        assert f"y {group.more} {'caso' if group.more == 1 else 'casos'} más" in text


def test_digest_preview_writes_only_inside_its_folder(
    write_config: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An agent address is whatever a mail's From held: "/" and ".." are valid in it.
    config_path = write_config()
    config = load_config(config_path)
    escaping = "../../escaped/x@example.com"
    raw = escalation("02-panda-basic.eml").replace(b"andres.perez@example.com", escaping.encode())
    result = Pipeline(config, Store(config.database_url), lambda: datetime.now(UTC)).process(raw)
    assert result.outcome == "routed"
    preview = tmp_path / "a" / "b" / "preview"
    assert main(["--config", str(config_path), "digest", "--preview", str(preview)]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".html", ".txt")]
    assert written and all(p.parent == preview for p in written), written
    assert (preview / "_.._escaped_x@example.com.html").is_file()


def test_a_digest_is_read_and_sorted_with_the_cycle_collector_paused(
    setup: tuple[Pipeline, Followup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big backlog holds no cycles, and full collections walked all of it again; the
    collector is back on afterwards, a failure included. The rows are plain tuples whose
    fields the core reads as a case's."""
    pipeline, followup = setup
    pipeline.process(escalation("02-panda-basic.eml"))
    seen: list[tuple[bool, tuple[list[str], ...]]] = []

    def watched(cases: Any, *args: Any) -> Any:
        cases = list(cases)
        seen.append((gc.isenabled(), tuple(case.labels for case in cases)))
        return build_digests(cases, *args)

    monkeypatch.setattr("mailrouter.service.build_digests", watched)
    assert gc.isenabled()
    assert followup.digests_now()
    assert seen == [(False, ([],))]
    assert gc.isenabled()

    def failing(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("mailrouter.service.build_digests", failing)
    with pytest.raises(RuntimeError):
        followup.digests_now()
    assert gc.isenabled()


def test_paused_gc_leaves_the_collector_off_when_it_found_it_off() -> None:
    gc.disable()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
