"""Who may speak for whom (issue 18, items 4, 5 and 7): Authentication-Results from trusted
hosts, commands only from a case's people, a tag alone threads only a participant's mail,
a Message-ID taken in advance does not swallow the real mail, and a huge subject is not
copied into every mail of its case."""

from __future__ import annotations

from datetime import timedelta

import authres
import pytest

from mailrouter.config import AuthenticationSettings
from mailrouter.core.authn import MAX_HEADERS, MAX_PARSED_CHARS, MAX_RESULTS, authenticate
from mailrouter.core.handle import UNAUTHENTICATED, Handler
from mailrouter.core.parse import SUBJECT_LIMIT, Refused
from mailrouter.model import FailedMail
from mailrouter.testing.book import MemoryCaseBook
from mailrouter.testing.factory import reply as compose
from tests.unit.test_handle import (
    ANDRES,
    HIBOT,
    LAURA,
    LEAD,
    NOW,
    agent_reply,
    arrive,
    details,
    handler_with,
    hibot_escalation,
    only,
    open_hibot,
    sample,
    vendor_reply,
)

MX = "mx.example.com"
FAILS = "; ".join(["dkim=fail header.d=a.example"] * MAX_RESULTS)
SEMIS = ";" * (2 * MAX_RESULTS)
DMARC = {"authentication": {"trusted_authserv_ids": [MX], "require": "dmarc"}}


def with_results(raw: bytes, *results: str) -> bytes:
    """`raw` with Authentication-Results headers on top, in the order given."""
    head = b"".join(f"Authentication-Results: {r}\n".encode() for r in results)
    return head + raw


# --- the rules of core/authn.py ---

REQUIRE_DMARC = AuthenticationSettings(trusted_authserv_ids=[MX], require="dmarc")
REQUIRE_ANY = AuthenticationSettings(trusted_authserv_ids=[MX], require="dkim-or-spf")


@pytest.mark.parametrize(
    ("settings", "headers", "passed"),
    [
        (REQUIRE_DMARC, [f"{MX}; dmarc=pass header.from=example.com"], True),
        (REQUIRE_DMARC, [f"{MX}; dmarc=fail header.from=example.com"], False),
        # DMARC for another domain than the From's says nothing about this From.
        (REQUIRE_DMARC, [f"{MX}; dmarc=pass header.from=evil.example.org"], False),
        # Only trusted hosts count: a stranger writes any result under any name.
        (REQUIRE_DMARC, ["mx.evil.example.org; dmarc=pass header.from=example.com"], False),
        (REQUIRE_DMARC, [], False),
        (REQUIRE_DMARC, [f"{MX}; none"], False),
        # The topmost run from the trusted host decides; an untrusted pass below is nothing.
        (
            REQUIRE_DMARC,
            [
                f"{MX}; dmarc=fail header.from=example.com",
                "x.org; dmarc=pass header.from=example.com",
            ],
            False,
        ),
        # Header names are case-blind; the trusted host may be below another host's header.
        (REQUIRE_DMARC, ["relay.other; spf=none", "MX.Example.COM; dmarc=pass"], True),
        # DKIM alone does not satisfy dmarc...
        (REQUIRE_DMARC, [f"{MX}; dkim=pass header.d=example.com"], False),
        # ...but satisfies dkim-or-spf when aligned (the same domain or a parent of it).
        (REQUIRE_ANY, [f"{MX}; dkim=pass header.d=example.com"], True),
        (REQUIRE_ANY, [f"{MX}; dkim=pass header.d=evil.example.org"], False),
        (REQUIRE_ANY, [f"{MX}; dkim=pass header.i=@example.com"], True),
        (REQUIRE_ANY, [f"{MX}; spf=pass smtp.mailfrom=bounce@example.com"], True),
        (REQUIRE_ANY, [f"{MX}; spf=pass smtp.mailfrom=bounce@evil.example.org"], False),
        (REQUIRE_ANY, [f"{MX}; spf=softfail smtp.mailfrom=example.com"], False),
        (REQUIRE_ANY, [f"{MX}; dkim=fail header.d=example.com; dmarc=pass"], True),
        # A ";" inside a comment does not end a result; results past the first
        # MAX_RESULTS of a header are not read, a second header of the run is.
        (
            REQUIRE_ANY,
            [f'{MX}; dkim=fail ({SEMIS}) header.d="{SEMIS}"; spf=pass smtp.mailfrom=x@example.com'],
            True,
        ),
        (REQUIRE_ANY, [f"{MX}; {FAILS}; dkim=pass header.d=example.com"], False),
        (REQUIRE_ANY, [f"{MX}; {FAILS}", f"{MX}; dkim=pass header.d=example.com"], True),
        # Unreadable results vouch for nothing and break nothing.
        (REQUIRE_ANY, [f"{MX}; ;;; ==="], False),
        (REQUIRE_ANY, ["garbage", f"{MX}; dkim=pass header.d=example.com"], True),
    ],
)
def test_authentication_rules(
    settings: AuthenticationSettings, headers: list[str], passed: bool
) -> None:
    verdict = authenticate(headers, "carla.diaz@example.com", settings)
    assert verdict.passed is passed, verdict.reason


