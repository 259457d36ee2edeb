"""Parse: raw bytes of one mail in, a `ParsedMail` out. Pure, no I/O.

Owns header decoding (RFC 2047, CR/LF stripped so nothing can smuggle a header
into a forward), body text (plain, or HTML converted to text), the agent's own
part of the body (quoted history and signatures cut off), the labelled fields
of the escalation fragment, the attachments, and the machine-mail verdict
(auto-replies, bounces, lists, our own mail) that keeps the router out of loops.

Header values come from the standard library; bodies and attachments from
mail-parser, falling back to the standard library where mail-parser raises.
"""

from __future__ import annotations

import base64
import copy
import email
import email.message
import email.policy
import functools
import itertools
import logging
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from email.header import decode_header, make_header
from email.parser import BytesFeedParser
from email.utils import getaddresses
from typing import Any

import mailparser
from flufl.bounce import all_failures

from mailrouter.config import Config
from mailrouter.model import Attachment, Bounce, ParsedMail

log = logging.getLogger(__name__)

LOOP_HEADER = "X-Mailrouter-Loop"
_FEED_SLICE = 64 * 1024


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SPACES = re.compile(r"\s{2,}")
_NOT_WORD = re.compile(r"[^\w]+")


def clean_header(value: str) -> str:
    """One line of text: CR, LF and other control characters become spaces."""
    return _SPACES.sub(" ", _CONTROL.sub(" ", value)).strip()


# Labels mail software puts on charsets that Python knows under another name,
# or supersets that decode what the label's strict codec refuses.
_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "unknown-8bit": "latin-1",
    "x-unknown": "latin-1",
    "us-ascii": "utf-8",
    "ascii": "utf-8",
}


def decode_bytes(payload: bytes, charset: str | None) -> str:
    """Text from bytes in a declared charset; never raises (unknown charsets fall back)."""
    name = (charset or "utf-8").strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return payload.decode(name, errors="replace")
    except LookupError:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return payload.decode("latin-1")


def decode_header_text(raw: str | None) -> str:
    """A header as one clean line of text, RFC 2047 words decoded, whatever their charset."""
    if raw is None:
        return ""
    raw = str(raw)
    try:
        text = str(make_header(decode_header(raw)))
    except (LookupError, UnicodeError, ValueError, AssertionError, TypeError):
        # A bad byte in a declared charset, or an unknown one: decode chunk by chunk, leniently.
        try:
            chunks = decode_header(raw)
        except Exception:
            chunks = [(raw, None)]
        text = "".join(
            chunk if isinstance(chunk, str) else decode_bytes(chunk, charset)
            for chunk, charset in chunks
        )
    return clean_header(text)


def subject_of(raw: object) -> str:
    """The subject, cut to `SUBJECT_LIMIT` characters: it is copied into every mail a case
    produces, the digest and the case list (a 1.4 MB subject was, every time)."""
    text = decode_header_text(str(raw)[: SUBJECT_LIMIT * 16] if raw is not None else None)
    return text if len(text) <= SUBJECT_LIMIT else text[: SUBJECT_LIMIT - 1] + "…"


_ANGLED_ID = re.compile(r"<([^<>\s]+)>")


def _msgid(raw: str | None) -> str | None:
    if not raw:
        return None
    found = _ANGLED_ID.search(str(raw))
    if found:
        return found.group(1)
    token = clean_header(str(raw)).strip("<>")
    return token or None


def _msgids(raw: str | None) -> list[str]:
    return _ANGLED_ID.findall(str(raw or ""))


