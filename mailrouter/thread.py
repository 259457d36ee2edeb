"""Thread: which existing case an incoming mail belongs to.

Owns the matching of a mail to a case: by In-Reply-To/References against the
Message-IDs the router stored for the case, by the case tag (`[ESC-000123]`)
in the subject, and by the fragment's own keys (same agent, destination and
client). Reads the store; changes nothing.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailrouter.parse import ParsedMail, normalize
from mailrouter.route import Decision
from mailrouter.store import Case, Message


def tagged_case_id(subject: str, prefix: str) -> int | None:
    """The case number of the first `[PREFIX-000123]` tag in a subject."""
    match = re.search(rf"\[{re.escape(prefix)}-(\d{{1,12}})\]", subject, re.I)
    return int(match.group(1)) if match else None


def case_by_thread(session: Session, mail: ParsedMail, prefix: str) -> Case | None:
    """The case whose stored mails this one answers, or whose tag its subject carries."""
    ids = [i for i in [mail.in_reply_to, *mail.references] if i]
    if ids:
        case_id = session.scalar(
            select(Message.case_id)
            .where(Message.message_id.in_(ids), Message.case_id.is_not(None))
            .order_by(Message.id.desc())
            .limit(1)
        )
        if case_id is not None:
            return session.get(Case, case_id)
    tagged = tagged_case_id(mail.subject, prefix)
    return session.get(Case, tagged) if tagged is not None else None


def find_resent_case(session: Session, mail: ParsedMail, decision: Decision) -> Case | None:
    """The agent's own case still waiting for fields that this fresh mail resends: same
    destination and same client (ignoring case, accents and spacing)."""
    client = normalize(mail.fields.get("cliente", ""))
    if not client or decision.provider is None:
        return None
    candidates = session.scalars(
        select(Case)
        .where(
            Case.status == "needs_info",
            Case.agent_address == mail.from_address,
            Case.provider == decision.provider.id,
        )
        .order_by(Case.id.desc())
    )
    return next((case for case in candidates if normalize(case.client) == client), None)
