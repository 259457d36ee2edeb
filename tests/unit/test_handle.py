"""Every decision path of `Handler`, against the in-memory `MemoryCaseBook`: no database, no
network, no clock (the time comes with each arrival), a few milliseconds a test."""

from __future__ import annotations

import email
import email.policy
import functools
import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from mailrouter.config import Config, load_config
from mailrouter.core.handle import Handler
from mailrouter.core.team import NOTE_COMMANDS
from mailrouter.model import CaseData, FailedMail, Result
from mailrouter.testing.book import MemoryCaseBook, StoredMail
from mailrouter.testing.book import arrive as arrive_in_memory
from mailrouter.testing.factory import reply as compose

PROJECT = Path(__file__).resolve().parents[2]
ESCALATIONS = PROJECT.parent / "shared" / "escalations"
NOW = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)
HIBOT = "soporte@hibot.us"
LAURA = "laura.gomez@example.com"
ANDRES = "andres.perez@example.com"
LEAD = "lider.pruebas@example.com"

# --- helpers -----------------------------------------------------------------------------


@functools.cache
def shipped() -> Config:
    return load_config(PROJECT / "config.yaml")


def variant(**updates: dict[str, Any]) -> Config:
    """The shipped config with some sections changed, e.g. `team={"leads": [...]}`."""
    config = shipped()
    settings = config.settings
    changed = {
        name: getattr(settings, name).model_copy(update=values) for name, values in updates.items()
    }
    return replace(config, settings=settings.model_copy(update=changed))


_handlers: dict[str, Handler] = {}


def handler_with(**updates: dict[str, Any]) -> Handler:
    """A handler whose team lead is LEAD (not whatever the environment says), plus `updates`.
    One per variant: a handler keeps no state between mails, and compiling its templates
    is most of what a test would otherwise spend."""
    updates = {"team": {"leads": [LEAD]}, **updates}
    key = repr(sorted(updates.items()))
    if key not in _handlers:
        _handlers[key] = Handler(variant(**updates))
    return _handlers[key]


def sample(name: str) -> bytes:
    return (ESCALATIONS / name).read_bytes()


def arrive(
    handler: Handler, book: MemoryCaseBook, raw: bytes, now: datetime = NOW, size: int | None = None
) -> Result:
    return arrive_in_memory(handler, book, raw, now, size)


_ids = itertools.count(1)


def hibot_escalation(client: str, user: str, priority: str = "MEDIA") -> bytes:
    return compose(
        f"Laura Gómez <{LAURA}>",
        f"Proveedor: HIBOT\nCliente: {client}\nUsuario que tiene el problema: {user}\n"
        f"Correo asociado al usuario: {user}@cliente.example\nPrioridad: {priority}\n"
        "Descripción del problema: no puede ingresar\n",
        subject=f"Escalamiento HIBOT - {client}",
    )


def message_id_of(raw: bytes) -> str:
    return str(email.message_from_bytes(raw)["Message-ID"]).strip("<>")


def parsed(stored: StoredMail) -> EmailMessage:
    return email.message_from_bytes(stored.raw, policy=email.policy.default)  # type: ignore[return-value]


def body_of(stored: StoredMail) -> str:
    part = parsed(stored).get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def only(book: MemoryCaseBook, kind: str) -> StoredMail:
    (mail,) = book.outbox(kind)
    return mail


def details(book: MemoryCaseBook, case_id: int, kind: str) -> list[str]:
    return [e.detail for e in book.events if e.case_id == case_id and e.kind == kind]


def open_hibot(handler: Handler, book: MemoryCaseBook) -> CaseData:
    """Sample 01 routed: case 1 at HIBOT, ALTA, with its forward and acknowledgement queued."""
    assert arrive(handler, book, sample("01-hibot-basic.eml")).outcome == "routed"
    return book.cases[1]


def vendor_reply(forward: StoredMail, text: str, **headers: str) -> bytes:
    return compose(
        "Carlos HIBOT <carlos@hibot.us>",
        text,
        subject=f"RE: {forward.subject}",
        in_reply_to=forward.message_id,
        headers=headers,
    )