def test_a_parent_domain_signature_covers_a_subdomain_sender() -> None:
    headers = [f"{MX}; dkim=pass header.d=example.com"]
    assert authenticate(headers, "carla@ventas.example.com", REQUIRE_ANY).passed
    assert not authenticate(headers, "carla@example.com.evil.org", REQUIRE_ANY).passed


def test_huge_authentication_headers_hand_authres_a_bounded_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """authres is the slow part (about 9 s for the first 16,000 results of one crafted
    header): whatever the headers, it is handed at most MAX_HEADERS values of at most
    MAX_PARSED_CHARS in all, each cut after MAX_RESULTS results, and nothing of another
    host's. What that costs against a normal mail is `make bench`'s hostile row."""
    handed: list[str] = []
    parse_value = authres.AuthenticationResultsHeader.parse_value

    def spy(value: str) -> object:
        handed.append(value)
        return parse_value(value)

    monkeypatch.setattr(authres.AuthenticationResultsHeader, "parse_value", spy)
    one = "; ".join(["dkim=fail header.d=a.example"] * 20_000)
    shapes = {
        "one huge header": ([f"{MX}; {one}"], 0),
        "many trusted headers": ([f"{MX}; {one[:1000]}"] * 40, 1),
        "many short trusted headers": ([f"{MX}; dkim=fail"] * 40, MAX_HEADERS),
        "many untrusted headers": ([f"x.example; {one}"] * 16, 0),
    }
    for name, (headers, calls) in shapes.items():
        handed.clear()
        assert not authenticate(headers, "carla@example.com", REQUIRE_ANY).passed
        assert len(handed) == calls, name
        assert sum(map(len, handed)) <= MAX_PARSED_CHARS, name
        assert all(value.count(";") <= MAX_RESULTS for value in handed), name


# --- 4. nobody speaks as an agent or a vendor without proof ---


def test_without_a_requirement_from_is_believed(book: MemoryCaseBook) -> None:
    assert arrive(handler_with(), book, sample("01-hibot-basic.eml")).outcome == "routed"


def test_an_agent_s_mail_that_passes_dmarc_is_routed(book: MemoryCaseBook) -> None:
    handler = handler_with(**DMARC)
    raw = with_results(sample("01-hibot-basic.eml"), f"{MX}; dmarc=pass header.from=example.com")
    assert arrive(handler, book, raw).outcome == "routed"