def normalize(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form used to compare labels and values."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_NOT_WORD.sub(" ", stripped).split())


# Fields are read from the first this many characters of the text: an escalation's fields
# are at its top, and the cost of reading grows with the text.
FIELD_TEXT_LIMIT = 256 * 1024
# HTML beyond this many characters is not converted: fields are at the top of a mail, and
# a converter's cost grows with its input (a 7 MB table once held a worker for minutes).
HTML_TEXT_LIMIT = 256 * 1024
# Characters of a subject kept (and copied into the mails about its case).
SUBJECT_LIMIT = 300


def html_to_text(html: str) -> str:
    """Visible text of an HTML body (inscriptis: linear, tables as rows of cells), one
    space between words, at most one blank line between paragraphs."""
    # Imported here: most mail has a plain-text part, and lxml costs the daemon memory.
    from inscriptis import get_text
    from inscriptis.model.config import ParserConfig

    text = get_text(_first_elements(html[:HTML_TEXT_LIMIT]), ParserConfig(display_links=False))
    lines = (" ".join(line.split()) for line in text.splitlines())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


_BLANK_RUNS = re.compile(r"\n{3,}")
# inscriptis spends about 10 us per element: 256 KB of `<p>x</p>` took 20 times a normal
# mail. HTML is converted up to its this-many-th tag (fields are at the top).
HTML_ELEMENT_LIMIT = 2000


def _first_elements(html: str) -> str:
    at = -1
    for _ in range(HTML_ELEMENT_LIMIT):
        at = html.find("<", at + 1)
        if at < 0:
            return html
    return html[:at]


# Where the agent's own words end: the start of quoted or forwarded history, a signature,
# or a sign-off line ("Gracias,", "Saludos cordiales", "Best regards"...).
_CUT_MARKERS = [
    re.compile(
        r"^-{2,}\s*(mensaje original|original message|forwarded message|mensaje reenviado)",
        re.I,
    ),
    re.compile(r"^(on|el)\s.+(wrote|escribi[oó]):\s*$", re.I),
    re.compile(r"^>"),
    re.compile(r"^-- ?$"),
    re.compile(r"^_{10,}\s*$"),
    re.compile(
        r"^(muchas |mil )?(gracias|saludos|saludos cordiales|cordial saludo|cordialmente|"
        r"atentamente|un saludo|quedo atent[oa]|quedamos atentos|best regards|kind regards|"
        r"regards|thanks|thank you|cheers)\b[^:]{0,40}$",
        re.I,
    ),
]
_OUTLOOK_HEADER = re.compile(r"^(de|from)\s*:\s*\S", re.I)
_OUTLOOK_FOLLOWER = re.compile(r"^(enviado el|enviado|sent|fecha|date)\s*:", re.I)


@functools.cache
def _reply_parser() -> Any:
    from mailparser_reply import EmailReplyParser

    return EmailReplyParser(languages=["es", "en"])


def agent_part(text: str, *, sign_offs: bool = True) -> str:
    """The text before any quoted original, forwarded message, signature or (when `sign_offs`,
    for reading fields) a sign-off line. Relays keep the sign-off: it is part of a reply.

    Signatures, sign-offs ("Saludos,", "Enviado desde mi iPhone"...), English and Outlook
    quote headers are found by mail-parser-reply; our own markers stay for what it misses:
    Gmail's Spanish "El ... escribió:" header, forwarded-message separators, ">" lines."""
    own = _before_markers(text, _CUT_MARKERS if sign_offs else _CUT_MARKERS[:-1])
    if not sign_offs or not own.strip():
        return own
    try:
        replies = _reply_parser().read(text=own).replies
    except Exception as exc:  # its patterns are its own: a mail it trips on keeps ours
        log.debug("mail-parser-reply gave up (%s)", exc)
        return own
    body = str(replies[0].body).rstrip() if replies else ""
    return body if body.strip() else own


def _before_markers(text: str, markers: list[re.Pattern[str]]) -> str:
    lines = text.splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip() if not line.startswith("-- ") else line.rstrip("\n")
        if any(marker.match(stripped) for marker in markers):
            return "\n".join(lines[:index]).rstrip()
        if _OUTLOOK_HEADER.match(stripped) and any(
            _OUTLOOK_FOLLOWER.match(following.strip()) for following in lines[index + 1 : index + 4]
        ):
            return "\n".join(lines[:index]).rstrip()
    return text.rstrip()


# `Label: value`, `LABEL :`, `**Label:** value`, `Label - value` (spaced dash or en/em dash).
# Read by scanning the line, not by a regular expression: the obvious pattern (optional
# spaces and emphasis around a lazy label) backtracks polynomially on a line of spaces, and
# one such line froze the daemon for minutes. Each step below is a linear pass.
_LABEL_MAX = 80
_EMPHASIS = "*_"
_DASHES = "-–—"


def _label_before(head: str) -> str | None:
    """The label in `head` (what precedes the separator): emphasis and spaces around it
    dropped; None when that leaves nothing or more than `_LABEL_MAX` characters."""
    label = head.rstrip().rstrip(_EMPHASIS).rstrip()
    return label if 0 < len(label) <= _LABEL_MAX and "\n" not in label else None


def _labels_and_values(line: str) -> list[tuple[str, str]]:
    """The (label, raw value) readings of a line: as `Label: value`, then as `Label - value`
    (the first dash with white space on both sides, the label before it without a colon).
    Labels are short: the spaces and emphasis between one and its dash are bounded too."""
    text = line.lstrip().lstrip(_EMPHASIS).lstrip()
    readings = []
    colon = text.find(":")
    if colon >= 0:
        label = _label_before(text[:colon])
        if label is not None:
            readings.append((label, text[colon + 1 :].lstrip().lstrip(_EMPHASIS).lstrip()))
    limit = min(colon if colon >= 0 else len(text), len(text) - 1, 3 * _LABEL_MAX)
    for index in range(1, limit):
        if text[index] in _DASHES and text[index - 1].isspace() and text[index + 1].isspace():
            label = _label_before(text[:index])
            if label is not None:
                readings.append((label, text[index + 1 :].lstrip()))
                break
    return readings


def alias_index(aliases: Mapping[str, list[str]]) -> dict[str, str]:
    """Map each normalised alias to its canonical field name."""
    index: dict[str, str] = {}
    for canonical, names in aliases.items():
        for name in [canonical, *names]:
            index[normalize(name)] = canonical
    return index


def field_aliases(config: Config) -> dict[str, str]:
    """Normalised label -> canonical field name, from the `fields` section of config.yaml."""
    return alias_index(
        {name: [spec.label, *spec.aliases] for name, spec in config.settings.fields.items()}
    )


def _labelled(line: str, aliases: Mapping[str, str]) -> tuple[str, str] | None:
    """(canonical field, value) when the line starts with a known label."""
    for label, value in _labels_and_values(line):
        canonical = aliases.get(normalize(label))
        if canonical:
            return canonical, value.strip(" *_")
    return None


def _join(lines: list[str]) -> str:
    """Hard-wrapped lines become one line per paragraph; paragraphs keep a blank line."""
    paragraphs = " ".join(line.strip() or "\n\n" for line in lines).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def extract_fields(text: str, aliases: Mapping[str, str]) -> dict[str, str]:
    """Labelled fields of the agent's text. A value runs on over the following lines up to the
    next known label or the end of the text. The first occurrence of a field wins."""
    fields: dict[str, str] = {}
    current: str | None = None
    parts: list[str] = []
    for line in [*text.splitlines(), None]:
        found = _labelled(line, aliases) if line is not None else None
        if line is not None and found is None:
            if current is not None:
                parts.append(line)
            continue
        if current is not None and current not in fields:
            fields[current] = _join(parts)
        if found is not None:
            current, parts = found[0], [found[1]]
    return fields


_AUTO_SUBJECT = re.compile(
    r"^(auto(matic)?[ -]?(reply|response|antwort)|respuesta autom[aá]tica|out of (the )?office|"
    r"fuera de (la )?oficina|r[ée]ponse automatique|abwesenheitsnotiz|undeliver(able|ed)|"
    r"delivery (status notification|failure|has failed)|mail delivery failed|returned mail|"
    r"failure notice|non[- ]?delivery)",
    re.I,
)
_ROBOT_SENDER = re.compile(
    r"^(mailer-daemon|postmaster|post_master|no-?reply|do-?not-?reply|bounces?|"
    r"mail-?daemon)([+._-].*)?$",
    re.I,
)


def machine_reason(msg: email.message.Message, from_address: str, loop_token: str) -> str | None:
    """Why this mail was written by a machine (and so must never be answered), or None."""

    def header(name: str) -> str:
        try:
            return clean_header(str(msg.get(name, "") or "")).lower()
        except Exception:  # a header the stdlib cannot even turn into text
            return ""

    if loop_token and loop_token.lower() in header(LOOP_HEADER):
        return "the router's own mail (loop header)"
    auto = header("Auto-Submitted")
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress"):
        if header(name):
            return f"{name} header"
    if header("X-Apple-Action") == "vacation":
        return "vacation reply (X-Apple-Action)"
    precedence = header("Precedence")
    if precedence in {"bulk", "junk", "list", "auto_reply"}:
        return f"Precedence: {precedence}"
    for name in ("List-Id", "List-Unsubscribe", "List-Subscribe", "List-Post", "X-MLServer"):
        if header(name):
            return f"mailing list mail ({name})"
    if msg.get_content_type() == "multipart/report":
        return "delivery or read report (multipart/report)"
    if header("Return-Path") == "<>":
        return "null return path (a bounce)"
    if not from_address:
        return "no sender address"
    local = from_address.split("@", 1)[0]
    if _ROBOT_SENDER.match(local):
        return f"sent by an automatic address ({local})"
    subject = decode_header_text(msg.get("Subject"))
    if _AUTO_SUBJECT.match(subject):
        return f"automatic reply or bounce (subject {subject[:60]!r})"
    return None


# A mail worth handing to the bounce library: a DSN, or mail from a mailer daemon, with a
# null return path, or a bounce's subject. Anything else is not scanned (its heuristics are
# for mail already known to be a report, and they cost a pass over the text).
_BOUNCE_SUBJECT = re.compile(
    r"^(undeliver|delivery (status|failure|has failed|notification)|mail delivery failed|"
    r"returned mail|failure notice|non[- ]?delivery|no se pudo entregar|"
    r"mensaje no entregado|unzustellbar|warning: could not send)",
    re.I,
)
# The bounce library reads the report's first this many bytes when a bounce returns a
# large original: the report itself is at its top.
BOUNCE_SCAN_LIMIT = 512 * 1024


def _is_dsn(msg: email.message.Message) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type") or "").lower() == "delivery-status"
    )


