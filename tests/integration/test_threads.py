"""Threads on the pipeline: vendor replies back to their case, agent replies back to the
vendor, commands, duplicates, bounces, and the machine-mail verdict on the corpus."""

from __future__ import annotations

import csv
import email
import email.policy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailrouter.config import load_config
from mailrouter.core.parse import field_aliases, parse_message
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from mailrouter.store.tables import Message
from mailrouter.testing.factory import reply as mail
from tests.conftest import CORPUS, PROJECT, escalation


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def pipeline(write_config: Callable[..., Path]) -> Pipeline:
    config = load_config(write_config())
    return Pipeline(config, Store(config.database_url), Clock())


def body_of(message: Message) -> str:
    parsed = email.message_from_bytes(message.raw, policy=email.policy.default)
    part = parsed.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def sent(pipeline: Pipeline, kind: str) -> list[Message]:
    return [m for m in pipeline.store.outbound() if m.kind == kind]


def open_hibot(pipeline: Pipeline) -> Message:
    pipeline.process(escalation("01-hibot-basic.eml"))
    (forward,) = sent(pipeline, "forward")
    return forward


def test_hibot_ticket_auto_reply_records_ticket_and_tells_agent_once(pipeline: Pipeline) -> None:
    forward = open_hibot(pipeline)
    auto = mail(
        "HIBOT Soporte <soporte@hibot.us>",
        "Hemos recibido su solicitud. Ticket #55123 creado.\nNo responda a este correo.",
        subject="Ticket #55123 creado",
        in_reply_to=forward.message_id,
        headers={"Auto-Submitted": "auto-replied"},
    )
    result = pipeline.process(auto)
    assert result.outcome == "threaded" and result.case_id == 1
    (case,) = pipeline.store.cases()
    assert case.vendor_ticket == "55123"
    (notice,) = sent(pipeline, "vendor_ticket")
    assert notice.recipients == ["laura.gomez@example.com"]
    assert "55123" in notice.subject and "[ESC-000001]" in notice.subject
    # A second auto-reply (same ticket) says nothing more; nothing ever goes back to HIBOT.
    pipeline.process(auto.replace(b"Message-ID: <", b"Message-ID: <again-"))
    assert len(sent(pipeline, "vendor_ticket")) == 1
    assert [
        m.recipients for m in pipeline.store.outbound() if "soporte@hibot.us" in m.recipients
    ] == [["soporte@hibot.us"]]


def test_vendor_reply_relayed_and_agent_reply_relayed_back(pipeline: Pipeline) -> None:
    forward = open_hibot(pipeline)
    ticket_mail = mail(
        "soporte@hibot.us",
        "Ticket #55123 creado",
        subject="Ticket #55123",
        in_reply_to=forward.message_id,
        headers={"Auto-Submitted": "auto-replied"},
    )
    pipeline.process(ticket_mail)
    assert forward.message_id is not None  # outbound mail gets its Message-ID when decided
    human = mail(
        "Carlos HIBOT <carlos@hibot.us>",
        "Hola, reiniciamos la sesión del usuario. ¿Pueden probar de nuevo?\n\nGracias,\nCarlos",
        subject="RE: Ticket #55123",
        references=[forward.message_id],
    )
    assert pipeline.process(human).outcome == "threaded"
    (case,) = pipeline.store.cases()
    assert case.status == "vendor_replied"
    (relay,) = sent(pipeline, "relay_to_agent")
    assert relay.recipients == ["laura.gomez@example.com"]
    assert relay.subject.startswith("[ESC-000001] Ticket #55123 Respuesta de HIBOT")
    text = body_of(relay)
    assert "reiniciamos la sesión" in text and "Carlos" in text  # the sign-off is kept
    parsed = email.message_from_bytes(relay.raw, policy=email.policy.default)
    assert parsed["Auto-Submitted"] == "auto-generated"

    answer = mail(
        "Laura Gómez <laura.gomez@example.com>",
        "Ya probamos y sigue igual.\n#nota el cliente está molesto\n#prioridad urgente\n\n"
        "> Hola, reiniciamos la sesión del usuario.",
        subject=f"Re: {relay.subject}",
        in_reply_to=relay.message_id,
    )
    assert pipeline.process(answer).outcome == "threaded"
    (back,) = sent(pipeline, "relay_to_vendor")
    assert back.recipients == ["soporte@hibot.us"]
    parsed = email.message_from_bytes(back.raw, policy=email.policy.default)
    assert parsed["Subject"] == (
        "Re: [ESC-000001] Ticket #55123 - Escalamiento INBOUND - Lafise Nicaragua - Prioridad ALTA"
    )
    human_id = email.message_from_bytes(human)["Message-ID"]
    assert parsed["In-Reply-To"] == human_id
    assert forward.message_id in parsed["References"]
    text = body_of(back)
    assert "sigue igual" in text
    assert "#nota" not in text and "molesto" not in text and "#prioridad" not in text
    assert "reiniciamos" not in text  # the quoted history is not sent back
    (case,) = pipeline.store.cases()
    assert (case.status, case.priority) == ("awaiting_vendor", "URGENTE")
    kinds = [e.kind for e in pipeline.store.events(case.id)]
    assert "note" in kinds and "priority" in kinds


