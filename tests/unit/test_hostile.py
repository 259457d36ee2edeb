"""Hostile mail (issue 18): shapes that froze the parser, and senders that spoke as an agent
from a display name. Timings are ratios to a normal escalation in the same run, never
absolute times; the hostile inputs are generated here at the sizes that were reported."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrouter.config import load_config
from mailrouter.core.handle import Handler
from mailrouter.core.parse import _labels_and_values, html_to_text, normalize, sender_of
from mailrouter.testing.book import MemoryCaseBook, arrive
from tests.conftest import ESCALATIONS, PROJECT

NOW = datetime(2026, 11, 23, 14, 0, tzinfo=UTC)
HANDLER = Handler(load_config(PROJECT / "config.yaml"))
NORMAL = (ESCALATIONS / "01-hibot-basic.eml").read_bytes()


def fastest(work: Callable[[], object], runs: int = 3) -> float:
    """The best of a few runs: the least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def plain(body: str, *, cte: str | None = None, sender: str = "laura.gomez@example.com") -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = "Escalamiento HIBOT"
    if cte:
        msg.set_content(body, cte=cte)
    else:
        msg.set_content(body)
    return bytes(msg)


# --- 1. a line of spaces (or tabs, colons...) freezes field parsing --------------------------

BLANK_RUNS = {
    "spaces 150": "Cliente: Lafise\n" + " " * 150 + "\n",
    "spaces 250": "Cliente: Lafise\n" + " " * 250 + "\n",
    "spaces 5000": "Cliente: Lafise\n" + " " * 5000 + "\n",
    "tabs 250": "Cliente: Lafise\n" + "\t" * 250 + "\n",
    "colons 5000": "Cliente: Lafise\n" + ":" * 5000 + "\n",
    "spaced colons": "Cliente: Lafise\n" + " :" * 2500 + "\n",
    "spaced dashes": "Cliente - Lafise\n" + " - " * 2500 + "\n",
    "emphasis": "Cliente: Lafise\n" + "* _ " * 1500 + "x\n",
}


@pytest.mark.parametrize("name", sorted(BLANK_RUNS))
def test_a_run_of_blanks_costs_what_a_normal_mail_costs(name: str) -> None:
    hostile = plain(BLANK_RUNS[name])
    normal = fastest(lambda: HANDLER.parse(NORMAL))
    cost = fastest(lambda: HANDLER.parse(hostile))
    assert HANDLER.parse(hostile).fields["cliente"].startswith("Lafise")
    assert cost < 10 * normal, f"{name}: {cost / normal:.0f}x a normal escalation"


def test_quoted_printable_soft_breaks_joining_into_a_long_blank_run() -> None:
    # Each encoded line stays under the 1001-byte line limit; decoded, they join.
    hostile = plain("Cliente: Lafise\n" + " " * 20_000 + "\n", cte="quoted-printable")
    assert max(len(line) for line in hostile.splitlines()) < 1001
    normal = fastest(lambda: HANDLER.parse(NORMAL))
    cost = fastest(lambda: HANDLER.parse(hostile))
    assert cost < 10 * normal, f"{cost / normal:.0f}x a normal escalation"


# The patterns the label scanner replaces: on short lines they are fast, and the scanner
# must read every line as they did.
_OLD_FORMS = [
    re.compile(r"^\s*[*_]*\s*(?P<label>[^:\n]{1,80}?)\s*[*_]*\s*:\s*[*_]*\s*(?P<value>.*)$"),
    re.compile(r"^\s*[*_]*\s*(?P<label>[^:\n]{1,80}?)\s*[*_]*\s+[-–—]\s+(?P<value>.*)$"),
]


def _meaningful(readings: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Readings whose label could name a field (not only blanks, emphasis or punctuation)."""
    return [
        (normalize(label), value.strip(" *_"))
        for label, value in readings
        if normalize(label).replace("_", "").strip()
    ]


@given(
    st.lists(
        st.sampled_from(["a", "b", "c d", " ", "\t", "*", "_", ":", "-", "–", "é"]), max_size=16
    ).map("".join)
)
def test_the_label_scanner_reads_lines_as_the_old_patterns_did(line: str) -> None:
    old = [(m["label"], m["value"]) for form in _OLD_FORMS if (m := form.match(line))]
    assert _meaningful(_labels_and_values(line)) == _meaningful(old)


# --- 2. HTML to text is linear, and capped ------------------------------------------------


def test_html_to_text_grows_linearly() -> None:
    small, large = "<p>x</p>" * 10_000, "<p>x</p>" * 20_000  # 80 KB and the reported 160 KB
    ratio = fastest(lambda: html_to_text(large)) / fastest(lambda: html_to_text(small))
    assert ratio < 3, f"twice the HTML took {ratio:.1f}x the time"  # quadratic: about 4x


def test_a_huge_html_table_is_read_only_as_far_as_the_cap() -> None:
    row = "<tr><td>Cliente:</td><td>Lafise</td></tr>"
    capped = "<table>" + row * 8_000 + "</table>"  # about the cap
    huge = "<table>" + row * 160_000 + "</table>"  # 7 MB
    ratio = fastest(lambda: html_to_text(huge), runs=1) / fastest(lambda: html_to_text(capped))
    assert ratio < 3, f"7 MB of HTML took {ratio:.1f}x what the cap's worth takes"
    assert "Cliente: Lafise" in html_to_text(huge)


# --- 3. a display name is never an address -----------------------------------------------

SPOOFED_FROMS = [
    "carla.diaz@example.com <x@evil.example.org>",
    "=?utf-8?b?TWVzYSA8Y2FybGEuZGlhekBleGFtcGxlLmNvbT4=?= <x@evil.example.org>",
    "=?iso-8859-1?q?carla=2Ediaz=40example=2Ecom?= <x@evil.example.org>",
    '"carla.diaz@example.com" <x@evil.example.org>',
]


@pytest.mark.parametrize("header", SPOOFED_FROMS)
def test_an_agent_address_in_the_display_name_is_not_the_sender(header: str) -> None:
    _, address = sender_of(header)
    assert address in ("", "x@evil.example.org")
    book = MemoryCaseBook()
    raw = (ESCALATIONS / "01-hibot-basic.eml").read_bytes()
    raw = re.sub(rb"(?m)^From: .*$", b"From: " + header.encode(), raw, count=1)
    raw = raw.replace(b"Message-ID: <", b"Message-ID: <spoof-", 1)
    result = arrive(HANDLER, book, raw, NOW)
    # Nobody's mail is machine mail (ignored); the evil address is a stranger (quarantined).
    assert result.outcome in ("ignored", "quarantined")
    assert book.cases == {} and book.outbox() == []


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "Laura =?utf-8?q?G=C3=B3mez?= <Laura.Gomez@example.com>",
            ("Laura Gómez", "laura.gomez@example.com"),
        ),
        ("laura.gomez@example.com", ("", "laura.gomez@example.com")),
        ("a@example.com, b@example.com", ("", "")),  # two senders: nobody
        ("<>", ("", "")),
        ("not an address", ("", "")),
    ],
)
def test_the_sender_is_the_one_addr_spec_of_the_header(
    header: str, expected: tuple[str, str]
) -> None:
    assert sender_of(header) == expected


def test_the_sample_agent_is_still_herself() -> None:
    assert HANDLER.parse(NORMAL).from_address == "laura.gomez@example.com"
    assert arrive(HANDLER, MemoryCaseBook(), NORMAL, NOW).outcome == "routed"