def _looks_like_bounce(msg: email.message.Message, from_address: str, raw: bytes) -> bool:
    if _is_dsn(msg):
        return True
    local = from_address.split("@", 1)[0].lower()
    return (
        str(msg.get("Return-Path", "")).strip() == "<>"
        or (not from_address and b"mailer-daemon" in raw[:4096].lower())
        or local in ("mailer-daemon", "postmaster", "mail-daemon", "maildaemon")
        or bool(_BOUNCE_SUBJECT.match(decode_header_text(msg.get("Subject"))))
    )


def bounce_of(msg: email.message.Message, from_address: str, raw: bytes) -> Bounce | None:
    """The delivery failure this mail reports, or None. Recognised before any auto-reply
    check: real MTAs mark their reports `Auto-Submitted: auto-replied` too. Who failed comes
    from flufl.bounce (RFC 3464 DSNs and the shapes of Postfix, Exim, qmail, Exchange,
    Yahoo...); the reason text and the status codes from the DSN's own fields, and the
    returned Message-IDs from the text: the library gives neither."""
    if not _looks_like_bounce(msg, from_address, raw):
        return None
    scanned = msg if len(raw) <= BOUNCE_SCAN_LIMIT else read_message(raw[:BOUNCE_SCAN_LIMIT])
    try:
        temporary, permanent = all_failures(scanned)
    except Exception as exc:  # a detector that trips on a broken report: ours still reads it
        log.debug("flufl.bounce gave up (%s)", exc)
        temporary, permanent = frozenset(), frozenset()
    delayed, failed, reasons = _dsn_fields(scanned)
    gone = {_address_text(a) for a in permanent} | failed
    later = ({_address_text(a) for a in temporary} | delayed) - failed
    # A DSN's 4.x.x status says "still trying", whatever its Action line says.
    later |= gone & delayed
    gone -= later
    if not gone and not later:
        return None
    text = raw[:BOUNCE_SCAN_LIMIT].decode("utf-8", "replace")
    own = _msgid(msg.get("Message-ID"))
    quoted = [i for i in dict.fromkeys(_QUOTED_ID.findall(text)) if i != own]
    reason = "; ".join(reasons) or "the mail server returned the mail"
    return Bounce(sorted(gone), sorted(later), reason, quoted)


