"""Hostile mail (issue 18): shapes that froze the parser, and senders that spoke as an agent
from a display name. Timings are ratios to a normal escalation in the same run, never
absolute times; the hostile inputs are generated here at the sizes that were reported."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mailrouter.cli import main
from mailrouter.config import Condition, ConfigError, load_config
from mailrouter.core import parse
from mailrouter.core.handle import Handler
from mailrouter.core.parse import (
    HTML_ELEMENT_LIMIT,
    HTML_TEXT_LIMIT,
    Deadline,
    Refused,
    _labels_and_values,
    html_to_text,
    normalize,
    sender_of,
)
from mailrouter.core.route import condition_matches
from mailrouter.core.threads import ticket_in
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


@pytest.mark.parametrize(
    "html",
    [
        "<p>x</p>" * 5_000,  # 40 KB
        "<p>x</p>" * 20_000,  # the reported 160 KB
        "<table>" + "<tr><td>Cliente:</td><td>Lafise</td></tr>" * 160_000 + "</table>",  # 7 MB
    ],
    ids=["40 KB of paragraphs", "160 KB of paragraphs", "a 7 MB table"],
)
def test_html_reaches_inscriptis_only_as_far_as_the_cap(
    html: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inscriptis spends about 10 us an element: what it is handed is capped in elements
    and in characters, so however long the HTML, it costs at most the cap's worth (the
    time itself is `make bench`'s hostile row)."""
    import inscriptis

    handed: list[str] = []
    real = inscriptis.get_text

    def counting(text: str, config: Any = None) -> str:
        handed.append(text)
        return str(real(text, config))

    monkeypatch.setattr(inscriptis, "get_text", counting)
    text = html_to_text(html)
    (given,) = handed
    assert given.count("<") <= HTML_ELEMENT_LIMIT and len(given) <= HTML_TEXT_LIMIT
    assert given == html[: len(given)]  # the top of it, where the fields are
    assert text.startswith(("x", "Cliente: Lafise"))


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


# --- 8. an admin's pattern cannot backtrack on mail text ------------------------------------


def route_on_subject(pattern: str) -> Handler:
    config = load_config(PROJECT / "config.yaml")
    routes = [
        config.settings.routes[0].model_copy(
            update={"name": "trap", "when": Condition(subject=pattern)}
        ),
        *config.settings.routes,
    ]
    settings = config.settings.model_copy(update={"routes": routes})
    return Handler(replace(config, settings=settings))


def test_a_catastrophic_route_pattern_runs_in_linear_time() -> None:
    # On Python's engine, (a+)+$ against 30 a's and a b takes minutes; the subject is
    # cut to 300 characters, so the field pattern is tried on a field of 256 KB too.
    handler = route_on_subject(r"(a+)+$")
    hostile = plain("Cliente: Lafise\n").replace(
        b"Subject: Escalamiento HIBOT", b"Subject: " + b"a" * 290 + b"!"
    )
    normal = fastest(lambda: arrive(handler, MemoryCaseBook(), NORMAL, NOW))
    cost = fastest(lambda: arrive(handler, MemoryCaseBook(), hostile, NOW))
    assert cost < 10 * normal, f"{cost / normal:.0f}x a normal escalation"
    field = Condition(field="cliente", matches=r"^(\w+\s?)*$")
    mail = HANDLER.parse(plain("Cliente: " + "palabra " * 30_000 + "!\n"))
    start = time.perf_counter()
    assert not condition_matches(field, mail)
    assert time.perf_counter() - start < 1000 * fastest(lambda: HANDLER.parse(NORMAL))


