"""Health and metrics over HTTP (`http.listen`): the real daemon, scraped as Prometheus and
a load balancer would, while Dovecot stops and starts and the relay is down."""

from __future__ import annotations

import http.client
import json
import shutil
import smtplib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from mailrouter import __version__
from mailrouter.config import ConfigError, load_config
from mailrouter.core.handle import UNAUTHENTICATED
from mailrouter.core.parse import Deadline, Refused, parse_message
from mailrouter.metrics import REASONS, Metrics, quarantine_category
from mailrouter.store.db import Store
from mailrouter.testing.servers import (
    Dovecot,
    RecordingRelay,
    free_port,
    wait_until,
)
from tests.conftest import DaemonThread, crlf, escalation

pytestmark = pytest.mark.integration

# file -> (provider, priority) of the case it opens
CASES = {
    "01-hibot-basic.eml": ("hibot", "ALTA"),
    "02-panda-basic.eml": ("panda", "MEDIA"),
    "03-operaciones-encuestas.eml": ("operaciones", "MEDIA"),
    "04-tech-endoso.eml": ("tech", "URGENTE"),
}
RECEIVED = "mailrouter_mails_received_total"
SENT = "mailrouter_mails_sent_total"
QUARANTINED = "mailrouter_quarantined_total"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def get_json(port: int, path: str) -> tuple[int, Any]:
    status, body = get(port, path)
    return status, json.loads(body)


def scrape(port: int) -> Samples:
    """Every sample of /metrics, read by Prometheus's own parser."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` that have `labels` (among others)."""
    wanted = set(labels.items())
    return sum(value for (n, have), value in samples.items() if n == name and wanted <= have)


def present(samples: Samples, name: str, **labels: str) -> bool:
    wanted = set(labels.items())
    return any(n == name and wanted <= have for n, have in samples)


def smtp_outbound(host: str, port: int) -> dict[str, Any]:
    return {"transport": "smtp", "smtp": {"host": host, "port": port, "security": "none"}}


