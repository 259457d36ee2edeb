"""Threads against real servers: HIBOT's round trip over IMAP, and robots that answer every
mail they get, delivering back into the intake, to prove the exchange always stops."""

from __future__ import annotations

import email
import email.policy
import smtplib
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailrouter.store.db import Store
from mailrouter.testing.servers import Dovecot, RecordingRelay, free_port, wait_until
from tests.conftest import DaemonThread, crlf, escalation, headers_of

pytestmark = pytest.mark.integration


def body_text(msg: EmailMessage) -> str:
    body = msg.get_body()
    assert body is not None  # every mail here has a text body
    text: str = body.get_content()
    return text


def reply(
    to_data: bytes, sender: str, text: str, subject: str | None = None, auto: bool = True
) -> bytes:
    original = headers_of(to_data)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = subject or f"Re: {original['Subject']}"
    msg["Message-ID"] = email.utils.make_msgid(domain="robots.example")
    msg["In-Reply-To"] = original["Message-ID"]
    msg["References"] = original["Message-ID"]
    if auto:
        msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(text)
    return msg.as_bytes()


def settle(relay: RecordingRelay, quiet: float = 3.0, timeout: float = 90.0) -> int:
    """Wait until the relay has received nothing new for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    count, since = len(relay.messages), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if len(relay.messages) != count:
            count, since = len(relay.messages), time.monotonic()
        elif time.monotonic() - since >= quiet:
            return count
    raise AssertionError(f"the exchange did not stop: {count} mails and counting")


def imap_config(
    write_config: Callable[..., Path], dovecot: Dovecot, user: str, relay: RecordingRelay
) -> Path:
    return write_config(
        {
            "intake": {"source": "imap", "imap": dovecot.imap_settings(user, poll_interval=0.5)},
            "outbound": {
                "transport": "smtp",
                "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
            },
        }
    )


def test_hibot_round_trip(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    user = dovecot.new_user()
    inbox = dovecot.client(user)
    daemon = run_daemon(imap_config(write_config, dovecot, user, relay))
    inbox.append("INBOX", escalation("01-hibot-basic.eml"))
    assert wait_until(lambda: len(relay.messages) == 2)
    (forward,) = relay.to("soporte@hibot.us")

    # HIBOT's system answers automatically with its ticket number.
    inbox.append(
        "INBOX",
        reply(
            forward.data,
            "HIBOT <soporte@hibot.us>",
            "Su solicitud fue registrada. Ticket #55123 creado.",
            subject="Ticket #55123 creado",
        ),
    )
    assert wait_until(lambda: len(relay.messages) == 3)
    notice = relay.messages[-1]
    assert notice.rcpt_tos == ["laura.gomez@example.com"]
    assert "55123" in str(headers_of(notice.data)["Subject"])

    # A person at HIBOT replies; the agent gets it.
    inbox.append(
        "INBOX",
        reply(
            forward.data,
            "Carlos <carlos@hibot.us>",
            "Reiniciamos la sesión, ¿pueden probar?",
            auto=False,
        ),
    )
    assert wait_until(lambda: len(relay.messages) == 4)
    relayed = relay.messages[-1]
    assert relayed.rcpt_tos == ["laura.gomez@example.com"]
    assert "Reiniciamos la sesión" in body_text(headers_of(relayed.data))

    # The agent answers that relay; HIBOT gets it in its thread, with its ticket number.
    inbox.append(
        "INBOX",
        reply(
            relayed.data,
            "Laura Gómez <laura.gomez@example.com>",
            "Sigue sin funcionar.",
            auto=False,
        ),
    )
    assert wait_until(lambda: len(relay.to("soporte@hibot.us")) == 2)
    back = headers_of(relay.to("soporte@hibot.us")[-1].data)
    assert "Ticket #55123" in str(back["Subject"]) and "[ESC-000001]" in str(back["Subject"])
    assert back["In-Reply-To"] is not None
    assert headers_of(forward.data)["Message-ID"] in str(back["References"])
    assert "Sigue sin funcionar" in body_text(back)
    assert settle(relay) == 5  # and nothing else: no acknowledgement to HIBOT's robot
    daemon.stop()
    (case,) = Store(daemon.config.database_url).cases()
    assert (case.vendor_ticket, case.status) == ("55123", "awaiting_vendor")


class Robots:
    """Behind the relay: a vendor robot and an agent's out-of-office, answering every mail."""

    def __init__(
        self, relay: RecordingRelay, deliver: Callable[[bytes], None], auto_headers: bool
    ) -> None:
        self.relay, self.deliver, self.auto_headers = relay, deliver, auto_headers
        self.answered = 0

    async def handle_RCPT(self, *args: Any) -> str:
        return await self.relay.handle_RCPT(*args)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        answer = await self.relay.handle_DATA(server, session, envelope)
        data = bytes(envelope.original_content)
        for rcpt in envelope.rcpt_tos:
            if rcpt == "soporte@hibot.us":
                text, sender = "Recibido. Ticket #777 creado.", "HIBOT Bot <soporte@hibot.us>"
            else:
                text, sender = "Estoy fuera de la oficina.", f"Agente <{rcpt}>"
            robot_reply = reply(data, sender, text, auto=self.auto_headers)
            self.answered += 1
            threading.Thread(target=self.deliver, args=(robot_reply,), daemon=True).start()
        return answer