def test_a_pattern_re2_cannot_run_is_refused_with_its_line(tmp_path: Path) -> None:
    data = yaml.safe_load((PROJECT / "config.yaml").read_text(encoding="utf-8"))
    data["providers_dir"] = str(PROJECT / "providers")
    data["templates_dir"] = str(PROJECT / "templates")
    data["routes"].insert(0, {"name": "eco", "when": {"subject": r"(\w+) \1"}, "to": "hibot"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), "utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = [str(p) for p in caught.value.problems]
    assert problem.startswith(f"{path}:")
    assert "routes[0].when: bad regular expression" in problem
    assert "no backreferences or lookaround" in problem


def test_a_ticket_number_after_a_non_breaking_space_is_still_found() -> None:
    provider = HANDLER.config.providers["hibot"]
    mail = HANDLER.parse(plain("Su ticket\xa0#\xa012345 fue creado", sender="carlos@hibot.us"))
    assert ticket_in(mail, provider) == "12345"


# --- bounded shapes and the per-mail deadline ---------------------------------------------

HEAD = b"From: laura.gomez@example.com\nTo: escalaciones@example.com\nSubject: x\n"


def nested(depth: int) -> bytes:
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=B%d\n\n--B%d\n" % (i, i) for i in range(depth)
    )
    closing = b"".join(b"\n--B%d--\n" % i for i in reversed(range(depth)))
    return HEAD + b"MIME-Version: 1.0\n" + opening + b"Content-Type: text/plain\n\nx\n" + closing


def parts(count: int) -> bytes:
    body = b"".join(b"--B\nContent-Type: text/plain\n\nparte %d\n" % i for i in range(count))
    return HEAD + b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=B\n\n" + body


SHAPES = {
    "3000 nested multiparts": (nested(3000), "more than 100 multipart MIME containers"),
    "900 MIME parts": (parts(900) + b"--B--\n", "more than 200 MIME parts"),
    "5000 header fields": (
        HEAD + b"".join(b"X-H%d: v\n" % i for i in range(5_000)) + b"\nCliente: a\n",
        "more than 1000 header fields",
    ),
    "a 5 MB header": (HEAD + b"X-Long: " + b"a " * 2_500_000 + b"\n\nx\n", "header over 256 KB"),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_a_shape_no_escalation_has_is_refused_early(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused on a count of the bytes, before the stdlib's parse (900 parts cost it three
    normal mails; the time itself is `make bench`'s hostile row)."""
    raw, reason = SHAPES[name]

    def never(raw: bytes) -> None:
        raise AssertionError("the stdlib parsed it")

    monkeypatch.setattr(parse, "read_message", never)
    with pytest.raises(Refused, match=reason):
        HANDLER.parse(raw)


def test_shapes_within_the_limits_are_read() -> None:
    assert HANDLER.parse(nested(20)).from_address == "laura.gomez@example.com"
    assert len(HANDLER.parse(parts(150) + b"--B--\n").attachments) == 0


def test_the_deadline_stops_reading_between_steps() -> None:
    ticks = iter([0.0, 0.5, 31.0])  # start, after the MIME, after the bodies
    deadline = Deadline(30, clock=lambda: next(ticks))
    with pytest.raises(Refused, match=r"took over 30 s \(stopped at the bodies"):
        HANDLER.parse(NORMAL, deadline)
    assert HANDLER.parse(NORMAL, Deadline(30)).fields["cliente"] == "Lafise Nicaragua"


# --- `mailrouter route` on each hostile shape: an answer, within the bound ---------------


@pytest.mark.parametrize(
    "name", ["spaces 5000", "colons 5000", "3000 nested multiparts", "a 5 MB header"]
)
def test_route_answers_on_a_hostile_shape(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = plain(BLANK_RUNS[name]) if name in BLANK_RUNS else SHAPES[name][0]
    hostile, normal = tmp_path / "hostile.eml", tmp_path / "normal.eml"
    hostile.write_bytes(raw)
    normal.write_bytes(NORMAL)
    config = str(PROJECT / "config.yaml")
    base = fastest(lambda: main(["--config", config, "route", str(normal)]))
    cost = fastest(lambda: main(["--config", config, "route", str(hostile)]), runs=1)
    out, err = capsys.readouterr()
    assert "Outcome:" in out and "Traceback" not in err
    # Per byte, no worse than a normal mail (the 5 MB header is 2,000 times its size).
    assert cost < 3 * base * max(1.0, len(raw) / len(NORMAL) / 100), f"{cost / base:.1f}x"
