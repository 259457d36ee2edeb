"""Thread: which existing case an incoming mail belongs to, and what an agent's reply asks.

Owns the matching of a mail to a case — by In-Reply-To/References against the
Message-IDs the router stored for the case, by the case tag (`[ESC-000123]`)
in the subject, by the vendor's own ticket number, and by the fragment's keys
for duplicates and resends — plus who is writing (the case's vendor or an
agent), the agent's `#commands`, and the headers that keep a relay in its
thread. Pure: the cases and Message-IDs to choose among are handed in.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailrouter.config import Config, Provider, pattern_search
from mailrouter.core.parse import FIELD_TEXT_LIMIT, normalize
from mailrouter.core.route import normalize_priority
from mailrouter.model import (
    OPEN_STATUSES,
    CaseRecord,
    Commands,
    Decision,
    ParsedMail,
    ThreadHeaders,
)


def tagged_case_id(subject: str, prefix: str) -> int | None:
    """The case number of the first `[PREFIX-000123]` tag in a subject."""
    match = re.search(rf"\[{re.escape(prefix)}-(\d{{1,12}})\]", subject, re.I)
    return int(match.group(1)) if match else None


# "RE:", "RV:" (Spanish), "Fwd:", "AW:"/"WG:" (German), "TR:" (French), "SV:" (Nordic),
# "R:"/"I:" (Italian), "RES:"/"ENC:" (Portuguese), with an optional count: "RE[2]:".
_REPLY_PREFIX = re.compile(
    r"\s*(?:re|rv|fwd?|aw|wg|tr|sv|antw|vs|r|i|res|enc)\s*(?:\[\d{1,3}\])?\s*:\s*", re.I
)


def bare_subject(subject: str, tag_prefix: str, ticket: str | None = None) -> str:
    """A subject without reply and forward prefixes, without our case tags, and without a
    leading bracket that holds the vendor's ticket number: what goes after the one tag and
    the one "Re:" of each mail the router writes about a case."""
    tag = re.compile(rf"\[\s*{re.escape(tag_prefix)}-\d{{1,12}}\s*\]", re.I)
    text = tag.sub(" ", subject)
    while True:
        match = _REPLY_PREFIX.match(text)
        if match is None or match.end() == 0:
            break
        text = text[match.end() :]
    text = text.strip()
    if ticket and text.startswith("[") and "]" in text:
        head, _, rest = text[1:].partition("]")
        if ticket in head:
            text = rest
            while (match := _REPLY_PREFIX.match(text)) is not None and match.end():
                text = text[match.end() :]
    return " ".join(text.split())


def is_vendor(address: str, provider: Provider) -> bool:
    return any(fnmatch.fnmatchcase(address, p.lower()) for p in provider.sender_patterns)


def vendors_of(address: str, config: Config) -> list[Provider]:
    """The destinations this sender may write back for."""
    return [p for p in config.providers.values() if is_vendor(address, p)]


def ticket_in(mail: ParsedMail, provider: Provider) -> str | None:
    """The vendor's ticket number in the subject or the new text of its mail."""
    if not provider.ticket_number:
        return None
    for text in (mail.subject, mail.body[:FIELD_TEXT_LIMIT]):
        match = pattern_search(provider.ticket_number, text)
        if match and match.group(1):
            return str(match.group(1))
    return None


_COMMAND = re.compile(
    r"^\s*#(resuelto|cerrar|prioridad|nota|seguimiento|asignar|tomar|etiqueta|quitar-etiqueta)"
    r"(?![\w-])[:\s]*(.*)$",
    re.I,
)


_ADDRESS = re.compile(r"[^\s<>,;:\"']+@[^\s<>,;:\"']+")


def parse_commands(text: str) -> Commands:
    """`#resuelto`/`#cerrar`, `#prioridad ALTA`, `#nota …`, `#seguimiento …` (the client was
    contacted), `#asignar WHO`, `#tomar`, `#etiqueta NAME`, `#quitar-etiqueta NAME` on lines
    of their own; every other line is the text to relay."""
    found = Commands()
    kept: list[str] = []
    for line in text.splitlines():
        match = _COMMAND.match(line)
        if match is None:
            kept.append(line)
            continue
        command, argument = match.group(1).lower(), match.group(2).strip()
        if command in ("resuelto", "cerrar"):
            found.close = True
        elif command == "prioridad":
            found.priority = normalize_priority(argument)
        elif command == "seguimiento":
            found.followups.append(argument or "cliente contactado")
        elif command == "asignar":
            # An address anywhere on the line ("Pedro Ruiz <pedro@…>"), else its first word.
            address = _ADDRESS.search(argument)
            words = argument.split()
            found.assign = address.group(0) if address else (words[0] if words else "")
        elif command == "tomar":
            found.take = True
        elif command == "etiqueta":
            found.label.append(argument)
        elif command == "quitar-etiqueta":
            found.unlabel.append(argument)
        elif argument:
            found.notes.append(argument)
    found.text = "\n".join(kept).strip()
    return found


@dataclass(frozen=True)
class Earlier:
    """What an incoming escalation may belong to instead of a new case."""

    duplicate: CaseRecord | None  # an open case for the same destination and client (seed 000)
    resent: CaseRecord | None  # the agent's own case waiting for the fields this mail resends


def pick_earlier(candidates: Sequence[CaseRecord], mail: ParsedMail, decision: Decision) -> Earlier:
    """Among the cases in progress for the same destination and client, the duplicate (an
    open case with the same keys) and the resent case (the agent's own, waiting for fields)."""
    provider = decision.provider
    if provider is None or not candidates:
        return Earlier(None, None)
    duplicate = next(
        (
            case
            for case in candidates
            if case.status in OPEN_STATUSES and _same_keys(case, mail, provider.duplicate_keys)
        ),
        None,
    )
    agent = mail.from_address[:320]
    waiting = [c for c in candidates if c.status == "needs_info" and c.agent_address == agent]
    return Earlier(duplicate, waiting[-1] if waiting else None)


def _same_keys(case: CaseRecord, mail: ParsedMail, keys: Sequence[str]) -> bool:
    """Every other key the destination declares, where both give it, matches."""
    return all(
        normalize(case.fields.get(key, "")) == normalize(mail.fields.get(key, ""))
        for key in keys
        if key != "cliente" and case.fields.get(key) and mail.fields.get(key)
    )


def thread_headers(ids: list[str]) -> ThreadHeaders:
    """In-Reply-To the latest, References all, of a thread's Message-IDs (oldest first)."""
    return ThreadHeaders(ids[-1] if ids else None, ids)