def test_auto_repliers_never_loop(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    user = dovecot.new_user()

    def into_inbox(data: bytes) -> None:
        client = dovecot.client(user)
        client.append("INBOX", data)
        client.logout()

    port = free_port()
    robots = Robots(RecordingRelay("127.0.0.1", port), into_inbox, auto_headers=True)
    controller = Controller(robots, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        daemon = run_daemon(imap_config(write_config, dovecot, user, robots.relay))
        into_inbox(escalation("01-hibot-basic.eml"))
        total = settle(robots.relay)
        daemon.stop()
    finally:
        controller.stop()
    # forward, acknowledgement, and the one "HIBOT opened ticket #777" notice; every robot
    # answer (to each of the three) was recorded and ignored.
    assert total == 3
    assert robots.answered == 3
    assert len(robots.relay.to("soporte@hibot.us")) == 1
    store = Store(daemon.config.database_url)
    assert store.cases()[0].vendor_ticket == "777"
    ignored = [m for m in store.inbound() if m.kind in ("machine", "vendor")]
    assert len(ignored) == 3


def test_robots_without_auto_headers_are_stopped_by_the_rate_limit(
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    listen = free_port()

    def into_listener(data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", listen) as client:
            client.sendmail("robot@robots.example", ["escalaciones@example.com"], crlf(data))

    port = free_port()
    robots = Robots(RecordingRelay("127.0.0.1", port), into_listener, auto_headers=False)
    controller = Controller(robots, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        daemon = run_daemon(
            write_config(
                {
                    "intake": {"source": "smtp", "listen": {"port": listen}},
                    "outbound": {
                        "transport": "smtp",
                        "smtp": {"host": "127.0.0.1", "port": port, "security": "none"},
                    },
                }
            )
        )
        into_listener(escalation("01-hibot-basic.eml"))
        total = settle(robots.relay, quiet=3.0, timeout=120)
        daemon.stop()
    finally:
        controller.stop()
    # The robots pass for people, so replies are relayed both ways — until the case has
    # relayed 20 mails in the hour: forward + acknowledgement + 20 relays, then silence.
    assert total == 22
    kinds = [m.kind for m in Store(daemon.config.database_url).outbound()]
    assert kinds.count("relay_to_agent") + kinds.count("relay_to_vendor") == 20


def test_panda_round_trip_by_thread_alone(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    user = dovecot.new_user()
    inbox = dovecot.client(user)
    daemon = run_daemon(imap_config(write_config, dovecot, user, relay))
    inbox.append("INBOX", escalation("02-panda-basic.eml"))
    assert wait_until(lambda: len(relay.messages) == 2)
    (forward,) = relay.to("soporte_revendedores@clickpanda.com")
    # Panda answers with a subject of its own: no tag, no ticket, only the thread headers.
    inbox.append(
        "INBOX",
        reply(
            forward.data,
            "Soporte Panda <soporte_revendedores@clickpanda.com>",
            "El dominio del cliente no tiene SPF; por eso no llegan.",
            subject="Consulta cliente",
            auto=False,
        ),
    )
    assert wait_until(lambda: len(relay.to("andres.perez@example.com")) == 2)
    relayed = relay.to("andres.perez@example.com")[-1]
    assert "SPF" in body_text(headers_of(relayed.data))
    inbox.append(
        "INBOX",
        reply(
            relayed.data,
            "Andrés Pérez <andres.perez@example.com>",
            "Gracias, ya le pedimos al cliente que lo configure.",
            auto=False,
        ),
    )
    assert wait_until(lambda: len(relay.to("soporte_revendedores@clickpanda.com")) == 2)
    back = headers_of(relay.to("soporte_revendedores@clickpanda.com")[-1].data)
    assert str(back["Subject"]).startswith("Re: [ESC-000001]")
    assert headers_of(forward.data)["Message-ID"] in str(back["References"])
    daemon.stop()
    (case,) = Store(daemon.config.database_url).cases()
    assert case.vendor_ticket is None and case.status == "awaiting_vendor"