def test_a_forged_agent_is_quarantined_and_the_leads_told_once_a_day(
    book: MemoryCaseBook,
) -> None:
    handler = handler_with(**DMARC)
    forged = [
        with_results(
            hibot_escalation(f"Cliente {n}", f"user{n}"),
            f"{MX}; spf=fail smtp.mailfrom=example.com; dmarc=fail header.from=example.com",
        )
        for n in range(3)
    ]
    first = arrive(handler, book, forged[0])
    assert first.outcome == "quarantined"
    assert first.reason.startswith(f"{UNAUTHENTICATED}: dmarc does not pass for example.com")
    assert arrive(handler, book, forged[1], NOW + timedelta(hours=1)).outcome == "quarantined"
    assert not book.cases
    (alert,) = book.outbox("unauthenticated_alert")
    assert alert.recipients == [LEAD]
    assert LAURA in alert.subject
    # The next local day (Bogotá), the first one is told again.
    assert arrive(handler, book, forged[2], NOW + timedelta(days=1)).outcome == "quarantined"
    assert len(book.outbox("unauthenticated_alert")) == 2
    assert not book.outbox("forward") and not book.outbox("acknowledgement")


def test_mail_without_trusted_results_is_not_acted_on(book: MemoryCaseBook) -> None:
    handler = handler_with(**DMARC)
    raw = with_results(
        sample("01-hibot-basic.eml"), "mx.evil.example.org; dmarc=pass header.from=example.com"
    )
    result = arrive(handler, book, raw)
    assert result.outcome == "quarantined"
    assert "no Authentication-Results from a trusted host" in result.reason


def test_a_forged_vendor_cannot_answer_or_set_the_ticket(book: MemoryCaseBook) -> None:
    handler = handler_with(**DMARC)
    raw = with_results(sample("01-hibot-basic.eml"), f"{MX}; dmarc=pass header.from=example.com")
    arrive(handler, book, raw)
    forward = only(book, "forward")
    forged = vendor_reply(forward, "Ticket #99999: cerrado, ya no responda")
    result = arrive(handler, book, with_results(forged, f"{MX}; dmarc=fail header.from=hibot.us"))
    assert result.outcome == "quarantined"
    assert book.cases[1].vendor_ticket is None
    assert not book.outbox("relay_to_agent")
    genuine = vendor_reply(forward, "Ticket #12345 recibido")
    genuine = with_results(genuine, f"{MX}; dmarc=pass header.from=hibot.us")
    assert arrive(handler, book, genuine).outcome == "threaded"
    assert book.cases[1].vendor_ticket == "12345"


def test_forged_mail_does_not_lock_the_real_agent_out(book: MemoryCaseBook) -> None:
    handler = handler_with(
        loop_protection={"max_replies_per_address_per_hour": 3},
        **DMARC,
    )
    for n in range(5):
        forged = with_results(hibot_escalation(f"Forjado {n}", f"u{n}"), f"{MX}; dmarc=fail")
        assert arrive(handler, book, forged).outcome == "quarantined"
    real = with_results(sample("01-hibot-basic.eml"), f"{MX}; dmarc=pass header.from=example.com")
    assert arrive(handler, book, real, NOW + timedelta(minutes=1)).outcome == "routed"


# --- 4. a case's commands are its agent's and the leads' ---


def test_commands_from_another_agent_are_refused_and_the_sender_told(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    raw = agent_reply(ack, "#resuelto\n#prioridad BAJA\nYa lo hablé con el cliente.", ANDRES)
    assert arrive(handler, book, raw).outcome == "threaded"
    case = book.cases[1]
    assert case.status == "awaiting_vendor"  # the text went to the vendor
    assert case.priority == "ALTA"
    (refusal,) = book.outbox("commands_refused")
    assert refusal.recipients == [ANDRES]
    assert details(book, 1, "commands_refused") == [f"{ANDRES}: #resuelto, #prioridad BAJA"]
    text = refusal.raw.decode()
    assert "#resuelto" in text and "#prioridad BAJA" in text


def test_the_lead_and_the_agent_may_command(handler: Handler, book: MemoryCaseBook) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, "#prioridad URGENTE", LEAD))
    assert book.cases[1].priority == "URGENTE"
    arrive(handler, book, agent_reply(ack, "#resuelto", LAURA))
    assert book.cases[1].status == "closed"
    assert not book.outbox("commands_refused")


# --- 4. a tag alone threads only a participant's mail ---