_QUOTED_ID = re.compile(r"<([^<>\s@]{1,250}@[^<>\s@]{1,250})>")


def _address_text(address: bytes | str) -> str:
    value = address.decode("utf-8", "replace") if isinstance(address, bytes) else address
    return value.strip().strip("<>").lower()


def _dsn_fields(msg: email.message.Message) -> tuple[set[str], set[str], list[str]]:
    """(delayed, failed, reasons) from the per-recipient fields of an RFC 3464 report."""
    delayed: set[str] = set()
    failed: set[str] = set()
    reasons: list[str] = []
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        for block in payload if isinstance(payload, list) else []:
            if not isinstance(block, email.message.Message):
                continue
            recipient = str(block.get("Final-Recipient") or block.get("Original-Recipient") or "")
            action = str(block.get("Action", "")).strip().lower()
            if not recipient or action not in ("failed", "delayed", ""):
                continue
            address = _address_text(recipient.split(";", 1)[-1])
            status = clean_header(str(block.get("Status", "")))
            temporary = action == "delayed" or status.startswith("4")
            (delayed if temporary else failed).add(address)
            diagnostic = clean_header(str(block.get("Diagnostic-Code", "")))
            reasons.append(f"{address}: {status} {diagnostic.split(';', 1)[-1].strip()}".strip())
    return delayed, failed, reasons


