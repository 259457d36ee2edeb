"""Render: turns a template and its data into a complete outgoing mail. Pure, no I/O.

Owns the Jinja2 environment over `templates/` and every header the router
puts on what it sends: Message-ID on the intake's domain (fixed here, before
the mail is stored, so a resend carries the same one), Reply-To the intake
address, the loop header, Auto-Submitted on mail to agents, threading headers.

A template reads like a mail: `Subject: ...`, a blank line, then the body.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import re
import stat
import uuid
from collections.abc import Sequence
from datetime import datetime, tzinfo
from email import message_from_bytes
from email.charset import BASE64, Charset
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.policy import Compat32
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from pathlib import Path
from typing import Any

from jinja2 import (
    BytecodeCache,
    Environment,
    FileSystemBytecodeCache,
    FileSystemLoader,
    StrictUndefined,
)
from jinja2.bccache import Bucket

from mailrouter.config import Config, Provider
from mailrouter.core.parse import LOOP_HEADER, clean_header
from mailrouter.core.team import case_labels, person
from mailrouter.core.threads import bare_subject
from mailrouter.model import (
    Attachment,
    CaseInfo,
    CaseRecord,
    Decision,
    OutgoingMail,
    ParsedMail,
    case_tag,
)

log = logging.getLogger(__name__)

LABELS_HEADER = "X-Mailrouter-Labels"


def case_info(case: CaseRecord, config: Config, now: datetime | None = None) -> CaseInfo:
    """What templates show of a case: its tag, its due time in the team's zone, its owner
    and its labels (the time-bound ones only when `now` is given)."""
    due = case.follow_up_due
    return CaseInfo(
        tag=case_tag(config.settings.case_tag_prefix, case.id),
        priority=case.priority,
        status=case.status,
        follow_up_due=local_time(due, config) if due else "",
        ticket=case.vendor_ticket or "",
        owner=person(config, case.owner) if case.owner else "",
        labels=", ".join(case_labels(case, config, now)),
    )


def local_time(moment: datetime, config: Config) -> str:
    """A moment as the team reads it: in its time zone, written in its language (babel), to
    the minute."""
    zone = config.calendar().zone
    local = moment.astimezone(zone).replace(second=0, microsecond=0, tzinfo=None)
    return _written(local, zone, config.settings.locale)


# A memo of a pure function: babel takes about 0.1 ms a moment, and the mails of a burst
# (two or three each) mostly show the same few minutes. Keyed by the wall-clock time and
# its zone: aware datetimes of one instant in two zones would be equal keys.
@functools.lru_cache(maxsize=256)
def _written(wall_clock: datetime, zone: tzinfo, locale: str) -> str:
    from babel.dates import format_date, format_time

    local = wall_clock.replace(tzinfo=zone)
    day = format_date(local, format="full", locale=locale)
    return f"{day}, {format_time(local, format='short', tzinfo=zone, locale=locale)}"


class TemplateShapeError(ValueError):
    pass


# Encoded words of a non-ASCII header in base64: for quoted-printable, or for "whichever is
# shorter" (the stdlib's choice for UTF-8), the stdlib measures the encoding of every prefix
# of the header character by character, quadratic: 0.4 ms of a Spanish subject, per mail.
_UTF8_HEADER = Charset("utf-8")
_UTF8_HEADER.header_encoding = BASE64


# The classic email API (compat32) builds a mail several times faster than EmailMessage, to
# the same standards: text bodies quoted-printable, headers folded at spaces, non-ASCII
# header text as RFC 2047 encoded words, CRLF line ends as SMTP wants them.
class _WirePolicy(Compat32):
    """compat32 with CRLF, except that a message id header stays on one line: folding it is
    legal, but tools that match replies to their thread by id are not all that careful."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        # A short ASCII header folds to itself: compat32 would spend a Header object and
        # a few milliseconds per mail to say so.
        if (
            isinstance(value, str)
            and _one_line(value)
            and (self._fits(name, value) or name.lower() in _ID_HEADERS)
        ):
            return f"{name}: {value}{self.linesep}".encode("ascii")
        if name.lower() == "to" and isinstance(value, str) and not value.isascii():
            # An address with a non-ASCII local part: RFC 6532 writes it as UTF-8 (it
            # leaves only through a relay that offers SMTPUTF8); an encoded word would
            # turn the address into text that no server delivers to.
            return f"{name}: {_PRINTABLE_ONLY(' ', value)}{self.linesep}".encode()
        return super().fold_binary(name, value)

    def _fits(self, name: str, value: str) -> bool:
        limit = self.max_line_length
        return not limit or len(name) + 2 + len(value) <= limit


