"""Thread: which existing case an incoming mail belongs to, and what an agent's reply asks.

Owns the matching of a mail to a case — by In-Reply-To/References against the
Message-IDs the router stored for the case, by the case tag (`[ESC-000123]`)
in the subject, by the vendor's own ticket number, and by the fragment's keys
for duplicates and resends — plus who is writing (the case's vendor or an
agent), the agent's `#commands`, and the headers that keep a relay in its
thread. Reads the store; changes nothing.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from mailrouter.config import Config, Provider
from mailrouter.model import OPEN_STATUSES, Commands, Decision, ParsedMail, ThreadHeaders
from mailrouter.parse import normalize
from mailrouter.route import normalize_priority
from mailrouter.store.tables import Case, Message


def tagged_case_id(subject: str, prefix: str) -> int | None:
    """The case number of the first `[PREFIX-000123]` tag in a subject."""
    match = re.search(rf"\[{re.escape(prefix)}-(\d{{1,12}})\]", subject, re.I)
    return int(match.group(1)) if match else None


# Statements of the per-mail path are built once: composing one from ORM attributes
# costs more than SQLite takes to run it.
_CASE_OF_MESSAGE_IDS = (
    select(Message.case_id)
    .where(Message.message_id.in_(bindparam("ids", expanding=True)), Message.case_id.is_not(None))
    .order_by(Message.id.desc())
    .limit(1)
)


def case_by_thread(session: Session, mail: ParsedMail, prefix: str) -> Case | None:
    """The case whose stored mails this one answers, or whose tag its subject carries."""
    ids = [i for i in [mail.in_reply_to, *mail.references] if i]
    if ids:
        case_id = session.scalar(_CASE_OF_MESSAGE_IDS, {"ids": ids})
        if case_id is not None:
            return session.get(Case, case_id)
    tagged = tagged_case_id(mail.subject, prefix)
    return session.get(Case, tagged) if tagged is not None else None


def is_vendor(address: str, provider: Provider) -> bool:
    return any(fnmatch.fnmatchcase(address, p.lower()) for p in provider.sender_patterns)


def vendors_of(address: str, config: Config) -> list[Provider]:
    """The destinations this sender may write back for."""
    return [p for p in config.providers.values() if is_vendor(address, p)]


def ticket_in(mail: ParsedMail, provider: Provider) -> str | None:
    """The vendor's ticket number in the subject or the new text of its mail."""
    if not provider.ticket_number:
        return None
    for text in (mail.subject, mail.body):
        match = re.search(provider.ticket_number, text)
        if match:
            return match.group(1)
    return None


def case_by_ticket(session: Session, mail: ParsedMail, vendors: list[Provider]) -> Case | None:
    """The case of a vendor reply that only carries the vendor's own ticket number."""
    for provider in vendors:
        ticket = ticket_in(mail, provider)
        if ticket:
            found = session.scalars(
                select(Case)
                .where(Case.provider == provider.id, Case.vendor_ticket == ticket)
                .order_by(Case.id.desc())
                .limit(1)
            ).first()
            if found is not None:
                return found
    return None


_COMMAND = re.compile(r"^\s*#(resuelto|cerrar|prioridad|nota|seguimiento)\b[:\s]*(.*)$", re.I)


def parse_commands(text: str) -> Commands:
    """`#resuelto`/`#cerrar`, `#prioridad ALTA`, `#nota …`, `#seguimiento …` (the client was
    contacted) on lines of their own; every other line is the text to relay."""
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
        elif argument:
            found.notes.append(argument)
    found.text = "\n".join(kept).strip()
    return found


@dataclass(frozen=True)
class Earlier:
    """What an incoming escalation may belong to instead of a new case."""

    duplicate: Case | None  # an open case for the same destination and client (seed 000)
    resent: Case | None  # the agent's own case waiting for the fields this mail resends


_OF_CLIENT = (
    Case.provider == bindparam("provider"),
    Case.client_key == bindparam("client"),
    Case.status.in_((*OPEN_STATUSES, "needs_info")),
)
_CASES_OF_CLIENT = select(Case).where(*_OF_CLIENT).order_by(Case.id)
# Most escalations are of a client with no case in progress: a plain lookup says so in
# about half the time loading case objects takes (the ORM around the same query).
_ANY_CASE_OF_CLIENT = select(Case.id).where(*_OF_CLIENT).limit(1)


def find_earlier_case(session: Session, mail: ParsedMail, decision: Decision) -> Earlier:
    """Look up the cases for the same destination and the same client (ignoring case,
    accents and spacing), and pick the duplicate and the resent case."""
    provider = decision.provider
    client = normalize(mail.fields.get("cliente", ""))
    if provider is None or not client:
        return Earlier(None, None)
    keys = {"provider": provider.id, "client": client}
    if session.connection().execute(_ANY_CASE_OF_CLIENT, keys).first() is None:
        return Earlier(None, None)
    candidates = session.scalars(_CASES_OF_CLIENT, keys).all()
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


def _same_keys(case: Case, mail: ParsedMail, keys: Sequence[str]) -> bool:
    """Every other key the destination declares, where both give it, matches."""
    return all(
        normalize(case.fields.get(key, "")) == normalize(mail.fields.get(key, ""))
        for key in keys
        if key != "cliente" and case.fields.get(key) and mail.fields.get(key)
    )


def _thread(session: Session, case: Case, ours: str, theirs: str) -> ThreadHeaders:
    """In-Reply-To the latest, References all: our `ours` mails and their `theirs` mails."""
    ids = session.scalars(
        select(Message.message_id)
        .where(
            Message.case_id == case.id,
            Message.message_id.is_not(None),
            ((Message.direction == "out") & (Message.kind == ours))
            | ((Message.direction == "in") & (Message.kind == theirs)),
        )
        .order_by(Message.id)
    )
    clean = [i for i in ids if i]
    return ThreadHeaders(clean[-1] if clean else None, clean)


def vendor_thread(session: Session, case: Case) -> ThreadHeaders:
    """Headers that put our next mail to the vendor in the vendor's thread: the forward, then
    every mail the vendor sent on the case."""
    return _thread(session, case, ours="forward", theirs="vendor")


def agent_thread(session: Session, case: Case) -> ThreadHeaders:
    """Headers that keep our mails to the agent in the conversation they started."""
    return _thread(session, case, ours="acknowledgement", theirs="escalation")
