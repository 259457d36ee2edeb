"""Model: the records that cross module boundaries, and the words they use. No logic
beyond a few pure helpers on the records; no I/O, no database, no network.

A mail comes in as a `ParsedMail`, is decided as a `Decision`, may cause
`OutgoingMail`s, and its processing ends in a `Result`. A case is whatever has the
attributes of `CaseRecord`: a database row in the daemon, a `CaseData` in memory
for a new case and in the tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol

from mailrouter.config import Provider, Route

# A case that is still being worked on, and so can receive duplicates and replies.
OPEN_STATUSES = ("open", "vendor_replied", "awaiting_vendor")
# Cases a digest lists: everything not closed.
LISTED_STATUSES = ("open", "vendor_replied", "awaiting_vendor", "needs_info", "undeliverable")
# Inbound mail kept aside: in quarantine, or taken out of it by a lead (released: processed
# again as a new row; attached: recorded on a case as a new row; dropped). None of it
# counts as something its sender said to the router.
SET_ASIDE = ("quarantined", "released", "attached", "dropped")
# Automatic answers to the sender of a mail: what `loop_protection` counts and withholds.
REPLY_KINDS = (
    "acknowledgement",
    "needs_info",
    "duplicate",
    "too_large",
    "commands_refused",
    "commands_done",
)
# Cases that get overdue reminders.
REMINDED_STATUSES = ("open", "vendor_replied", "awaiting_vendor")

# A mail over this size is handled with care for memory: one at a time per process, its
# bytes fetched, written to the database and sent in slices.
LARGE_MAIL_BYTES = 1024 * 1024

Clock = Callable[[], datetime]


def is_large(size: int) -> bool:
    return size > LARGE_MAIL_BYTES


def case_tag(prefix: str, case_id: int) -> str:
    """How a case is named to people and in subjects: ESC-000123."""
    return f"{prefix}-{case_id:06d}"


def content_hash(raw: bytes) -> str:
    """Hash of a mail's bytes, blind to CRLF vs LF (IMAP and files differ there)."""
    return hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest()


def body_hash(raw: bytes) -> str:
    """Hash of a mail's body (after the header's blank line), blind to CRLF vs LF."""
    data = raw.replace(b"\r\n", b"\n")
    _, blank, body = data.partition(b"\n\n")
    return hashlib.sha256(body if blank else data).hexdigest()[:32]


class TemporaryFailure(Exception):
    """Something the work needs is unreachable (the database restarting, say): the work is
    not at fault; it waits and is tried again with backoff. Logged as a line, never with a
    traceback."""


# --- one inbound mail --------------------------------------------------------------------


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    payload: bytes


@dataclass(frozen=True)
class Bounce:
    """What a delivery failure report says: who failed for good, who is still being tried,
    why, and which mails it returns (their Message-IDs)."""

    permanent: list[str]
    temporary: list[str]
    reason: str
    original_ids: list[str]


@dataclass(frozen=True)
class ParsedMail:
    raw: bytes
    message_id: str | None
    subject: str
    from_address: str
    from_name: str
    to: list[str]
    in_reply_to: str | None
    references: list[str]
    body: str
    agent_text: str
    fields: dict[str, str]
    attachments: list[Attachment] = field(default_factory=list)
    # Why a machine wrote this mail (and so it must never be answered), or None.
    machine_reason: str | None = None
    # The Authentication-Results header values, top to bottom (core/authn.py reads them).
    auth_results: tuple[str, ...] = ()
    # The delivery failure this mail reports (`core.parse.bounce_of`), or None.
    bounce: Bounce | None = None

    @property
    def content_hash(self) -> str:
        return content_hash(self.raw)

    @property
    def content_digest(self) -> str | None:
        """A digest of the sender's own words (quotes and signature left out, case and
        spacing ignored); None when there are none. A robot repeats it, a person rarely."""
        words = " ".join(self.agent_text.lower().split())
        return hashlib.sha256(words.encode()).hexdigest()[:32] if words else None

    @property
    def dedupe_key(self) -> str:
        """What identifies this mail wherever it arrives from (IMAP, SMTP, twice): its
        Message-ID with its sender and a digest of its body. A Message-ID alone can be
        taken in advance by anyone (a stranger who sends one first would make the real
        mail a "duplicate"); the same mail arriving twice has the same body, whatever
        headers the hops in between added."""
        if self.message_id:
            # Body digest and sender first: the column keeps 1024 characters.
            return f"mid:{body_hash(self.raw)}:{self.from_address}:{self.message_id}"
        return f"sha256:{self.content_hash}"


@dataclass(frozen=True)
class ImapSource:
    mailbox: str
    uidvalidity: int
    uid: int


@dataclass(frozen=True)
class Arrival:
    """One inbound mail as processing knows it: bytes, identity, origin, time, parse, and
    its size (more than the bytes when only its header was fetched)."""

    raw: bytes
    key: str
    source: ImapSource | None
    now: datetime
    mail: ParsedMail | None
    size: int


@dataclass(frozen=True)
class Result:
    outcome: str  # routed | needs_info | threaded | ignored | quarantined
    reason: str
    case_id: int | None = None
    duplicate: bool = False
    # Committed moments ago by another worker on the same mailbox (a second daemon), which
    # moves it: moving it here too could run beside that MOVE, and a mail moved by two
    # sessions at once can land in the folder twice. Left for a later pass.
    in_other_hands: bool = False


# How long the address log keeps a row: its questions look back an hour (the cap on
# automatic replies to an address) or to the day's start (the leads told once a day).
ADDRESS_LOG_KEPT = timedelta(days=2)


