"""What agents get back: missing fields, a corrected resend completing its case, oversized
mail, replies on a case's thread; and each sample escalation's outcome end to end."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailrouter.config import load_config
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from mailrouter.store.tables import Message
from tests.conftest import escalation

NOW = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)


@pytest.fixture
def pipeline(write_config: Callable[..., Path]) -> Pipeline:
    config = load_config(write_config())
    return Pipeline(config, Store(config.database_url), lambda: NOW)


def body_of(message: Message) -> str:
    parsed = email.message_from_bytes(message.raw, policy=email.policy.default)
    part = parsed.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def reply_to(
    outgoing: Message,
    text: str,
    *,
    subject: str | None = None,
    sender: str = "Andrés Pérez <andres.perez@example.com>",
    attachment: tuple[str, bytes] | None = None,
    message_id: str = "r1",
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = subject if subject is not None else f"RE: {outgoing.subject}"
    msg["Message-ID"] = f"<{message_id}@example.com>"
    msg["In-Reply-To"] = f"<{outgoing.message_id}>"
    msg.set_content(text)
    if attachment:
        msg.add_attachment(attachment[1], maintype="image", subtype="png", filename=attachment[0])
    return msg.as_bytes()


def test_reply_with_missing_field_completes_the_case(pipeline: Pipeline) -> None:
    first = pipeline.process(escalation("06-hibot-missing-correo.eml"))
    (question,) = pipeline.store.outbound()
    answer = reply_to(
        question,
        "Correo asociado al usuario: jlopez@claro.example\n\n"
        "> Tu escalamiento a HIBOT NO fue enviado\n> Cliente: OTRO",
    )
    second = pipeline.process(answer)
    assert second.outcome == "routed" and second.case_id == first.case_id
    (case,) = pipeline.store.cases()
    assert case.status == "open" and case.follow_up_due is not None
    assert case.fields["correo_usuario"] == "jlopez@claro.example"
    assert case.fields["cliente"] == "Claro"
    forward = next(m for m in pipeline.store.outbound() if m.kind == "forward")
    assert forward.recipients == ["soporte@hibot.us"]
    text = body_of(forward)
    assert "jlopez@claro.example" in text and "Claro" in text and "historial" in text
    assert [e.kind for e in pipeline.store.events(case.id)] == [
        "needs_info",
        "agent_update",
        "opened",
    ]


def test_fresh_resend_completes_the_case_too(pipeline: Pipeline) -> None:
    pipeline.process(escalation("06-hibot-missing-correo.eml"))
    fixed = (
        escalation("06-hibot-missing-correo.eml")
        .replace(
            b"Usuario que tiene el problema: jlopez",
            b"Usuario que tiene el problema: jlopez\n"
            b"Correo asociado al usuario: jlopez@claro.example",
        )
        .replace(b"<179535592844.20720.16600677435803181987@example.com>", b"<resend@example.com>")
    )
    result = pipeline.process(fixed)
    assert result.outcome == "routed"
    assert len(pipeline.store.cases()) == 1


def test_still_missing_asks_again_on_the_same_case(pipeline: Pipeline) -> None:
    pipeline.process(escalation("06-hibot-missing-correo.eml"))
    (question,) = pipeline.store.outbound()
    again = pipeline.process(reply_to(question, "Correo asociado al usuario: no sé"))
    assert again.outcome == "needs_info"
    (case,) = pipeline.store.cases()
    assert case.status == "needs_info"
    second_question = pipeline.store.outbound()[-1]
    assert second_question.kind == "needs_info"
    assert "«no sé» no es una dirección de correo" in body_of(second_question)
    assert not any(m.kind == "forward" for m in pipeline.store.outbound())


def filename(part: EmailMessage) -> str:
    name = part.get_filename()
    assert name is not None  # every attachment here is sent with a file name
    return name


def test_attachments_of_the_first_mail_are_kept(pipeline: Pipeline) -> None:
    raw = escalation("04-tech-endoso.eml").replace(b"D=C3=B3nde: App m=C3=B3vil", b"Lugar: App")
    assert pipeline.process(raw).outcome == "needs_info"
    question = pipeline.store.outbound()[0]
    pipeline.process(
        reply_to(
            question, "Dónde: App móvil Android 5.2.0", attachment=("segunda.png", b"\x89PNG-2")
        )
    )
    forward = next(m for m in pipeline.store.outbound() if m.kind == "forward")
    parsed = email.message_from_bytes(forward.raw, policy=email.policy.default)
    names = sorted(filename(p) for p in parsed.iter_attachments())
    assert names == ["error-endoso.png", "segunda.png"]


def test_invalid_email_is_reported(pipeline: Pipeline) -> None:
    raw = escalation("01-hibot-basic.eml").replace(
        b"Correo asociado al usuario: mrodriguez@lafise.com.ni",
        b"Correo asociado al usuario: mrodriguez arroba lafise",
    )
    assert pipeline.process(raw).outcome == "needs_info"
    (reply,) = pipeline.store.outbound()
    assert "«mrodriguez arroba lafise» no es una dirección de correo" in body_of(reply)


def test_reply_on_an_open_case_is_relayed_not_a_new_case(pipeline: Pipeline) -> None:
    pipeline.process(escalation("01-hibot-basic.eml"))
    forward, ack = pipeline.store.outbound()
    result = pipeline.process(
        reply_to(ack, "¿Alguna novedad?", sender="Laura Gómez <laura.gomez@example.com>")
    )
    assert result.outcome == "threaded" and result.case_id == 1
    (case,) = pipeline.store.cases()
    assert case.status == "awaiting_vendor"
    relay = pipeline.store.outbound()[-1]
    assert relay.kind == "relay_to_vendor" and relay.recipients == ["soporte@hibot.us"]
    parsed = email.message_from_bytes(relay.raw, policy=email.policy.default)
    assert parsed["In-Reply-To"] == f"<{forward.message_id}>"
    assert parsed["Subject"] == f"Re: {forward.subject}"
    assert "¿Alguna novedad?" in body_of(relay)


def test_oversized_mail_answers_the_agent_only(write_config: Callable[..., Path]) -> None:
    config = load_config(write_config({"intake": {"max_message_bytes": 600}}))
    pipeline = Pipeline(config, Store(config.database_url), lambda: NOW)
    assert pipeline.process(escalation("01-hibot-basic.eml")).outcome == "quarantined"
    (reply,) = pipeline.store.outbound()
    assert reply.recipients == ["laura.gomez@example.com"] and reply.kind == "too_large"
    assert "supera el límite" in body_of(reply)
    # A stranger's or a robot's oversized mail gets no answer (no backscatter, no loop).
    assert pipeline.process(escalation("10-spoofed-sender.eml")).outcome == "quarantined"
    assert pipeline.process(escalation("09-agent-out-of-office.eml")).outcome in (
        "ignored",
        "quarantined",
    )
    assert len(pipeline.store.outbound()) == 1


# file -> (outcome, destination address or None, priority or None)
README_OUTCOMES = {
    "01-hibot-basic.eml": ("routed", "soporte@hibot.us", "ALTA"),
    "02-panda-basic.eml": ("routed", "soporte_revendedores@clickpanda.com", "MEDIA"),
    "03-operaciones-encuestas.eml": ("routed", "support@example.hs-inbox.com", "MEDIA"),
    "04-tech-endoso.eml": ("routed", "tech@example.com", "URGENTE"),
    "05-hibot-html-only.eml": ("routed", "soporte@hibot.us", "BAJA"),
    "06-hibot-missing-correo.eml": ("needs_info", None, None),
    "07-panda-no-accents.eml": ("routed", "soporte_revendedores@clickpanda.com", "ALTA"),
    "09-agent-out-of-office.eml": ("ignored", None, None),
    "10-spoofed-sender.eml": ("quarantined", None, None),
    "11-forwarded-customer-mail.eml": ("routed", "soporte_revendedores@clickpanda.com", "ALTA"),
    "12-subject-injection.eml": ("routed", "soporte@hibot.us", "BAJA"),
}


@pytest.mark.parametrize("name", sorted(README_OUTCOMES))
def test_sample_reaches_its_readme_outcome(pipeline: Pipeline, name: str) -> None:
    outcome, vendor, priority = README_OUTCOMES[name]
    assert pipeline.process(escalation(name)).outcome == outcome
    sent = pipeline.store.outbound()
    forwards = [m for m in sent if m.kind == "forward"]
    assert [f.recipients for f in forwards] == ([[vendor]] if vendor else [])
    if priority:
        assert pipeline.store.cases()[0].priority == priority
    if name == "04-tech-endoso.eml":
        parsed = email.message_from_bytes(forwards[0].raw, policy=email.policy.default)
        assert [p.get_filename() for p in parsed.iter_attachments()] == ["error-endoso.png"]
    if name == "11-forwarded-customer-mail.eml":
        assert pipeline.store.cases()[0].client == "Comfama"
    if name == "12-subject-injection.eml":
        parsed = email.message_from_bytes(forwards[0].raw, policy=email.policy.default)
        assert parsed["Bcc"] is None and parsed["To"] == "soporte@hibot.us"
        assert b"\nBcc:" not in forwards[0].raw
    if outcome in ("ignored", "quarantined"):
        assert sent == []
    if outcome == "needs_info":
        (reply,) = sent
        assert "Correo asociado al usuario" in body_of(reply)
