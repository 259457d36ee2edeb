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

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import or_, select
from sqlalchemy.exc import (
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as DBTimeoutError
from sqlalchemy.orm import Session

from mailrouter.config import Config
from mailrouter.parse import ParsedMail, alias_index, content_hash, parse_message
from mailrouter.render import CaseInfo, OutgoingMail, Renderer
from mailrouter.route import Decision, decide
from mailrouter.store import Case, Event, ImapState, Message, Store
from mailrouter.thread import case_by_thread, find_resent_case

log = logging.getLogger(__name__)

# The database is down, locked or gone: the mail is not at fault, it must be retried.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, DBTimeoutError)

Clock = Callable[[], datetime]


def field_aliases(config: Config) -> dict[str, str]:
    """Normalised label -> canonical field name, from the `fields` section of config.yaml."""
    return alias_index(
        {name: [spec.label, *spec.aliases] for name, spec in config.settings.fields.items()}
    )


@dataclass(frozen=True)
class ImapSource:
    mailbox: str
    uidvalidity: int
    uid: int


@dataclass(frozen=True)
class Arrival:
    """One inbound mail as processing knows it: bytes, identity, origin, time, parse."""

    raw: bytes
    key: str
    source: ImapSource | None
    now: datetime
    mail: ParsedMail | None


@dataclass(frozen=True)
class Result:
    outcome: str  # routed | needs_info | threaded | ignored | quarantined
    reason: str
    case_id: int | None = None
    duplicate: bool = False


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

    def known_outcome(self, source: ImapSource) -> Result | None:
        """The committed outcome of an IMAP message, looked up by its UID alone."""
        with self.store.transaction() as session:
            found = session.scalar(_by_imap(source))
            return _result_of(found) if found is not None else None

    def process(self, raw: bytes, source: ImapSource | None = None) -> Result:
        """Commit the outcome of one mail, exactly once. Raises only when the database cannot
        be used (then nothing was committed and the caller retries the mail later)."""
        now = self.clock()
        try:
            mail: ParsedMail | None = self.parse(raw)
        except Exception as exc:
            log.exception("cannot parse mail (%d bytes)", len(raw))
            mail, failure = None, _summary(exc)
        key = mail.dedupe_key if mail else f"sha256:{content_hash(raw)}"
        arrival = Arrival(raw, key, source, now, mail)
        for attempt in range(3):
            try:
                with self.store.transaction() as session:
                    earlier = _find_earlier(session, key, source)
                    if earlier is not None:
                        _remember_uid(session, source)
                        return _result_of(earlier, duplicate=True)
                    if mail is None:
                        return self._quarantine(session, arrival, f"parse error: {failure}")
                    return self._decide_and_apply(session, arrival, mail)
            except IntegrityError:
                # Another worker committed this mail, or the same mailbox's state, between
                # our lookup and our insert: look again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _decide_and_apply(self, session: Session, arrival: Arrival, mail: ParsedMail) -> Result:
        if len(arrival.raw) > self.config.settings.intake.max_message_bytes:
            return self._too_large(session, arrival, mail)
        try:
            with session.begin_nested():
                return self._apply(session, arrival, mail, decide(mail, self.config))
        except (IntegrityError, *INFRASTRUCTURE_ERRORS):
            raise
        except Exception as exc:
            # A poison mail: this mail makes our code raise. Keep it aside with the reason
            # (the savepoint dropped whatever it had half-written) and go on with the rest.
            log.exception("processing failed; quarantining the mail")
            return self._quarantine(session, arrival, f"processing error: {_summary(exc)}")

    def _inbound(self, session: Session, arrival: Arrival, outcome: str, reason: str) -> Message:
        mail, source = arrival.mail, arrival.source
        kind = {"quarantined": "quarantined", "ignored": "machine"}.get(outcome, "escalation")
        message = Message(
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
            raw=arrival.raw,
            outcome=outcome,
            reason=reason,
            attempts=0,
        )
        session.add(message)
        _remember_uid(session, source)
        return message

    def _quarantine(self, session: Session, arrival: Arrival, reason: str) -> Result:
        log.warning("quarantined: %s", reason)
        self._inbound(session, arrival, "quarantined", reason)
        return Result("quarantined", reason)

    def _apply(
        self, session: Session, arrival: Arrival, mail: ParsedMail, decision: Decision
    ) -> Result:
        if decision.outcome == "quarantine":
            return self._quarantine(session, arrival, decision.reason)
        if decision.outcome == "ignore":
            log.info("ignored %s from %s: %s", mail.message_id, mail.from_address, decision.reason)
            self._inbound(session, arrival, "ignored", decision.reason)
            return Result("ignored", decision.reason)
        prefix = self.config.settings.case_tag_prefix
        threaded = case_by_thread(session, mail, prefix)
        if threaded is not None and threaded.agent_address == mail.from_address:
            if threaded.status == "needs_info":
                return self._complete(session, arrival, mail, threaded)
            return self._record_reply(session, arrival, mail, threaded)
        waiting = find_resent_case(session, mail, decision)
        if waiting is not None:
            return self._complete(session, arrival, mail, waiting)
        case = Case(
            created_at=arrival.now,
            agent_address=mail.from_address[:320],
            agent_name=mail.from_name[:320],
            subject=mail.subject,
        )
        return self._open(session, arrival, mail, decision, case)

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
        inbound = self._inbound(session, arrival, outcome, decision.reason)
        case.updated_at = now
        case.status = "needs_info" if needs_info else "open"
        case.provider, case.route, case.priority = provider.id, route.name, decision.priority
        case.client = mail.fields.get("cliente", "")[:320]
        case.fields = dict(mail.fields)
        hours = self.config.settings.sla_hours[decision.priority]
        case.follow_up_due = None if needs_info else now + timedelta(hours=hours)
        if case.id is None:
            session.add(case)
            session.flush()  # the case id is the case tag, needed by the templates below
        inbound.case_id = case.id
        for outgoing in self.renderer.decision_mails(self._case_info(case), mail, decision, now):
            self._send(session, case.id, now, outgoing)
        detail = f"{decision.reason}; forwarded to {provider.name} <{provider.address}>"
        _event(
            session,
            case.id,
            now,
            "needs_info" if needs_info else "opened",
            decision.reason if needs_info else detail,
        )
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
                select(Message.raw).where(Message.case_id == case.id, Message.direction == "in")
            )
            for attachment in self.parse(raw).attachments
        ]
        attachments = list(
            {(a.filename, a.payload): a for a in [*earlier, *mail.attachments]}.values()
        )
        whole = replace(mail, fields=fields, attachments=attachments)
        _event(
            session,
            case.id,
            arrival.now,
            "agent_update",
            f"resent by {mail.from_address}: {', '.join(sorted(mail.fields)) or 'no fields'}",
        )
        return self._open(session, arrival, whole, decide(whole, self.config), case)

    def _record_reply(
        self, session: Session, arrival: Arrival, mail: ParsedMail, case: Case
    ) -> Result:
        """The agent wrote on the thread of an open case: keep it on the case, open nothing."""
        tag = case.tag(self.config.settings.case_tag_prefix)
        reason = f"agent reply recorded on {tag}"
        inbound = self._inbound(session, arrival, "threaded", reason)
        inbound.case_id = case.id
        case.updated_at = arrival.now
        _event(session, case.id, arrival.now, "agent_reply", mail.subject)
        log.info("%s: reply from %s recorded", tag, mail.from_address)
        return Result("threaded", reason, case.id)

    def _too_large(self, session: Session, arrival: Arrival, mail: ParsedMail) -> Result:
        limit = self.config.settings.intake.max_message_bytes
        reason = f"message of {len(arrival.raw)} bytes is over the {limit}-byte limit"
        result = self._quarantine(session, arrival, reason)
        if decide(mail, self.config).outcome not in ("route", "needs_info"):
            return result  # no answer to machines or strangers
        settings = self.config.settings
        context = {
            "agent": {"name": mail.from_name, "address": mail.from_address},
            "original_subject": mail.subject,
            "size_mb": f"{len(arrival.raw) / 1_048_576:.1f}",
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
        when it was the forward, mark the case undeliverable and tell the agent, instead of
        the acknowledgement that would have said it was sent."""
        now = self.clock()
        if row.case_id is None:
            return
        detail = f"{row.kind} to {', '.join(row.recipients)} failed: {error}"
        case = session.get(Case, row.case_id)
        _event(session, row.case_id, now, "delivery_failed", detail)
        if case is None or row.kind != "forward":
            return
        case.status, case.updated_at = "undeliverable", now
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
        if provider is None:
            return
        context = self.renderer.case_context(
            self._case_info(case),
            provider,
            case.fields,
            case.agent_name,
            case.agent_address,
            case.subject,
        )
        notice = self.renderer.compose(
            "undeliverable",
            "undeliverable.j2",
            {**context, "error": error},
            [case.agent_address],
            now=now,
            to_agent=True,
        )
        self._send(session, case.id, now, notice)

    def _case_info(self, case: Case) -> CaseInfo:
        settings = self.config.settings
        due = case.follow_up_due
        return CaseInfo(
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
        """Queue one mail in the outbox, inside the caller's transaction."""
        session.add(
            Message(
                created_at=now,
                case_id=case_id,
                direction="out",
                kind=mail.kind,
                message_id=mail.message_id,
                source="router",
                sender=mail.sender,
                recipients=mail.recipients,
                subject=mail.subject,
                raw=mail.data,
                delivery="pending",
                attempts=0,
                next_attempt_at=now,
            )
        )


def _summary(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]


def _by_imap(source: ImapSource) -> Any:
    return select(Message).where(
        Message.imap_mailbox == source.mailbox,
        Message.imap_uidvalidity == source.uidvalidity,
        Message.imap_uid == source.uid,
    )


def _find_earlier(session: Session, key: str, source: ImapSource | None) -> Message | None:
    condition = Message.dedupe_key == key
    if source is not None:
        condition = or_(
            condition,
            (Message.imap_mailbox == source.mailbox)
            & (Message.imap_uidvalidity == source.uidvalidity)
            & (Message.imap_uid == source.uid),
        )
    return session.scalars(select(Message).where(condition).limit(1)).first()


def _remember_uid(session: Session, source: ImapSource | None) -> None:
    if source is None:
        return
    state = session.get(ImapState, source.mailbox)
    if state is None:
        session.add(
            ImapState(mailbox=source.mailbox, uidvalidity=source.uidvalidity, last_uid=source.uid)
        )
    elif state.uidvalidity != source.uidvalidity:
        state.uidvalidity, state.last_uid = source.uidvalidity, source.uid
    else:
        state.last_uid = max(state.last_uid, source.uid)


def _result_of(message: Message, duplicate: bool = False) -> Result:
    return Result(
        message.outcome or "quarantined", message.reason or "", message.case_id, duplicate
    )


def _event(session: Session, case_id: int, now: datetime, kind: str, detail: str) -> None:
    session.add(Event(case_id=case_id, at=now, kind=kind, detail=detail))
