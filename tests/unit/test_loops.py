"""Loop protection aimed at robots, not at people (issue 19, item 2): every escalation
opens its case and reaches the vendor however many arrive; what is limited is what the
router sends to one address, and a robot is recognised by repeating itself."""

from __future__ import annotations

from datetime import timedelta

from mailrouter.testing.book import MemoryCaseBook
from mailrouter.testing.factory import reply as compose
from tests.unit.test_handle import LAURA, LEAD, NOW, arrive, handler_with, hibot_escalation

ROBOT = "tickets@example.com"  # an allowed address whose owner set up an auto-responder


def to(book: MemoryCaseBook, address: str) -> list[str]:
    return [m.kind for m in book.outbox() if address in m.recipients]


def test_a_burst_of_200_escalations_from_one_agent_all_reach_the_vendor() -> None:
    handler, book = handler_with(), MemoryCaseBook()
    for n in range(200):
        raw = hibot_escalation(f"Cliente {n}", f"usuario{n}")
        result = arrive(handler, book, raw, NOW + timedelta(seconds=10 * n))
        assert result.outcome == "routed", result.reason
    assert len(book.cases) == 200 and len(book.outbox("forward")) == 200
    assert not [m for m in book.inbound() if m.outcome == "quarantined"]
    # The agent gets the first 10 acknowledgements of the hour; the leads hear once why.
    assert len(book.outbox("acknowledgement")) == 10
    (alert,) = book.outbox("replies_stopped")
    assert alert.recipients == [LEAD] and LAURA in alert.subject


def test_an_auto_responder_ping_pong_stops_at_the_limit() -> None:
    handler, book = handler_with(), MemoryCaseBook()
    for n in range(40):
        # A ticket system without Auto-Submitted: a new mail, new text, to each of ours.
        robot_mail = compose(ROBOT, f"Recibimos su solicitud. Ticket {1000 + n}.")
        arrive(handler, book, robot_mail, NOW + timedelta(seconds=30 * n))
    assert to(book, ROBOT).count("needs_info") == 10
    assert len(book.outbox("replies_stopped")) == 1
    # Next day, the leads hear of it again (once) if it goes on.
    for n in range(15):
        robot_mail = compose(ROBOT, f"Recibimos su solicitud. Ticket {2000 + n}.")
        arrive(handler, book, robot_mail, NOW + timedelta(days=1, seconds=30 * n))
    assert to(book, ROBOT).count("needs_info") == 20
    assert len(book.outbox("replies_stopped")) == 2


def test_the_same_text_is_never_answered_twice() -> None:
    handler, book = handler_with(), MemoryCaseBook()
    out_of_office = "Estoy fuera de la oficina hasta el lunes.\n\nGracias,\nPedro"
    for n in range(5):
        arrive(handler, book, compose(ROBOT, out_of_office), NOW + timedelta(minutes=n))
    assert to(book, ROBOT) == ["needs_info"]
    (alert,) = book.outbox("replies_stopped")
    assert "same text again" in alert.raw.decode()
    # Someone else with the same words is another sender: answered.
    arrive(handler, book, compose("pedro@example.com", out_of_office), NOW + timedelta(hours=1))
    assert to(book, "pedro@example.com") == ["needs_info"]


def test_a_person_writing_different_mails_is_answered_each_time() -> None:
    handler, book = handler_with(), MemoryCaseBook()
    for n in range(5):
        arrive(handler, book, hibot_escalation(f"Cliente {n}", "u"), NOW + timedelta(minutes=n))
    assert to(book, LAURA).count("acknowledgement") == 5
    assert not book.outbox("replies_stopped")


def test_a_robot_that_says_so_is_never_answered() -> None:
    handler, book = handler_with(), MemoryCaseBook()
    auto = compose(ROBOT, "Fuera de la oficina", headers={"Auto-Submitted": "auto-replied"})
    assert arrive(handler, book, auto).outcome == "ignored"
    assert not book.outbox()
