"""The escalation team end to end: escalations and replies through the real IMAP intake
(Dovecot), every mail out through a real SMTP relay, on a frozen clock moved by the test:
owners by round robin across daemon restarts, members away skipped, the lead when all are
away, the fewest cases in progress; reassignment, #tomar and a refusal by mail; labels
from the route, a command and the case's state in the mails and in `mailrouter cases`;
the owner's digest, the lead's by owner, and the owner → lead reminder chain."""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrouter.cli import main
from mailrouter.testing.servers import Dovecot, Received, RecordingRelay, wait_until
from tests.conftest import PROJECT, DaemonThread, headers_of

pytestmark = pytest.mark.integration

AGENT = "laura.gomez@example.com"
ANA, PEDRO, SOFIA = "ana.torres@example.com", "pedro.ruiz@example.com", "sofia.mejia@example.com"
LEAD = "lider.equipo@example.com"
HIBOT = "soporte@hibot.us"
MEMBERS: list[Any] = [
    {"address": ANA, "name": "Ana Torres"},
    {"address": PEDRO, "name": "Pedro Ruiz", "short": "pedro"},
    SOFIA,
]


class Clock:
    """The daemon's clock, frozen where the test puts it."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)  # Monday 14:05 in Bogotá

    def __call__(self) -> datetime:
        return self.now


def escalation(client: str, priority: str = "ALTA") -> bytes:
    user = "u-" + "".join(client.lower().split())
    msg = EmailMessage()
    msg["From"] = f"Laura Gómez <{AGENT}>"
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = f"Escalamiento HIBOT - {client}"
    msg["Message-ID"] = email.utils.make_msgid(domain="example.com")
    msg["Date"] = email.utils.formatdate()
    msg.set_content(
        f"Proveedor: HIBOT\nCliente: {client}\nUsuario que tiene el problema: {user}\n"
        f"Correo asociado al usuario: {user}@cliente.example\nPrioridad: {priority}\n"
        "Descripción del problema: no puede ingresar\n"
    )
    return msg.as_bytes()


def answer(to: Received, sender: str, text: str) -> bytes:
    """`sender`'s reply, in its thread, to a mail the router sent."""
    original = headers_of(to.data)
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = f"Re: {original['Subject']}"
    msg["Message-ID"] = email.utils.make_msgid(domain="example.com")
    msg["In-Reply-To"] = original["Message-ID"]
    msg["References"] = original["Message-ID"]
    msg.set_content(text)
    return msg.as_bytes()


def text_of(mail: Received) -> str:
    body = headers_of(mail.data).get_body(preferencelist=("plain",))
    assert body is not None
    return " ".join(str(body.get_content()).split())


def subject_of(mail: Received) -> str:
    return str(headers_of(mail.data)["Subject"])


