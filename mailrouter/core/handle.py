"""Handle: what happens to one mail, and to a case that falls overdue — every decision path.

Read top-down: `handle` takes a parsed mail that is new to the router and sends it down
one path: a vendor's reply on a case, machine mail (a bounce, an auto-reply), a stranger,
an agent's reply or resend on a case's thread, a duplicate escalation, or a new case.
Each path records the mail, changes its case, and queues the mails it causes — all
through one `CaseBook`, whose writes the caller commits together (or not at all). No
session, no clock: the time comes with the arrival. `remind` is the overdue path, run by
the scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from mailrouter.config import LABEL_MAX, PRIORITIES, Config, NotifyEvent, Provider, label_name
from mailrouter.core.authn import authenticate
from mailrouter.core.digests import age_text
from mailrouter.core.notify import notifications
from mailrouter.core.parse import (
    Deadline,
    agent_part,
    field_aliases,
    normalize,
    parse_message,
)
from mailrouter.core.render import Renderer, case_info, local_time
from mailrouter.core.route import decide, sender_allowed
from mailrouter.core.sla import due_after, windows_overdue
from mailrouter.core.team import (
    AUTOMATIC_LABELS,
    LABEL_COMMANDS,
    MAX_LABELS,
    NOTE_COMMANDS,
    Choice,
    available,
    choose_owner,
    is_member,
    member_for,
    person,
    with_labels,
)
from mailrouter.core.threads import (
    bare_subject,
    is_vendor,
    parse_commands,
    pick_earlier,
    tagged_case_id,
    thread_headers,
    ticket_in,
    vendors_of,
)
from mailrouter.model import (
    OPEN_STATUSES,
    REPLY_KINDS,
    Arrival,
    Attachment,
    Bounce,
    CaseData,
    CaseRecord,
    Commands,
    Decision,
    FailedMail,
    ImapSource,
    OutgoingMail,
    ParsedMail,
    Result,
    ThreadHeaders,
    case_tag,
)

log = logging.getLogger(__name__)

PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
# How far back a sender's same text counts as a repetition (a robot's, not a person's).
REPEAT_WINDOW = timedelta(hours=24)
# The reason a mail without the proof `authentication.require` asks for is kept aside.
UNAUTHENTICATED = "unauthenticated sender"


class CaseBook(Protocol):
    """Where the decision paths read and write cases, mails and history: the database in
    the daemon (`store.repo.SqlCaseBook`), a dictionary in the tests (`testing.book`). A
    case it hands out is live until the caller commits; `open_case` stores a new one as
    it is then."""

    # this mail, seen before? who sent how much?
    def earlier_outcome(self, key: str, source: ImapSource | None) -> Result | None: ...
    # whom did we answer, and what did they send?
    def repeated(self, address: str, digest: str, since: datetime, other_than: str) -> bool: ...
    def logged(self, address: str, kind: str, since: datetime) -> int: ...

    # which case
    def case(self, case_id: int) -> CaseRecord | None: ...
    def case_by_thread(self, message_ids: list[str]) -> CaseRecord | None: ...
    def case_by_ticket(self, provider: str, ticket: str) -> CaseRecord | None: ...
    def cases_of_client(self, provider: str, client_key: str) -> Sequence[CaseRecord]: ...
    def case_of_bounced(self, message_ids: list[str]) -> CaseRecord | None: ...

    # what a case holds
    def inbound_raws(self, case_id: int) -> list[bytes]: ...
    def has_written(self, case_id: int, address: str) -> bool: ...
    def thread_ids(self, case_id: int, ours: str, theirs: str) -> list[str]: ...
    def forward_subject(self, case_id: int) -> str | None: ...
    def relays_of(self, case_id: int, since: datetime) -> int: ...
    def last_vendor_mail(self, case_id: int) -> tuple[datetime, bytes] | None: ...

    # writes
    def open_case(self, case: CaseRecord) -> int: ...
    def record_inbound(
        self, arrival: Arrival, outcome: str, reason: str, kind: str, case_id: int | None
    ) -> None: ...
    def log_address(self, address: str, kind: str, at: datetime) -> None: ...
    def event(self, case_id: int, at: datetime, kind: str, detail: str) -> None: ...
    def queue(self, case_id: int | None, now: datetime, mail: OutgoingMail) -> None: ...
    def cancel_pending_acks(self, case_id: int, reason: str) -> None: ...

    # the escalation team: the round robin's next turn (counted in the book, so that
    # restarts and daemons side by side continue one rotation); cases in progress by owner
    def next_turn(self) -> int: ...
    def open_counts(self, owners: Sequence[str]) -> dict[str, int]: ...


class Handler:
    """The decision paths for one configuration (a reload builds a new one)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.renderer = Renderer(config)
        self.aliases = field_aliases(config)

    def parse(self, raw: bytes, deadline: Deadline | None = None) -> ParsedMail:
        return parse_message(raw, self.aliases, self.config.settings.intake.address, deadline)

    def handle(self, book: CaseBook, arrival: Arrival, mail: ParsedMail) -> Result:
        """The outcome of a mail the router has not seen before, written through `book`."""
        if arrival.size > self.config.settings.intake.max_message_bytes:
            return self._too_large(book, arrival, mail)
        return self._apply(book, arrival, mail)

    def _inbound(
        self,
        book: CaseBook,
        arrival: Arrival,
        outcome: str,
        reason: str,
        kind: str | None = None,
        case: CaseRecord | None = None,
    ) -> None:
        """Store the inbound mail with its outcome (kind: escalation, agent_reply, vendor,
        machine, bounce, quarantined), on its case when it has one."""
        if kind is None:
            kind = {"quarantined": "quarantined", "ignored": "machine"}.get(outcome, "escalation")
        book.record_inbound(arrival, outcome, reason, kind, case.id if case is not None else None)

    def quarantine(self, book: CaseBook, arrival: Arrival, reason: str) -> Result:
        log.warning("quarantined: %s", reason)
        self._inbound(book, arrival, "quarantined", reason)
        return Result("quarantined", reason)

    def _apply(self, book: CaseBook, arrival: Arrival, mail: ParsedMail) -> Result:
        """Which path a mail takes: a sender who cannot prove who they are, a vendor's reply,
        machine mail, a stranger, an agent on a case's thread, a duplicate or resend, or a
        new escalation."""
        config, now = self.config, arrival.now
        if mail.bounce is not None:
            # First, before any sender or auto-reply check: a report comes from the relay's
            # daemon, marked auto-replied, and is believed only about a mail of ours it
            # quotes by Message-ID (which a stranger does not know).
            return self._bounce(book, arrival, mail.bounce)
        vendors = vendors_of(mail.from_address, config)
        allowed = sender_allowed(mail.from_address, config.settings.allowed_senders)
        if allowed or vendors:
            verdict = authenticate(
                mail.auth_results, mail.from_address, config.settings.authentication
            )
            if not verdict.passed:
                return self._unauthenticated(book, arrival, mail, verdict.reason)
        case = book.case_by_thread([i for i in [mail.in_reply_to, *mail.references] if i])
        if case is None:
            case = self._tagged_case(book, mail)
        if case is None and vendors:
            case = self._case_by_ticket(book, mail, vendors)
        if case is not None and self._from_vendor(mail, case):
            return self._vendor_reply(book, arrival, mail, case)
        if mail.machine_reason:
            log.info(
                "ignored %s from %s: %s", mail.message_id, mail.from_address, mail.machine_reason
            )
            reason = f"machine mail: {mail.machine_reason}"
            self._inbound(book, arrival, "ignored", reason, "machine", case)
            return Result("ignored", reason, case.id if case else None)
        if not allowed:
            if vendors:
                return self.quarantine(book, arrival, "unmatched vendor reply")
            return self.quarantine(book, arrival, decide(mail, config).reason)
        if case is not None:
            if case.status == "needs_info":
                return self._complete(book, arrival, mail, case)
            return self._agent_reply(book, arrival, mail, case)
        decision = decide(mail, config, self._day_start(now).date())
        client = normalize(mail.fields.get("cliente", ""))
        candidates = (
            book.cases_of_client(decision.provider.id, client)
            if decision.provider is not None and client
            else []
        )
        earlier = pick_earlier(candidates, mail, decision)
        if earlier.duplicate is not None:
            return self._duplicate(book, arrival, mail, decision, earlier.duplicate)
        if earlier.resent is not None:
            return self._complete(book, arrival, mail, earlier.resent)
        case = CaseData(
            created_at=now,
            updated_at=now,
            agent_address=mail.from_address[:320],
            agent_name=mail.from_name[:320],
            subject=mail.subject,
        )
        return self._open(book, arrival, mail, decision, case)

    def _tagged_case(self, book: CaseBook, mail: ParsedMail) -> CaseRecord | None:
        """The case a mail names only by the tag in its subject. Tags are sequential and easy
        to guess, so the tag alone threads only a participant's mail."""
        tagged = tagged_case_id(mail.subject, self.config.settings.case_tag_prefix)
        case = book.case(tagged) if tagged is not None else None
        if case is None or self._participant(book, case, mail.from_address):
            return case
        log.info(
            "%s named in a subject by %s, who is not on the case: not threaded",
            self._tag(case),
            mail.from_address,
        )
        return None

    def _participant(self, book: CaseBook, case: CaseRecord, address: str) -> bool:
        """The case's agent, a lead, its vendor, or someone who already wrote on it."""
        provider = self.config.providers.get(case.provider)
        return (
            self._may_command(case, address)
            or is_member(self.config, address)
            or (provider is not None and is_vendor(address, provider))
            or book.has_written(case.id, address)
        )

    def _leads(self) -> set[str]:
        return {lead.lower() for lead in self.config.settings.team.leads}

    def _unauthenticated(
        self, book: CaseBook, arrival: Arrival, mail: ParsedMail, reason: str
    ) -> Result:
        """Mail that names an agent or a vendor in From without the proof `authentication`
        asks for: kept aside, never acted on; the leads hear of the first one per sender per
        day (a forger can send many)."""
        now, leads = arrival.now, sorted(self._leads())
        result = self.quarantine(book, arrival, f"{UNAUTHENTICATED}: {reason}")
        if not leads or not self._first_today(book, mail.from_address, "leads_told_forged", now):
            return result
        context = {
            "sender": mail.from_address,
            "reason": reason,
            "original_subject": mail.subject,
            "message_id": mail.message_id or "",
            "intake_address": self.config.settings.intake.address,
        }
        alert = self.renderer.compose(
            "unauthenticated_alert",
            "unauthenticated_alert.j2",
            context,
            leads,
            now=now,
            to_agent=True,
        )
        book.queue(None, now, alert)
        return result

    def _case_by_ticket(
        self, book: CaseBook, mail: ParsedMail, vendors: list[Provider]
    ) -> CaseRecord | None:
        """The case of a vendor reply that only carries the vendor's own ticket number."""
        for provider in vendors:
            ticket = ticket_in(mail, provider)
            found = book.case_by_ticket(provider.id, ticket) if ticket else None
            if found is not None:
                return found
        return None

    def _tag(self, case: CaseRecord) -> str:
        return case_tag(self.config.settings.case_tag_prefix, case.id)

    def _from_vendor(self, mail: ParsedMail, case: CaseRecord) -> bool:
        provider = self.config.providers.get(case.provider)
        return (
            provider is not None
            and mail.from_address != case.agent_address
            and is_vendor(mail.from_address, provider)
        )

    # --- replies on a case's thread ------------------------------------------------------

    def _vendor_reply(
        self, book: CaseBook, arrival: Arrival, mail: ParsedMail, case: CaseRecord
    ) -> Result:
        """The vendor wrote on a case: record its ticket number the first time one shows
        (even in an auto-reply, and then tell the agent once); relay a human reply."""
        now, tag = arrival.now, self._tag(case)
        provider = self.config.providers[case.provider]
        ticket = ticket_in(mail, provider)
        new_ticket = bool(ticket) and not case.vendor_ticket
        if new_ticket:
            case.vendor_ticket = ticket
            book.event(case.id, now, "vendor_ticket", f"{provider.name} ticket #{ticket}")
        case.updated_at = now
        text = agent_part(mail.body, sign_offs=False) or mail.body.strip()
        if mail.machine_reason:
            reason = f"vendor auto-reply on {tag}: {mail.machine_reason}"
            ticket_note = f" (ticket #{ticket})" if new_ticket else ""
            log.info("%s: vendor auto-reply from %s%s", tag, mail.from_address, ticket_note)
            self._inbound(book, arrival, "threaded", reason, "vendor", case)
            if new_ticket:
                self._to_agent(
                    book,
                    case,
                    provider,
                    "vendor_ticket",
                    "vendor_ticket.j2",
                    now,
                    also=self._owner_copy(case),
                    text=text,
                    original_subject=mail.subject,
                )
            return Result("threaded", reason, case.id)
        reason = f"vendor reply on {tag}"
        log.info("%s: vendor reply from %s (%s)", tag, mail.from_address, provider.id)
        self._inbound(book, arrival, "threaded", reason, "vendor", case)
        if case.status in OPEN_STATUSES:
            case.status = "vendor_replied"
            case.follow_up_due = self._due(now, case.priority)
        book.event(case.id, now, "vendor_reply", mail.subject)
        self._notify(book, case, "vendor_reply", now)
        if self._relay_allowed(book, case, now):
            self._to_agent(
                book,
                case,
                provider,
                "relay_to_agent",
                "relay_to_agent.j2",
                now,
                also=self._owner_copy(case),
                text=text,
                original_subject=mail.subject,
                attachments=mail.attachments,
            )
        return Result("threaded", reason, case.id)

    def _agent_reply(
        self, book: CaseBook, arrival: Arrival, mail: ParsedMail, case: CaseRecord
    ) -> Result:
        """An agent wrote on a case's thread: apply its #commands, relay the rest to the
        vendor in the vendor's thread."""
        now, tag = arrival.now, self._tag(case)
        commands = parse_commands(agent_part(mail.body, sign_offs=False))
        self._inbound(book, arrival, "threaded", f"agent reply on {tag}", "agent_reply", case)
        case.updated_at = now
        commands = self._permitted(book, arrival, case, mail, commands)
        done: list[str] = []  # what the commands did, for the sender's confirmation
        for command, kind, said, given in (
            ("#nota", "note", "anotado en el historial del caso", commands.notes),
            ("#seguimiento", "follow_up", "registrado", commands.followups),
        ):
            for text in given[:NOTE_COMMANDS]:
                book.event(case.id, now, kind, f"{mail.from_address}: {text}")
                done.append(f"{command}: {said} ({text[:80]})")
            if len(given) > NOTE_COMMANDS:  # a mail of thousands of lines costs no more
                done.append(_beyond_cap(command, len(given), NOTE_COMMANDS, "anotaron"))
        if commands.priority and commands.priority != case.priority:
            book.event(case.id, now, "priority", f"{case.priority} -> {commands.priority}")
            done.append(f"#prioridad: {case.priority} -> {commands.priority}")
            case.priority = commands.priority
            if case.priority == "URGENTE":
                self._alert_leads(book, case, self.config.providers[case.provider], now)
                done[-1] += " (los líderes fueron avisados)"
        elif commands.priority:
            done.append(f"#prioridad: ya era {case.priority}")
        if case.status in OPEN_STATUSES:
            # Any word from the agent on the thread is a follow-up: the clock starts again.
            case.follow_up_due = self._due(now, case.priority)
        relayable = commands.text and case.status not in ("closed", "undeliverable")
        if relayable and self._relay_allowed(book, case, now):
            self._to_vendor(
                book,
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
            book.event(case.id, now, "closed", f"closed by {mail.from_address}")
            done.append("#resuelto: el caso quedó cerrado")
        done += self._team_commands(book, case, mail.from_address, commands, now)
        if done:
            self._answer_sender(book, arrival, mail, case, "commands_done", done=done)
        log.info("%s: agent reply from %s (%s)", tag, mail.from_address, case.status)
        return Result("threaded", f"agent reply on {tag}", case.id)

    def _permitted(
        self,
        book: CaseBook,
        arrival: Arrival,
        case: CaseRecord,
        mail: ParsedMail,
        commands: Commands,
    ) -> Commands:
        """The commands of `mail` its sender may give; the others are refused, with an
        answer. A member of the escalation team who is not on the case may #tomar it."""
        sender = mail.from_address
        if not _asked(commands) or self._may_command(case, sender):
            return commands
        take = commands.take and is_member(self.config, sender)
        refused = replace(commands, take=False) if take else commands
        if _asked(refused):
            self._refuse_commands(book, arrival, case, mail, refused)
        return Commands(text=commands.text, take=take)

    def _team_commands(
        self, book: CaseBook, case: CaseRecord, sender: str, commands: Commands, now: datetime
    ) -> list[str]:
        """#tomar, #asignar, #etiqueta and #quitar-etiqueta; what each did, for the sender."""
        done = []
        if commands.take:
            done.append(self._reassign(book, case, sender, sender, now, "#tomar"))
        if commands.assign is not None:
            target = member_for(self.config, commands.assign)
            if target is None:
                done.append(
                    f"#asignar: {commands.assign[:80]} no es del equipo de escalamiento ni "
                    "líder; el caso no cambió de responsable"
                )
            else:
                done.append(self._reassign(book, case, target, sender, now, "#asignar"))
        asked = [*((t, True) for t in commands.label), *((t, False) for t in commands.unlabel)]
        for text, adding in asked[:LABEL_COMMANDS]:
            done.append(self._relabel(book, case, sender, text, adding, now))
        if len(asked) > LABEL_COMMANDS:  # a mail of thousands of lines costs no more
            done.append(_beyond_cap("#etiqueta", len(asked), LABEL_COMMANDS, "aplicaron"))
        return done

    def _reassign(
        self, book: CaseBook, case: CaseRecord, owner: str, by: str, now: datetime, command: str
    ) -> str:
        """Make `owner` the case's owner, at `by`'s word; both owners are told."""
        previous = case.owner
        if owner == previous:
            return f"{command}: {person(self.config, owner)} ya era responsable del caso"
        case.owner = owner
        book.event(case.id, now, "reassigned", f"{previous or 'nobody'} -> {owner} by {by}")
        provider = self.config.providers[case.provider]
        context = self._case_context(case, provider, now)
        context.update(
            previous=person(self.config, previous) if previous else "",
            by=person(self.config, by),
        )
        to = [owner, *([previous] if previous else [])]
        mail = self.renderer.compose(
            "assignment", "reassigned.j2", context, to, now=now, to_agent=True
        )
        book.queue(case.id, now, mail)
        return f"{command}: ahora el responsable es {person(self.config, owner)}"

    def _relabel(
        self, book: CaseBook, case: CaseRecord, by: str, text: str, adding: bool, now: datetime
    ) -> str:
        command = "#etiqueta" if adding else "#quitar-etiqueta"
        name = label_name(text)
        if name is None:
            return (
                f"{command}: {text[:80]!r} no es una etiqueta (letras, números, '-', '_' o '.', "
                f"hasta {LABEL_MAX} caracteres)"
            )
        if name in AUTOMATIC_LABELS:
            return f"{command}: {name} es automática: sigue el estado del caso"
        if adding and name in case.labels:
            return f"{command}: el caso ya tenía {name}"
        if not adding and name not in case.labels:
            return f"{command}: el caso no tenía {name}"
        if adding:
            labels = with_labels(case.labels, [name])
            if name not in labels:
                return f"{command}: el caso ya tiene {MAX_LABELS} etiquetas; quita alguna antes"
            case.labels = labels
        else:
            case.labels = [label for label in case.labels if label != name]
        book.event(case.id, now, "labelled" if adding else "unlabelled", f"{name} by {by}")
        return f"{command}: {name} {'agregada' if adding else 'quitada'}"

    def _may_command(self, case: CaseRecord, address: str) -> bool:
        """A case's commands are its agent's, its owner's and the leads' alone."""
        return address in (case.agent_address, case.owner) or address in self._leads()

    def _refuse_commands(
        self,
        book: CaseBook,
        arrival: Arrival,
        case: CaseRecord,
        mail: ParsedMail,
        commands: Commands,
    ) -> None:
        now, refused = arrival.now, _command_lines(commands)
        log.warning(
            "%s: commands from %s refused (not the case's agent or a lead): %s",
            self._tag(case),
            mail.from_address,
            ", ".join(refused),
        )
        book.event(case.id, now, "commands_refused", f"{mail.from_address}: {', '.join(refused)}")
        self._answer_sender(
            book,
            arrival,
            mail,
            case,
            "commands_refused",
            refused=refused,
            case_agent=case.agent_address,
        )

    def _answer_sender(
        self,
        book: CaseBook,
        arrival: Arrival,
        mail: ParsedMail,
        case: CaseRecord,
        kind: str,
        **extra: Any,
    ) -> None:
        """An automatic answer about `case` to whoever sent `mail`, in their conversation
        (template `<kind>.j2`), unless loop protection withholds it."""
        if not self._may_answer(book, arrival, mail, case):
            return
        self._to_agent(
            book,
            case,
            self.config.providers[case.provider],
            kind,
            f"{kind}.j2",
            arrival.now,
            agent={"name": mail.from_name, "address": mail.from_address},
            thread=ThreadHeaders(mail.message_id, mail.references),
            original_subject=mail.subject,
            **extra,
        )

    def _duplicate(
        self,
        book: CaseBook,
        arrival: Arrival,
        mail: ParsedMail,
        decision: Decision,
        case: CaseRecord,
    ) -> Result:
        """An escalation of a case that is already open: add it to that case, relay it to the
        vendor in the case's thread, raise the priority if asked, tell the agent the case."""
        now, tag = arrival.now, self._tag(case)
        provider = self.config.providers[case.provider]
        reason = f"duplicate of {tag}"
        self._inbound(book, arrival, "threaded", reason, "escalation", case)
        raised = None
        if PRIORITY_RANK[decision.priority] > PRIORITY_RANK[case.priority]:
            raised, case.priority = case.priority, decision.priority
            sooner = self._due(now, case.priority)
            case.follow_up_due = min(case.follow_up_due or sooner, sooner)
            if case.priority == "URGENTE":
                self._alert_leads(book, case, provider, now)
        case.updated_at = now
        book.event(
            case.id,
            now,
            "duplicate",
            f"{mail.from_address}: {mail.subject}"
            + (f"; priority {raised} -> {case.priority}" if raised else ""),
        )
        self._to_vendor(
            book, case, now, mail.agent_text, mail.attachments, mail.from_name, mail.from_address
        )
        self._answer_sender(book, arrival, mail, case, "duplicate", raised=raised or "")
        log.info("%s: duplicate escalation from %s attached", tag, mail.from_address)
        return Result("threaded", reason, case.id)

    def _bounce(self, book: CaseBook, arrival: Arrival, bounce: Bounce) -> Result:
        """A delivery failure report. About a mail of ours to a vendor: given up for good,
        the case is undeliverable (its agent and the leads are told, once); still being
        tried, the delay goes in the case's history. Any other report is only recorded.
        Nothing is ever sent to a bounce."""
        case = book.case_of_bounced(bounce.original_ids)
        if case is None:
            reason = f"bounce not about a mail to a vendor: {bounce.reason}"
            self._inbound(book, arrival, "ignored", reason, "bounce")
            return Result("ignored", reason)
        if not bounce.permanent:
            reason = f"delivery delayed on {self._tag(case)}: {bounce.reason}"
            self._inbound(book, arrival, "ignored", reason, "bounce", case)
            book.event(case.id, arrival.now, "delivery_delayed", bounce.reason)
            return Result("ignored", reason, case.id)
        reason = f"bounce of {self._tag(case)}: {bounce.reason}"
        self._inbound(book, arrival, "ignored", reason, "bounce", case)
        self._undeliverable(book, case, arrival.now, bounce.reason)
        return Result("ignored", reason, case.id)

    def _open(
        self,
        book: CaseBook,
        arrival: Arrival,
        mail: ParsedMail,
        decision: Decision,
        case: CaseRecord,
    ) -> Result:
        """Give `case` the decision's destination, status and due time, and queue its mails:
        the forward and acknowledgement, or the missing-fields reply."""
        now = arrival.now
        provider, route = decision.provider, decision.route
        assert provider is not None and route is not None
        if decision.fields is not None:  # typed values as the router keeps them
            mail = replace(mail, fields=decision.fields)
        needs_info = decision.outcome == "needs_info"
        outcome = "needs_info" if needs_info else "routed"
        case.updated_at = now
        case.status = "needs_info" if needs_info else "open"
        case.provider, case.route, case.priority = provider.id, route.name, decision.priority
        case.client = mail.fields.get("cliente", "")[:320]
        case.client_key = normalize(case.client)
        case.fields = dict(mail.fields)
        case.follow_up_due = None if needs_info else self._due(now, decision.priority)
        case.labels = with_labels(case.labels, route.labels)
        # An owner once the case is escalated (not while it waits for fields).
        choice = None if needs_info or case.owner else self._choose_owner(book, now)
        if choice is not None:
            case.owner = choice.owner
        if case.id == 0:
            book.open_case(case)  # its id is the case tag, needed by the templates below
        self._inbound(book, arrival, outcome, decision.reason, case=case)
        for outgoing in self.renderer.decision_mails(
            case_info(case, self.config, now), mail, decision, now
        ):
            if outgoing.kind not in REPLY_KINDS or self._may_answer(book, arrival, mail, case):
                book.queue(case.id, now, outgoing)
        if choice is not None:
            self._assigned(book, case, now, choice.how)
        detail = f"{decision.reason}; forwarded to {provider.name} <{provider.address}>"
        book.event(
            case.id,
            now,
            "needs_info" if needs_info else "opened",
            decision.reason if needs_info else detail,
        )
        if not needs_info and case.priority == "URGENTE":
            self._alert_leads(book, case, provider, now)
        log.info(
            "%s %s: %s -> %s (%s)",
            self._tag(case),
            outcome,
            mail.from_address,
            provider.id,
            decision.priority,
        )
        return Result(outcome, decision.reason, case.id)

    def _choose_owner(self, book: CaseBook, now: datetime) -> Choice | None:
        """The owner of a case now escalated (None: the team does not assign owners)."""
        team = self.config.settings.team.escalation
        if team.assign == "none":
            return None
        today = self._day_start(now).date()
        counts = book.open_counts(available(team, today)) if team.assign == "least_open" else None
        return choose_owner(self.config, today, book.next_turn(), counts)

    def _assigned(self, book: CaseBook, case: CaseRecord, now: datetime, how: str) -> None:
        """Record who owns the new case, and tell the owner (not when it is the agent, who
        has the acknowledgement)."""
        if case.owner is None:
            log.warning("%s: no owner (%s)", self._tag(case), how)
            book.event(case.id, now, "unassigned", how)
            return
        book.event(case.id, now, "assigned", f"{case.owner} ({how})")
        if case.owner == case.agent_address:
            return
        provider = self.config.providers[case.provider]
        context = self._case_context(case, provider, now)
        mail = self.renderer.compose(
            "assignment", "assigned.j2", context, [case.owner], now=now, to_agent=True
        )
        book.queue(case.id, now, mail)

    def _case_context(
        self, case: CaseRecord, provider: Provider, now: datetime, agent_name: str | None = None
    ) -> dict[str, Any]:
        """What every template about `case` gets (`Renderer.case_context`), as of `now`."""
        return self.renderer.case_context(
            case_info(case, self.config, now),
            provider,
            case.fields,
            case.agent_name if agent_name is None else agent_name,
            case.agent_address,
            case.subject,
        )

    def _owner_copy(self, case: CaseRecord) -> list[str]:
        """The owner, copied on what the vendor says and does (the agent has it anyway)."""
        return [case.owner] if case.owner and case.owner != case.agent_address else []

    def _complete(
        self, book: CaseBook, arrival: Arrival, mail: ParsedMail, case: CaseRecord
    ) -> Result:
        """The agent's corrected resend of a `needs_info` case: merge what it adds (new values
        win), keep the first mail's attachments, and decide again on the whole."""
        fields = {**case.fields, **{k: v for k, v in mail.fields.items() if v.strip()}}
        earlier = [
            attachment
            for raw in book.inbound_raws(case.id)
            for attachment in self.parse(raw).attachments
        ]
        attachments = list(
            {(a.filename, a.payload): a for a in [*earlier, *mail.attachments]}.values()
        )
        whole = replace(mail, fields=fields, attachments=attachments)
        book.event(
            case.id,
            arrival.now,
            "agent_update",
            f"resent by {mail.from_address}: {', '.join(sorted(mail.fields)) or 'no fields'}",
        )
        today = self._day_start(arrival.now).date()
        return self._open(book, arrival, whole, decide(whole, self.config, today), case)

    def _too_large(self, book: CaseBook, arrival: Arrival, mail: ParsedMail) -> Result:
        limit = self.config.settings.intake.max_message_bytes
        reason = f"message of {arrival.size} bytes is over the {limit}-byte limit"
        if arrival.size != len(arrival.raw):
            reason += "; only its header is stored, the whole mail is in the IMAP quarantine folder"
        result = self.quarantine(book, arrival, reason)
        if decide(mail, self.config).outcome not in ("route", "needs_info"):
            return result  # no answer to machines or strangers
        if not self._may_answer(book, arrival, mail, None):
            return result
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
        book.queue(None, arrival.now, reply)
        return result

    def delivery_failed(self, book: CaseBook, failed: FailedMail, now: datetime) -> None:
        """A mail of a case was refused for good (5xx or retries exhausted): record it, and
        when it was the forward, mark the case undeliverable and tell the agent."""
        if failed.case_id is None:
            return
        detail = f"{failed.kind} to {', '.join(failed.recipients)} failed: {failed.error}"
        log.warning(
            "%s: %s", case_tag(self.config.settings.case_tag_prefix, failed.case_id), detail
        )
        book.event(failed.case_id, now, "delivery_failed", detail)
        case = book.case(failed.case_id)
        if case is not None and failed.kind in ("forward", "relay_to_vendor"):
            self._undeliverable(book, case, now, failed.error)

    def _undeliverable(self, book: CaseBook, case: CaseRecord, now: datetime, error: str) -> None:
        """The vendor cannot be reached: say so on the case, to the agent and the leads,
        instead of the acknowledgement that would have said it was sent."""
        if case.status == "undeliverable":
            return
        case.status, case.updated_at = "undeliverable", now
        book.event(case.id, now, "undeliverable", error)
        book.cancel_pending_acks(case.id, "the forward was refused")
        self._notify(book, case, "undeliverable", now, error)
        provider = self.config.providers.get(case.provider)
        if provider is not None:
            self._to_agent(
                book,
                case,
                provider,
                "undeliverable",
                "undeliverable.j2",
                now,
                also=[*self._owner_copy(case), *sorted(self._leads() - {case.agent_address})],
                error=error,
                original_subject=case.subject,
            )

    def _to_agent(
        self,
        book: CaseBook,
        case: CaseRecord,
        provider: Provider,
        kind: str,
        template: str,
        now: datetime,
        *,
        thread: ThreadHeaders | None = None,
        agent: dict[str, str] | None = None,
        also: Sequence[str] = (),
        **extra: Any,
    ) -> None:
        """Queue a mail about a case to its agent (and `also` to these), in the conversation
        the agent started."""
        context = self._case_context(case, provider, now)
        context.update(extra)
        context["original_subject"] = bare_subject(
            context["original_subject"], self.config.settings.case_tag_prefix, case.vendor_ticket
        )
        if agent is not None:
            context["agent"] = agent
        thread = thread or thread_headers(
            book.thread_ids(case.id, ours="acknowledgement", theirs="escalation")
        )
        to = agent["address"] if agent else case.agent_address
        mail = self.renderer.compose(
            kind,
            template,
            context,
            list(dict.fromkeys([to, *also])),
            now=now,
            to_agent=True,
            attachments=extra.get("attachments", ()),
            in_reply_to=thread.in_reply_to,
            references=thread.references,
        )
        book.queue(case.id, now, mail)

    def _to_vendor(
        self,
        book: CaseBook,
        case: CaseRecord,
        now: datetime,
        text: str,
        attachments: Sequence[Attachment],
        agent_name: str,
        agent_address: str,
    ) -> None:
        """Relay an agent's words to the vendor, in the vendor's own thread for the case."""
        provider = self.config.providers[case.provider]
        # The vendor's thread: our forward, then every mail the vendor sent on the case.
        thread = thread_headers(book.thread_ids(case.id, ours="forward", theirs="vendor"))
        forward_subject = book.forward_subject(case.id) or case.subject
        info = case_info(case, self.config, now)
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
        book.queue(case.id, now, mail)
        book.event(case.id, now, "relayed_to_vendor", subject)

    def _due(self, start: datetime, priority: str) -> datetime:
        return due_after(start, self.config.settings.sla_hours[priority], self.config.calendar())

    # --- whom the router answers -----------------------------------------------------------

    def _may_answer(
        self, book: CaseBook, arrival: Arrival, mail: ParsedMail, case: CaseRecord | None
    ) -> bool:
        """Whether an automatic reply may go to the sender of `mail`: not when it sent this
        same text before (a robot answering each of our mails), nor past
        `max_replies_per_address_per_hour`. Each reply allowed is counted here."""
        address, now = mail.from_address, arrival.now
        limit = self.config.settings.loop_protection.max_replies_per_address_per_hour
        digest = mail.content_digest
        if digest and book.repeated(address, digest, now - REPEAT_WINDOW, arrival.key):
            why = "it sent the same text again (a robot answering our mail?)"
        elif limit and book.logged(address, "reply", now - timedelta(hours=1)) >= limit:
            why = (
                f"{limit} automatic replies to it in the last hour "
                "(loop_protection.max_replies_per_address_per_hour)"
            )
        else:
            book.log_address(address, "reply", now)
            return True
        self._stop_answering(book, address, why, now, case)
        return False

    def _stop_answering(
        self, book: CaseBook, address: str, why: str, now: datetime, case: CaseRecord | None
    ) -> None:
        """No reply to `address`; the leads hear of it once a (local) day per address."""
        where = f"{self._tag(case)}: " if case is not None else ""
        log.warning("%snot answering %s: %s", where, address, why)
        if case is not None:
            book.event(case.id, now, "reply_withheld", f"{address}: {why}")
        leads = sorted(self._leads())
        if not leads or not self._first_today(book, address, "leads_told", now):
            return
        context = {
            "address": address,
            "why": why,
            "case_tag": self._tag(case) if case is not None else "",
            "intake_address": self.config.settings.intake.address,
        }
        alert = self.renderer.compose(
            "replies_stopped", "replies_stopped.j2", context, leads, now=now, to_agent=True
        )
        book.queue(case.id if case is not None else None, now, alert)

    def _first_today(self, book: CaseBook, address: str, kind: str, now: datetime) -> bool:
        """Whether this is the first `kind` about `address` this (local) day; logs it."""
        if book.logged(address, kind, self._day_start(now)):
            return False
        book.log_address(address, kind, now)
        return True

    def _day_start(self, now: datetime) -> datetime:
        local = now.astimezone(self.config.calendar().zone)
        return local.replace(hour=0, minute=0, second=0, microsecond=0)

    def _alert_leads(
        self, book: CaseBook, case: CaseRecord, provider: Provider, now: datetime
    ) -> None:
        """An URGENTE case: the team lead(s) hear of it at once."""
        self._notify(book, case, "urgent", now)
        leads = self.config.settings.team.leads
        if not leads:
            log.warning(
                "URGENTE case %s but no team.leads configured to alert",
                self._tag(case),
            )
            return
        context = self._case_context(case, provider, now)
        alert = self.renderer.compose(
            "urgent_alert", "urgent_alert.j2", context, list(leads), now=now, to_agent=True
        )
        book.queue(case.id, now, alert)
        book.event(case.id, now, "lead_alerted", ", ".join(leads))

    def _notify(
        self, book: CaseBook, case: CaseRecord, event: NotifyEvent, now: datetime, detail: str = ""
    ) -> None:
        """Post `event` to the chat channels and webhooks that want it (`notify:`). Queued
        apart from the case's mails (no case on the row): a chat that is down never holds
        up a forward; the case's history says who was told."""
        posts = notifications(self.config, event, case, now, detail)
        for post in posts:
            book.queue(None, now, post)
        if posts:
            names = ", ".join(post.recipients[0] for post in posts)
            book.event(case.id, now, "notified", f"{event}: {names}")

    def _relay_allowed(self, book: CaseBook, case: CaseRecord, now: datetime) -> bool:
        """The last brake on a loop no header revealed: a case relays at most N mails an hour."""
        limit = self.config.settings.loop_protection.max_relays_per_case_per_hour
        if not limit:
            return True
        relays = book.relays_of(case.id, now - timedelta(hours=1))
        if relays < limit:
            return True
        log.warning(
            "%s: %d relays in the last hour; not relaying more (possible mail loop)",
            self._tag(case),
            relays,
        )
        book.event(case.id, now, "rate_limited", f"{relays} relays in the last hour")
        return False

    # --- a case that fell overdue ----------------------------------------------------------

    def remind(self, book: CaseBook, case: CaseRecord, now: datetime) -> int:
        """The agent's reminder once per overdue period; the lead's after a second window.
        Returns how many mails were queued."""
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
        context = self._reminder_context(book, case, provider, now)
        if remind:
            # The owner first, when the case has one: theirs is the next move; the agent,
            # who speaks to the client, in copy.
            to = list(dict.fromkeys([*([case.owner] if case.owner else []), case.agent_address]))
            self._remind(book, case, now, "reminder", context, to)
            case.reminded_due = case.follow_up_due
            self._notify(book, case, "overdue", now)
            queued += 1
        if escalate:
            if settings.team.leads:
                self._remind(book, case, now, "reminder_lead", context, list(settings.team.leads))
                queued += 1
            case.escalated_due = case.follow_up_due
        return queued

    def _reminder_context(
        self, book: CaseBook, case: CaseRecord, provider: Provider, now: datetime
    ) -> dict[str, Any]:
        context = self._case_context(
            case, provider, now, self.config.agent_name(case.agent_address, case.agent_name)
        )
        last = book.last_vendor_mail(case.id)
        excerpt = ""
        if last is not None:
            parsed = parse_message(last[1], {}, self.config.settings.intake.address)
            excerpt = agent_part(parsed.body, sign_offs=False)[:600]
        context.update(
            age=age_text(case.created_at, now),
            last_vendor_date=local_time(last[0], self.config) if last else "",
            last_vendor_text=excerpt,
        )
        return context

    def _remind(
        self,
        book: CaseBook,
        case: CaseRecord,
        now: datetime,
        kind: str,
        context: dict[str, Any],
        to: list[str],
    ) -> None:
        mail = self.renderer.compose(kind, f"{kind}.j2", context, to, now=now, to_agent=True)
        book.queue(case.id, now, mail)
        book.event(case.id, now, kind, ", ".join(to))

    # --- a lead's hand: a quarantined mail attached to a case ------------------------------

    def attach(
        self,
        book: CaseBook,
        arrival: Arrival,
        mail: ParsedMail,
        case: CaseRecord,
        who: str,
        number: int,
    ) -> Result:
        """`who` attaches the quarantined message `number` to `case`: the mail joins the
        case's thread and its text and attachments go to the vendor, as an agent's reply
        would (only while the case is open: not one waiting for fields, closed or
        undeliverable); its #commands are not applied and its sender, maybe a stranger,
        gets no answer. The act goes in the case's history."""
        now, tag = arrival.now, self._tag(case)
        kind = "agent_reply" if mail.in_reply_to or mail.references else "escalation"
        relay = case.status in OPEN_STATUSES and case.provider in self.config.providers
        reason = f"attached to {tag} from quarantine by {who}"
        if not relay:
            reason += f"; not relayed to the vendor (case {case.status}, to {case.provider})"
        self._inbound(book, arrival, "threaded", reason, kind, case)
        case.updated_at = now
        detail = f"{who}: message #{number} from {mail.from_address or '(no sender)'}"
        book.event(case.id, now, "attached_from_quarantine", detail)
        if relay:
            text = mail.agent_text or mail.body.strip()
            self._to_vendor(
                book, case, now, text, mail.attachments, mail.from_name, mail.from_address
            )
            if case.status in OPEN_STATUSES:
                case.status = "awaiting_vendor"
                case.follow_up_due = self._due(now, case.priority)
        log.info("%s: message #%d from %s attached by %s", tag, number, mail.from_address, who)
        return Result("threaded", reason, case.id)


def _beyond_cap(command: str, given: int, cap: int, verb: str) -> str:
    """The confirmation's line for the `given` - `cap` commands of a mail past its cap."""
    return f"{command}: {given - cap} más no se {verb} (hasta {cap} por correo)"


def _asked(commands: Commands) -> bool:
    return bool(
        commands.close
        or commands.priority
        or commands.notes
        or commands.followups
        or commands.assign is not None
        or commands.take
        or commands.label
        or commands.unlabel
    )


def _command_lines(commands: Commands) -> list[str]:
    """The commands of a reply as the agent wrote them, for a refusal."""
    lines = ["#resuelto"] if commands.close else []
    lines += [f"#prioridad {commands.priority}"] if commands.priority else []
    lines += [f"#nota {note}"[:200] for note in commands.notes]
    lines += [f"#seguimiento {text}"[:200] for text in commands.followups]
    lines += [f"#asignar {commands.assign}"[:200]] if commands.assign is not None else []
    lines += ["#tomar"] if commands.take else []
    lines += [f"#etiqueta {text}"[:200] for text in commands.label]
    lines += [f"#quitar-etiqueta {text}"[:200] for text in commands.unlabel]
    return lines
