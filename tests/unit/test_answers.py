"""Commands answer (issue 19, item 6) and one tag in every subject (item 7)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mailrouter.core.handle import Handler
from mailrouter.core.threads import bare_subject
from mailrouter.testing.book import MemoryCaseBook
from mailrouter.testing.factory import reply as compose
from tests.unit.test_handle import (
    ANDRES,
    LAURA,
    LEAD,
    NOW,
    agent_reply,
    arrive,
    body_of,
    only,
    open_hibot,
)


def test_resuelto_closes_the_case_and_confirms_it(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, "#resuelto"), NOW + timedelta(hours=1))
    assert book.cases[1].status == "closed"
    done = only(book, "commands_done")
    assert done.recipients == [LAURA]
    assert done.subject.startswith("[ESC-000001] Hecho:")
    assert "#resuelto: el caso quedó cerrado" in body_of(done)


def test_a_lead_s_command_is_confirmed_to_the_lead(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, "#prioridad URGENTE\n#nota llamó el gerente", LEAD))
    done = only(book, "commands_done")
    assert done.recipients == [LEAD]
    text = body_of(done)
    assert "#prioridad: ALTA -> URGENTE (los líderes fueron avisados)" in text
    assert "#nota: anotado en el historial del caso (llamó el gerente)" in text


def test_commands_from_anyone_else_change_nothing_and_are_not_confirmed(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, "#resuelto", ANDRES))
    assert book.cases[1].status == "open"
    assert not book.outbox("commands_done") and only(book, "commands_refused")


def test_a_plain_reply_gets_no_confirmation(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    arrive(handler, book, agent_reply(only(book, "acknowledgement"), "Más datos del cliente"))
    assert not book.outbox("commands_done")


@pytest.mark.parametrize(
    ("subject", "bare"),
    [
        ("RE: RE: [ESC-000001] Escalamiento INBOUND", "Escalamiento INBOUND"),
        ("RV: Fwd: [esc-000001] Caída", "Caída"),
        ("AW: TR: [HIBOT #4567] RE: [ESC-000001] Hola", "Hola"),
        ("Re[2]: SV: hola", "hola"),
        ("Reunión: de trabajo", "Reunión: de trabajo"),
        ("[ESC-000001] [ESC-000001] doble", "doble"),
    ],
)
def test_a_subject_is_bared_of_prefixes_tags_and_the_vendor_s_ticket(
    subject: str, bare: str
) -> None:
    assert bare_subject(subject, "ESC", "4567") == bare


def test_every_subject_carries_one_tag_and_one_re(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    forward = only(book, "forward")
    answer = compose(
        "Carlos HIBOT <carlos@hibot.us>",
        "Ticket #4567 abierto.",
        subject=f"AW: [HIBOT #4567] RE: {forward.subject}",
        in_reply_to=forward.message_id,
    )
    arrive(handler, book, answer, NOW + timedelta(minutes=5))
    (to_agent,) = [*book.outbox("vendor_ticket"), *book.outbox("relay_to_agent")]
    assert to_agent.subject.count("[ESC-000001]") == 1
    assert "RE:" not in to_agent.subject.upper() and "AW:" not in to_agent.subject
    assert to_agent.subject.count("4567") == 1
    reply = compose(
        f"Laura <{LAURA}>",
        "Gracias, quedo atenta",
        subject=f"RE: RE: {to_agent.subject}",
        in_reply_to=to_agent.message_id,
    )
    arrive(handler, book, reply, NOW + timedelta(minutes=10))
    relay = only(book, "relay_to_vendor")
    assert relay.subject.count("[ESC-000001]") == 1
    assert relay.subject.upper().count("RE:") == 1