# How long a daemon's claim on an IMAP message lasts (`IntakeHooks.claim`): longer than a
# fetch batch usually takes, and a batch that takes longer (large mails) renews its claims
# on the way; a claim that runs out anyway lets another daemon fetch the mail too, which
# the database then refuses as a duplicate (wasted work, never a second case).
IMAP_CLAIM_SECONDS = 60.0


@dataclass(frozen=True)
class IntakeHooks:
    """What an intake is handed by whoever composes the router: never the orchestrator."""

    # Commit one mail's outcome: (bytes, where it came from, whole size when only its header
    # is in hand). Raises only when the database cannot be used: try the mail again later.
    ingest: Callable[[bytes, ImapSource | None, int | None], Result]
    # The committed outcomes of IMAP messages, by UID: (mailbox, UIDVALIDITY, UIDs).
    known: Callable[[str, int, list[int]], dict[int, Result]]
    # A mail over this size is quarantined from its header alone.
    max_bytes: int
    # Held around a mail of the given size: the process's one turn for large mails.
    large_mail: Callable[[int], AbstractContextManager[None]]
    # Take IMAP messages to process, (mailbox, UIDVALIDITY, UIDs) -> the UIDs now ours (the
    # others are another daemon's); and let them go once moved out of the folder.
    claim: Callable[[str, int, list[int]], list[int]] = lambda _box, _validity, uids: uids
    release: Callable[[str, int, list[int]], None] = lambda _box, _validity, _uids: None
    # How long a claim lasts: a batch that takes longer renews its claims on the way.
    claim_seconds: float = IMAP_CLAIM_SECONDS
    # Commit the outcomes of several small mails together, each as `ingest` would (the same
    # promise: raises only when the database cannot be used); None: one at a time.
    ingest_group: Callable[[list[tuple[bytes, ImapSource]]], list[Result]] | None = None


# --- what to do with it ------------------------------------------------------------------


@dataclass(frozen=True)
class MissingField:
    name: str
    label: str
    problem: str = ""


Outcome = Literal["route", "needs_info", "ignore", "quarantine"]


@dataclass(frozen=True)
class Decision:
    """What to do with one inbound mail, and why (shown by `mailrouter route`)."""

    outcome: Outcome
    reason: str
    route: Route | None = None
    provider: Provider | None = None
    priority: str = "MEDIA"
    missing: list[MissingField] = field(default_factory=list)
    # The mail's fields with typed values normalised (phones E.164, dates ISO); None: as read.
    fields: dict[str, str] | None = None


@dataclass
class Commands:
    """What an agent's reply asks besides the text to relay."""

    close: bool = False
    priority: str | None = None
    notes: list[str] = field(default_factory=list)
    followups: list[str] = field(default_factory=list)
    # #asignar WHO (an address or a member's short name, as written); #tomar
    assign: str | None = None
    take: bool = False
    # #etiqueta NAME / #quitar-etiqueta NAME, as written (checked when applied)
    label: list[str] = field(default_factory=list)
    unlabel: list[str] = field(default_factory=list)
    text: str = ""


@dataclass(frozen=True)
class ThreadHeaders:
    in_reply_to: str | None
    references: list[str]


# --- cases -------------------------------------------------------------------------------


class CaseRecord(Protocol):
    """What the decision paths read and write on a case. A case handed out by a book is
    live until its transaction commits: what a handler sets on it is saved then."""

    id: int
    created_at: datetime
    updated_at: datetime
    status: str  # open | vendor_replied | awaiting_vendor | needs_info | undeliverable | closed
    provider: str
    route: str
    priority: str
    agent_address: str
    agent_name: str
    client: str
    client_key: str  # the client normalised: what duplicate detection compares
    subject: str
    fields: dict[str, str]
    follow_up_due: datetime | None
    vendor_ticket: str | None
    # The due time an overdue reminder (to the agent) and its escalation (to the lead) were
    # sent for: one of each per overdue period.
    reminded_due: datetime | None
    escalated_due: datetime | None
    # Who on the escalation team follows it up (None: nobody), and its stored labels.
    owner: str | None
    labels: list[str]


@dataclass
class CaseData:
    """A case in memory: a new case before the book stores it, and the in-memory book's."""

    created_at: datetime
    updated_at: datetime
    agent_address: str
    agent_name: str = ""
    subject: str = ""
    status: str = "open"
    provider: str = ""
    route: str = ""
    priority: str = "MEDIA"
    client: str = ""
    client_key: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    follow_up_due: datetime | None = None
    vendor_ticket: str | None = None
    reminded_due: datetime | None = None
    escalated_due: datetime | None = None
    owner: str | None = None
    labels: list[str] = field(default_factory=list)
    id: int = 0  # 0 until the book has stored it


class DigestCase(Protocol):
    """What a digest reads of a case: a case, or a row of the same columns."""

    id: int
    created_at: datetime
    status: str
    provider: str
    priority: str
    agent_address: str
    agent_name: str
    client: str
    subject: str
    follow_up_due: datetime | None
    vendor_ticket: str | None
    owner: str | None
    labels: list[str]


@dataclass(frozen=True)
class CaseInfo:
    """What templates may show of a case."""

    tag: str
    priority: str
    status: str
    follow_up_due: str
    ticket: str = ""
    owner: str = ""  # "Name <address>", or "" when nobody owns it
    labels: str = ""  # every label, stored and automatic, comma separated


# --- what leaves -------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingMail:
    kind: str
    message_id: str
    sender: str
    recipients: list[str]
    subject: str
    data: bytes


@dataclass(frozen=True)
class FailedMail:
    """An outbox mail refused for good (5xx, or retries exhausted), as the sender reports it."""

    row_id: int
    case_id: int | None
    kind: str
    recipients: list[str]
    error: str