class Team:
    """One mailbox, one relay, one database, and the daemon started and stopped on them."""

    def __init__(
        self,
        dovecot: Dovecot,
        relay: RecordingRelay,
        write_config: Callable[..., Path],
        run_daemon: Callable[..., DaemonThread],
    ) -> None:
        self.dovecot, self.relay = dovecot, relay
        self.write_config, self.run_daemon = write_config, run_daemon
        self.user = dovecot.new_user()
        self.inbox = dovecot.client(self.user)
        self.clock = Clock()
        self.daemon: DaemonThread | None = None
        self.config_path: Path | None = None

    def start(
        self, members: list[Any] = MEMBERS, schedule: str = "0 3 29 2 *", **team: Any
    ) -> None:
        """The daemon on the team of `members`; digests on `schedule` (by default a day that
        comes once in four years: none in the middle of a count)."""
        shipped = yaml.safe_load((PROJECT / "config.yaml").read_text(encoding="utf-8"))
        routes = shipped["routes"]
        routes[0]["labels"] = ["inbound"]  # proveedor-hibot
        self.config_path = self.write_config(
            {
                "intake": {
                    "source": "imap",
                    "imap": self.dovecot.imap_settings(self.user, poll_interval=0.3),
                },
                "outbound": {
                    "transport": "smtp",
                    "smtp": {"host": self.relay.host, "port": self.relay.port, "security": "none"},
                },
                "team": {
                    "leads": [LEAD],
                    "escalation": {"members": members, "assign": "round_robin", **team},
                },
                "routes": routes,
                "reminder_check_seconds": 0.2,
                "digest": {"schedule": schedule},
            }
        )
        self.daemon = self.run_daemon(self.config_path, clock=self.clock)

    def stop(self) -> None:
        assert self.daemon is not None
        self.daemon.stop()

    def send(self, raw: bytes, then: int | Callable[[], bool]) -> None:
        """Drop `raw` in the intake mailbox; wait until the relay holds `then` mails (or
        until `then()`)."""
        self.inbox.append("INBOX", raw)
        done = then if callable(then) else lambda: len(self.relay.messages) >= then
        assert wait_until(done, timeout=30), [
            (m.rcpt_tos, subject_of(m)) for m in self.relay.messages
        ]

    def assigned(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.owners()) == count

    def of_kind(self, words: str) -> list[Received]:
        return [m for m in self.relay.messages if words in subject_of(m)]

    def owners(self) -> list[list[str]]:
        return [m.rcpt_tos for m in self.of_kind("Nuevo caso a tu cargo")]

    def cases(self, *filters: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
        capsys.readouterr()
        assert main(["--config", str(self.config_path), "cases", "--json", *filters]) == 0
        rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
        return rows


@pytest.fixture
def team(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[..., DaemonThread],
) -> Team:
    return Team(dovecot, relay, write_config, run_daemon)


def test_owners_rotate_across_restarts_skip_the_away_and_fall_back_on_the_lead(
    team: Team,
) -> None:
    team.start()
    team.send(escalation("Uno"), team.assigned(1))
    team.send(escalation("Dos"), team.assigned(2))
    team.stop()
    team.start()  # a new daemon on the same database goes on with the rotation
    team.send(escalation("Tres"), team.assigned(3))
    team.send(escalation("Cuatro"), team.assigned(4))
    assert team.owners() == [[ANA], [PEDRO], [SOFIA], [ANA]]
    ack = next(m for m in team.of_kind("Escalamiento enviado") if "Tres" in subject_of(m))
    assert "Responsable: sofia.mejia@example.com" in text_of(ack)
    team.stop()

    away = [{**MEMBERS[0]}, {**MEMBERS[1], "away_until": "2026-11-20"}, SOFIA]
    team.start(members=away)  # Pedro on leave until Friday: skipped
    team.send(escalation("Cinco"), team.assigned(5))
    team.send(escalation("Seis"), team.assigned(6))
    assert team.owners()[4:] == [[ANA], [SOFIA]]
    team.stop()

    everyone_away = [{"address": a, "away_until": "2026-11-30"} for a in (ANA, PEDRO, SOFIA)]
    team.start(members=everyone_away)
    team.send(escalation("Siete"), team.assigned(7))
    assert team.owners()[6:] == [[LEAD]]
    team.stop()

    # By the fewest cases in progress: Ana has 3, Sofía 2, Pedro 1.
    team.start(assign="least_open")
    team.send(escalation("Ocho"), team.assigned(8))
    assert team.owners()[7:] == [[PEDRO]]
    team.stop()


def test_reassignment_take_over_refusal_and_labels_by_mail(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    team.start()
    # URGENTE: forward, acknowledgement, the leads' alert and the assignment.
    team.send(escalation("Acme", "URGENTE"), then=4)
    (assignment,) = team.of_kind("Nuevo caso a tu cargo")
    assert assignment.rcpt_tos == [ANA]
    (ack,) = team.of_kind("Escalamiento enviado")
    assert headers_of(ack.data)["X-Mailrouter-Labels"] == "inbound, urgente"
    assert "Etiquetas: inbound, urgente" in text_of(ack)
    (forward,) = team.relay.to(HIBOT)
    assert headers_of(forward.data)["X-Mailrouter-Labels"] is None  # our triage, not theirs

    # The owner hands it to Pedro by his short name and labels it; both owners are told.
    team.send(answer(assignment, f"Ana <{ANA}>", "#asignar pedro\n#etiqueta Facturación"), 6)
    (handed,) = team.of_kind("Cambio de responsable")
    assert handed.rcpt_tos == [PEDRO, ANA]
    assert "Ahora: Pedro Ruiz <pedro.ruiz@example.com>" in text_of(handed)
    (done,) = team.of_kind("Hecho:")
    assert done.rcpt_tos == [ANA] and "facturación agregada" in text_of(done)

    # Someone from the team who is not on the case may not reassign it...
    team.send(answer(ack, "Andrés <andres.perez@example.com>", f"#asignar {ANA}"), 7)
    (refused,) = team.of_kind("Comandos no aplicados")
    assert refused.rcpt_tos == ["andres.perez@example.com"]
    # ...but a member may take it.
    team.send(answer(ack, f"Sofía <{SOFIA}>", "#tomar"), 9)
    taken = team.of_kind("Cambio de responsable")[-1]
    assert taken.rcpt_tos == [SOFIA, PEDRO]

    # The vendor answers: the agent gets it, and the owner in copy.
    team.send(answer(forward, "Carlos <carlos@hibot.us>", "Lo estamos revisando."), 10)
    relayed = team.of_kind("Respuesta de HIBOT")[-1]
    assert relayed.rcpt_tos == [AGENT, SOFIA]
    team.stop()

    (case,) = team.cases("--label", "facturación", capsys=capsys)
    assert (case["owner"], case["labels"][:3]) == (SOFIA, ["inbound", "facturación", "urgente"])
    assert team.cases("--owner", SOFIA, "--label", "urgente", capsys=capsys) == [case]
    assert team.cases("--owner", ANA, capsys=capsys) == []


def test_the_owner_is_reminded_first_then_the_lead_and_digests_go_by_owner(team: Team) -> None:
    team.start()
    team.send(escalation("Uno"), then=3)  # ALTA: 24 h; Ana's
    team.send(escalation("Dos", "BAJA"), then=6)  # 72 h; Pedro's
    team.clock.now += timedelta(hours=25)  # Uno's window has passed
    assert wait_until(lambda: len(team.of_kind("Seguimiento vencido")) == 1, timeout=15)
    (reminder,) = team.of_kind("Seguimiento vencido")
    assert reminder.rcpt_tos == [ANA, AGENT]
    team.clock.now += timedelta(hours=24)  # and a second one: the lead hears of it
    assert wait_until(lambda: len(team.of_kind("Sin seguimiento hace dos plazos")) == 1, 15)
    assert team.of_kind("Sin seguimiento hace dos plazos")[0].rcpt_tos == [LEAD]
    team.stop()

    # Restarted after this morning's 08:00 digests were due: it sends them (once).
    team.clock.now = datetime(2026, 11, 18, 14, 0, tzinfo=UTC)  # Wednesday 09:00 in Bogotá
    team.start(schedule="0 8 * * *")
    assert wait_until(lambda: len(team.of_kind("Escalaciones:")) == 4, timeout=30)
    digests = {m.rcpt_tos[0]: m for m in team.of_kind("Escalaciones:")}
    assert set(digests) == {AGENT, ANA, PEDRO, LEAD}
    assert "ESC-000001" in text_of(digests[ANA]) and "ESC-000002" not in text_of(digests[ANA])
    assert "ESC-000002" in text_of(digests[PEDRO]) and "ESC-000001" not in text_of(digests[PEDRO])
    lead = text_of(digests[LEAD])
    assert "== Ana Torres: 1 abiertas, 1 vencidas ==" in lead
    assert "== Pedro Ruiz: 1 abiertas, 0 vencidas ==" in lead
    assert lead.index("Ana Torres: 1 abiertas") < lead.index("Pedro Ruiz: 1 abiertas")
    team.stop()