_ID_HEADERS = frozenset({"message-id", "in-reply-to"})


def subject_header(subject: str) -> str | Header:
    """What goes in a Subject: the text itself when ASCII, else a Header, which compat32
    writes as RFC 2047 encoded words (typeshed's header type says str only)."""
    return subject if subject.isascii() else Header(subject, _UTF8_HEADER)


def _one_line(value: str) -> bool:
    # Printable ASCII and tabs only: other control characters (\v, \f, \x1c-\x1e) are
    # line boundaries to Python's str.splitlines, which compat32 folds on.
    return len(value) < 900 and _PLAIN_HEADER(value) is not None


@functools.lru_cache(maxsize=16)
def _parsed_address(header: str) -> tuple[str, str]:
    """`outbound.from`, parsed once rather than twice per mail (the stdlib's address
    parser is slow)."""
    return parseaddr(header)


_PLAIN_HEADER = re.compile(r"[\t -~]*").fullmatch
_SUBJECT_LINE = re.compile(r"Subject:(.*)", re.S).fullmatch
_BLANK_LINES = re.compile(r"\n{3,}").sub
_PRINTABLE_ONLY = re.compile(r"[\x00-\x1f\x7f\u0080-\u009f\u2028\u2029]").sub


_WIRE = _WirePolicy(linesep="\r\n")


def _text_part(text: str, subtype: str) -> Message:
    """A UTF-8 text part in quoted-printable, with the headers the email package gives it,
    encoded by binascii's C encoder: four times faster than the email package's own, in
    Python (0.25 ms for a 3.6 KB text, three or four texts per mail). A property test
    checks that any text reads back as itself."""
    part = MIMENonMultipart("text", subtype)
    part.set_param("charset", "utf-8")
    part["Content-Transfer-Encoding"] = "quoted-printable"
    part.set_payload(binascii.b2a_qp(text.encode("utf-8"), istext=True).decode("ascii"))
    return part


def _attachment_part(item: Attachment, placeholder: str) -> Message:
    """The MIME part of one attachment. A base64 body is left as `placeholder`, for
    `_splice` to fill in: the stdlib generator would write it line by line, a few Python
    objects per 76 bytes, which is most of the time and memory a large attachment costs."""
    maintype, _, subtype = item.content_type.partition("/")
    part: Message
    if maintype == "message" and subtype == "rfc822":
        # A forwarded mail stays a mail (message/* parts cannot be base64-encoded).
        part = MIMEMessage(message_from_bytes(item.payload))
    else:
        part = MIMEBase(maintype or "application", subtype or "octet-stream")
        part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(placeholder)
    filename: str | tuple[str, str, str] = (
        item.filename if item.filename.isascii() else ("utf-8", "", item.filename)
    )
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _splice(data: bytes, bodies: dict[bytes, bytes]) -> bytes:
    """`data` with each placeholder replaced by its payload in base64 lines (76 columns,
    CRLF), as `encode_base64` and the generator would have written it."""
    if not bodies:
        return data
    pieces: list[bytes | memoryview] = []
    done = 0
    for found in re.finditer(b"|".join(re.escape(p) for p in bodies), data):
        pieces.append(data[done : found.start()])
        pieces += _base64_lines(bodies[found.group()])
        done = found.end()
    pieces.append(data[done:])
    return b"".join(pieces)


_ENCODE_SLICE = 57 * 1024  # whole 76-column lines: slices encode exactly as the whole


def _base64_lines(payload: bytes) -> list[bytes]:
    """`payload` in base64 lines joined by CRLF, without the last CRLF, in slices: encoding
    it whole would hold two full-size copies (LF lines, then CRLF) besides the result."""
    view = memoryview(payload)
    lines = [
        base64.encodebytes(view[start : start + _ENCODE_SLICE]).replace(b"\n", b"\r\n")
        for start in range(0, len(payload), _ENCODE_SLICE)
    ]
    if lines:
        lines[-1] = lines[-1][:-2]
    return lines


