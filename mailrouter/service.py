"""Service: composes the core and the store — one mail in, its outcome committed; and the
scheduled follow-up jobs.

`Pipeline.process` is the single entry point every intake calls (SMTP listener, IMAP
poller, tests, benchmarks): parse, find the mail's earlier outcome, `Handler.handle` it
against the database's `CaseBook`, commit — the inbound message with its outcome, the
case, its history and every mail the decision causes (the outbox) in one transaction.
Processing is idempotent: a mail already stored (same Message-ID or bytes, or same IMAP
UID) gets its earlier outcome back. A mail whose processing raises is quarantined with
the reason, so one bad mail never blocks the rest.

`Followup` is what the daemon's scheduler runs: overdue reminders and the digests.

`Quarantine` is how a lead works the mail kept aside (`mailrouter quarantine`): list,
show, release, attach to a case, drop; each act recorded on the mail's row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import random
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from mailrouter.config import Config, ConfigError, load_config
from mailrouter.core.checks import template_problems
from mailrouter.core.digests import Digest, build_digests, render_digest
from mailrouter.core.handle import Handler
from mailrouter.core.parse import Deadline, Refused
from mailrouter.deliver.journal import claim_is_dead, process_identity
from mailrouter.model import (
    ADDRESS_LOG_KEPT,
    IMAP_CLAIM_SECONDS,
    REMINDED_STATUSES,
    SET_ASIDE,
    Arrival,
    Clock,
    FailedMail,
    ImapSource,
    IntakeHooks,
    OutgoingMail,
    ParsedMail,
    Result,
    case_tag,
    content_hash,
)
from mailrouter.store import repo
from mailrouter.store.db import Conflict, Store, Unavailable
from mailrouter.store.repo import GroupLocks, RecordingBook, SqlCaseBook
from mailrouter.store.tables import Message

log = logging.getLogger(__name__)


def load_checked(path: Path | str) -> Config:
    """The configuration at `path`, with its templates rendered on a sample: a broken one
    raises ConfigError listing every problem (a start fails, a reload keeps the last good
    one) instead of failing on the first mail that needs the template."""
    config = load_config(path)
    problems = template_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


# Tries at committing one mail's outcome when another worker's commit got in the way.
COMMIT_ATTEMPTS = 5


class Pipeline:
    """Holds what processing needs; `process` is safe to call from several threads."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: Clock,
        stopwatch: Callable[[], float] = time.monotonic,
    ) -> None:
        """`stopwatch`: what times the reading of a mail against its deadline."""
        self.config = config
        self.store = store
        self.clock = clock
        self.stopwatch = stopwatch
        self.handler = Handler(config)
        self.handler.renderer.load_all()
        self.identity = process_identity()  # who holds this process's IMAP claims

    def parse(self, raw: bytes) -> ParsedMail:
        seconds = self.config.settings.intake.mail_deadline_seconds
        return self.handler.parse(raw, Deadline(seconds, self.stopwatch))

    def intake_hooks(self) -> IntakeHooks:
        """What an intake is handed to feed this pipeline."""
        return IntakeHooks(
            ingest=self.process,
            ingest_group=self.process_group,
            known=self.known_outcomes,
            max_bytes=self.config.settings.intake.max_message_bytes,
            large_mail=self.store.large_mail,
            claim=self.claim_uids,
            release=self.release_uids,
        )

    def claim_uids(self, mailbox: str, uidvalidity: int, uids: list[int]) -> list[int]:
        """Take IMAP messages to process (see `repo.claim_uids`): every daemon on the
        database polls the folder, each mail is fetched and processed by one. A claim lasts
        `IMAP_CLAIM_SECONDS`; a daemon that died on this host loses its claims at once."""
        now = self.clock()
        until = now + timedelta(seconds=IMAP_CLAIM_SECONDS)
        with self.store.transaction() as session:
            return repo.claim_uids(
                session, mailbox, uidvalidity, uids, self.identity, until, now, self._is_dead
            )

    def release_uids(self, mailbox: str, uidvalidity: int, uids: list[int]) -> None:
        before = self.clock() - timedelta(hours=1)
        with self.store.transaction() as session:
            repo.release_uids(session, mailbox, uidvalidity, uids, before)

    def known_outcomes(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, Result]:
        """The committed outcomes of a batch of IMAP messages, by UID (see `repo`). One that
        another live daemon still holds a claim on is in its hands: it moves the mail, and
        two sessions moving one mail at once can both copy it to the processed folder."""
        now = self.clock()
        with self.store.reading() as session:
            known = repo.known_outcomes(session, mailbox, uidvalidity, uids, now)
            if not known:
                return known
            held = repo.held_by_others(
                session, mailbox, uidvalidity, list(known), self.identity, now, self._is_dead
            )
        return {
            uid: dataclasses.replace(result, in_other_hands=True) if uid in held else result
            for uid, result in known.items()
        }

    def _is_dead(self, owner: str) -> bool:
        return claim_is_dead(owner, self.identity.split(":", 1)[0])

    def process(
        self, raw: bytes, source: ImapSource | None = None, whole_size: int | None = None
    ) -> Result:
        """Commit the outcome of one mail, exactly once. Raises only when the database cannot
        be used (then nothing was committed and the caller retries the mail later). The
        intake holds `store.large_mail` around a large mail, from before it has it in hand.
        `whole_size`: `raw` is only the header of a mail of that size, over the limit, whose
        body the intake left on the server (it goes to the IMAP quarantine folder whole)."""
        return self._commit(self._arrive(raw, source, whole_size))

    def process_group(self, mails: list[tuple[bytes, ImapSource]]) -> list[Result]:
        """`process` for each of `mails` (small IMAP mails), their outcomes committed
        together: one transaction and one write to disk for the group, not one each. The
        intake moves them out of the folder only after this returns, so a crash before the
        commit has them read again. Should any of them make the decision raise (a poison
        mail, or a `Conflict`), nothing of the group stays and each is committed alone, as
        `process` would have: the others still go through, and the poison mail is kept
        aside. On PostgreSQL a group holds all its decisions' locks to its end, and waits
        for none once it has begun (`repo.GroupLocks`): should another daemon hold one it
        asks for, the group is committed one by one the same way."""
        arrivals = [self._arrive(raw, source, None) for raw, source in mails]
        if len(arrivals) > 1:
            try:
                with _said_on_success(DECISIONS_LOG), self.store.transaction() as session:
                    sources = [source for _, source in mails]
                    return self._decide_group(session, arrivals, sources)
            except Unavailable:
                raise
            except Exception:
                log.debug("a group's commit failed; committing its mails one by one", exc_info=True)
        return [self._commit(arrival) for arrival in arrivals]

    def _arrive(
        self, raw: bytes, source: ImapSource | None, whole_size: int | None
    ) -> tuple[Arrival, str]:
        """A mail as it arrives: parsed (or why it cannot be), keyed, stamped; and the reason
        it is quarantined, if it cannot be parsed."""
        now = self.clock()
        failure = ""
        try:
            mail: ParsedMail | None = self.parse(raw)
        except Refused as exc:
            mail, failure = None, str(exc)
        except Exception as exc:
            # A line, not a traceback: the mail is kept with the reason, and the log is
            # read by people looking for what needs them (`--log-level debug` has it all).
            log.debug("cannot parse mail", exc_info=True)
            mail, failure = None, f"parse error: {_summary(exc)}"
        key = mail.dedupe_key if mail else f"sha256:{content_hash(raw)}"
        return Arrival(raw, key, source, now, mail, whole_size or len(raw)), failure

    def _decide_group(
        self, session: Any, arrivals: list[tuple[Arrival, str]], sources: list[ImapSource]
    ) -> list[Result]:
        """The outcomes of a group of mails of one IMAP folder, written in `session`'s
        transaction: whether each was seen before asked once for all, and on PostgreSQL
        the group's locks taken first (`repo.GroupLocks`)."""
        group = None
        if self.store.postgresql:
            group = GroupLocks(session, [a.mail.from_address for a, _ in arrivals if a.mail])
        keyed = [
            (arrival.key, source) for (arrival, _), source in zip(arrivals, sources, strict=True)
        ]
        earlier = SqlCaseBook(session, group=group).earlier_outcomes(keyed)
        results, keys = [], set()
        for (arrival, failure), known in zip(arrivals, earlier, strict=True):
            # A copy of a mail earlier in the group asks again: the group wrote its first.
            looked_up = None if arrival.key in keys else (known,)
            keys.add(arrival.key)
            results.append(self._decide(session, arrival, failure, group, looked_up))
        return results

    def _decide(
        self,
        session: Any,
        arrival: Arrival,
        failure: str,
        group: GroupLocks | None = None,
        looked_up: tuple[Result | None] | None = None,
    ) -> Result:
        """The outcome of one arrived mail, written in `session`'s transaction (with the
        other decisions of a `group` on PostgreSQL). `looked_up`: its earlier outcome, or
        None if it had none, already asked for (`_decide_group`)."""
        mail = arrival.mail
        book = SqlCaseBook(session, mail.from_address if mail else None, group)
        if looked_up is None:
            earlier = book.earlier_outcome(arrival.key, arrival.source)
        else:
            (earlier,) = looked_up
        if earlier is not None:
            return earlier
        if mail is None:
            return self.handler.quarantine(book, arrival, failure)
        return self.handler.handle(book, arrival, mail)

    def _commit(self, arrived: tuple[Arrival, str]) -> Result:
        """The outcome of one arrived mail, in a transaction of its own."""
        arrival, _ = arrived
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                with self.store.transaction() as session:
                    return self._decide(session, *arrived)
            except Conflict:
                # Another worker committed this mail, or the same mailbox's state, between
                # our lookup and our insert; or, on PostgreSQL, two daemons' decisions
                # locked each other (a deadlock, which the server breaks): look again.
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(random.uniform(0.0, 0.05) * (attempt + 1))
            except Unavailable:
                raise
            except Exception as exc:
                # A poison mail: this mail makes our code raise. Whatever it had half-written
                # is rolled back; keep the mail aside with the reason and go on with the rest.
                log.debug("processing failed", exc_info=True)
                with self.store.transaction() as session:
                    reason = f"processing error: {_summary(exc)}"
                    return self.handler.quarantine(SqlCaseBook(session), arrival, reason)
        raise AssertionError("unreachable")

    def delivery_failed(self, session: Any, failed: FailedMail) -> None:
        """The sender's report of a mail refused for good, inside the transaction that marks
        it failed (`store.outbox.OnFailed`)."""
        self.handler.delivery_failed(SqlCaseBook(session), failed, self.clock())