def tagged(sender: str, text: str) -> bytes:
    return compose(sender, text, subject="Re: [ESC-000001] Escalamiento HIBOT")


def test_a_guessed_tag_does_not_thread_a_stranger_to_the_case(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    result = arrive(handler, book, tagged(ANDRES, "#resuelto\nCerrado."))
    assert result.case_id != 1
    assert book.cases[1].status == "open"
    assert not details(book, 1, "closed")


def test_a_tag_threads_the_agent_the_lead_and_the_vendor(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    assert arrive(handler, book, tagged(LAURA, "Más datos")).case_id == 1
    assert arrive(handler, book, tagged(LEAD, "Revisado")).case_id == 1
    assert (
        arrive(handler, book, tagged(f"Carlos <carlos@{HIBOT.split('@')[1]}>", "ok")).case_id == 1
    )


def test_someone_who_wrote_on_the_case_is_a_participant(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, "Yo también lo vi", ANDRES))  # on the thread
    assert arrive(handler, book, tagged(ANDRES, "Otro dato")).case_id == 1


# --- 5. a Message-ID taken in advance ------------------------------------------------------------


def test_a_message_id_taken_in_advance_does_not_swallow_the_real_mail(
    handler: Handler, book: MemoryCaseBook
) -> None:
    real = sample("01-hibot-basic.eml")
    squatter = real.replace(
        b"From: Laura =?utf-8?q?G=C3=B3mez?= <laura.gomez@example.com>", b"From: x@evil.example.org"
    )
    assert squatter != real
    assert arrive(handler, book, squatter).outcome == "quarantined"
    result = arrive(handler, book, real)
    assert result.outcome == "routed" and not result.duplicate
    again = arrive(handler, book, real)  # the same mail twice is still one mail
    assert again.duplicate and again.case_id == result.case_id
    # The same Message-ID and sender with another body is another mail, not dropped.
    edited = real.replace(b"Gracias,", b"Gracias de nuevo,")
    assert not arrive(handler, book, edited).duplicate


def test_the_same_mail_through_another_hop_is_a_duplicate(
    handler: Handler, book: MemoryCaseBook
) -> None:
    real = sample("01-hibot-basic.eml")
    arrive(handler, book, real)
    relayed = b"Received: from relay.example.com by mx.example.com; Mon, 16 Nov 2026\r\n" + (
        real.replace(b"\n", b"\r\n")
    )
    assert arrive(handler, book, relayed).duplicate


# --- 7. the subject copied into a case's mails is bounded ---


def with_subject(raw: bytes, subject: bytes) -> bytes:
    head, body = raw.split(b"\n\n", 1)
    head = b"\n".join(line for line in head.split(b"\n") if not line.startswith(b"Subject:"))
    return head + b"\nSubject: " + subject + b"\n\n" + body


def test_a_long_subject_is_cut_before_it_is_copied(handler: Handler, book: MemoryCaseBook) -> None:
    raw = with_subject(hibot_escalation("Lafise", "mrodriguez"), b"palabra " * 25_000)  # 200 KB
    assert arrive(handler, book, raw).outcome == "routed"
    assert len(book.cases[1].subject) <= SUBJECT_LIMIT
    for mail in book.outbox():
        assert len(mail.subject) < SUBJECT_LIMIT + 100
        assert len(mail.raw) < 20_000


def test_a_subject_of_megabytes_is_refused_with_the_header(
    handler: Handler, book: MemoryCaseBook
) -> None:
    raw = with_subject(hibot_escalation("Lafise", "mrodriguez"), b"palabra " * 175_000)  # 1.4 MB
    with pytest.raises(Refused, match="header over 256 KB"):
        handler.parse(raw)


# --- 6. a forward refused for good tells the agent and the leads ---


def test_a_refused_forward_tells_the_agent_and_the_leads(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    forward = only(book, "forward")
    failed = FailedMail(forward.id, 1, "forward", [HIBOT], "553 5.1.3 bad address")
    handler.delivery_failed(book, failed, NOW)
    assert only(book, "undeliverable").recipients == [LAURA, LEAD]
