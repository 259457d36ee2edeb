"""Bounces first (issue 19, item 1): real delivery failure reports from the corpus —
Postfix, Exim, Exchange, Gmail, qmail, most marked `Auto-Submitted: auto-replied` — are
read as bounces of our forward, not ignored as auto-replies."""

from __future__ import annotations

import pytest

from mailrouter.core.handle import Handler
from mailrouter.testing.book import MemoryCaseBook
from tests.conftest import CORPUS
from tests.unit.test_handle import (
    HIBOT,
    LAURA,
    LEAD,
    NOW,
    arrive,
    details,
    only,
    open_hibot,
)

# Reports as real servers write them (each returns a mail whose Message-ID we replace by
# our forward's, so that it is about our case).
PERMANENT = {
    "Postfix, Auto-Submitted": "zammad__mail033-undelivered-mail-returned-to-sender.eml",
    "Postfix": "sisimai__lhost-postfix-01.eml",
    "Exim": "sisimai__lhost-exim-29.eml",
    "Exchange 2007": "sisimai__lhost-exchange2007-07.eml",
    "Gmail": "chatwoot__bounced_gmail.eml",
    "Office 365": "flanker__office365.eml",
    "qmail": "flufl__qmail_06.eml",
    "Yahoo": "flufl__yahoo_07.eml",
}
TEMPORARY = {
    "DSN 4.0.0": "flanker__delayed.eml",
    "delayed, Auto-Submitted": "sisimai__rhost-franceptt-06.eml",
}


def returning(handler: Handler, name: str, message_id: str) -> bytes:
    """Corpus report `name`, as if it returned our mail `message_id`."""
    raw = (CORPUS / name).read_bytes()
    bounce = handler.parse(raw).bounce
    assert bounce is not None and bounce.original_ids, f"{name} is not read as a bounce"
    for quoted in bounce.original_ids:
        raw = raw.replace(f"<{quoted}>".encode(), f"<{message_id}>".encode())
    return raw


@pytest.mark.parametrize("shape", sorted(PERMANENT))
def test_a_permanent_failure_makes_the_case_undeliverable_once(
    shape: str, handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    forward = only(book, "forward")
    report = returning(handler, PERMANENT[shape], forward.message_id or "")
    result = arrive(handler, book, report)
    assert (result.outcome, result.case_id) == ("ignored", 1)
    assert result.reason.startswith("bounce of ESC-000001")
    assert book.cases[1].status == "undeliverable"
    notice = only(book, "undeliverable")
    assert notice.recipients == [LAURA, LEAD]
    # Told once: the same report again (another relay's copy) changes nothing.
    again = report.replace(b"Message-I", b"X-Old-Message-I", 1)
    arrive(handler, book, again)
    assert len(book.outbox("undeliverable")) == 1
    # Nothing is ever sent to a bounce: only the forward, the cancelled ack and the notice.
    assert {m.kind for m in book.outbox()} == {"forward", "acknowledgement", "undeliverable"}


@pytest.mark.parametrize("shape", sorted(TEMPORARY))
def test_a_delay_is_only_recorded_in_the_history(
    shape: str, handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    forward = only(book, "forward")
    result = arrive(handler, book, returning(handler, TEMPORARY[shape], forward.message_id or ""))
    assert result.reason.startswith("delivery delayed on ESC-000001")
    assert book.cases[1].status == "open"
    assert len(details(book, 1, "delivery_delayed")) == 1
    assert len(book.outbox()) == 2  # the forward and the acknowledgement, nothing more


def test_a_bounce_from_the_vendor_s_own_domain_is_a_bounce(
    handler: Handler, book: MemoryCaseBook
) -> None:
    # Before: mail from *@hibot.us on the case's thread was taken for the vendor's reply.
    open_hibot(handler, book)
    forward = only(book, "forward")
    report = returning(handler, PERMANENT["Postfix, Auto-Submitted"], forward.message_id or "")
    report = report.replace(
        b"MAILER-DAEMON@mx1.zammad.com", f"MAILER-DAEMON@{HIBOT.split('@')[1]}".encode()
    )
    assert arrive(handler, book, report).reason.startswith("bounce of ESC-000001")
    assert book.cases[1].status == "undeliverable" and not book.outbox("relay_to_agent")


def test_a_bounce_of_someone_else_s_mail_changes_nothing(
    handler: Handler, book: MemoryCaseBook
) -> None:
    open_hibot(handler, book)
    raw = (CORPUS / PERMANENT["Exim"]).read_bytes()
    result = arrive(handler, book, raw, NOW)
    assert result.outcome == "ignored"
    assert result.reason.startswith("bounce not about a mail to a vendor")
    assert book.cases[1].status == "open" and len(book.outbox()) == 2


def test_an_ordinary_auto_reply_is_not_a_bounce(handler: Handler) -> None:
    auto = CORPUS / "chatwoot__auto_reply_with_auto_submitted.eml"
    mail = handler.parse(auto.read_bytes())
    assert mail.bounce is None and mail.machine_reason
