"""MemoryCaseBook: the core's `CaseBook` in dictionaries, for unit tests of the decision
paths (milliseconds each, no database).

It answers every question the way `store.repo.SqlCaseBook` does and keeps what was written
where a test can read it: `cases`, `messages` (inbound and outbox alike, in order),
`events`. There are no transactions: a write is there at once. Like the database book, a
case handed out is live (what a handler sets on it stays) and `open_case` stores a copy
of the new case as it is then.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from mailrouter.core.handle import Handler
from mailrouter.model import (
    LISTED_STATUSES,
    OPEN_STATUSES,
    SET_ASIDE,
    Arrival,
    CaseData,
    CaseRecord,
    ImapSource,
    OutgoingMail,
    Result,
)


@dataclass
class StoredMail:
    """One row of the in-memory `messages`: an inbound mail or an outbox mail."""

    id: int
    created_at: datetime
    direction: str  # in | out
    kind: str
    case_id: int | None
    message_id: str | None
    sender: str
    recipients: list[str]
    subject: str
    raw: bytes
    outcome: str | None = None
    reason: str | None = None
    dedupe_key: str | None = None
    source: ImapSource | None = None
    content_digest: str | None = None
    delivery: str | None = None  # out: pending | sent | failed | cancelled
    last_error: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    case_id: int
    at: datetime
    kind: str
    detail: str


@dataclass
class MemoryCaseBook:
    cases: dict[int, CaseData] = field(default_factory=dict)
    messages: list[StoredMail] = field(default_factory=list)
    events: list[StoredEvent] = field(default_factory=list)
    address_log: list[tuple[str, str, datetime]] = field(default_factory=list)
    turns: int = 0  # of the escalation team's round robin

    # --- what tests read --------------------------------------------------------------------

    def outbox(self, kind: str | None = None) -> list[StoredMail]:
        return [
            m for m in self.messages if m.direction == "out" and (kind is None or m.kind == kind)
        ]

    def inbound(self) -> list[StoredMail]:
        return [m for m in self.messages if m.direction == "in"]

    def events_of(self, case_id: int) -> list[str]:
        return [e.kind for e in self.events if e.case_id == case_id]

    # --- this mail, seen before? --------------------------------------------------------------

    def earlier_outcome(self, key: str, source: ImapSource | None) -> Result | None:
        for mail in self.inbound():
            if mail.dedupe_key == key or (source is not None and mail.source == source):
                return Result(
                    mail.outcome or "quarantined",
                    mail.reason or "",
                    mail.case_id,
                    duplicate=True,
                    in_other_hands=source is not None and mail.source == source,
                )
        return None

    def repeated(self, address: str, digest: str, since: datetime, other_than: str) -> bool:
        return any(
            m.sender == address
            and m.created_at >= since
            and m.content_digest == digest
            and m.dedupe_key != other_than
            and m.outcome not in SET_ASIDE
            for m in self.inbound()
        )

    def logged(self, address: str, kind: str, since: datetime) -> int:
        return sum(1 for a, k, at in self.address_log if a == address and k == kind and at >= since)

    def case(self, case_id: int) -> CaseData | None:
        return self.cases.get(case_id)

    def case_by_thread(self, message_ids: list[str]) -> CaseData | None:
        ours = [m for m in self.messages if m.message_id in message_ids and m.case_id is not None]
        if ours:
            return self.cases.get(max(ours, key=lambda m: m.id).case_id or 0)
        return None

    def case_by_ticket(self, provider: str, ticket: str) -> CaseData | None:
        found = [
            c for c in self.cases.values() if c.provider == provider and c.vendor_ticket == ticket
        ]
        return max(found, key=lambda c: c.id) if found else None

    def cases_of_client(self, provider: str, client_key: str) -> list[CaseData]:
        in_progress = (*OPEN_STATUSES, "needs_info")
        return sorted(
            (
                c
                for c in self.cases.values()
                if c.provider == provider and c.client_key == client_key and c.status in in_progress
            ),
            key=lambda c: c.id,
        )

    def case_of_bounced(self, message_ids: list[str]) -> CaseData | None:
        for mail in self.outbox():
            if mail.message_id in message_ids and mail.kind in ("forward", "relay_to_vendor"):
                return self.cases.get(mail.case_id) if mail.case_id is not None else None
        return None

    # --- what a case holds ----------------------------------------------------------------------

    def inbound_raws(self, case_id: int) -> list[bytes]:
        return [m.raw for m in self.inbound() if m.case_id == case_id]

    def has_written(self, case_id: int, address: str) -> bool:
        return any(
            m.case_id == case_id and m.sender == address and m.outcome not in SET_ASIDE
            for m in self.inbound()
        )

    def thread_ids(self, case_id: int, ours: str, theirs: str) -> list[str]:
        return [
            m.message_id
            for m in self.messages
            if m.case_id == case_id
            and m.message_id
            and (
                (m.direction == "out" and m.kind == ours)
                or (m.direction == "in" and m.kind == theirs)
            )
        ]

    def forward_subject(self, case_id: int) -> str | None:
        forwards = [m for m in self.outbox("forward") if m.case_id == case_id]
        return forwards[0].subject if forwards else None

    def relays_of(self, case_id: int, since: datetime) -> int:
        return sum(
            1
            for m in self.messages
            if m.case_id == case_id
            and m.kind in ("relay_to_agent", "relay_to_vendor")
            and m.created_at >= since
        )

    def last_vendor_mail(self, case_id: int) -> tuple[datetime, bytes] | None:
        mails = [m for m in self.inbound() if m.case_id == case_id and m.kind == "vendor"]
        return (mails[-1].created_at, mails[-1].raw) if mails else None

    # --- writes -------------------------------------------------------------------------------

    def open_case(self, case: CaseRecord) -> int:
        case.id = max(self.cases, default=0) + 1
        values = {f.name: getattr(case, f.name) for f in dataclasses.fields(CaseData)}
        self.cases[case.id] = CaseData(**{**values, "fields": dict(case.fields)})
        return case.id

    def record_inbound(
        self, arrival: Arrival, outcome: str, reason: str, kind: str, case_id: int | None
    ) -> None:
        mail = arrival.mail
        self.messages.append(
            StoredMail(
                id=len(self.messages) + 1,
                created_at=arrival.now,
                direction="in",
                kind=kind,
                case_id=case_id,
                message_id=mail.message_id if mail else None,
                sender=mail.from_address if mail else "",
                recipients=mail.to if mail else [],
                subject=mail.subject if mail else "",
                raw=arrival.raw,
                outcome=outcome,
                reason=reason,
                dedupe_key=arrival.key,
                source=arrival.source,
                content_digest=mail.content_digest if mail else None,
            )
        )

    def log_address(self, address: str, kind: str, at: datetime) -> None:
        self.address_log.append((address, kind, at))

    def event(self, case_id: int, at: datetime, kind: str, detail: str) -> None:
        self.events.append(StoredEvent(case_id, at, kind, detail))

    def queue(self, case_id: int | None, now: datetime, mail: OutgoingMail) -> None:
        self.messages.append(
            StoredMail(
                id=len(self.messages) + 1,
                created_at=now,
                direction="out",
                kind=mail.kind,
                case_id=case_id,
                message_id=mail.message_id,
                sender=mail.sender,
                recipients=list(mail.recipients),
                subject=mail.subject,
                raw=mail.data,
                delivery="pending",
            )
        )

    def cancel_pending_acks(self, case_id: int, reason: str) -> None:
        for mail in self.outbox("acknowledgement"):
            if mail.case_id == case_id and mail.delivery in ("pending", "sending"):
                mail.delivery, mail.last_error = "cancelled", reason

    def next_turn(self) -> int:
        self.turns += 1
        return self.turns - 1

    def open_counts(self, owners: Sequence[str]) -> dict[str, int]:
        counts = Counter(
            c.owner for c in self.cases.values() if c.owner and c.status in LISTED_STATUSES
        )
        return {owner: counts[owner] for owner in owners if counts[owner]}


def arrive(
    handler: Handler, book: MemoryCaseBook, raw: bytes, now: datetime, size: int | None = None
) -> Result:
    """What `service.Pipeline.process` does with one mail, without the database."""
    mail = handler.parse(raw)
    arrival = Arrival(raw, mail.dedupe_key, None, now, mail, size if size is not None else len(raw))
    earlier = book.earlier_outcome(arrival.key, None)
    if earlier is not None:
        return earlier
    return handler.handle(book, arrival, mail)
