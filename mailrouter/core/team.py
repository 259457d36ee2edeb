"""Team: who owns a case's follow-up, and the labels that make a case visible.

Pure decisions, read by the decision paths (core/handle.py), the digests and the `cases`
command. An owner is chosen from the escalation team (`team.escalation`) by round robin or
by the fewest cases in progress, skipping members who are away; the book counts the turns
(in the database: restarts and daemons side by side continue one rotation). A case's
labels are those stored on it (from its route and from #etiqueta) plus the automatic
ones, which follow its state and are never stored: `urgente`, `sin-acuse`, `undeliverable`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Protocol

from mailrouter.config import Config, EscalationTeam

# At most this many stored labels on a case: a label is for finding cases, not for notes.
MAX_LABELS = 20
# At most this many #etiqueta / #quitar-etiqueta lines of one mail are applied.
LABEL_COMMANDS = 2 * MAX_LABELS
# At most this many #nota lines, and as many #seguimiento lines, of one mail are recorded:
# each is an event in the case's history, and one in the sender's confirmation.
NOTE_COMMANDS = 20
AUTOMATIC_LABELS = ("urgente", "sin-acuse", "undeliverable")


class LabelledCase(Protocol):
    """What the labels of a case are read from: a case, or a digest's row."""

    created_at: datetime
    status: str
    provider: str
    priority: str
    vendor_ticket: str | None
    labels: list[str]


@dataclass(frozen=True)
class Choice:
    """The owner chosen for a new case (None: nobody), and how, for its history."""

    owner: str | None
    how: str


def awaits_vendor_ack(case: LabelledCase, config: Config, now: datetime) -> bool:
    """The vendor opens tickets and has not sent one `vendor_ack_hours` after the case
    was opened ("SIN ACUSE DEL PROVEEDOR")."""
    provider = config.providers.get(case.provider)
    return (
        provider is not None
        and provider.ticket_number is not None
        and not case.vendor_ticket
        and case.status not in ("needs_info", "undeliverable", "closed")
        and now - case.created_at > timedelta(hours=config.settings.vendor_ack_hours)
    )


def automatic_labels(case: LabelledCase, config: Config, now: datetime | None) -> list[str]:
    """The labels a case's state gives it (`sin-acuse` only when `now` is known)."""
    labels = []
    if case.priority == "URGENTE" and case.status != "closed":
        labels.append("urgente")
    if now is not None and awaits_vendor_ack(case, config, now):
        labels.append("sin-acuse")
    if case.status == "undeliverable":
        labels.append("undeliverable")
    return labels


def case_labels(case: LabelledCase, config: Config, now: datetime | None) -> list[str]:
    """Every label of a case: the stored ones in their order, then the automatic ones."""
    stored = list(case.labels or [])
    return stored + [label for label in automatic_labels(case, config, now) if label not in stored]


def with_labels(current: Sequence[str], added: Sequence[str]) -> list[str]:
    """`current` with `added` after it (each once; automatic names are never stored),
    up to MAX_LABELS."""
    labels = list(current)
    for label in added:
        if label not in labels and label not in AUTOMATIC_LABELS and len(labels) < MAX_LABELS:
            labels.append(label)
    return labels


def available(team: EscalationTeam, today: date) -> list[str]:
    """The members who may get a case today, in the configured order."""
    return [member.address for member in team.members if not member.away(today)]


def in_turn(members: Sequence[str], turn: int) -> str:
    """Whose `turn` it is among `members` (the book counts the turns)."""
    return members[turn % len(members)]


def least_open(members: Sequence[str], counts: Mapping[str, int], turn: int) -> str:
    """The member with the fewest cases in progress; among equals, the first from whose
    turn it is, in the list's order."""
    fewest = min(counts.get(member, 0) for member in members)
    start = turn % len(members)
    in_order = [*members[start:], *members[:start]]
    return next(member for member in in_order if counts.get(member, 0) == fewest)


def choose_owner(
    config: Config, today: date, turn: int, counts: Mapping[str, int] | None
) -> Choice:
    """The owner of a new case under `team.escalation` (`turn`: the rotation's count;
    `counts`: cases in progress by owner, for least_open)."""
    settings = config.settings.team
    team = settings.escalation
    if team.assign == "none":
        return Choice(None, "")
    members = available(team, today)
    if not members:
        if team.fallback == "lead" and settings.leads:
            return Choice(settings.leads[0].lower(), "every member away: the team lead")
        return Choice(None, "every member away")
    if team.assign == "least_open":
        return Choice(least_open(members, counts or {}, turn), "fewest cases in progress")
    return Choice(in_turn(members, turn), "round robin")


def member_for(config: Config, name: str) -> str | None:
    """Whom `#asignar NAME` means: a member (address or short name) or a lead."""
    team = config.settings.team
    member = team.escalation.member(name)
    if member is not None:
        return member.address
    wanted = name.strip().lower()
    return next((lead.lower() for lead in team.leads if lead.lower() == wanted), None)


def is_member(config: Config, address: str) -> bool:
    return config.settings.team.escalation.member(address) is not None


def member_name(config: Config, address: str) -> str:
    """A team member's configured name (on the escalation team, else among the agents),
    or ""."""
    member = config.settings.team.escalation.member(address)
    return (member.name if member else "") or config.agent_name(address)


def person(config: Config, address: str) -> str:
    """How mails name a team member: "Name <address>" when a name is configured."""
    name = member_name(config, address)
    return f"{name} <{address}>" if name else address
