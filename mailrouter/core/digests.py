"""Digests: open cases into each agent's digest and each lead's team digest. Pure.

A digest is read top down by someone with little time, so it is ordered by urgency, in
three sections: overdue (URGENTE, ALTA, MEDIA, BAJA, then the longest overdue first), due
later today in the team's time zone, and the rest by due time. Above them: the counts
(open, overdue, due today, new since the recipient's last digest) and a table per
destination. Only the `digest.max_cases` most pressing cases become lines; each section
counts the rest. The scheduler's job that queues them, once per recipient and period, is
`service.Followup`.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from urllib.parse import quote

from mailrouter.config import Config
from mailrouter.core.render import Renderer, local_time
from mailrouter.core.threads import bare_subject
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
# Most urgent first; a priority the router does not know goes after BAJA.
PRIORITY_RANK = {"URGENTE": 0, "ALTA": 1, "MEDIA": 2, "BAJA": 3}
STATUS_LABELS = {
    "open": "enviado",
    "vendor_replied": "respondió el proveedor",
    "awaiting_vendor": "esperando al proveedor",
    "needs_info": "faltan datos",
    "undeliverable": "no entregado",
}

OVERDUE, DUE_TODAY, LATER = 0, 1, 2
# Each section: its heading, and its kind (what a template may style it by).
SECTIONS = {
    OVERDUE: ("Vencidas", "overdue"),
    DUE_TODAY: ("Vencen hoy", "today"),
    LATER: ("Más adelante", "later"),
}


def age_text(since: datetime, now: datetime) -> str:
    minutes = max(0, int((now - since).total_seconds() // 60))
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    return f"{days} d {hours} h" if days else f"{hours} h {minutes} min"


def reply_link(address: str, subject: str) -> str:
    """A `mailto:` URL (RFC 6068) for a mail to `address` with `subject`: every octet of the
    UTF-8 subject outside the unreserved set percent-encoded, a space as %20 (a "+" would
    stay a plus sign in a mail client)."""
    return f"mailto:{quote(address, safe='@')}?subject={quote(subject, safe='')}"


def reply_subject(tag: str, subject: str, prefix: str, ticket: str | None) -> str:
    """The subject of a reply into a case's thread, written as the router writes its own:
    one "Re:", the case's tag (which threads a participant's mail), the bare original."""
    return f"Re: [{tag}] {bare_subject(subject, prefix, ticket)}".rstrip()


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
    due_today: bool = False
    overdue_by: str = ""  # how long past its due time, when overdue
    undeliverable: bool = False
    new: bool = False  # opened since the recipient's last digest (never in a first one)
    reply: str = ""  # mailto: into the case's thread


@dataclass(frozen=True)
class DigestGroup:
    """One section of a digest: its first lines (the most pressing `max_cases` of the whole
    digest), and how many cases it has."""

    name: str
    lines: list[DigestLine]
    total: int
    kind: str = ""  # overdue | today | later

    @property
    def more(self) -> int:
        return self.total - len(self.lines)


@dataclass(frozen=True)
class ProviderCount:
    name: str
    open: int
    overdue: int


@dataclass(frozen=True)
class Digest:
    recipient: str
    name: str
    for_lead: bool
    groups: list[DigestGroup]
    overdue: int
    open: int
    due_today: int = 0
    new: int = 0
    since: str = ""  # when the recipient's last digest went, as the team reads it; "" if never
    providers: tuple[ProviderCount, ...] = ()

    @property
    def subject(self) -> str:
        return f"Escalaciones: {self.overdue} vencidas, {self.open} abiertas"


@dataclass(frozen=True)
class _Today:
    """`now`, and the start of tomorrow in the team's zone: what "due today" ends at."""

    now: datetime
    tomorrow: datetime

    @classmethod
    def of(cls, now: datetime, config: Config) -> _Today:
        zone = config.calendar().zone
        day = now.astimezone(zone).date() + timedelta(days=1)
        return cls(now, datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC))

    def section(self, due: datetime | None) -> int:
        if due is not None and due < self.now:
            return OVERDUE
        if due is not None and due < self.tomorrow:
            return DUE_TODAY
        return LATER


def _destination(case: DigestCase, config: Config) -> str:
    return _provider_name(case.provider, config)


def _provider_name(provider_id: str, config: Config) -> str:
    provider = config.providers.get(provider_id)
    return provider.name if provider else provider_id