def agent_reply(on: StoredMail, text: str, sender: str = f"Laura Gómez <{LAURA}>") -> bytes:
    return compose(sender, text, subject=f"Re: {on.subject}", in_reply_to=on.message_id)


def dsn(original_id: str) -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@relay.example.com>\r\n"
        "To: escalaciones@example.com\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <dsn{next(_ids)}@relay.example.com>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay\r\n\r\n"
        f"Final-Recipient: rfc822; {HIBOT}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: <{original_id}>\r\nSubject: x\r\n\r\n--B--\r\n"
    ).encode()


# --- 1. a complete escalation opens a case ------------------------------------------------


def test_complete_escalation_is_routed_with_forward_and_acknowledgement(
    handler: Handler, book: MemoryCaseBook
) -> None:
    raw = sample("01-hibot-basic.eml")
    result = arrive(handler, book, raw)
    assert result == Result("routed", result.reason, 1)
    assert "proveedor-hibot" in result.reason
    case = book.cases[1]
    assert (case.provider, case.route, case.priority, case.status) == (
        "hibot",
        "proveedor-hibot",
        "ALTA",
        "open",
    )
    assert case.follow_up_due == NOW + timedelta(hours=24)
    assert (case.agent_address, case.client, case.client_key) == (
        LAURA,
        "Lafise Nicaragua",
        "lafise nicaragua",
    )
    assert case.fields["correo_usuario"] == "mrodriguez@lafise.com.ni"
    assert [(m.kind, m.recipients, m.case_id) for m in book.outbox()] == [
        ("forward", [HIBOT], 1),
        ("acknowledgement", [LAURA], 1),
    ]
    forward, ack = book.outbox()
    assert forward.subject.startswith("[ESC-000001] ")
    assert parsed(forward)["Reply-To"] == "escalaciones@example.com"
    assert "mrodriguez@lafise.com.ni" in body_of(forward)
    # The acknowledgement answers the agent's own mail, with the case number and due time.
    assert parsed(ack)["In-Reply-To"] == f"<{message_id_of(raw)}>"
    text = body_of(ack)
    assert "ESC-000001" in text and "ALTA" in text
    assert "martes, 17 de noviembre de 2026, 2:05" in text  # the due time, in Bogotá, in Spanish
    (inbound,) = book.inbound()
    assert (inbound.kind, inbound.outcome, inbound.case_id) == ("escalation", "routed", 1)
    assert book.events_of(1) == ["opened"]  # ALTA: no lead alert
    assert book.outbox("urgent_alert") == []


def test_urgent_escalation_alerts_the_team_lead_at_once(
    handler: Handler, book: MemoryCaseBook
) -> None:
    result = arrive(handler, book, sample("04-tech-endoso.eml"))
    assert result.outcome == "routed"
    case = book.cases[1]
    assert (case.provider, case.priority) == ("tech", "URGENTE")
    assert case.follow_up_due == NOW + timedelta(hours=4)
    alert = only(book, "urgent_alert")
    assert alert.recipients == [LEAD] and alert.case_id == 1
    assert book.events_of(1) == ["opened", "lead_alerted"]
    names = [p.get_filename() for p in parsed(only(book, "forward")).iter_attachments()]
    assert names == ["error-endoso.png"]


# --- 2. missing fields, then the agent completes them ---------------------------------------


def test_missing_field_answers_the_agent_and_forwards_nothing(
    handler: Handler, book: MemoryCaseBook
) -> None:
    raw = sample("06-hibot-missing-correo.eml")
    result = arrive(handler, book, raw)
    assert (result.outcome, result.case_id) == ("needs_info", 1)
    case = book.cases[1]
    assert (case.status, case.follow_up_due, case.provider) == ("needs_info", None, "hibot")
    question = only(book, "needs_info")
    assert question.recipients == [ANDRES]
    assert parsed(question)["In-Reply-To"] == f"<{message_id_of(raw)}>"
    listed = [
        line.strip()[2:] for line in body_of(question).splitlines() if line.startswith("  - ")
    ]
    assert listed == ["Correo asociado al usuario"]
    assert [m.kind for m in book.outbox()] == ["needs_info"]
    assert book.events_of(1) == ["needs_info"]