def test_health_metrics_and_readiness_over_imap(
    private_dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    user = private_dovecot.new_user()
    mailbox = private_dovecot.client(user)
    port = free_port()
    config = write_config(
        {
            "intake": {
                "source": "imap",
                "imap": private_dovecot.imap_settings(user, reconnect_max=1),
            },
            "outbound": smtp_outbound(relay.host, relay.port),
            "http": {"listen": f"127.0.0.1:{port}"},
        }
    )
    run_daemon(config)

    assert get_json(port, "/healthz") == (200, {"status": "ok", "version": __version__})
    assert wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=15), get(port, "/readyz")
    assert get_json(port, "/readyz")[1] == {
        "status": "ready",
        "failed": [],
        "checks": {"database": "ok", "imap": "ok", "outbox": "ok"},
    }
    assert get(port, "/nowhere")[0] == 404
    assert get(port, "/metrics", method="POST")[0] == 405
    assert get(port, "/healthz", method="HEAD") == (200, b"")

    before = scrape(port)
    # Known outcomes and categories are there from the first scrape, at 0.
    assert present(before, RECEIVED, source="imap", outcome="routed")
    assert total(before, RECEIVED) == 0
    assert present(before, QUARANTINED, reason="sender not allowed")
    assert total(before, QUARANTINED) == 0
    assert total(before, "mailrouter_cases_open") == 0
    assert total(before, "mailrouter_imap_connected") == 1
    assert total(before, "mailrouter_ready") == 1

    for name in CASES:
        mailbox.append("INBOX", escalation(name))
    mailbox.append("INBOX", escalation("10-spoofed-sender.eml"))  # a stranger's mail
    assert wait_until(
        lambda: total(scrape(port), RECEIVED, outcome="routed") == len(CASES), timeout=30
    )

    def all_sent() -> bool:
        now = scrape(port)
        return (
            len(relay.messages) >= 9
            and total(now, SENT, result="sent") == len(relay.messages)
            and total(now, "mailrouter_outbox_pending") == 0
        )

    assert wait_until(all_sent, timeout=30)
    after = scrape(port)
    assert total(after, RECEIVED, source="imap", outcome="routed") == 4
    assert total(after, RECEIVED, outcome="quarantined") == 1
    assert total(after, RECEIVED) == 5
    assert total(after, QUARANTINED, reason="sender not allowed") == 1
    assert total(after, QUARANTINED) == 1
    assert total(after, "mailrouter_route_seconds_count") == 5
    assert total(after, "mailrouter_route_seconds_bucket", le="+Inf") == 5
    # 4 forwards, 4 acknowledgements, the URGENTE alert to the lead: each counted once.
    assert total(after, SENT, result="sent") == len(relay.messages) == 9
    assert total(after, SENT, kind="forward", result="sent") == 4
    assert total(after, SENT, kind="acknowledgement", result="sent") == 4
    assert total(after, SENT, result="failed") == 0
    opened = {
        (dict(labels)["provider"], dict(labels)["priority"]): value
        for (name, labels), value in after.items()
        if name == "mailrouter_cases_open" and value
    }
    assert opened == {case: 1 for case in CASES.values()}
    assert total(after, "mailrouter_cases_overdue") == 0
    assert total(after, "mailrouter_outbox_oldest_pending_seconds") == 0

    # The mailbox's server goes down: still alive, no longer ready, and it says why.
    private_dovecot.take_down()
    assert wait_until(lambda: get(port, "/readyz")[0] == 503, timeout=15)
    status, down = get_json(port, "/readyz")
    assert status == 503
    assert down["status"] == "not ready"
    assert down["failed"] == ["imap"]
    assert down["checks"]["database"] == down["checks"]["outbox"] == "ok"
    assert get(port, "/healthz")[0] == 200
    during = scrape(port)
    assert total(during, "mailrouter_imap_connected") == 0
    assert total(during, "mailrouter_ready") == 0

    # Back: ready again once the intake has logged in again.
    private_dovecot.start()
    assert wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=20), get(port, "/readyz")
    assert total(scrape(port), "mailrouter_imap_connected") == 1


def test_readyz_fails_while_the_outbox_is_stuck(
    write_config: Callable[..., Path], run_daemon: Callable[[Path], DaemonThread]
) -> None:
    smtp_port, port = free_port(), free_port()
    dead_relay_port = free_port()  # where the relay listens once the test starts it
    config = write_config(
        {
            "intake": {"source": "smtp", "listen": {"port": smtp_port}},
            # Nothing listens there yet: every try is a temporary failure, retried soon.
            "outbound": {
                **smtp_outbound("127.0.0.1", dead_relay_port),
                "retry": {"first_delay": 0.2, "max_delay": 0.5},
            },
            "http": {"listen": f"127.0.0.1:{port}", "stuck_outbox_seconds": 2},
        }
    )
    run_daemon(config)
    assert get_json(port, "/readyz")[1]["checks"] == {
        "database": "ok",
        "smtp": "ok",
        "outbox": "ok",
    }
    with smtplib.SMTP("127.0.0.1", smtp_port) as client:
        client.sendmail(
            "laura.gomez@example.com",
            ["escalaciones@example.com"],
            crlf(escalation("01-hibot-basic.eml")),
        )
    # Waiting, but not for long yet: still ready.
    assert get(port, "/readyz")[0] == 200
    queued = scrape(port)
    assert total(queued, "mailrouter_outbox_pending") == 2  # the forward and the ack
    assert total(queued, "mailrouter_outbox_oldest_pending_seconds") < 2

    assert wait_until(lambda: get(port, "/readyz")[0] == 503, timeout=10)
    status, stuck = get_json(port, "/readyz")
    assert status == 503
    assert stuck["failed"] == ["outbox"]
    assert "http.stuck_outbox_seconds" in stuck["checks"]["outbox"]
    samples = scrape(port)
    assert total(samples, "mailrouter_outbox_pending") == 2
    assert total(samples, "mailrouter_outbox_oldest_pending_seconds") >= 2
    assert total(samples, SENT, kind="forward", result="deferred") >= 1
    assert total(samples, SENT, result="sent") == 0
    assert total(samples, "mailrouter_ready") == 0

    # The relay is back; it refuses the agent's address for good.
    relay = RecordingRelay("127.0.0.1", dead_relay_port)
    relay.refuse["laura.gomez@example.com"] = "550 5.1.1 no such user"
    controller = Controller(relay, hostname="127.0.0.1", port=dead_relay_port)
    controller.start()
    try:
        assert wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=15)
        assert wait_until(lambda: total(scrape(port), SENT, result="failed") == 1, timeout=5)
        after = scrape(port)
        assert total(after, SENT, kind="forward", result="sent") == 1 == len(relay.messages)
        assert total(after, SENT, kind="acknowledgement", result="failed") == 1
        assert total(after, "mailrouter_outbox_pending") == 0
        assert total(after, "mailrouter_outbox_oldest_pending_seconds") == 0
    finally:
        controller.stop()