def _bodies_stdlib(msg: email.message.Message) -> tuple[str, str, list[Attachment]]:
    plain: list[str] = []
    html: list[str] = []
    attachments: list[Attachment] = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = (part.get_content_disposition() or "").lower()
        filename = part.get_filename()
        ctype = part.get_content_type()
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = str(part.get_payload()).encode("utf-8", "replace")
        if disposition == "attachment" or filename or not ctype.startswith("text/"):
            attachments.append(
                Attachment(decode_header_text(filename) or "adjunto", ctype, payload)
            )
        elif ctype == "text/html":
            html.append(decode_bytes(payload, part.get_content_charset()))
        else:
            plain.append(decode_bytes(payload, part.get_content_charset()))
    return "\n".join(plain), "\n".join(html), attachments


def read_message(raw: bytes) -> email.message.Message:
    """The stdlib's parse of `raw`, fed in slices: parsing it whole decodes a second copy of
    the mail and holds several more on the way (about 8x a 14 MB mail, against under 3x)."""
    parser = BytesFeedParser(policy=email.policy.compat32)
    view = memoryview(raw)
    for start in range(0, len(raw), _FEED_SLICE):
        parser.feed(bytes(view[start : start + _FEED_SLICE]))
    return parser.close()


def _mime_view(msg: email.message.Message) -> email.message.Message:
    """`msg` with only its MIME headers (Content-*, MIME-Version) on top, sharing its parts.
    mail-parser reads every header it is handed (addresses, dates, Received hops): half its
    cost on an escalation, for values the router takes from the stdlib's parse. The
    private `_headers` is set in one pass: deleting the others one name at a time costs
    names x headers, and a mail chooses its header names."""
    view = copy.copy(msg)  # shares the parts, preamble, epilogue and defects
    view.__dict__["_headers"] = [
        (name, value)
        for name, value in msg.raw_items()
        if name.lower().startswith(("content-", "mime-version"))
    ]
    return view


