"""Digests: open cases into each agent's digest and each lead's team digest. Pure.

Overdue first, then by due time; each table capped at `digest.max_cases` lines with the
rest counted. The scheduler's job that queues them, once per recipient and period, is
`service.Followup`.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mailrouter.config import Config
from mailrouter.core.render import Renderer, local_time
from mailrouter.model import (
    DigestCase,
    OutgoingMail,
    case_tag,
)

log = logging.getLogger(__name__)

PRIORITY_LOOK = {
    "URGENTE": ("🔴", "#d93025"),
    "ALTA": ("🟠", "#f29900"),
    "MEDIA": ("🟡", "#f9ab00"),
    "BAJA": ("🟢", "#188038"),
}
STATUS_LABELS = {
    "open": "enviado",
    "vendor_replied": "respondió el proveedor",
    "awaiting_vendor": "esperando al proveedor",
    "needs_info": "faltan datos",
    "undeliverable": "no entregado",
}


def age_text(since: datetime, now: datetime) -> str:
    minutes = max(0, int((now - since).total_seconds() // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return f"{days} d {hours} h" if days else f"{hours} h {minutes} min"


@dataclass(frozen=True)
class DigestLine:
    tag: str
    client: str
    destination: str
    priority: str
    icon: str
    color: str
    status: str
    due: str
    overdue: bool
    age: str
    ticket: str
    no_vendor_ack: bool
    agent: str
    subject: str


@dataclass(frozen=True)
class DigestGroup:
    """One table of a digest: its first `max_cases` lines, and how many cases it has."""

    name: str
    lines: list[DigestLine]
    total: int

    @property
    def more(self) -> int:
        return self.total - len(self.lines)


@dataclass(frozen=True)
class Digest:
    recipient: str
    name: str
    for_lead: bool
    groups: list[DigestGroup]
    overdue: int
    open: int

    @property
    def subject(self) -> str:
        return f"Escalaciones: {self.overdue} vencidas, {self.open} abiertas"


def _destination(case: DigestCase, config: Config) -> str:
    provider = config.providers.get(case.provider)
    return provider.name if provider else case.provider


def _is_overdue(case: DigestCase, now: datetime) -> bool:
    return case.follow_up_due is not None and case.follow_up_due < now


def _line(case: DigestCase, config: Config, now: datetime) -> DigestLine:
    settings = config.settings
    provider = config.providers.get(case.provider)
    zone = config.calendar().zone
    awaits_ticket = provider is not None and provider.ticket_number is not None
    icon, color = PRIORITY_LOOK.get(case.priority, ("", "#5f6368"))
    return DigestLine(
        tag=case_tag(settings.case_tag_prefix, case.id),
        client=case.client,
        destination=_destination(case, config),
        priority=case.priority,
        icon=icon,
        color=color,
        status=STATUS_LABELS.get(case.status, case.status),
        due=case.follow_up_due.astimezone(zone).strftime("%d/%m %H:%M")
        if case.follow_up_due
        else "—",
        overdue=_is_overdue(case, now),
        age=age_text(case.created_at, now),
        ticket=case.vendor_ticket or "",
        no_vendor_ack=awaits_ticket
        and not case.vendor_ticket
        and case.status != "needs_info"
        and now - case.created_at > timedelta(hours=settings.vendor_ack_hours),
        agent=config.agent_name(case.agent_address, case.agent_name) or case.agent_address,
        subject=case.subject,
    )


_Keyed = tuple[tuple[bool, datetime, int], DigestCase]
_NEVER = datetime.max.replace(tzinfo=UTC)


def _keyed(case: DigestCase, now: datetime) -> _Keyed:
    """The case with its place in a digest: overdue first, then by due time (soonest first),
    cases without one last."""
    due = case.follow_up_due
    return (not _is_overdue(case, now), due or _NEVER, case.id), case


def _group(name: str, cases: list[_Keyed], config: Config, now: datetime) -> DigestGroup:
    """Only the first `digest.max_cases` become lines: a list of thousands is read by nobody."""
    first = heapq.nsmallest(config.settings.digest.max_cases, cases, key=lambda kc: kc[0])
    return DigestGroup(name, [_line(case, config, now) for _, case in first], len(cases))


def build_digests(cases: Iterable[DigestCase], config: Config, now: datetime) -> list[Digest]:
    """Each agent's digest of their cases, and each lead's digest of the whole team, grouped
    by destination. Empty digests are included only when `digest.send_empty` is set."""
    by_agent: dict[str, list[_Keyed]] = {}
    by_destination: dict[str, list[_Keyed]] = {}
    for case in cases:
        keyed = _keyed(case, now)
        by_agent.setdefault(case.agent_address, []).append(keyed)
        by_destination.setdefault(_destination(case, config), []).append(keyed)

    def overdue(mine: list[_Keyed]) -> int:
        return sum(not key[0] for key, _ in mine)

    digests = [
        Digest(
            recipient=agent,
            name=config.agent_name(agent),
            for_lead=False,
            groups=[_group("", mine, config, now)],
            overdue=overdue(mine),
            open=len(mine),
        )
        for agent, mine in sorted(by_agent.items())
    ]
    if config.settings.digest.send_empty:
        for agent in config.settings.team.agents:
            if agent not in by_agent:
                digests.append(Digest(agent, config.agent_name(agent), False, [], 0, 0))
    every = [keyed for mine in by_agent.values() for keyed in mine]
    if every or config.settings.digest.send_empty:
        groups = [_group(name, mine, config, now) for name, mine in sorted(by_destination.items())]
        for lead in config.settings.team.leads:
            digests.append(
                Digest(lead, config.agent_name(lead), True, groups, overdue(every), len(every))
            )
    return digests


def render_digest(
    renderer: Renderer, digest: Digest, config: Config, now: datetime
) -> OutgoingMail:
    """The digest's mail: a text part and its HTML alternative."""
    context = {
        "digest": digest,
        "intake_address": config.settings.intake.address,
        "now": local_time(now, config),
    }
    return renderer.compose(
        "digest",
        "digest.j2",
        context,
        [digest.recipient],
        now=now,
        to_agent=True,
        html_template="digest.html.j2",
    )