class _CompiledTemplates(BytecodeCache):
    """Each template compiled once per process: a daemon builds several renderers of one
    configuration (its checks, its pipeline, its follow-ups), each of which compiled every
    template again, a third of its start-up. Jinja keys an entry by the template's name
    and file, and recompiles when the file's text has changed (a reload).

    With a `folder`, kept on disk too: the next process, a restarted daemon or each
    command, does not compile them again (0.2 s of every start). A folder that cannot be
    used, or a file in it that cannot be read, costs only the compilation."""

    def __init__(self, code: dict[str, bytes], folder: Path | None = None) -> None:
        """`code`: the process's compiled templates, shared by every folder's cache (a
        daemon whose state folder appears during its start compiles them once)."""
        self._code = code
        self._folder = folder
        self._disk: BytecodeCache | None = None
        self._disk_tried = False

    def _on_disk(self) -> BytecodeCache | None:
        if not self._disk_tried and self._folder is not None:
            self._disk_tried = True
            try:
                self._folder.mkdir(mode=0o700, exist_ok=True)
                if not _ours_alone(self._folder):
                    raise PermissionError(f"{self._folder} is not the router's user's alone")
                self._disk = FileSystemBytecodeCache(str(self._folder))
            except OSError as exc:  # read-only, or not ours alone
                log.debug("templates compiled without a disk cache: %s", exc)
        return self._disk

    def load_bytecode(self, bucket: Bucket) -> None:
        code = self._code.get(bucket.key)
        if code is not None:
            bucket.bytecode_from_string(code)
            return
        disk = self._on_disk()
        if disk is None:
            return
        try:
            disk.load_bytecode(bucket)
        except OSError:  # unreadable (jinja itself reads a damaged one as none): compile
            bucket.reset()
        if bucket.code is not None:
            self._code[bucket.key] = bucket.bytecode_to_string()

    def dump_bytecode(self, bucket: Bucket) -> None:
        self._code[bucket.key] = bucket.bytecode_to_string()
        disk = self._on_disk()
        if disk is not None:
            try:
                disk.dump_bytecode(bucket)
            except OSError as exc:  # a full disk: the next process compiles again
                log.debug("compiled template not kept on disk: %s", exc)