def _bodies_mailparser(msg: email.message.Message) -> tuple[str, str, list[Attachment]]:
    return bodies_of(mailparser.MailParser(_mime_view(msg)))


def bodies_of(parsed: mailparser.MailParser) -> tuple[str, str, list[Attachment]]:
    """(plain text, HTML, attachments) as mail-parser read them."""
    attachments = []
    for item in parsed.attachments:
        payload = item.get("payload") or ""
        if item.get("binary"):
            data = base64.b64decode(payload)
        else:
            data = str(payload).encode(item.get("charset") or "utf-8", "replace")
        attachments.append(
            Attachment(
                decode_header_text(item.get("filename")) or "adjunto",
                str(item.get("mail_content_type") or "application/octet-stream"),
                data,
            )
        )
    return "\n".join(parsed.text_plain), "\n".join(parsed.text_html), attachments


# An addr-spec as the router accepts one: a local part, one @, a domain with a dot; none of
# the characters that delimit addresses. (Linear: the local part cannot contain "@".)
_ADDR_SPEC = re.compile(
    r"[^@\s<>()\[\],;:\"]{1,64}@[^@\s<>()\[\],;:\"]{1,255}\.[^@\s<>()\[\],;:\"]+"
)


def _raw_text(value: object) -> str:
    """A header as it was written (encoded words left encoded), on one line."""
    return _CONTROL.sub(" ", str(value or ""))[:4096]


def sender_of(raw_from: object) -> tuple[str, str]:
    """(display name, address) of a From header. The address is the addr-spec parsed from
    the header as written, before any encoded word is decoded: text in a display name,
    encoded or not, is never an address. A header that does not hold exactly one valid
    addr-spec (`a@b <c@d>` holds two) has no address: nobody sent it."""
    pairs = [
        (name, address) for name, address in getaddresses([_raw_text(raw_from)]) if name or address
    ]
    if len(pairs) != 1:
        return "", ""
    name, address = pairs[0]
    if not _ADDR_SPEC.fullmatch(address) or len(address) > 320:
        return clean_header(decode_header_text(name)), ""
    return clean_header(decode_header_text(name)), address.lower()


class Refused(ValueError):
    """A mail the router does not read further; the message is the quarantine's reason."""


