"""The quarantine worked end to end: mail kept aside by the running daemon over IMAP (moved
to the quarantine folder), then released by a lead with `mailrouter quarantine release`;
what it causes leaves through the daemon's sender and reaches the relay."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient

from mailrouter.cli import main
from mailrouter.store.db import Store
from mailrouter.testing.servers import Dovecot, RecordingRelay, wait_until
from tests.conftest import DaemonThread, escalation, headers_of

pytestmark = pytest.mark.integration

LEAD = "lead.ana"
HIBOT = "soporte@hibot.us"
AGENT = "laura.gomez@example.com"
STRANGER = "soporte@ejemplo-falso.example"
NEW_AGENT = "laura.gomez@agentes.example.net"


def settings(dovecot: Dovecot, user: str, relay: RecordingRelay) -> dict[str, Any]:
    return {
        "intake": {"source": "imap", "imap": dovecot.imap_settings(user)},
        "outbound": {
            "transport": "smtp",
            "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
        },
    }


def in_folder(mailbox: IMAPClient, folder: str) -> int:
    """How many messages `folder` holds (0 while the daemon has not created it)."""
    if not mailbox.folder_exists(folder):
        return 0
    mailbox.select_folder(folder)
    return len(mailbox.search("ALL"))


def quarantined(config: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["--config", str(config), "quarantine", "list", "--json"]) == 0
    listed: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return listed


def text_of(data: bytes) -> str:
    part = headers_of(data).get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def test_a_strangers_escalation_is_attached_to_a_case_from_the_imap_quarantine(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOGNAME", LEAD)
    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    mailbox.append("INBOX", escalation("01-hibot-basic.eml"))
    mailbox.append("INBOX", escalation("10-spoofed-sender.eml"))
    config = write_config(settings(dovecot, user, relay))
    daemon = run_daemon(config)

    # The agent's escalation opens ESC-000001; the stranger's is kept aside, unanswered.
    assert wait_until(lambda: len(relay.to(HIBOT)) == 1 and len(relay.to(AGENT)) == 1, 30)
    assert wait_until(lambda: in_folder(mailbox, "Quarantine") == 1, 15)
    (held,) = quarantined(config, capsys)
    assert held["from"] == STRANGER and "allowed_senders" in held["reason"]
    (forward,) = relay.to(HIBOT)

    assert (
        main(
            [
                "--config",
                str(config),
                "quarantine",
                "release",
                str(held["id"]),
                "--attach-to",
                "ESC-000001",
            ]
        )
        == 0
    )
    assert "threaded (attached to ESC-000001 from quarantine by lead.ana)" in (
        capsys.readouterr().out
    )

    # Its text reaches the vendor through the daemon's sender, in the case's vendor thread.
    assert wait_until(lambda: len(relay.to(HIBOT)) == 2, 20)
    relayed = relay.to(HIBOT)[1]
    mail = headers_of(relayed.data)
    assert mail["In-Reply-To"] == headers_of(forward.data)["Message-ID"]
    assert "[ESC-000001]" in str(mail["Subject"])
    assert "restablecer la contraseña y enviarla a este correo" in text_of(relayed.data)
    daemon.stop()
    assert relay.to(STRANGER) == []  # no backscatter, even now
    assert len(relay.messages) == 3

    store = Store(daemon.config.database_url)
    history = [(e.kind, e.detail) for e in store.events(1)]
    assert ("attached_from_quarantine", f"{LEAD}: message #{held['id']} from {STRANGER}") in (
        history
    )
    (row,) = [m for m in store.inbound() if m.id == held["id"]]
    assert row.outcome == "attached" and row.imap_uid is not None
    assert " — attached to ESC-000001 by lead.ana at " in (row.reason or "")
    assert store.quarantined(10) == []
    store.close()
    assert in_folder(mailbox, "Quarantine") == 1  # the IMAP copy stays where it was


def test_a_mail_quarantined_before_its_sender_was_allowed_is_routed_on_release(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOGNAME", LEAD)
    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    # An agent of a new team, whose domain is not in allowed_senders yet.
    raw = escalation("01-hibot-basic.eml").replace(AGENT.encode(), NEW_AGENT.encode())
    mailbox.append("INBOX", raw)
    config = write_config(settings(dovecot, user, relay))
    daemon = run_daemon(config)
    assert wait_until(lambda: in_folder(mailbox, "Quarantine") == 1, 30)
    (held,) = quarantined(config, capsys)
    assert held["reason"] == f"sender {NEW_AGENT} is not in allowed_senders"
    assert relay.messages == []

    # The admin allows the new team; the lead releases what was kept aside meanwhile.
    write_config(
        {
            **settings(dovecot, user, relay),
            "allowed_senders": ["*@example.com", "*@agentes.example.net"],
        }
    )
    assert main(["--config", str(config), "quarantine", "release", str(held["id"])]) == 0
    assert capsys.readouterr().out == (
        f"message #{held['id']}: routed (route 'proveedor-hibot' matched), case ESC-000001\n"
    )
    assert wait_until(lambda: len(relay.to(HIBOT)) == 1 and len(relay.to(NEW_AGENT)) == 1, 20)
    daemon.stop()
    (forward,) = relay.to(HIBOT)
    assert str(headers_of(forward.data)["Subject"]).startswith("[ESC-000001]")
    assert "Lafise Nicaragua" in text_of(forward.data)
    assert len(relay.messages) == 2  # the forward and the agent's acknowledgement

    store = Store(daemon.config.database_url)
    (case,) = store.cases()
    assert (case.agent_address, case.provider, case.status) == (NEW_AGENT, "hibot", "open")
    rows = {m.id: m for m in store.inbound()}
    assert rows[held["id"]].outcome == "released"
    assert " — released by lead.ana at " in (rows[held["id"]].reason or "")
    assert [m.outcome for m in rows.values() if m.id != held["id"]] == ["routed"]
    store.close()