def test_agent_reply_with_the_missing_field_routes_the_same_case(
    handler: Handler, book: MemoryCaseBook
) -> None:
    arrive(handler, book, sample("06-hibot-missing-correo.eml"))
    question = only(book, "needs_info")
    answer = agent_reply(
        question,
        "Correo asociado al usuario: jlopez@claro.example\n\n> Cliente: OTRO",
        sender=f"Andrés Pérez <{ANDRES}>",
    )
    later = NOW + timedelta(minutes=10)
    result = arrive(handler, book, answer, later)
    assert (result.outcome, result.case_id) == ("routed", 1)
    assert list(book.cases) == [1]
    case = book.cases[1]
    assert case.status == "open" and case.follow_up_due == later + timedelta(hours=48)
    assert case.fields["correo_usuario"] == "jlopez@claro.example"
    assert case.fields["cliente"] == "Claro"  # the first mail's fields are kept
    forward = only(book, "forward")
    assert forward.recipients == [HIBOT]
    assert "jlopez@claro.example" in body_of(forward) and "historial" in body_of(forward)
    assert only(book, "acknowledgement").recipients == [ANDRES]
    assert book.events_of(1) == ["needs_info", "agent_update", "opened"]


def test_fresh_resend_of_a_needs_info_case_completes_it(
    handler: Handler, book: MemoryCaseBook
) -> None:
    arrive(handler, book, sample("06-hibot-missing-correo.eml"))
    fixed = (
        sample("06-hibot-missing-correo.eml")
        .replace(
            b"Usuario que tiene el problema: jlopez",
            b"Usuario que tiene el problema: jlopez\n"
            b"Correo asociado al usuario: jlopez@claro.example",
        )
        .replace(b"<179535592844.20720.16600677435803181987@example.com>", b"<resend@example.com>")
    )
    result = arrive(handler, book, fixed, NOW + timedelta(minutes=5))
    assert (result.outcome, result.case_id) == ("routed", 1)
    assert list(book.cases) == [1] and book.cases[1].status == "open"
    assert only(book, "forward").recipients == [HIBOT]


# --- 3. a duplicate escalation joins the open case ------------------------------------------