def test_off_unless_listen_is_set(
    write_config: Callable[..., Path], run_daemon: Callable[[Path], DaemonThread]
) -> None:
    shipped = load_config(write_config())
    assert shipped.settings.http.address is None
    daemon = run_daemon(write_config({"intake": {"listen": {"port": free_port()}}}))
    assert daemon.daemon.http is None
    for wrong in ("9464", "localhost:http", ":9464", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match=r"http\.listen"):
            load_config(write_config({"http": {"listen": wrong}}))
    ipv6 = load_config(write_config({"http": {"listen": "[::1]:9464"}}))
    assert ipv6.settings.http.address == ("::1", 9464)


def _refusal(raw: bytes, deadline: Deadline | None = None) -> str:
    with pytest.raises(Refused) as refused:
        parse_message(raw, {}, "escalaciones@example.com", deadline)
    return str(refused.value)


def test_quarantine_reasons_are_counted_by_category_never_by_their_text() -> None:
    many_fields = b"".join(b"X-F%d: x\r\n" % n for n in range(1001)) + b"\r\nhola\r\n"
    ticks = iter([0.0, 100.0])
    late = Deadline(1.0, clock=lambda: next(ticks))
    assert quarantine_category(_refusal(many_fields)) == "refused shape"
    assert quarantine_category(_refusal(b"Subject: x\r\n\r\nhola\r\n", late)) == "deadline"
    reasons = {
        "sender x@evil.example is not in allowed_senders": "sender not allowed",
        f"{UNAUTHENTICATED}: no dmarc=pass for example.com": "unauthenticated sender",
        "message of 30000000 bytes is over the 26214400-byte limit": "too large",
        "processing error: KeyError: 'x' at handle.py:12": "processing error",
        "parse error: ValueError: bad at parse.py:3": "processing error",
        "unmatched vendor reply": "unmatched vendor reply",
        "sender (none) is not in allowed_senders": "sender not allowed",
        "anything a mail could make us write": "other",
    }
    for reason, category in reasons.items():
        assert quarantine_category(reason) == category, reason
    assert {quarantine_category(r) for r in reasons} <= set(REASONS)


def test_readiness_names_an_unreadable_database(tmp_path: Path) -> None:
    folder = tmp_path / "db"
    store = Store(f"sqlite:///{folder / 'mailrouter.db'}")
    metrics = Metrics(
        store,
        lambda: datetime.now(UTC),
        source="smtp",
        providers=lambda: ["hibot"],
        stuck_outbox_seconds=900,
    )
    metrics.intake_state(True)
    try:
        assert metrics.readiness().failed == []
        shutil.rmtree(folder)
        store.engine_for_reading().dispose()  # no connection to the old file is reused
        readiness = metrics.readiness()
        assert readiness.failed == ["database"]
        assert not readiness.ready
        names = {family.name for family in metrics.registry.collect()}
        assert "mailrouter_ready" in names
        assert "mailrouter_outbox_pending" not in names  # left out, not reported as 0
    finally:
        store.close()