class Deadline:
    """How long reading one mail may take, checked between the steps of `parse_message`.
    Each step's cost is bounded by the limits above (header, parts, text and HTML caps),
    so a mail stops within a step of its deadline, and the worker goes on with the next.
    Checked between steps, not by interrupting a thread: an exception thrown into one can
    land inside a lock's acquire and its `try`, and leave the lock held for good."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = seconds, clock
        self.expires = clock() + seconds

    def check(self, step: str) -> None:
        if self.clock() > self.expires:
            raise Refused(
                f"reading the mail took over {self.seconds:g} s (stopped at {step}; "
                "intake.mail_deadline_seconds)"
            )


# Shapes no escalation has, refused before the costly parse: a header of hundreds of
# kilobytes, thousands of header fields or MIME parts, MIME nested deeper than the stdlib
# parser can recurse (it raises RecursionError at about a thousand levels).
HEADER_LIMIT = 256 * 1024
MAX_HEADER_FIELDS = 1000
MAX_PARTS = 200
MAX_MULTIPART = 100
_MULTIPART = re.compile(rb"(?im)^content-type:\s*multipart/")
_CONTENT_TYPE = re.compile(rb"(?im)^content-type:")
_FIELD_START = re.compile(rb"\n[^ \t\r\n]")


def _refuse_shape(raw: bytes) -> None:
    """Counted on the bytes, before the stdlib parses them (parsing 900 parts costs three
    normal mails): the parse then only confirms."""
    blanks = (raw.find(b"\n\n", 0, HEADER_LIMIT), raw.find(b"\r\n\r\n", 0, HEADER_LIMIT))
    ends = [at for at in blanks if at >= 0]
    if len(raw) > HEADER_LIMIT and not ends:
        raise Refused(f"header over {HEADER_LIMIT // 1024} KB")
    header = raw[: min(ends)] if ends else raw
    if sum(1 for _ in itertools.islice(_FIELD_START.finditer(header), MAX_HEADER_FIELDS)) >= (
        MAX_HEADER_FIELDS
    ):
        raise Refused(f"more than {MAX_HEADER_FIELDS} header fields")
    for count, _ in enumerate(_MULTIPART.finditer(raw), start=1):
        if count > MAX_MULTIPART:
            raise Refused(f"more than {MAX_MULTIPART} multipart MIME containers")
    for count, _ in enumerate(_CONTENT_TYPE.finditer(raw), start=1):
        if count > MAX_PARTS + 1:
            raise Refused(f"more than {MAX_PARTS} MIME parts")


def _refuse_tree(msg: email.message.Message) -> None:
    if len(msg) > MAX_HEADER_FIELDS:
        raise Refused(f"more than {MAX_HEADER_FIELDS} header fields")
    for count, _ in enumerate(msg.walk(), start=1):
        if count > MAX_PARTS:
            raise Refused(f"more than {MAX_PARTS} MIME parts")


# --- the customer's original, forwarded by the agent -----------------------------------------

_FORWARD_SUBJECT = re.compile(r"^\s*(rv|fwd?|tr|wg|enc|i)\s*:", re.I)
# Where an inline forwarded mail begins: always after these; after a reply separator only
# when the subject says the mail is a forward (Outlook forwards under "Mensaje original").
_FORWARD_SEPARATOR = re.compile(
    r"^\s*(?:-{2,}\s*(?:forwarded message|mensaje reenviado)\s*-*"
    r"|(?:begin forwarded message|inicio del mensaje reenviado)\s*:)\s*$",
    re.I,
)
_ORIGINAL_SEPARATOR = re.compile(
    r"^\s*-{2,}\s*(?:mensaje original|original message)\s*-*\s*$", re.I
)
_INLINE_HEADERS = {
    "de": "From",
    "from": "From",
    "fecha": "Date",
    "date": "Date",
    "enviado": "Date",
    "enviado el": "Date",
    "sent": "Date",
    "para": "To",
    "to": "To",
    "cc": "Cc",
    "asunto": "Subject",
    "subject": "Subject",
}
_UNSAFE_IN_NAME = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')


def _eml_name(subject: str) -> str:
    """A file name every mail client opens as a mail: the subject, made safe, and .eml."""
    stem = " ".join(_UNSAFE_IN_NAME.sub(" ", subject).split())[:100].strip(" .")
    return f"{stem or 'mensaje reenviado'}.eml"


def _detach_originals(msg: email.message.Message) -> list[Attachment]:
    """Mails attached to this one (message/rfc822), taken out of the tree: each travels to
    the vendor whole — subject, sender, date, its own attachments — and neither its text
    nor its attachments are read as the agent's."""
    originals: list[Attachment] = []

    def visit(part: email.message.Message) -> None:
        payload = part.get_payload()
        if not part.is_multipart() or not isinstance(payload, list):
            return
        kept: list[email.message.Message | str] = []
        for sub in payload:
            if not isinstance(sub, email.message.Message):
                continue
            inner = sub.get_payload()
            forwarded = inner[0] if isinstance(inner, list) and inner else None
            if sub.get_content_type() == "message/rfc822" and isinstance(
                forwarded, email.message.Message
            ):
                data = forwarded.as_bytes(policy=email.policy.compat32)
                name = decode_header_text(sub.get_filename()) or _eml_name(
                    subject_of(forwarded.get("Subject"))
                )
                name = name if name.lower().endswith(".eml") else f"{name}.eml"
                originals.append(Attachment(name, "message/rfc822", data))
            else:
                visit(sub)
                kept.append(sub)
        part.set_payload(kept)

    if msg.get_content_type() != "multipart/report":  # a bounce's returned mail stays
        visit(msg)
    return originals