# What the decisions say (each case opened, each reply withheld, each mail kept aside).
DECISIONS_LOG = logging.getLogger(Handler.__module__)


@contextlib.contextmanager
def _said_on_success(logger: logging.Logger) -> Iterator[None]:
    """What `logger` is told in this thread inside the block, said only once the block
    ends without an exception: a group that gives way is decided again one by one, and
    the lines of its first attempt (with case numbers since rolled back) would mislead."""
    thread = threading.get_ident()
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return True
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
    for record in held:
        logger.handle(record)


@dataclass(frozen=True)
class Explanation:
    """What one mail would do against the database as it is now (`mailrouter route --db`)."""

    result: Result
    seen_before: bool  # this very mail was processed already: `result` is what it got
    opened: bool  # it would open a new case (`result.case_id` is the number it would get)
    events: list[tuple[int, str, str]]  # (case id, kind, detail) it would add to history
    mails: list[OutgoingMail]  # what it would queue


def explain(config: Config, store: Store, raw: bytes, now: datetime) -> Explanation:
    """Run the decision paths on `raw` over a read-only snapshot of the database, writing
    nothing: whether it would thread into a case, be a duplicate, or open a new case."""
    handler = Handler(config)
    mail = handler.parse(raw)
    arrival = Arrival(raw, mail.dedupe_key, None, now, mail, len(raw))
    with store.dry_run() as session:
        book = RecordingBook(session)
        earlier = book.earlier_outcome(arrival.key, None)
        if earlier is not None:
            return Explanation(earlier, True, False, [], [])
        result = handler.handle(book, arrival, mail)
        return Explanation(
            result, False, bool(book.opened), book.events, [m for _, m in book.queued]
        )


