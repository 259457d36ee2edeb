"""Pipeline: one inbound mail, from raw bytes to its committed outcome.

The single entry point every intake calls (SMTP listener, IMAP poller, tests,
benchmarks). It parses, decides, and then commits in one transaction the
inbound message with its outcome, the case, the case events, and every mail
the decision causes (the outbox). Processing is idempotent: a mail already
stored (same Message-ID or same bytes, or same IMAP UID) is recognised and
its earlier outcome returned, never processed again. A mail whose processing
raises is quarantined with the reason, so one bad mail never blocks the rest.
"""

from __future__ import annotations

import email
import logging
import traceback
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy import case as sql_case
from sqlalchemy.orm import Session

from mailrouter.config import PRIORITIES, Config, Provider
from mailrouter.model import (
    OPEN_STATUSES,
    Arrival,
    Attachment,
    CaseInfo,
    Clock,
    Decision,
    ImapSource,
    OutgoingMail,
    ParsedMail,
    Result,
    ThreadHeaders,
    content_hash,
)
from mailrouter.parse import (
    agent_part,
    alias_index,
    bounce_details,
    is_bounce,
    normalize,
    parse_message,
)
from mailrouter.render import Renderer
from mailrouter.route import decide, sender_allowed
from mailrouter.sla import due_after
from mailrouter.store.db import Conflict, Store, Unavailable, add_case, add_event, add_message
from mailrouter.store.tables import IMAP_STATE, Case, Message, MessageBody
from mailrouter.thread import (
    agent_thread,
    case_by_thread,
    case_by_ticket,
    find_earlier_case,
    is_vendor,
    parse_commands,
    ticket_in,
    vendor_thread,
    vendors_of,
)

log = logging.getLogger(__name__)

PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


def field_aliases(config: Config) -> dict[str, str]:
    """Normalised label -> canonical field name, from the `fields` section of config.yaml."""
    return alias_index(
        {name: [spec.label, *spec.aliases] for name, spec in config.settings.fields.items()}
    )


