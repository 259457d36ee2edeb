"""SLA follow-through: overdue reminders, their escalation to the lead, and the digests.

Owns what the scheduler runs. `Followup.remind` finds cases that became
overdue and queues one reminder to the agent per overdue period, and one to
the team lead once a second window has passed too. `build_digests` (pure)
turns open cases into each agent's digest and each lead's team digest;
`Followup.queue_digests` records one digest per recipient and period in the
same transaction as its outbox row, so it is never sent twice, even across a
restart or with two daemons. Everything leaves through the outbox.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailrouter.config import Config, Provider
from mailrouter.model import (
    LISTED_STATUSES,
    REMINDED_STATUSES,
    CaseInfo,
    DigestCase,
    OutgoingMail,
    case_tag,
)
from mailrouter.parse import agent_part, parse_message
from mailrouter.pipeline import queue_mail
from mailrouter.render import Renderer
from mailrouter.sla import windows_overdue
from mailrouter.store.db import Conflict, Store, add_event
from mailrouter.store.tables import Case, DigestRecord, Message

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


def last_fire(
    trigger: CronTrigger, now: datetime, lookback: timedelta = timedelta(days=2)
) -> datetime | None:
    """The most recent time the schedule fired at or before `now` (within `lookback`)."""
    last = None
    fire = trigger.get_next_fire_time(None, now - lookback)
    while fire is not None and fire <= now:
        last = fire
        fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
    return last


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


DIGEST_COLUMNS = [Case.__table__.c[name] for name in DigestCase.__annotations__]


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


@dataclass
class DigestRun:
    queued: list[str] = field(default_factory=list)
    already_sent: list[str] = field(default_factory=list)
    rendered: list[tuple[Digest, OutgoingMail]] = field(default_factory=list)


class Followup:
    """What the daemon's scheduler runs, also callable from the CLI and tests."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], datetime]) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.renderer = Renderer(config)

    def _case_info(self, case: Case) -> CaseInfo:
        zone = self.config.calendar().zone
        due = case.follow_up_due
        return CaseInfo(
            tag=case.tag(self.config.settings.case_tag_prefix),
            priority=case.priority,
            status=case.status,
            follow_up_due=due.astimezone(zone).strftime("%Y-%m-%d %H:%M (%Z)") if due else "",
            ticket=case.vendor_ticket or "",
        )

    def remind(self, chunk: int = 50) -> int:
        """Queue the reminders due now; return how many were queued. Works through the
        overdue cases a few at a time, one short transaction each, so a backlog (after a
        long stop) never holds the database for long."""
        now = self.clock()
        with self.store.transaction() as session:
            # Sorted here: "ORDER BY id" makes SQLite walk every case in id order rather
            # than search the due-time index for the few overdue ones.
            candidates = sorted(
                session.scalars(
                    select(Case.id).where(
                        Case.status.in_(REMINDED_STATUSES), Case.follow_up_due < now
                    )
                )
            )
        queued = 0
        for start in range(0, len(candidates), chunk):
            with self.store.transaction() as session:
                for case in session.scalars(
                    select(Case).where(Case.id.in_(candidates[start : start + chunk]))
                ):
                    queued += self._remind_case(session, case, now)
        if queued:
            log.info("queued %d follow-up reminders", queued)
        return queued

    def _remind_case(self, session: Session, case: Case, now: datetime) -> int:
        """The agent's reminder once per overdue period; the lead's after a second window."""
        settings = self.config.settings
        provider = self.config.providers.get(case.provider)
        if provider is None or case.follow_up_due is None:
            return 0
        hours = settings.sla_hours[case.priority]
        overdue = windows_overdue(case.follow_up_due, now, hours, self.config.calendar())
        remind = overdue >= 1 and case.reminded_due != case.follow_up_due
        escalate = overdue >= 2 and case.escalated_due != case.follow_up_due
        if not remind and not escalate:
            return 0
        queued = 0
        context = self._reminder_context(session, case, provider, now)
        if remind:
            self._queue(
                session, case, now, "reminder", "reminder.j2", context, [case.agent_address]
            )
            case.reminded_due = case.follow_up_due
            queued += 1
        if escalate:
            if settings.team.leads:
                self._queue(
                    session,
                    case,
                    now,
                    "reminder_lead",
                    "reminder_lead.j2",
                    context,
                    list(settings.team.leads),
                )
                queued += 1
            case.escalated_due = case.follow_up_due
        return queued

    def _reminder_context(
        self, session: Session, case: Case, provider: Provider, now: datetime
    ) -> dict[str, Any]:
        context = self.renderer.case_context(
            self._case_info(case),
            provider,
            case.fields,
            self.config.agent_name(case.agent_address, case.agent_name),
            case.agent_address,
            case.subject,
        )
        last = session.scalars(
            select(Message)
            .where(Message.case_id == case.id, Message.direction == "in", Message.kind == "vendor")
            .order_by(Message.id.desc())
            .limit(1)
        ).first()
        excerpt = ""
        if last is not None:
            parsed = parse_message(last.raw, {}, self.config.settings.intake.address)
            excerpt = agent_part(parsed.body, sign_offs=False)[:600]
        zone = self.config.calendar().zone
        context.update(
            age=age_text(case.created_at, now),
            last_vendor_date=last.created_at.astimezone(zone).strftime("%Y-%m-%d %H:%M")
            if last
            else "",
            last_vendor_text=excerpt,
        )
        return context

    def _queue(
        self,
        session: Session,
        case: Case,
        now: datetime,
        kind: str,
        template: str,
        context: dict[str, Any],
        to: list[str],
    ) -> None:
        mail = self.renderer.compose(kind, template, context, to, now=now, to_agent=True)
        queue_mail(session, case.id, now, mail)
        add_event(session, case.id, now, kind, ", ".join(to))

    def digest_trigger(self) -> CronTrigger:
        return CronTrigger.from_crontab(
            self.config.settings.digest.schedule, timezone=self.config.calendar().zone
        )

    def scheduled_digests(self) -> DigestRun:
        """The digests of the latest scheduled run, if it is under a day old: what the cron
        job sends, and what a daemon started after a missed run catches up on, once."""
        fired = last_fire(self.digest_trigger(), self.clock())
        if fired is None or self.clock() - fired > timedelta(days=1):
            return DigestRun()
        return self.queue_digests(fired.isoformat(timespec="minutes"))

    def digests_now(self) -> list[Digest]:
        # Plain rows, not ORM objects: a team's whole backlog is read for the counts.
        with self.store.engine_for_reading().connect() as connection:
            cases = connection.execute(
                select(*DIGEST_COLUMNS)
                .where(Case.__table__.c.status.in_(LISTED_STATUSES))
                .order_by(Case.__table__.c.id)
            ).all()
        return build_digests(cases, self.config, self.clock())

    def render_digest(self, digest: Digest) -> OutgoingMail:
        settings = self.config.settings
        context = {
            "digest": digest,
            "intake_address": settings.intake.address,
            "now": self.clock().astimezone(self.config.calendar().zone).strftime("%Y-%m-%d %H:%M"),
        }
        return self.renderer.compose(
            "digest",
            "digest.j2",
            context,
            [digest.recipient],
            now=self.clock(),
            to_agent=True,
            html_template="digest.html.j2",
        )

    def queue_digests(
        self, period: str, only_to: str | None = None, dry_run: bool = False
    ) -> DigestRun:
        """Queue every digest of `period` not sent yet (or, dry, only render them)."""
        run = DigestRun()
        now = self.clock()
        for digest in self.digests_now():
            if only_to and digest.recipient.lower() != only_to.lower():
                continue
            mail = self.render_digest(digest)
            run.rendered.append((digest, mail))
            if dry_run:
                continue
            try:
                with self.store.transaction() as session:
                    session.add(
                        DigestRecord(
                            recipient=digest.recipient,
                            period=period,
                            created_at=now,
                            message_id=mail.message_id,
                        )
                    )
                    session.flush()  # the unique (recipient, period) says if it was sent
                    queue_mail(session, None, now, mail)
                run.queued.append(digest.recipient)
            except Conflict:
                run.already_sent.append(digest.recipient)
        if run.queued:
            log.info("digests for %s queued to %s", period, ", ".join(run.queued))
        return run
