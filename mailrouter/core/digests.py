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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from urllib.parse import quote

from mailrouter.config import Config
from mailrouter.core.render import Renderer, local_time
from mailrouter.core.team import awaits_vendor_ack, case_labels, member_name
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
    owner: str = ""  # its owner's name (or address); "" when nobody owns it
    labels: str = ""  # every label, stored and automatic


@dataclass(frozen=True)
class DigestGroup:
    """One section of a digest: its first lines (the most pressing `max_cases` of the whole
    digest), and how many cases it has."""

    name: str
    lines: list[DigestLine]
    total: int
    kind: str = ""  # overdue | today | later | owner (a lead's digest, by owner)
    overdue: int = 0  # of an owner's group: how many of its cases are overdue

    @property
    def more(self) -> int:
        return self.total - len(self.lines)


@dataclass(frozen=True)
class ProviderCount:
    """Open and overdue cases of a destination (or of an owner)."""

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
    # A lead's digest when the team has owners: its groups are the owners' (most overdue
    # first, each in urgency order), and these their counts.
    by_owner: bool = False
    owners: tuple[ProviderCount, ...] = ()

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
    zone = config.calendar().zone
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
        no_vendor_ack=awaits_vendor_ack(case, config, now),
        agent=config.agent_name(case.agent_address, case.agent_name) or case.agent_address,
        subject=case.subject,
        due_today=section == DUE_TODAY,
        overdue_by=age_text(due, now) if due and section == OVERDUE else "",
        undeliverable=case.status == "undeliverable",
        # In a first digest every case is new: a mark on every line would mark nothing.
        new=since is not None and case.created_at > since,
        reply=reply_link(settings.intake.address, subject),
        owner=_owner_name(case.owner, config) if case.owner else "",
        labels=", ".join(case_labels(case, config, now)),
    )


def _owner_name(owner: str, config: Config) -> str:
    return member_name(config, owner) or owner


# The group of a lead's digest by owner that holds the cases nobody owns.
NO_OWNER = ""


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
    owners: tuple[ProviderCount, ...] = ()  # by owner address (NO_OWNER: nobody), when asked

    @classmethod
    def of(cls, keyed: list[_Keyed], config: Config, by_owner: bool = False) -> _Pile:
        # Only the first `digest.max_cases` become lines: a list of thousands is read by
        # nobody, and sorting all of them would cost what a heap of 50 does not.
        first = heapq.nsmallest(config.settings.digest.max_cases, keyed, key=lambda kc: kc[0])
        # One pass, counted in C by (section, provider id); destinations named once each.
        pairs = Counter((key[0], case.provider) for key, case in keyed)
        sections: Counter[int] = Counter()
        for (section, _), count in pairs.items():
            sections[section] += count
        providers = _counts(pairs, lambda provider: _provider_name(provider, config))
        owners: tuple[ProviderCount, ...] = ()
        if by_owner:
            owned = Counter((key[0], case.owner or NO_OWNER) for key, case in keyed)
            owners = _counts(owned, lambda owner: owner)
        opened = [case.created_at for _, case in keyed]
        return cls(first, sections, providers, opened, owners)

    def digest(
        self,
        recipient: str,
        for_lead: bool,
        config: Config,
        today: _Today,
        since: datetime | None,
    ) -> Digest:
        if self.owners:
            groups = [
                DigestGroup(
                    _owner_name(owner.name, config) if owner.name else "Sin responsable",
                    [
                        _line(c, k[0], config, today, since)
                        for k, c in self.first
                        if (c.owner or NO_OWNER) == owner.name
                    ],
                    owner.open,
                    "owner",
                    owner.overdue,
                )
                for owner in self.owners
            ]
        else:
            groups = [
                DigestGroup(
                    SECTIONS[section][0],
                    [
                        _line(c, section, config, today, since)
                        for k, c in self.first
                        if k[0] == section
                    ],
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
            by_owner=bool(self.owners),
            owners=tuple(
                ProviderCount(_owner_name(o.name, config) if o.name else "Sin responsable", *n)
                for o in self.owners
                for n in [(o.open, o.overdue)]
            ),
        )


def _counts(
    pairs: Counter[tuple[int, str]], name_of: Callable[[str], str]
) -> tuple[ProviderCount, ...]:
    """Open and overdue counts by what `pairs` counts (section, what), named by `name_of`:
    the most overdue first (where a lead looks first)."""
    counts: dict[str, ProviderCount] = {}
    for (section, what), count in pairs.items():
        name = name_of(what)
        was = counts.get(name, ProviderCount(name, 0, 0))
        late = count if section == OVERDUE else 0
        counts[name] = ProviderCount(name, was.open + count, was.overdue + late)
    return tuple(sorted(counts.values(), key=lambda p: (-p.overdue, -p.open, p.name)))


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
    every = [_keyed(case, today) for case in cases]
    # Each case in its agent's digest and in its owner's (one digest to one who is both).
    mine: dict[str, list[_Keyed]] = {}
    for keyed in every:
        case = keyed[1]
        mine.setdefault(case.agent_address, []).append(keyed)
        if case.owner and case.owner != case.agent_address:
            mine.setdefault(case.owner, []).append(keyed)

    def digest_of(pile: _Pile, recipient: str, for_lead: bool) -> Digest:
        return pile.digest(recipient, for_lead, config, today, last.get(recipient.lower()))

    team = config.settings.team
    # A lead gets one digest a period (one is recorded per recipient and period): the
    # team's, which holds their own cases too.
    leads = {lead.lower() for lead in team.leads}
    digests = [
        digest_of(_Pile.of(cases, config), person, False)
        for person, cases in sorted(mine.items())
        if person.lower() not in leads
    ]
    if config.settings.digest.send_empty:
        empty = _Pile.of([], config)
        everyone = [*team.agents, *(member.address for member in team.escalation.members)]
        for person in dict.fromkeys(everyone):
            if person not in mine and person.lower() not in leads:
                digests.append(digest_of(empty, person, False))
    if every or config.settings.digest.send_empty:
        whole = _Pile.of(every, config, by_owner=bool(team.escalation.members))
        digests += [digest_of(whole, lead, True) for lead in team.leads]
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