class Pipeline:
    """Holds what processing needs; `process` is safe to call from several threads."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.renderer = Renderer(config)
        self.aliases = field_aliases(config)

    def parse(self, raw: bytes) -> ParsedMail:
        return parse_message(raw, self.aliases, self.config.settings.intake.address)

    def known_outcomes(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, Result]:
        """The committed outcomes of a batch of IMAP messages, looked up by their UIDs alone.
        One committed under `MOVE_GRACE_SECONDS` ago is in the hands of whoever committed it
        (that worker moves it at the end of its batch); an older one was left by a worker
        that stopped before moving it (a crash, a lost connection): ours to move."""
        if not uids:
            return {}
        with self.store.reading() as session:
            rows = session.execute(
                select(Message.imap_uid, Message.created_at, *_OUTCOME).where(
                    Message.imap_mailbox == mailbox,
                    Message.imap_uidvalidity == uidvalidity,
                    Message.imap_uid.in_(uids),
                )
            ).all()
        recent = self.clock() - timedelta(seconds=MOVE_GRACE_SECONDS)
        return {
            uid: replace(_result_of(outcome, reason, case_id), in_other_hands=created > recent)
            for uid, created, outcome, reason, case_id in rows
            if uid is not None
        }

    def process(
        self, raw: bytes, source: ImapSource | None = None, whole_size: int | None = None
    ) -> Result:
        """Commit the outcome of one mail, exactly once. Raises only when the database cannot
        be used (then nothing was committed and the caller retries the mail later). The
        intake holds `store.large_mail` around a large mail, from before it has it in hand.
        `whole_size`: `raw` is only the header of a mail of that size, over the limit, whose
        body the intake left on the server (it goes to the IMAP quarantine folder whole)."""
        now = self.clock()
        try:
            mail: ParsedMail | None = self.parse(raw)
        except Exception as exc:
            log.exception("cannot parse mail (%d bytes)", len(raw))
            mail, failure = None, _summary(exc)
        key = mail.dedupe_key if mail else f"sha256:{content_hash(raw)}"
        arrival = Arrival(raw, key, source, now, mail, whole_size or len(raw))
        for attempt in range(3):
            try:
                with self.store.transaction() as session:
                    earlier = _find_earlier(session, key, source)
                    if earlier is not None:
                        _remember_uid(session, source)
                        return earlier
                    if mail is None:
                        return self._quarantine(session, arrival, f"parse error: {failure}")
                    if arrival.size > self.config.settings.intake.max_message_bytes:
                        return self._too_large(session, arrival, mail)
                    return self._apply(session, arrival, mail)
            except Conflict:
                # Another worker committed this mail, or the same mailbox's state, between
                # our lookup and our insert: look again.
                if attempt == 2:
                    raise
            except Unavailable:
                raise
            except Exception as exc:
                # A poison mail: this mail makes our code raise. Whatever it had half-written
                # is rolled back; keep the mail aside with the reason and go on with the rest.
                log.exception("processing failed; quarantining the mail")
                with self.store.transaction() as session:
                    return self._quarantine(session, arrival, f"processing error: {_summary(exc)}")
        raise AssertionError("unreachable")

    def _inbound(
        self,
        session: Session,
        arrival: Arrival,
        outcome: str,
        reason: str,
        kind: str | None = None,
        case: Case | None = None,
    ) -> None:
        """Store the inbound mail with its outcome (kind: escalation, agent_reply, vendor,
        machine, bounce, quarantined), on its case when it has one."""
        mail, source = arrival.mail, arrival.source
        if kind is None:
            kind = {"quarantined": "quarantined", "ignored": "machine"}.get(outcome, "escalation")
        add_message(
            session,
            arrival.raw,
            case_id=case.id if case is not None else None,
            created_at=arrival.now,
            direction="in",
            kind=kind,
            message_id=mail.message_id[:998] if mail and mail.message_id else None,
            dedupe_key=arrival.key[:1024],
            source="imap" if source else "smtp",
            imap_mailbox=source.mailbox if source else None,
            imap_uidvalidity=source.uidvalidity if source else None,
            imap_uid=source.uid if source else None,
            sender=mail.from_address[:320] if mail else "",
            recipients=mail.to if mail else [],
            subject=mail.subject if mail else "",
            outcome=outcome,
            reason=reason,
            attempts=0,
        )
        _remember_uid(session, source)

    def _quarantine(self, session: Session, arrival: Arrival, reason: str) -> Result:
        log.warning("quarantined: %s", reason)
        self._inbound(session, arrival, "quarantined", reason)
        return Result("quarantined", reason)

    def _apply(self, session: Session, arrival: Arrival, mail: ParsedMail) -> Result:
        """Which path a mail takes: a vendor's reply, machine mail, a stranger, an agent on a
        case's thread, a duplicate or resend, or a new escalation."""
        config, now = self.config, arrival.now
        limits = config.settings.loop_protection
        if limits.max_per_sender_per_hour and mail.from_address:
            recent = session.scalar(
                select(func.count(Message.id)).where(
                    Message.direction == "in",
                    Message.sender == mail.from_address[:320],
                    Message.created_at >= now - timedelta(hours=1),
                )
            )
            if (recent or 0) >= limits.max_per_sender_per_hour:
                reason = (
                    f"rate limit: {recent} mails from {mail.from_address} in the last hour "
                    f"(loop_protection.max_per_sender_per_hour)"
                )
                return self._quarantine(session, arrival, reason)
        case = case_by_thread(session, mail, config.settings.case_tag_prefix)
        vendors = vendors_of(mail.from_address, config)
        if case is None and vendors:
            case = case_by_ticket(session, mail, vendors)
        if case is not None and self._from_vendor(mail, case):
            return self._vendor_reply(session, arrival, mail, case)
        if mail.machine_reason:
            if is_bounce(mail):
                return self._bounce(session, arrival, mail)
            log.info(
                "ignored %s from %s: %s", mail.message_id, mail.from_address, mail.machine_reason
            )
            reason = f"machine mail: {mail.machine_reason}"
            self._inbound(session, arrival, "ignored", reason, "machine", case)
            return Result("ignored", reason, case.id if case else None)
        if not sender_allowed(mail.from_address, config.settings.allowed_senders):
            if vendors:
                return self._quarantine(session, arrival, "unmatched vendor reply")
            return self._quarantine(session, arrival, decide(mail, config).reason)
        if case is not None:
            if case.status == "needs_info":
                return self._complete(session, arrival, mail, case)
            return self._agent_reply(session, arrival, mail, case)
        decision = decide(mail, config)
        earlier = find_earlier_case(session, mail, decision)
        if earlier.duplicate is not None:
            return self._duplicate(session, arrival, mail, decision, earlier.duplicate)
        if earlier.resent is not None:
            return self._complete(session, arrival, mail, earlier.resent)
        case = Case(
            created_at=now,
            agent_address=mail.from_address[:320],
            agent_name=mail.from_name[:320],
            subject=mail.subject,
        )
        return self._open(session, arrival, mail, decision, case)

    def _from_vendor(self, mail: ParsedMail, case: Case) -> bool:
        provider = self.config.providers.get(case.provider)
        return (
            provider is not None
            and mail.from_address != case.agent_address
            and is_vendor(mail.from_address, provider)
        )

    # --- replies on a case's thread ------------------------------------------------------

    def _vendor_reply(
        self, session: Session, arrival: Arrival, mail: ParsedMail, case: Case
    ) -> Result:
        """The vendor wrote on a case: record its ticket number the first time one shows
        (even in an auto-reply, and then tell the agent once); relay a human reply."""
        now, tag = arrival.now, case.tag(self.config.settings.case_tag_prefix)
        provider = self.config.providers[case.provider]
        ticket = ticket_in(mail, provider)
        new_ticket = bool(ticket) and not case.vendor_ticket
        if new_ticket:
            case.vendor_ticket = ticket
            add_event(session, case.id, now, "vendor_ticket", f"{provider.name} ticket #{ticket}")
        case.updated_at = now
        text = agent_part(mail.body, sign_offs=False) or mail.body.strip()
        if mail.machine_reason:
            reason = f"vendor auto-reply on {tag}: {mail.machine_reason}"
            self._inbound(session, arrival, "threaded", reason, "vendor", case)
            if new_ticket:
                self._to_agent(
                    session,
                    case,
                    provider,
                    "vendor_ticket",
                    "vendor_ticket.j2",
                    now,
                    text=text,
                    original_subject=mail.subject,
                )
            return Result("threaded", reason, case.id)
        reason = f"vendor reply on {tag}"
        self._inbound(session, arrival, "threaded", reason, "vendor", case)
        if case.status in OPEN_STATUSES:
            case.status = "vendor_replied"
            case.follow_up_due = self._due(now, case.priority)
        add_event(session, case.id, now, "vendor_reply", mail.subject)
        if self._relay_allowed(session, case, now):
            self._to_agent(
                session,
                case,
                provider,
                "relay_to_agent",
                "relay_to_agent.j2",
                now,
                text=text,
                original_subject=mail.subject,
                attachments=mail.attachments,
            )
        return Result("threaded", reason, case.id)

    def _agent_reply(
        self, session: Session, arrival: Arrival, mail: ParsedMail, case: Case
    ) -> Result:
        """An agent wrote on a case's thread: apply its #commands, relay the rest to the
        vendor in the vendor's thread."""
        now, tag = arrival.now, case.tag(self.config.settings.case_tag_prefix)
        commands = parse_commands(agent_part(mail.body, sign_offs=False))
        self._inbound(session, arrival, "threaded", f"agent reply on {tag}", "agent_reply", case)
        case.updated_at = now
        for note in commands.notes:
            add_event(session, case.id, now, "note", f"{mail.from_address}: {note}")
        for followup in commands.followups:
            add_event(session, case.id, now, "follow_up", f"{mail.from_address}: {followup}")
        if commands.priority and commands.priority != case.priority:
            add_event(session, case.id, now, "priority", f"{case.priority} -> {commands.priority}")
            case.priority = commands.priority
            if case.priority == "URGENTE":
                self._alert_leads(session, case, self.config.providers[case.provider], now)
        if case.status in OPEN_STATUSES:
            # Any word from the agent on the thread is a follow-up: the clock starts again.
            case.follow_up_due = self._due(now, case.priority)
        relayable = commands.text and case.status not in ("closed", "undeliverable")
        if relayable and self._relay_allowed(session, case, now):
            self._to_vendor(
                session,
                case,
                now,
                commands.text,
                mail.attachments,
                mail.from_name,
                mail.from_address,
            )
            case.status = "awaiting_vendor"
        if commands.close:
            case.status, case.follow_up_due = "closed", None
            add_event(session, case.id, now, "closed", f"closed by {mail.from_address}")
        log.info("%s: agent reply from %s (%s)", tag, mail.from_address, case.status)
        return Result("threaded", f"agent reply on {tag}", case.id)

    def _duplicate(
        self,
        session: Session,
        arrival: Arrival,
        mail: ParsedMail,
        decision: Decision,
        case: Case,
    ) -> Result:
        """An escalation of a case that is already open: add it to that case, relay it to the
        vendor in the case's thread, raise the priority if asked, tell the agent the case."""
        now, tag = arrival.now, case.tag(self.config.settings.case_tag_prefix)
        provider = self.config.providers[case.provider]
        reason = f"duplicate of {tag}"
        self._inbound(session, arrival, "threaded", reason, "escalation", case)
        raised = None
        if PRIORITY_RANK[decision.priority] > PRIORITY_RANK[case.priority]:
            raised, case.priority = case.priority, decision.priority
            sooner = self._due(now, case.priority)
            case.follow_up_due = min(case.follow_up_due or sooner, sooner)
            if case.priority == "URGENTE":
                self._alert_leads(session, case, provider, now)
        case.updated_at = now
        add_event(
            session,
            case.id,
            now,
            "duplicate",
            f"{mail.from_address}: {mail.subject}"
            + (f"; priority {raised} -> {case.priority}" if raised else ""),
        )
        self._to_vendor(
            session, case, now, mail.agent_text, mail.attachments, mail.from_name, mail.from_address
        )
        agent = {"name": mail.from_name, "address": mail.from_address}
        self._to_agent(
            session,
            case,
            provider,
            "duplicate",
            "duplicate.j2",
            now,
            original_subject=mail.subject,
            raised=raised or "",
            agent=agent,
            thread=ThreadHeaders(mail.message_id, mail.references),
        )
        log.info("%s: duplicate escalation from %s attached", tag, mail.from_address)
        return Result("threaded", reason, case.id)

    def _bounce(self, session: Session, arrival: Arrival, mail: ParsedMail) -> Result:
        """A delivery failure report: when it returns one of our mails to a vendor, the case
        is undeliverable and its agent is told; any other bounce is only recorded."""
        details = bounce_details(email.message_from_bytes(arrival.raw))
        bounced = session.scalars(
            select(Message).where(
                Message.direction == "out",
                Message.message_id.in_(details.original_ids or [""]),
                Message.kind.in_(("forward", "relay_to_vendor")),
            )
        ).first()
        case = session.get(Case, bounced.case_id) if bounced and bounced.case_id else None
        if case is None:
            reason = f"bounce not about a mail to a vendor: {details.reason}"
            self._inbound(session, arrival, "ignored", reason, "bounce")
            return Result("ignored", reason)
        reason = f"bounce of {case.tag(self.config.settings.case_tag_prefix)}: {details.reason}"
        self._inbound(session, arrival, "ignored", reason, "bounce", case)
        self._undeliverable(session, case, arrival.now, details.reason)
        return Result("ignored", reason, case.id)

    def _open(
        self,
        session: Session,
        arrival: Arrival,
        mail: ParsedMail,
        decision: Decision,
        case: Case,
    ) -> Result:
        """Give `case` the decision's destination, status and due time, and queue its mails:
        the forward and acknowledgement, or the missing-fields reply."""
        now = arrival.now
        provider, route = decision.provider, decision.route
        assert provider is not None and route is not None
        needs_info = decision.outcome == "needs_info"
        outcome = "needs_info" if needs_info else "routed"
        case.updated_at = now
        case.status = "needs_info" if needs_info else "open"
        case.provider, case.route, case.priority = provider.id, route.name, decision.priority
        case.client = mail.fields.get("cliente", "")[:320]
        case.client_key = normalize(case.client)
        case.fields = dict(mail.fields)
        case.follow_up_due = None if needs_info else self._due(now, decision.priority)
        if case.id is None:
            add_case(session, case)  # its id is the case tag, needed by the templates below
        self._inbound(session, arrival, outcome, decision.reason, case=case)
        for outgoing in self.renderer.decision_mails(self._case_info(case), mail, decision, now):
            self._send(session, case.id, now, outgoing)
        detail = f"{decision.reason}; forwarded to {provider.name} <{provider.address}>"
        add_event(
            session,
            case.id,
            now,
            "needs_info" if needs_info else "opened",
            decision.reason if needs_info else detail,
        )
        if not needs_info and case.priority == "URGENTE":
            self._alert_leads(session, case, provider, now)
        log.info(
            "%s %s: %s -> %s (%s)",
            case.tag(self.config.settings.case_tag_prefix),
            outcome,
            mail.from_address,
            provider.id,
            decision.priority,
        )
        return Result(outcome, decision.reason, case.id)

    def _complete(self, session: Session, arrival: Arrival, mail: ParsedMail, case: Case) -> Result:
        """The agent's corrected resend of a `needs_info` case: merge what it adds (new values
        win), keep the first mail's attachments, and decide again on the whole."""
        fields = {**case.fields, **{k: v for k, v in mail.fields.items() if v.strip()}}
        earlier = [
            attachment
            for raw in session.scalars(
                select(MessageBody.raw)
                .join(Message, Message.id == MessageBody.id)
                .where(Message.case_id == case.id, Message.direction == "in")
            )
            for attachment in self.parse(raw).attachments
        ]
        attachments = list(
            {(a.filename, a.payload): a for a in [*earlier, *mail.attachments]}.values()
        )
        whole = replace(mail, fields=fields, attachments=attachments)
        add_event(
            session,
            case.id,
            arrival.now,
            "agent_update",
            f"resent by {mail.from_address}: {', '.join(sorted(mail.fields)) or 'no fields'}",
        )
        return self._open(session, arrival, whole, decide(whole, self.config), case)

    def _too_large(self, session: Session, arrival: Arrival, mail: ParsedMail) -> Result:
        limit = self.config.settings.intake.max_message_bytes
        reason = f"message of {arrival.size} bytes is over the {limit}-byte limit"
        if arrival.size != len(arrival.raw):
            reason += "; only its header is stored, the whole mail is in the IMAP quarantine folder"
        result = self._quarantine(session, arrival, reason)
        if decide(mail, self.config).outcome not in ("route", "needs_info"):
            return result  # no answer to machines or strangers
        settings = self.config.settings
        context = {
            "agent": {"name": mail.from_name, "address": mail.from_address},
            "original_subject": mail.subject,
            "size_mb": f"{arrival.size / 1_048_576:.1f}",
            "limit_mb": f"{limit / 1_048_576:.1f}",
            "intake_address": settings.intake.address,
        }
        reply = self.renderer.compose(
            "too_large",
            "too_large.j2",
            context,
            [mail.from_address],
            now=arrival.now,
            to_agent=True,
            in_reply_to=mail.message_id,
            references=mail.references,
        )
        self._send(session, None, arrival.now, reply)
        return result

    def delivery_failed(self, session: Session, row: Message, error: str) -> None:
        """A mail of a case was refused for good (5xx or retries exhausted): record it, and
        when it was the forward, mark the case undeliverable and tell the agent."""
        if row.case_id is None:
            return
        now = self.clock()
        detail = f"{row.kind} to {', '.join(row.recipients)} failed: {error}"
        add_event(session, row.case_id, now, "delivery_failed", detail)
        case = session.get(Case, row.case_id)
        if case is not None and row.kind in ("forward", "relay_to_vendor"):
            self._undeliverable(session, case, now, error)

    def _undeliverable(self, session: Session, case: Case, now: datetime, error: str) -> None:
        """The vendor cannot be reached: say so on the case and to the agent, instead of the
        acknowledgement that would have said it was sent."""
        if case.status == "undeliverable":
            return
        case.status, case.updated_at = "undeliverable", now
        add_event(session, case.id, now, "undeliverable", error)
        pending_acks = session.scalars(
            select(Message).where(
                Message.case_id == case.id,
                Message.kind == "acknowledgement",
                Message.delivery.in_(("pending", "sending")),
            )
        )
        for ack in pending_acks:
            ack.delivery, ack.last_error = "cancelled", "the forward was refused"
            ack.claimed_by = ack.claimed_until = None
        provider = self.config.providers.get(case.provider)
        if provider is not None:
            self._to_agent(
                session,
                case,
                provider,
                "undeliverable",
                "undeliverable.j2",
                now,
                error=error,
                original_subject=case.subject,
            )

    def _to_agent(
        self,
        session: Session,
        case: Case,
        provider: Provider,
        kind: str,
        template: str,
        now: datetime,
        *,
        thread: ThreadHeaders | None = None,
        agent: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        """Queue a mail about a case to its agent, in the conversation the agent started."""
        context = self.renderer.case_context(
            self._case_info(case),
            provider,
            case.fields,
            case.agent_name,
            case.agent_address,
            case.subject,
        )
        context.update(extra)
        if agent is not None:
            context["agent"] = agent
        thread = thread or agent_thread(session, case)
        to = agent["address"] if agent else case.agent_address
        mail = self.renderer.compose(
            kind,
            template,
            context,
            [to],
            now=now,
            to_agent=True,
            attachments=extra.get("attachments", ()),
            in_reply_to=thread.in_reply_to,
            references=thread.references,
        )
        self._send(session, case.id, now, mail)

    def _to_vendor(
        self,
        session: Session,
        case: Case,
        now: datetime,
        text: str,
        attachments: Sequence[Attachment],
        agent_name: str,
        agent_address: str,
    ) -> None:
        """Relay an agent's words to the vendor, in the vendor's own thread for the case."""
        provider = self.config.providers[case.provider]
        thread = vendor_thread(session, case)
        forward_subject = (
            session.scalar(
                select(Message.subject)
                .where(Message.case_id == case.id, Message.kind == "forward")
                .order_by(Message.id)
                .limit(1)
            )
            or case.subject
        )
        info = self._case_info(case)
        if case.vendor_ticket and provider.ticket_subject:
            bare = forward_subject.replace(f"[{info.tag}]", "").strip()
            subject = provider.ticket_subject.format(
                tag=info.tag, ticket=case.vendor_ticket, subject=bare
            )
        else:
            subject = (
                forward_subject
                if forward_subject.lower().startswith("re:")
                else (f"Re: {forward_subject}")
            )
        context = self.renderer.case_context(
            info, provider, case.fields, agent_name, agent_address, case.subject
        )
        context.update(text=text, subject=subject, attachments=list(attachments))
        mail = self.renderer.compose(
            "relay_to_vendor",
            "relay_to_vendor.j2",
            context,
            [provider.address],
            now=now,
            to_agent=False,
            attachments=attachments,
            in_reply_to=thread.in_reply_to,
            references=thread.references,
        )
        self._send(session, case.id, now, mail)
        add_event(session, case.id, now, "relayed_to_vendor", subject)

    def _due(self, start: datetime, priority: str) -> datetime:
        return due_after(start, self.config.settings.sla_hours[priority], self.config.calendar())

    def _alert_leads(self, session: Session, case: Case, provider: Provider, now: datetime) -> None:
        """An URGENTE case: the team lead(s) hear of it at once."""
        leads = self.config.settings.team.leads
        if not leads:
            log.warning(
                "URGENTE case %s but no team.leads configured to alert",
                case.tag(self.config.settings.case_tag_prefix),
            )
            return
        context = self.renderer.case_context(
            self._case_info(case),
            provider,
            case.fields,
            case.agent_name,
            case.agent_address,
            case.subject,
        )
        alert = self.renderer.compose(
            "urgent_alert", "urgent_alert.j2", context, list(leads), now=now, to_agent=True
        )
        self._send(session, case.id, now, alert)
        add_event(session, case.id, now, "lead_alerted", ", ".join(leads))

    def _relay_allowed(self, session: Session, case: Case, now: datetime) -> bool:
        """The last brake on a loop no header revealed: a case relays at most N mails an hour."""
        limit = self.config.settings.loop_protection.max_relays_per_case_per_hour
        if not limit:
            return True
        relays = (
            session.scalar(
                select(func.count(Message.id)).where(
                    Message.case_id == case.id,
                    Message.kind.in_(("relay_to_agent", "relay_to_vendor")),
                    Message.created_at >= now - timedelta(hours=1),
                )
            )
            or 0
        )
        if relays < limit:
            return True
        log.warning(
            "%s: %d relays in the last hour; not relaying more (possible mail loop)",
            case.tag(self.config.settings.case_tag_prefix),
            relays,
        )
        add_event(session, case.id, now, "rate_limited", f"{relays} relays in the last hour")
        return False

    def _case_info(self, case: Case) -> CaseInfo:
        settings = self.config.settings
        due = case.follow_up_due
        return CaseInfo(
            ticket=case.vendor_ticket or "",
            tag=case.tag(settings.case_tag_prefix),
            priority=case.priority,
            status=case.status,
            follow_up_due=due.astimezone(ZoneInfo(settings.timezone)).strftime(
                "%Y-%m-%d %H:%M (%Z)"
            )
            if due
            else "",
        )

    def _send(
        self, session: Session, case_id: int | None, now: datetime, mail: OutgoingMail
    ) -> None:
        queue_mail(session, case_id, now, mail)


def queue_mail(session: Session, case_id: int | None, now: datetime, mail: OutgoingMail) -> None:
    """Put one mail in the outbox, inside the caller's transaction: it leaves only if that
    transaction commits, and the sender delivers it as stored."""
    add_message(
        session,
        mail.data,
        created_at=now,
        case_id=case_id,
        direction="out",
        kind=mail.kind,
        message_id=mail.message_id,
        source="router",
        sender=mail.sender,
        recipients=mail.recipients,
        subject=mail.subject,
        delivery="pending",
        attempts=0,
        next_attempt_at=now,
    )


def _summary(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]


# What a committed inbound message tells about itself.
_OUTCOME = (Message.outcome, Message.reason, Message.case_id)

# Longer than a worker takes from committing a fetch batch's first mail to moving the batch.
MOVE_GRACE_SECONDS = 5.0


# Built once: composing a statement from ORM attributes costs more than running it.
_EARLIER_BY_KEY = select(*_OUTCOME).where(Message.dedupe_key == bindparam("key")).limit(1)
_EARLIER_BY_KEY_OR_UID = (
    select(*_OUTCOME, Message.imap_mailbox, Message.imap_uidvalidity, Message.imap_uid)
    .where(
        or_(
            Message.dedupe_key == bindparam("key"),
            (Message.imap_mailbox == bindparam("box"))
            & (Message.imap_uidvalidity == bindparam("validity"))
            & (Message.imap_uid == bindparam("uid")),
        )
    )
    .limit(1)
)


def _find_earlier(session: Session, key: str, source: ImapSource | None) -> Result | None:
    """The outcome committed for this mail before (same Message-ID or content, or the same
    IMAP UID), as a duplicate. This very IMAP message, committed since the intake looked it
    up, was committed by another worker: in its hands."""
    connection = session.connection()
    if source is None:
        by_key = connection.execute(_EARLIER_BY_KEY, {"key": key}).first()
        return _result_of(*by_key, duplicate=True) if by_key is not None else None
    found = connection.execute(
        _EARLIER_BY_KEY_OR_UID,
        {"key": key, "box": source.mailbox, "validity": source.uidvalidity, "uid": source.uid},
    ).first()
    if found is None:
        return None
    outcome, reason, case_id, *where = found
    this_message = where == [source.mailbox, source.uidvalidity, source.uid]
    return replace(
        _result_of(outcome, reason, case_id, duplicate=True), in_other_hands=this_message
    )


# Built once, run as Core: the ORM's bulk-update path cost more than the write itself.
_ADVANCE_LAST_UID = (
    update(IMAP_STATE)
    .where(IMAP_STATE.c.mailbox == bindparam("box"))
    .values(
        uidvalidity=bindparam("validity"),
        last_uid=sql_case(
            (
                (IMAP_STATE.c.uidvalidity == bindparam("validity"))
                & (IMAP_STATE.c.last_uid > bindparam("uid")),
                IMAP_STATE.c.last_uid,
            ),
            else_=bindparam("uid"),
        ),
    )
)


def _remember_uid(session: Session, source: ImapSource | None) -> None:
    """Record the highest UID of the mailbox whose outcome is committed (one statement)."""
    if source is None:
        return
    connection = session.connection()
    params = {"box": source.mailbox, "validity": source.uidvalidity, "uid": source.uid}
    if connection.execute(_ADVANCE_LAST_UID, params).rowcount == 0:
        connection.execute(
            insert(IMAP_STATE),
            {"mailbox": source.mailbox, "uidvalidity": source.uidvalidity, "last_uid": source.uid},
        )


def _result_of(
    outcome: str | None, reason: str | None, case_id: int | None, duplicate: bool = False
) -> Result:
    return Result(outcome or "quarantined", reason or "", case_id, duplicate)