def _line(
    case: DigestCase, section: int, config: Config, today: _Today, since: datetime | None
) -> DigestLine:
    settings = config.settings
    now = today.now
    provider = config.providers.get(case.provider)
    zone = config.calendar().zone
    awaits_ticket = provider is not None and provider.ticket_number is not None
    icon, color = PRIORITY_LOOK.get(case.priority, ("", "#5f6368"))
    tag = case_tag(settings.case_tag_prefix, case.id)
    due = case.follow_up_due
    subject = reply_subject(tag, case.subject, settings.case_tag_prefix, case.vendor_ticket)
    return DigestLine(
        tag=tag,
        client=case.client,
        destination=_destination(case, config),
        priority=case.priority,
        icon=icon,
        color=color,
        status=STATUS_LABELS.get(case.status, case.status),
        due=due.astimezone(zone).strftime("%d/%m %H:%M") if due else "—",
        overdue=section == OVERDUE,
        age=age_text(case.created_at, now),
        ticket=case.vendor_ticket or "",
        no_vendor_ack=awaits_ticket
        and not case.vendor_ticket
        and case.status not in ("needs_info", "undeliverable")
        and now - case.created_at > timedelta(hours=settings.vendor_ack_hours),
        agent=config.agent_name(case.agent_address, case.agent_name) or case.agent_address,
        subject=case.subject,
        due_today=section == DUE_TODAY,
        overdue_by=age_text(due, now) if due and section == OVERDUE else "",
        undeliverable=case.status == "undeliverable",
        # In a first digest every case is new: a mark on every line would mark nothing.
        new=since is not None and case.created_at > since,
        reply=reply_link(settings.intake.address, subject),
    )


_Key = tuple[int, int, datetime, int]
_Keyed = tuple[_Key, DigestCase]
_NEVER = datetime.max.replace(tzinfo=UTC)


def _keyed(case: DigestCase, today: _Today) -> _Keyed:
    """The case with its place in a digest: its section; overdue ones by priority, then the
    longest overdue (the earliest due) first; the others by due time, those without last."""
    due = case.follow_up_due
    section = today.section(due)
    rank = PRIORITY_RANK.get(case.priority, len(PRIORITY_RANK)) if section == OVERDUE else 0
    return (section, rank, due or _NEVER, case.id), case


@dataclass(frozen=True)
class _Pile:
    """What a set of cases gives every digest made of it, whoever receives it: the most
    pressing cases in order, and the counts. Built once for all the leads."""

    first: list[_Keyed]
    sections: Counter[int]
    providers: tuple[ProviderCount, ...]
    opened_at: list[datetime]  # of every case, for what is new to each recipient

    @classmethod
    def of(cls, keyed: list[_Keyed], config: Config) -> _Pile:
        # Only the first `digest.max_cases` become lines: a list of thousands is read by
        # nobody, and sorting all of them would cost what a heap of 50 does not.
        first = heapq.nsmallest(config.settings.digest.max_cases, keyed, key=lambda kc: kc[0])
        # One pass, counted in C by (section, provider id); destinations named once each.
        pairs = Counter((key[0], case.provider) for key, case in keyed)
        sections: Counter[int] = Counter()
        counts: dict[str, ProviderCount] = {}
        for (section, provider), count in pairs.items():
            sections[section] += count
            name = _provider_name(provider, config)
            was = counts.get(name, ProviderCount(name, 0, 0))
            late = count if section == OVERDUE else 0
            counts[name] = ProviderCount(name, was.open + count, was.overdue + late)
        # The destinations with the most overdue first: where the lead looks first.
        providers = sorted(counts.values(), key=lambda p: (-p.overdue, -p.open, p.name))
        return cls(first, sections, tuple(providers), [case.created_at for _, case in keyed])

    def digest(
        self,
        recipient: str,
        for_lead: bool,
        config: Config,
        today: _Today,
        since: datetime | None,
    ) -> Digest:
        groups = [
            DigestGroup(
                SECTIONS[section][0],
                [_line(c, section, config, today, since) for k, c in self.first if k[0] == section],
                self.sections[section],
                SECTIONS[section][1],
            )
            for section in (OVERDUE, DUE_TODAY, LATER)
            if self.sections[section]
        ]
        return Digest(
            recipient=recipient,
            name=config.agent_name(recipient),
            for_lead=for_lead,
            groups=groups,
            overdue=self.sections[OVERDUE],
            open=len(self.opened_at),
            due_today=self.sections[DUE_TODAY],
            # To one who never had a digest, every case is new.
            new=sum(1 for at in self.opened_at if at > since) if since else len(self.opened_at),
            since=local_time(since, config) if since else "",
            providers=self.providers,
        )


def build_digests(
    cases: Iterable[DigestCase],
    config: Config,
    now: datetime,
    last_sent: Mapping[str, datetime] | None = None,
) -> list[Digest]:
    """Each agent's digest of their cases, and each lead's digest of the whole team.
    `last_sent` says when each recipient (lower case) last got a digest: what is "new" to
    them. Empty digests are included only when `digest.send_empty` is set."""
    today = _Today.of(now, config)
    last = last_sent or {}
    by_agent: dict[str, list[_Keyed]] = {}
    for case in cases:
        by_agent.setdefault(case.agent_address, []).append(_keyed(case, today))

    def digest_of(pile: _Pile, recipient: str, for_lead: bool) -> Digest:
        return pile.digest(recipient, for_lead, config, today, last.get(recipient.lower()))

    digests = [
        digest_of(_Pile.of(mine, config), agent, False) for agent, mine in sorted(by_agent.items())
    ]
    if config.settings.digest.send_empty:
        empty = _Pile.of([], config)
        for agent in config.settings.team.agents:
            if agent not in by_agent:
                digests.append(digest_of(empty, agent, False))
    every = [keyed for mine in by_agent.values() for keyed in mine]
    if every or config.settings.digest.send_empty:
        team = _Pile.of(every, config)
        digests += [digest_of(team, lead, True) for lead in config.settings.team.leads]
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