def test_resuelto_closes_without_relaying(pipeline: Pipeline) -> None:
    pipeline.process(escalation("01-hibot-basic.eml"))
    (ack,) = sent(pipeline, "acknowledgement")
    pipeline.process(
        mail(
            "laura.gomez@example.com",
            "#resuelto",
            subject=f"Re: {ack.subject}",
            in_reply_to=ack.message_id,
        )
    )
    (case,) = pipeline.store.cases()
    assert case.status == "closed" and case.follow_up_due is None
    assert sent(pipeline, "relay_to_vendor") == []


def test_vendor_reply_matched_by_ticket_number_alone(pipeline: Pipeline) -> None:
    forward = open_hibot(pipeline)
    pipeline.process(
        mail(
            "soporte@hibot.us",
            "Ticket #55123 creado",
            subject="Ticket #55123",
            in_reply_to=forward.message_id,
            headers={"Auto-Submitted": "auto-replied"},
        )
    )
    # No threading headers, no case tag: only HIBOT's own ticket number.
    result = pipeline.process(
        mail("agente@hibot.us", "Solucionado.", subject="Actualización ticket 55123")
    )
    assert result.outcome == "threaded" and result.case_id == 1
    assert len(sent(pipeline, "relay_to_agent")) == 1


def test_unmatched_vendor_reply_is_quarantined(pipeline: Pipeline) -> None:
    open_hibot(pipeline)
    result = pipeline.process(mail("soporte@hibot.us", "¿De qué caso hablan?", subject="Consulta"))
    assert result.outcome == "quarantined" and result.reason == "unmatched vendor reply"
    assert len(pipeline.store.cases()) == 1


def test_panda_thread_only_with_rewritten_subject(pipeline: Pipeline) -> None:
    pipeline.process(escalation("02-panda-basic.eml"))
    (forward,) = sent(pipeline, "forward")
    assert forward.message_id is not None  # outbound mail gets its Message-ID when decided
    reply = mail(
        "Soporte Panda <soporte_revendedores@clickpanda.com>",
        "Revisamos la campaña: el dominio no tenía SPF.",
        subject="Caso cliente Compensar",  # no tag, no ticket: headers only
        references=["unrelated@x.example", forward.message_id],
    )
    assert pipeline.process(reply).case_id == 1
    (relay,) = sent(pipeline, "relay_to_agent")
    assert relay.recipients == ["andres.perez@example.com"] and "SPF" in body_of(relay)
    (case,) = pipeline.store.cases()
    assert case.vendor_ticket is None and case.status == "vendor_replied"


