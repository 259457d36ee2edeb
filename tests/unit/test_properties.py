"""Property-based tests of field extraction: random labels, values, whitespace, accents and
quoted blocks. It never raises and never takes a field from a quoted block. Also: the
header shortcut of the wire policy writes what compat32 would."""

from __future__ import annotations

import re
import unicodedata
from email import message_from_bytes
from email.errors import HeaderParseError
from email.policy import compat32
from typing import Literal, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailrouter.config import load_config
from mailrouter.core.parse import (
    agent_part,
    clean_header,
    decode_header_text,
    extract_fields,
    field_aliases,
    parse_message,
)
from mailrouter.core.render import _WIRE, _text_part, subject_header
from tests.conftest import PROJECT

CONFIG = load_config(PROJECT / "config.yaml")
ALIASES = field_aliases(CONFIG)
# Typed as the Literal categories: mypy infers a bare one-element tuple ("Cs",) as tuple[str].
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
LABELS = {name: [spec.label, *spec.aliases] for name, spec in CONFIG.settings.fields.items()}

VALUE_ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789áéíóúñÑ.,@#/()"))
values = (
    st.text(VALUE_ALPHABET, min_size=1, max_size=30)
    .map(lambda v: " ".join(v.split()) or "x")
    .filter(lambda v: v.strip(".,@#/()") != "")
)


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


@st.composite
def label_line(draw: st.DrawFn, name: str, value: str) -> str:
    label = draw(st.sampled_from(LABELS[name]))
    label = draw(st.sampled_from([label, label.upper(), label.lower(), strip_accents(label)]))
    bold = draw(st.booleans())
    shown = f"**{label}**" if bold else label
    separator = draw(st.sampled_from([": ", ":", " : ", "  :   ", " - ", " – "]))
    indent = draw(st.sampled_from(["", " ", "  ", "\t"]))
    trailing = draw(st.sampled_from(["", " ", "  "]))
    return f"{indent}{shown}{separator}{value}{trailing}"


QUOTE_STARTS = [
    "-----Mensaje original-----",
    "---------- Forwarded message ---------",
    "On Mon, 16 Nov 2026 at 09:12, Cliente <c@x.example> wrote:",
    "El lun, 16 nov 2026 a las 9:12, Cliente (<c@x.example>) escribió:",
    "-- ",
    "De: Cliente <c@x.example>\nEnviado el: lunes, 16 de noviembre de 2026 9:12",
]


@st.composite
def fragment(draw: st.DrawFn) -> tuple[str, dict[str, str], dict[str, str]]:
    names = draw(st.lists(st.sampled_from(sorted(LABELS)), min_size=1, max_size=6, unique=True))
    agent = {name: draw(values) for name in names}
    lines = [draw(st.sampled_from(["", "Hola equipo,", "Buen día,"]))]
    for name in names:
        lines.append(draw(label_line(name, agent[name])))
        lines.extend([""] * draw(st.integers(0, 1)))
    quoted = {
        name: f"CITADO {draw(values)}"
        for name in draw(
            st.lists(st.sampled_from(sorted(LABELS)), min_size=1, max_size=4, unique=True)
        )
    }
    quote_lines = [draw(label_line(name, value)) for name, value in quoted.items()]
    if draw(st.booleans()):
        lines += ["", "> " + "\n> ".join(quote_lines)]
    else:
        lines += ["", draw(st.sampled_from(QUOTE_STARTS)), *quote_lines]
    return "\n".join(lines), agent, quoted


@given(fragment())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
def test_agent_fields_found_and_quoted_never_taken(
    case: tuple[str, dict[str, str], dict[str, str]],
) -> None:
    text, agent, quoted = case
    fields = extract_fields(agent_part(text), ALIASES)
    assert fields == agent
    assert not any(value in fields.values() for value in quoted.values())
    assert not any("CITADO" in value for value in fields.values())


@given(st.text(max_size=400))
@settings(max_examples=300, deadline=None)
def test_extraction_never_raises(text: str) -> None:
    fields = extract_fields(agent_part(text), ALIASES)
    assert all(isinstance(v, str) for v in fields.values())
    assert set(fields) <= set(LABELS)


@given(st.binary(max_size=600))
@settings(max_examples=200, deadline=None)
def test_parsing_arbitrary_bytes_never_raises(raw: bytes) -> None:
    mail = parse_message(b"From: a@example.com\r\nSubject: x\r\n\r\n" + raw, ALIASES, "i@x.example")
    assert "\n" not in mail.subject and "\r" not in mail.subject


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from(["Subject", "To", "From", "X-Mailrouter-Case", "Content-Type"]),
    value=st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=120),
)
def test_the_short_header_shortcut_writes_what_compat32_writes(name: str, value: str) -> None:
    """The wire policy skips compat32's folding for short ASCII headers; whatever it
    writes for a header other than a message id must be compat32's own bytes."""
    try:
        expected = compat32.clone(linesep="\r\n").fold_binary(name, value)
    except HeaderParseError:  # a value that would smuggle in a header: refused by both
        with pytest.raises(HeaderParseError):
            _WIRE.fold_binary(name, value)
        return
    assert _WIRE.fold_binary(name, value) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=300))
def test_a_subject_is_written_in_ascii_lines_and_read_back_as_itself(subject: str) -> None:
    """Non-ASCII subjects go out as base64 encoded words, folded (the stdlib aims at 78
    characters a line and may overshoot by a few; 998 is the limit)."""
    subject = subject.replace("=?", "= ?")  # as the renderer leaves it
    written = _WIRE.fold_binary("Subject", subject_header(subject)).decode("ascii")
    lines = written.split("\r\n")
    assert lines[-1] == "" and all(len(line) <= 998 for line in lines)
    assert decode_header_text(written.removeprefix("Subject: ")) == clean_header(subject)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(st.characters(blacklist_categories=SURROGATES), max_size=400),
    subtype=st.sampled_from(["plain", "html"]),
)
def test_a_text_part_reads_back_as_its_text(text: str, subtype: str) -> None:
    """Quoted-printable by binascii: lines of at most 76 characters that decode to the
    text itself (line ends as CRLF on the wire), with the headers the email package
    would write."""
    written = _text_part(text, subtype).as_bytes(policy=_WIRE)
    head, _, body = written.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"MIME-Version: 1.0",
        f'Content-Type: text/{subtype}; charset="utf-8"'.encode(),
        b"Content-Transfer-Encoding: quoted-printable",
    ]
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))
    # A single text part: get_payload(decode=True) returns its bytes.
    decoded = cast(bytes, message_from_bytes(written).get_payload(decode=True))
    assert _lf(decoded) == _lf(text.encode())


def _lf(data: bytes) -> bytes:
    # A line ends in CR, LF or both in the text; on the wire, CRLF (as the email package's).
    return re.sub(rb"\r\n?", b"\n", data)