def _ours_alone(folder: Path) -> bool:
    """What is read from `folder` runs as code: it must be a folder of this user's that
    no one else may write in (not a link to one)."""
    seen = folder.lstat()
    return (
        stat.S_ISDIR(seen.st_mode)
        and seen.st_uid == os.getuid()
        and not seen.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


# A memo of a pure function of the templates' text, not state: any configuration may use
# it. The code in one dict; a cache for each folder it is kept in (None: memory only).
_CODE: dict[str, bytes] = {}
_COMPILED: dict[Path | None, _CompiledTemplates] = {}

# In the state folder: written only by the router's own user (the folder holds its
# database or journals), and read as code.
COMPILED_TEMPLATES_FOLDER = "compiled-templates"


def compiled_templates(config: Config) -> _CompiledTemplates:
    """Where `config`'s renderers keep their compiled templates: in the state folder once
    the router has one (a daemon made it), so that checking a new configuration writes
    nothing; in memory otherwise."""
    state = config.state_dir
    folder = state / COMPILED_TEMPLATES_FOLDER if state.is_dir() else None
    if folder not in _COMPILED:
        _COMPILED[folder] = _CompiledTemplates(_CODE, folder)
    return _COMPILED[folder]


class Renderer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.env = Environment(
            loader=FileSystemLoader(config.templates_dir),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            # Only HTML templates (`*.html.j2`) escape what they are given.
            autoescape=lambda name: name is not None and ".html" in name,
            # Templates change with a reload (SIGHUP builds a new Renderer), never between two
            # mails of one configuration: no stat of the file for every mail rendered.
            auto_reload=False,
            bytecode_cache=compiled_templates(config),
        )

    def load_all(self) -> None:
        """Compile every template now: a daemon that refuses a reload keeps rendering the
        templates of its last good configuration, even those no mail has needed yet, and
        not whatever the folder holds by then."""
        for name in self.env.list_templates(filter_func=lambda name: name.endswith(".j2")):
            self.env.get_template(name)

    def render(self, template: str, context: dict[str, Any]) -> tuple[str, str]:
        """Subject and body text of one template."""
        text = self.env.get_template(template).render(**context).lstrip("\n")
        head, _, body = text.partition("\n\n")
        match = _SUBJECT_LINE(head.strip())
        if match is None:
            raise TemplateShapeError(f"{template}: must start with 'Subject: ...' and a blank line")
        body = _BLANK_LINES("\n\n", body).strip("\n") + "\n"
        return clean_header(match.group(1)), body

    def compose(
        self,
        kind: str,
        template: str,
        context: dict[str, Any],
        to: Sequence[str],
        *,
        now: datetime,
        to_agent: bool,
        attachments: Sequence[Attachment] = (),
        in_reply_to: str | None = None,
        references: Sequence[str] = (),
        html_template: str | None = None,
    ) -> OutgoingMail:
        """A complete mail from `template` (text) and, when given, `html_template` (its HTML
        alternative, rendered from the same context)."""
        subject, body = self.render(template, context)
        # Literal "=?charset?...?=" text left in a subject (an undecodable original) would be
        # re-read as an encoded word by the stdlib and fail to encode; break the syntax.
        subject = subject.replace("=?", "= ?")
        settings = self.config.settings
        sender_header = settings.outbound.from_
        name, address = _parsed_address(sender_header)
        sender = address or settings.intake.address
        message_id = make_msgid(idstring=kind, domain=settings.intake.domain)

        text = _text_part(body, "plain")
        content: Message = text
        if html_template is not None:
            html = self.env.get_template(html_template).render(**context)
            content = MIMEMultipart("alternative")
            content.attach(text)
            content.attach(_text_part(html, "html"))
        placeholders: dict[bytes, bytes] = {}
        if attachments:
            mixed = MIMEMultipart("mixed")
            mixed.attach(content)
            for item in attachments:
                placeholder = f"mailrouter-attachment-{uuid.uuid4().hex}"
                placeholders[placeholder.encode("ascii")] = item.payload
                mixed.attach(_attachment_part(item, placeholder))
            content = mixed
        msg = content
        msg["From"] = formataddr((name, address), charset="utf-8") if name else address
        msg["To"] = ", ".join(to)
        msg["Subject"] = subject_header(subject)  # type: ignore[assignment]
        msg["Date"] = format_datetime(now)
        msg["Message-ID"] = message_id
        msg["Reply-To"] = settings.intake.address
        msg[LOOP_HEADER] = settings.intake.address
        if to_agent:
            # Keeps agents' out-of-office replies from answering us (RFC 3834).
            msg["Auto-Submitted"] = "auto-generated"
            # For the team's mail rules. Never to a vendor: labels are our own triage.
            case = context.get("case")
            if isinstance(case, CaseInfo) and case.labels:
                msg[LABELS_HEADER] = subject_header(case.labels)  # type: ignore[assignment]
        if in_reply_to:
            msg["In-Reply-To"] = f"<{in_reply_to}>"
        refs = [*references, *([in_reply_to] if in_reply_to else [])]
        if refs:
            msg["References"] = " ".join(f"<{r}>" for r in dict.fromkeys(refs))
        return OutgoingMail(
            kind=kind,
            message_id=message_id.strip("<>"),
            sender=sender,
            recipients=list(to),
            subject=subject,
            data=_splice(msg.as_bytes(policy=_WIRE), placeholders),
        )

    def decision_mails(
        self, case: CaseInfo, mail: ParsedMail, decision: Decision, now: datetime
    ) -> list[OutgoingMail]:
        """The mails a decision causes: forward and acknowledgement, or the missing-fields reply."""
        provider = decision.provider
        assert provider is not None
        context = self._context(case, mail, provider, decision)

        def to_agent(kind: str, template: str) -> OutgoingMail:
            # Threaded under the agent's own mail, so it lands in the same conversation.
            return self.compose(
                kind,
                template,
                context,
                [mail.from_address],
                now=now,
                to_agent=True,
                in_reply_to=mail.message_id,
                references=mail.references,
            )

        if decision.outcome == "needs_info":
            return [to_agent("needs_info", "needs_info.j2")]
        forward = self.compose(
            "forward",
            provider.template,
            context,
            [provider.address],
            now=now,
            to_agent=False,
            attachments=mail.attachments,
        )
        return [forward, to_agent("acknowledgement", "acknowledgement.j2")]

    def case_context(
        self,
        case: CaseInfo,
        provider: Provider,
        fields: dict[str, str],
        agent_name: str,
        agent_address: str,
        original_subject: str,
    ) -> dict[str, Any]:
        """What every template about a case can use."""
        settings = self.config.settings
        return {
            "case": case,
            "provider": provider,
            # Every known field is present (empty when not given), so a template can test an
            # optional one while a misspelt name still fails loudly (StrictUndefined).
            "fields": {**{name: "" for name in settings.fields}, **fields},
            "labels": {name: spec.label for name, spec in settings.fields.items()},
            "agent": {"name": agent_name, "address": agent_address},
            # One tag and one "Re:" in every subject the router writes: the original's
            # own prefixes and tags go.
            "original_subject": bare_subject(
                original_subject, settings.case_tag_prefix, case.ticket or None
            ),
            "attachments": [],
            "intake_address": settings.intake.address,
            "missing": [],
            "template_fields": [n for n in provider.required if n != "prioridad"],
        }

    def _context(
        self, case: CaseInfo, mail: ParsedMail, provider: Provider, decision: Decision
    ) -> dict[str, Any]:
        context = self.case_context(
            case, provider, mail.fields, mail.from_name, mail.from_address, mail.subject
        )
        return {**context, "attachments": mail.attachments, "missing": decision.missing}