def test_duplicate_escalation_attaches_to_open_case(pipeline: Pipeline) -> None:
    forward = open_hibot(pipeline)
    result = pipeline.process(escalation("08-hibot-duplicate.eml"))
    assert result.outcome == "threaded" and result.case_id == 1
    (case,) = pipeline.store.cases()
    assert case.priority == "URGENTE"
    (relay,) = sent(pipeline, "relay_to_vendor")
    assert relay.recipients == ["soporte@hibot.us"]
    parsed = email.message_from_bytes(relay.raw, policy=email.policy.default)
    assert parsed["In-Reply-To"] == f"<{forward.message_id}>"
    assert "sigue sin acceso" in body_of(relay)
    (notice,) = sent(pipeline, "duplicate")
    assert notice.recipients == ["laura.gomez@example.com"]
    assert "ESC-000001" in notice.subject and "URGENTE (subió desde ALTA)" in body_of(notice)


def test_other_user_of_same_client_is_not_a_duplicate(pipeline: Pipeline) -> None:
    open_hibot(pipeline)
    other = escalation("08-hibot-duplicate.eml").replace(b"mrodriguez", b"otro.usuario")
    assert pipeline.process(other).outcome == "routed"
    assert len(pipeline.store.cases()) == 2


def test_bounce_of_a_forward_marks_case_undeliverable(pipeline: Pipeline) -> None:
    forward = open_hibot(pipeline)
    dsn = (
        "From: Mail Delivery System <MAILER-DAEMON@relay.example.com>\r\n"
        "To: escalaciones@example.com\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn1@relay.example.com>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay\r\n\r\n"
        "Final-Recipient: rfc822; soporte@hibot.us\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{forward.message_id}>\r\nSubject: x\r\n\r\n--B--\r\n"
    ).encode()
    result = pipeline.process(dsn)
    assert result.outcome == "ignored" and result.case_id == 1
    (case,) = pipeline.store.cases()
    assert case.status == "undeliverable"
    (notice,) = sent(pipeline, "undeliverable")
    assert notice.recipients == ["laura.gomez@example.com", "lider.soporte@example.com"]
    text = body_of(notice)
    assert "soporte@hibot.us" in text and "5.1.1" in text and "User unknown" in text


def test_relays_per_case_are_rate_limited(pipeline: Pipeline) -> None:
    forward = open_hibot(pipeline)
    for n in range(25):
        pipeline.process(mail("soporte@hibot.us", f"respuesta {n}", in_reply_to=forward.message_id))
    assert len(sent(pipeline, "relay_to_agent")) == 20
    assert "rate_limited" in [e.kind for e in pipeline.store.events(1)]


def test_out_of_office_on_a_case_thread_is_ignored(pipeline: Pipeline) -> None:
    pipeline.process(escalation("01-hibot-basic.eml"))
    (ack,) = sent(pipeline, "acknowledgement")
    ooo = mail(
        "laura.gomez@example.com",
        "Estoy fuera de la oficina.",
        in_reply_to=ack.message_id,
        headers={"Auto-Submitted": "auto-replied"},
    )
    assert pipeline.process(ooo).outcome == "ignored"
    assert len(pipeline.store.outbound()) == 2


MACHINE_CATEGORIES = ("auto_reply", "auto_generated_bulk", "bounce_dsn")
with (CORPUS / "MANIFEST.tsv").open(encoding="utf-8") as manifest:
    MACHINE_FILES = [
        row["file"]
        for row in csv.DictReader(manifest, delimiter="\t")
        if row["category"] in MACHINE_CATEGORIES
    ]


@pytest.mark.parametrize("name", MACHINE_FILES)
def test_corpus_machine_mail_is_classified(name: str) -> None:
    config = load_config(PROJECT / "config.yaml")
    parsed = parse_message(
        (CORPUS / name).read_bytes(), field_aliases(config), "escalaciones@example.com"
    )
    assert parsed.machine_reason


def test_corpus_has_machine_mail() -> None:
    assert len(MACHINE_FILES) >= 80