def test_duplicate_escalation_threads_into_the_open_case_and_raises_priority(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    forward = only(book, "forward")
    raw = sample("08-hibot-duplicate.eml")
    later = NOW + timedelta(hours=1)
    result = arrive(handler, book, raw, later)
    assert result == Result("threaded", "duplicate of ESC-000001", 1)
    assert list(book.cases) == [1]
    case = book.cases[1]
    assert case.priority == "URGENTE"
    assert case.follow_up_due == later + timedelta(hours=4)  # sooner than ALTA's due
    relay = only(book, "relay_to_vendor")
    assert relay.recipients == [HIBOT]
    assert parsed(relay)["In-Reply-To"] == f"<{forward.message_id}>"
    assert "sigue sin acceso" in body_of(relay)
    notice = only(book, "duplicate")
    assert notice.recipients == [LAURA]
    assert parsed(notice)["In-Reply-To"] == f"<{message_id_of(raw)}>"
    assert "ESC-000001" in notice.subject and "URGENTE (subió desde ALTA)" in body_of(notice)
    assert only(book, "urgent_alert").recipients == [LEAD]
    assert details(book, 1, "duplicate")[0].endswith("priority ALTA -> URGENTE")
    assert book.events_of(1) == ["opened", "lead_alerted", "duplicate", "relayed_to_vendor"]
    assert book.inbound()[-1].kind == "escalation" and book.inbound()[-1].case_id == 1


def test_lower_priority_duplicate_keeps_the_case_priority(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    due = book.cases[1].follow_up_due
    lower = sample("08-hibot-duplicate.eml").replace(b"Prioridad: URGENTE", b"Prioridad: BAJA")
    result = arrive(handler, book, lower, NOW + timedelta(hours=1))
    assert result.reason == "duplicate of ESC-000001"
    assert (book.cases[1].priority, book.cases[1].follow_up_due) == ("ALTA", due)
    assert book.outbox("urgent_alert") == []
    assert "subió" not in body_of(only(book, "duplicate"))


def test_other_user_of_the_same_client_opens_a_new_case(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    other = sample("08-hibot-duplicate.eml").replace(b"mrodriguez", b"otro.usuario")
    assert arrive(handler, book, other).outcome == "routed"
    assert sorted(book.cases) == [1, 2]


# --- 4. the same mail twice --------------------------------------------------------------------


def test_same_mail_twice_gets_the_earlier_outcome_and_queues_nothing(
    handler: Handler, book: MemoryCaseBook
) -> None:
    raw = sample("01-hibot-basic.eml")
    first = arrive(handler, book, raw)
    queued = len(book.outbox())
    again = arrive(handler, book, raw, NOW + timedelta(minutes=1))
    assert again == replace(first, duplicate=True)
    assert again.outcome == "routed" and again.case_id == 1
    assert len(book.outbox()) == queued == 2
    assert len(book.inbound()) == 1 and list(book.cases) == [1]


# --- 5. the vendor writes back ---------------------------------------------------------------


def test_vendor_reply_is_relayed_to_the_agent(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    forward, ack = book.outbox()
    later = NOW + timedelta(hours=2)
    result = arrive(handler, book, vendor_reply(forward, "Reiniciamos la sesión.\n\nCarlos"), later)
    assert result == Result("threaded", "vendor reply on ESC-000001", 1)
    case = book.cases[1]
    assert case.status == "vendor_replied"
    assert case.follow_up_due == later + timedelta(hours=24)
    relay = only(book, "relay_to_agent")
    assert relay.recipients == [LAURA]
    assert "Reiniciamos la sesión" in body_of(relay)
    # In the agent's conversation: the escalation, then our acknowledgement.
    assert parsed(relay)["In-Reply-To"] == f"<{ack.message_id}>"
    assert book.inbound()[-1].kind == "vendor"
    assert book.events_of(1) == ["opened", "vendor_reply"]


def test_vendor_auto_reply_records_its_ticket_and_tells_the_agent_once(
    handler: Handler, book: MemoryCaseBook
) -> None:
    assert shipped().providers["hibot"].ticket_number  # HIBOT announces ticket numbers
    open_hibot(handler, book)
    forward = only(book, "forward")
    auto = compose(
        f"HIBOT Soporte <{HIBOT}>",
        "Hemos recibido su solicitud. Ticket #55123 creado.",
        subject="Ticket #55123 creado",
        in_reply_to=forward.message_id,
        headers={"Auto-Submitted": "auto-replied"},
    )
    result = arrive(handler, book, auto, NOW + timedelta(minutes=1))
    assert (result.outcome, result.case_id) == ("threaded", 1)
    assert result.reason.startswith("vendor auto-reply on ESC-000001")
    case = book.cases[1]
    assert case.vendor_ticket == "55123"
    assert case.status == "open"  # an auto-reply is not an answer
    notice = only(book, "vendor_ticket")
    assert notice.recipients == [LAURA] and "55123" in notice.subject
    assert book.outbox("relay_to_agent") == []
    # A second auto-reply with the same ticket tells nobody anything.
    again = auto.replace(b"Message-ID: <", b"Message-ID: <again-")
    assert arrive(handler, book, again, NOW + timedelta(minutes=2)).outcome == "threaded"
    assert len(book.outbox("vendor_ticket")) == 1
    assert book.events_of(1) == ["opened", "vendor_ticket"]
    # From now on the ticket number alone finds the case.
    bare = compose("agente@hibot.us", "Solucionado.", subject="Actualización ticket 55123")
    assert arrive(handler, book, bare, NOW + timedelta(minutes=3)).case_id == 1
    assert only(book, "relay_to_agent").recipients == [LAURA]


def test_vendor_mail_matching_no_case_is_quarantined(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    result = arrive(handler, book, compose(HIBOT, "¿De qué caso hablan?", subject="Consulta"))
    assert result == Result("quarantined", "unmatched vendor reply")
    assert len(book.outbox()) == 2


# --- 6. the agent writes on the case's thread ------------------------------------------------


def test_agent_reply_is_relayed_to_the_vendor_in_its_thread(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    forward, ack = book.outbox()
    later = NOW + timedelta(hours=3)
    result = arrive(handler, book, agent_reply(ack, "¿Alguna novedad?\n#nota llamó"), later)
    assert result == Result("threaded", "agent reply on ESC-000001", 1)
    relay = only(book, "relay_to_vendor")
    assert relay.recipients == [HIBOT]
    headers = parsed(relay)
    assert headers["In-Reply-To"] == f"<{forward.message_id}>"
    assert forward.message_id in headers["References"]
    assert headers["Subject"] == f"Re: {forward.subject}"
    text = body_of(relay)
    assert "¿Alguna novedad?" in text and "#nota" not in text and "llamó" not in text
    case = book.cases[1]
    assert case.status == "awaiting_vendor"
    assert case.follow_up_due == later + timedelta(hours=24)
    assert book.inbound()[-1].kind == "agent_reply"
    assert book.events_of(1) == ["opened", "note", "relayed_to_vendor"]


def test_a_mail_of_many_note_lines_records_only_the_first_ones(
    handler: Handler, book: MemoryCaseBook
) -> None:
    # Each #nota and #seguimiento is an event and a line of the confirmation: a mail of
    # thousands of them costs no more than the cap's worth.
    open_hibot(handler, book)
    lines = [f"#nota n{n}" for n in range(500)] + [f"#seguimiento s{n}" for n in range(30)]
    arrive(handler, book, agent_reply(only(book, "acknowledgement"), "\n".join(lines)))
    assert details(book, 1, "note") == [f"{LAURA}: n{n}" for n in range(NOTE_COMMANDS)]
    assert len(details(book, 1, "follow_up")) == NOTE_COMMANDS
    done = body_of(only(book, "commands_done"))
    assert f"#nota: {500 - NOTE_COMMANDS} más no se anotaron" in done
    assert f"#seguimiento: {30 - NOTE_COMMANDS} más no se anotaron" in done
    assert "(n20)" not in done


def test_resuelto_closes_the_case_without_relaying(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    result = arrive(handler, book, agent_reply(ack, "#resuelto"), NOW + timedelta(hours=1))
    assert result.outcome == "threaded"
    case = book.cases[1]
    assert (case.status, case.follow_up_due) == ("closed", None)
    assert book.outbox("relay_to_vendor") == []
    assert details(book, 1, "closed") == [f"closed by {LAURA}"]


def test_prioridad_urgente_raises_priority_and_alerts_the_lead(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    later = NOW + timedelta(hours=1)
    arrive(handler, book, agent_reply(ack, "#prioridad URGENTE"), later)
    case = book.cases[1]
    assert case.priority == "URGENTE" and case.status == "open"
    assert case.follow_up_due == later + timedelta(hours=4)
    assert details(book, 1, "priority") == ["ALTA -> URGENTE"]
    alert = only(book, "urgent_alert")
    assert alert.recipients == [LEAD] and alert.case_id == 1
    assert book.outbox("relay_to_vendor") == []  # nothing but the command: nothing to relay


# --- 7. machines and strangers ----------------------------------------------------------------


def test_auto_reply_is_ignored(handler: Handler, book: MemoryCaseBook) -> None:
    result = arrive(handler, book, sample("09-agent-out-of-office.eml"))
    assert result.outcome == "ignored" and "Auto-Submitted: auto-replied" in result.reason
    assert result.case_id is None
    assert book.cases == {} and book.outbox() == []
    (kept,) = book.inbound()
    assert (kept.kind, kept.outcome) == ("machine", "ignored")


def test_stranger_is_quarantined_without_a_reply(handler: Handler, book: MemoryCaseBook) -> None:
    result = arrive(handler, book, sample("10-spoofed-sender.eml"))
    assert result.outcome == "quarantined" and "not in allowed_senders" in result.reason
    assert book.cases == {} and book.outbox() == []
    (kept,) = book.inbound()
    assert (kept.kind, kept.outcome, kept.reason) == ("quarantined", "quarantined", result.reason)


# --- 8. a bounce of a forward ----------------------------------------------------------------


def test_bounce_of_the_forward_makes_the_case_undeliverable(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    forward, ack = book.outbox()
    assert forward.message_id
    result = arrive(handler, book, dsn(forward.message_id), NOW + timedelta(minutes=1))
    assert (result.outcome, result.case_id) == ("ignored", 1)
    assert result.reason.startswith("bounce of ESC-000001")
    assert book.cases[1].status == "undeliverable"
    assert (ack.delivery, forward.delivery) == ("cancelled", "pending")
    notice = only(book, "undeliverable")
    assert notice.recipients == [LAURA, LEAD]  # the leads hear too
    text = body_of(notice)
    assert HIBOT in text and "5.1.1" in text and "User unknown" in text
    assert book.inbound()[-1].kind == "bounce"
    assert book.events_of(1) == ["opened", "undeliverable"]


def test_bounce_of_something_else_is_only_recorded(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    result = arrive(handler, book, dsn("not-ours@example.com"))
    assert result.outcome == "ignored" and result.case_id is None
    assert book.cases[1].status == "open" and len(book.outbox()) == 2


# --- 9. too large ----------------------------------------------------------------------------


def test_too_large_mail_is_quarantined_and_the_agent_told(
    handler: Handler, book: MemoryCaseBook
) -> None:
    raw = sample("01-hibot-basic.eml")
    limit = handler.config.settings.intake.max_message_bytes
    result = arrive(handler, book, raw, size=limit + 1)
    assert result.outcome == "quarantined"
    assert f"over the {limit}-byte limit" in result.reason
    assert "only its header is stored" in result.reason  # size says more than the bytes held
    assert book.cases == {}
    reply = only(book, "too_large")
    assert (reply.recipients, reply.case_id) == ([LAURA], None)
    assert parsed(reply)["In-Reply-To"] == f"<{message_id_of(raw)}>"
    assert "supera el límite" in body_of(reply)
    assert [m.kind for m in book.outbox()] == ["too_large"]


def test_too_large_from_a_stranger_gets_no_reply(handler: Handler, book: MemoryCaseBook) -> None:
    small = handler_with(intake={"max_message_bytes": 100})
    result = arrive(small, book, sample("10-spoofed-sender.eml"))
    assert result.outcome == "quarantined" and "100-byte limit" in result.reason
    assert "only its header" not in result.reason
    assert book.outbox() == []


# --- 10. the sender gives up on a mail --------------------------------------------------------


def test_failed_forward_makes_the_case_undeliverable(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    forward, ack = book.outbox()
    failed = FailedMail(forward.id, 1, "forward", [HIBOT], "550 5.1.1 User unknown")
    handler.delivery_failed(book, failed, NOW + timedelta(minutes=5))
    assert book.cases[1].status == "undeliverable"
    assert book.events_of(1) == ["opened", "delivery_failed", "undeliverable"]
    assert details(book, 1, "delivery_failed") == [
        f"forward to {HIBOT} failed: 550 5.1.1 User unknown"
    ]
    assert ack.delivery == "cancelled"
    assert only(book, "undeliverable").recipients == [LAURA, LEAD]  # the leads hear too


def test_failed_acknowledgement_is_only_recorded(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    failed = FailedMail(ack.id, 1, "acknowledgement", [LAURA], "550 mailbox full")
    handler.delivery_failed(book, failed, NOW + timedelta(minutes=5))
    assert book.cases[1].status == "open"
    assert book.events_of(1) == ["opened", "delivery_failed"]
    assert len(book.outbox()) == 2
    handler.delivery_failed(book, replace(failed, case_id=None), NOW)  # a digest, say
    assert len(book.events) == 2


# --- 11. relays per case per hour --------------------------------------------------------------


def test_third_relay_within_the_hour_is_held_back() -> None:
    handler = handler_with(loop_protection={"max_relays_per_case_per_hour": 2})
    book = MemoryCaseBook()
    open_hibot(handler, book)
    forward = only(book, "forward")
    for minute in (1, 2, 3):
        reply = vendor_reply(forward, f"respuesta {minute}")
        result = arrive(handler, book, reply, NOW + timedelta(minutes=minute))
        assert result.outcome == "threaded"
    assert [body_of(m).count("respuesta") for m in book.outbox("relay_to_agent")] == [1, 1]
    assert "respuesta 3" not in "".join(body_of(m) for m in book.outbox("relay_to_agent"))
    assert details(book, 1, "rate_limited") == ["2 relays in the last hour"]
    # An hour later the case relays again.
    arrive(handler, book, vendor_reply(forward, "respuesta 4"), NOW + timedelta(minutes=65))
    assert len(book.outbox("relay_to_agent")) == 3


# --- 12. what the router sends to one address per hour ----------------------------------------


def test_an_agent_s_escalations_are_never_limited_only_the_replies() -> None:
    handler = handler_with(
        loop_protection={"max_replies_per_address_per_hour": 2, "max_relays_per_case_per_hour": 20}
    )
    book = MemoryCaseBook()
    for minute, client in enumerate(["Uno", "Dos", "Tres"]):
        raw = hibot_escalation(client, "u1")
        assert arrive(handler, book, raw, NOW + timedelta(minutes=minute)).outcome == "routed"
    assert sorted(book.cases) == [1, 2, 3] and len(book.outbox("forward")) == 3
    assert len(book.outbox("acknowledgement")) == 2
    assert details(book, 3, "reply_withheld") == [
        f"{LAURA}: 2 automatic replies to it in the last hour "
        "(loop_protection.max_replies_per_address_per_hour)"
    ]
    # An hour later the agent is answered again.
    later = arrive(handler, book, hibot_escalation("Cuatro", "u1"), NOW + timedelta(minutes=61))
    assert later.outcome == "routed" and len(book.outbox("acknowledgement")) == 3


# --- 13. overdue reminders ---------------------------------------------------------------------


def test_overdue_case_reminds_the_agent_once_then_the_lead(
    handler: Handler, book: MemoryCaseBook
) -> None:
    case = open_hibot(handler, book)
    due = NOW + timedelta(hours=24)
    assert case.follow_up_due == due
    assert handler.remind(book, case, due - timedelta(minutes=1)) == 0
    assert handler.remind(book, case, due + timedelta(hours=1)) == 1
    reminder = only(book, "reminder")
    assert reminder.recipients == [LAURA] and "ESC-000001" in reminder.subject
    assert "HIBOT todavía no ha respondido" in body_of(reminder)
    assert case.reminded_due == due and case.escalated_due is None
    # Same due time: nothing more, however often the scheduler asks.
    assert handler.remind(book, case, due + timedelta(hours=2)) == 0
    assert len(book.outbox("reminder")) == 1
    # A second whole window later the lead hears of it, once.
    assert handler.remind(book, case, due + timedelta(hours=25)) == 1
    assert only(book, "reminder_lead").recipients == [LEAD]
    assert case.escalated_due == due
    assert handler.remind(book, case, due + timedelta(hours=26)) == 0
    assert book.events_of(1) == ["opened", "reminder", "reminder_lead"]


def test_reminder_quotes_the_vendors_last_mail(handler: Handler, book: MemoryCaseBook) -> None:
    case = open_hibot(handler, book)
    forward = only(book, "forward")
    arrive(handler, book, vendor_reply(forward, "Necesitamos una captura."), NOW)
    assert case.follow_up_due is not None
    assert handler.remind(book, case, case.follow_up_due + timedelta(minutes=1)) == 1
    assert "Necesitamos una captura." in body_of(only(book, "reminder"))


def test_second_window_without_leads_sends_nothing_to_nobody(book: MemoryCaseBook) -> None:
    handler = handler_with(team={"leads": []})
    case = open_hibot(handler, book)
    assert case.follow_up_due is not None
    # Both windows passed at once: the agent's reminder only.
    assert handler.remind(book, case, case.follow_up_due + timedelta(hours=25)) == 1
    assert book.outbox("reminder_lead") == []
    assert case.escalated_due == case.follow_up_due