def _summary(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"[:1000]


# --- the scheduled jobs ---------------------------------------------------------------------


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


@dataclass
class DigestRun:
    queued: list[str] = field(default_factory=list)
    already_sent: list[str] = field(default_factory=list)
    rendered: list[tuple[Digest, OutgoingMail]] = field(default_factory=list)


class Followup:
    """What the daemon's scheduler runs, also callable from the CLI and tests."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.handler = Handler(config)
        self.handler.renderer.load_all()

    def remind(self, chunk: int = 50) -> int:
        """Queue the reminders due now; return how many were queued. Works through the
        overdue cases a few at a time, one short transaction each, so a backlog (after a
        long stop) never holds the database for long."""
        now = self.clock()
        with self.store.transaction() as session:
            candidates = repo.overdue_case_ids(session, REMINDED_STATUSES, now)
        queued = 0
        for start in range(0, len(candidates), chunk):
            with self.store.transaction() as session:
                book = SqlCaseBook(session)
                for case in repo.cases_by_id(session, candidates[start : start + chunk]):
                    queued += self.handler.remind(book, case, now)
        if queued:
            log.info("queued %d follow-up reminders", queued)
        return queued

    def forget_old_addresses(self, chunk: int = 5000) -> int:
        """Delete the address log's rows no question looks back to any more (older than
        `ADDRESS_LOG_KEPT`): it gains a row for every automatic reply, and would otherwise
        grow for as long as the router runs. Return how many went."""
        before = self.clock() - ADDRESS_LOG_KEPT
        forgotten = 0
        while True:
            with self.store.transaction() as session:
                gone = repo.forget_address_log(session, before, chunk)
            forgotten += gone
            if gone < chunk:
                return forgotten

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
        with paused_gc():
            with self.store.engine_for_reading().connect() as connection:
                cases = repo.digest_rows(connection)
                last_sent = repo.last_digests(connection)
            return build_digests(cases, self.config, self.clock(), last_sent)

    def render_digest(self, digest: Digest) -> OutgoingMail:
        return render_digest(self.handler.renderer, digest, self.config, self.clock())

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
                    book = SqlCaseBook(session)
                    book.record_digest(digest.recipient, period, now, mail.message_id)
                    book.queue(None, now, mail)
                run.queued.append(digest.recipient)
            except Conflict:
                run.already_sent.append(digest.recipient)
        if run.queued:
            log.info("digests for %s queued to %s", period, ", ".join(run.queued))
        return run


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cycle collector off while a team's backlog is read and sorted: 100,000 open
    cases are a few hundred thousand objects that hold no cycles, and each full collection
    walked all of them again (a third of a digest run's CPU). It is back on at the end,
    and then finds the few cycles made meanwhile. Nested, or in two threads at once: the
    one that found it on turns it back on."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


# --- the quarantine, worked by a lead -------------------------------------------------------

# What `Handler._too_large` says of a mail it kept only the header of (over IMAP); at the
# start of the reason, where no text of the mail's own can be.
HEADER_ONLY = re.compile(
    r"message of \d+ bytes is over the \d+-byte limit; only its header is stored"
)


class QuarantineError(Exception):
    """What a lead asked of the quarantine cannot be done: one line that says why."""


@dataclass(frozen=True)
class HeldMail:
    """One quarantined mail as a lead sees it, without its bytes."""

    id: int
    received: datetime
    sender: str
    reason: str
    subject: str
    outcome: str = "quarantined"  # or, settled: released | attached | dropped
    key: str | None = None  # its mail's identity (`ParsedMail.dedupe_key`) while it holds it

    @property
    def header_only(self) -> bool:
        """Only its header is stored: the mail is whole only in the IMAP quarantine folder."""
        return HEADER_ONLY.match(self.reason) is not None


@dataclass(frozen=True)
class HeldContent:
    """A quarantined mail with its bytes and what the router reads in them."""

    held: HeldMail
    raw: bytes
    mail: ParsedMail | None  # None: unreadable, or only the header is stored
    unreadable: str | None  # why the router cannot read it


def case_number(tag: str, prefix: str) -> int | None:
    """The case a lead names: `ESC-123` or `ESC-000123` (any case); None if it is no tag."""
    text = tag.strip()
    head, dash, digits = text.rpartition("-")
    if not dash or head.lower() != prefix.lower() or not digits.isascii():
        return None
    return int(digits) if digits.isdigit() and len(digits) <= 12 else None


class Quarantine:
    """The quarantine as a queue a lead empties: list, show, release (processed again as if
    it had just arrived), attach to a case, drop. Each act is recorded on the quarantined
    row, whose bytes stay: its outcome becomes released | attached | dropped and its reason
    says who did it and when (UTC). Nothing is deleted."""

    def __init__(self, config: Config, store: Store, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock

    def held(self, limit: int = 200, reason: str | None = None) -> list[HeldMail]:
        """The newest `limit` quarantined mails, oldest first; with `reason`, those whose
        reason holds that text."""
        with self.store.reading() as session:
            return [_held(row) for row in repo.quarantined(session, limit, reason=reason)]

    def show(self, number: int) -> HeldContent:
        """A mail that is, or was, in quarantine, with what the router reads in it."""
        held = self._find(number, SET_ASIDE)
        raw = self.store.read_raw(number)
        if held.header_only:
            folder = self.config.settings.intake.imap.quarantine_folder
            whole = f"only its header is stored; the whole mail is in the IMAP folder {folder!r}"
            return HeldContent(held, raw, None, whole)
        pipeline = Pipeline(self.config, self.store, self.clock)
        try:
            return HeldContent(held, raw, pipeline.parse(raw), None)
        except Exception as exc:  # Refused, or anything a hostile mail makes the parser raise
            return HeldContent(held, raw, None, str(exc) or type(exc).__name__)

    def release(self, number: int, who: str) -> Result:
        """Process the mail again as if it had just arrived, with today's configuration and
        checks: first the row is marked released and lets go of its mail's identity (in one
        transaction), then `Pipeline.process` takes the mail down the normal path. Should
        that fail, the row is put back in quarantine."""
        held = self._whole(self._find(number))
        raw = self.store.read_raw(number)
        pipeline = Pipeline(self.config, self.store, self.clock)
        with self.store.transaction() as session:
            note = self._note("released", who)
            if not repo.settle_quarantined(session, number, "released", note, forget_key=True):
                raise QuarantineError(f"message #{number} is no longer in quarantine")
        try:
            return pipeline.process(raw)
        except Exception as exc:
            self._put_back(number, "released", held, exc)
            raise

    def attach(self, number: int, tag: str, who: str) -> Result:
        """Add the mail to the case named `tag` (its thread, the vendor, its history) in one
        transaction with the mark on its row (`Handler.attach`)."""
        prefix = self.config.settings.case_tag_prefix
        case_id = case_number(tag, prefix)
        if case_id is None:
            raise QuarantineError(f"{tag!r} is not a case: give it as {prefix}-123")
        named = case_tag(prefix, case_id)
        self._whole(self._find(number))
        raw = self.store.read_raw(number)
        pipeline = Pipeline(self.config, self.store, self.clock)
        try:
            mail = pipeline.parse(raw)
        except Exception as exc:
            raise QuarantineError(
                f"message #{number} cannot be attached: the router cannot read it ({exc}); "
                f"`release` processes it again, or `drop` puts it aside for good"
            ) from exc
        now = self.clock()
        arrival = Arrival(raw, mail.dedupe_key, None, now, mail, len(raw))
        try:
            with self.store.transaction() as session:
                book = SqlCaseBook(session)
                case = book.case(case_id)
                if case is None:
                    raise QuarantineError(f"no case {named}")
                note = self._note(f"attached to {named}", who)
                if not repo.settle_quarantined(session, number, "attached", note, forget_key=True):
                    raise QuarantineError(f"message #{number} is no longer in quarantine")
                return pipeline.handler.attach(book, arrival, mail, case, who, number)
        except Conflict as exc:
            # Its identity (Message-ID, sender, body) belongs to another stored message.
            raise QuarantineError(
                f"message #{number} cannot be attached: the same mail is stored as another "
                "message already (processed since it was quarantined?)"
            ) from exc

    def drop(self, number: int, who: str) -> None:
        """Put the mail aside for good: marked dropped, kept (a copy that arrives again gets
        this outcome back), no longer listed."""
        self._find(number)
        with self.store.transaction() as session:
            note = self._note("dropped", who)
            if not repo.settle_quarantined(session, number, "dropped", note, forget_key=False):
                raise QuarantineError(f"message #{number} is no longer in quarantine")

    def _find(self, number: int, outcomes: tuple[str, ...] = ("quarantined",)) -> HeldMail:
        with self.store.reading() as session:
            row = repo.inbound_message(session, number)
        if row is None:
            raise QuarantineError(f"no message #{number}")
        if row.outcome not in outcomes:
            said = f"{row.outcome}: {row.reason or ''}"
            raise QuarantineError(f"no quarantined message #{number} ({said[:300]})")
        return _held(row)

    def _whole(self, held: HeldMail) -> HeldMail:
        if held.header_only:
            folder = self.config.settings.intake.imap.quarantine_folder
            raise QuarantineError(
                f"message #{held.id} cannot be released from the database: only its header "
                f"is stored; the whole mail is in the IMAP folder {folder!r} (to have it "
                "processed, raise intake.max_message_bytes and move it back to the intake "
                "folder; then drop this one)"
            )
        return held

    def _note(self, done: str, who: str) -> str:
        at = self.clock().astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f" — {done} by {who} at {at}"

    def _put_back(self, number: int, outcome: str, held: HeldMail, error: Exception) -> None:
        """Undo a release whose processing failed (nothing of it was committed)."""
        try:
            with self.store.transaction() as session:
                repo.requarantine(session, number, outcome, held.reason, held.key)
        except Exception as again:
            raise QuarantineError(
                f"message #{number} could not be processed ({error}) nor put back in "
                f"quarantine ({again}): it is marked {outcome}, its bytes are kept"
            ) from error


def _held(row: Message) -> HeldMail:
    """A stored message row (`store.tables.Message`) as the quarantine shows it."""
    return HeldMail(
        id=row.id,
        received=row.created_at,
        sender=row.sender,
        reason=row.reason or "",
        subject=row.subject,
        outcome=row.outcome or "quarantined",
        key=row.dedupe_key,
    )