def _inline_original(text: str, subject: str) -> Attachment | None:
    """The mail an agent forwarded inline (after "---------- Forwarded message ---------",
    or Outlook's "-----Mensaje original-----" under an RV:/Fwd: subject), rebuilt as a
    mail of its own from the header lines its client wrote."""
    lines = text.splitlines()
    forward = bool(_FORWARD_SUBJECT.match(subject))
    start = next(
        (
            n
            for n, line in enumerate(lines)
            if _FORWARD_SEPARATOR.match(line) or (forward and _ORIGINAL_SEPARATOR.match(line))
        ),
        None,
    )
    if start is None:
        return None
    headers: dict[str, str] = {}
    index = start + 1
    while index < len(lines) and lines[index].strip():
        name, colon, value = lines[index].partition(":")
        key = _INLINE_HEADERS.get(" ".join(name.strip().strip("*").lower().split()))
        if not colon or key is None:
            break
        headers.setdefault(key, " ".join(value.split())[:998])
        index += 1
    if "From" not in headers and "Subject" not in headers:
        return None
    original = email.message.EmailMessage()
    try:
        for key, value in headers.items():
            original[key] = value
        original.set_content("\n".join(lines[index:]).strip() + "\n")
        data = original.as_bytes(policy=email.policy.SMTP)
    except (ValueError, TypeError, IndexError, LookupError) as exc:
        # Header lines the stdlib cannot turn into a mail: the text still went inline.
        log.debug("forwarded original not rebuilt (%s)", exc)
        return None
    return Attachment(_eml_name(headers.get("Subject", "")), "message/rfc822", data)


def _as_mail(item: Attachment) -> Attachment:
    """A mail some clients attach as application/octet-stream named *.eml: a mail still."""
    if item.filename.lower().endswith(".eml") and item.content_type != "message/rfc822":
        return Attachment(item.filename, "message/rfc822", item.payload)
    return item


def parse_message(
    raw: bytes, aliases: Mapping[str, str], loop_token: str, deadline: Deadline | None = None
) -> ParsedMail:
    """Everything the router needs to know about one raw mail. Raises `Refused` for a mail
    of a shape no escalation has, or that takes longer than `deadline` to read."""
    check = deadline.check if deadline is not None else lambda step: None
    _refuse_shape(raw)
    msg = read_message(raw)
    check("MIME")
    _refuse_tree(msg)
    from_name, from_address = sender_of(msg.get("From"))
    subject = subject_of(msg.get("Subject"))
    # Read before the forwarded originals are taken out of the tree: a bounce returns one.
    machine = machine_reason(msg, from_address, loop_token)
    bounce = bounce_of(msg, from_address, raw)
    originals = _detach_originals(msg)
    try:
        plain, html, attachments = _bodies_mailparser(msg)
    except Exception as exc:  # mail-parser gives up on some broken MIME the stdlib reads
        log.debug("mail-parser failed (%s); using the standard library", exc)
        check("the bodies")
        plain, html, attachments = _bodies_stdlib(msg)
    check("the bodies")
    body = plain if plain.strip() else html_to_text(html) if html.strip() else ""
    check("the HTML")
    agent_text = agent_part(body[:FIELD_TEXT_LIMIT])
    inline = _inline_original(body[:FIELD_TEXT_LIMIT], subject) if not originals else None
    attachments = [*originals, *([inline] if inline else []), *map(_as_mail, attachments)]
    check("the text")
    return ParsedMail(
        raw=raw,
        message_id=_msgid(msg.get("Message-ID")),
        subject=subject,
        from_address=from_address,
        from_name=clean_header(from_name),
        to=[
            addr.lower()
            for _, addr in getaddresses([_raw_text(v) for v in msg.get_all("To", [])])
            if _ADDR_SPEC.fullmatch(addr)
        ],
        in_reply_to=_msgid(msg.get("In-Reply-To")),
        references=_msgids(msg.get("References")),
        body=body,
        agent_text=agent_text,
        fields=extract_fields(agent_text, aliases),
        attachments=attachments,
        machine_reason=machine,
        bounce=bounce,
        auth_results=tuple(_raw_text(v) for v in msg.get_all("Authentication-Results", [])[:16]),
    )
