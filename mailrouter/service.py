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
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from mailrouter.config import Config, ConfigError, load_config
from mailrouter.core.checks import template_problems
from mailrouter.core.digests import Digest, build_digests, render_digest
from mailrouter.core.handle import Handler
from mailrouter.core.parse import Deadline, Refused
from mailrouter.model import (
    REMINDED_STATUSES,
    Arrival,
    Clock,
    FailedMail,
    ImapSource,
    IntakeHooks,
    OutgoingMail,
    ParsedMail,
    Result,
    content_hash,
)
from mailrouter.store import repo
from mailrouter.store.db import Conflict, Store, Unavailable
from mailrouter.store.repo import RecordingBook, SqlCaseBook

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

    def parse(self, raw: bytes) -> ParsedMail:
        seconds = self.config.settings.intake.mail_deadline_seconds
        return self.handler.parse(raw, Deadline(seconds, self.stopwatch))

    def intake_hooks(self) -> IntakeHooks:
        """What an intake is handed to feed this pipeline."""
        return IntakeHooks(
            ingest=self.process,
            known=self.known_outcomes,
            max_bytes=self.config.settings.intake.max_message_bytes,
            large_mail=self.store.large_mail,
        )

    def known_outcomes(self, mailbox: str, uidvalidity: int, uids: list[int]) -> dict[int, Result]:
        """The committed outcomes of a batch of IMAP messages, by UID (see `repo`)."""
        with self.store.reading() as session:
            return repo.known_outcomes(session, mailbox, uidvalidity, uids, self.clock())

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
        except Refused as exc:
            mail, failure = None, str(exc)
        except Exception as exc:
            # A line, not a traceback: the mail is kept with the reason, and the log is
            # read by people looking for what needs them (`--log-level debug` has it all).
            log.debug("cannot parse mail", exc_info=True)
            mail, failure = None, f"parse error: {_summary(exc)}"
        key = mail.dedupe_key if mail else f"sha256:{content_hash(raw)}"
        arrival = Arrival(raw, key, source, now, mail, whole_size or len(raw))
        for attempt in range(3):
            try:
                with self.store.transaction() as session:
                    book = SqlCaseBook(session)
                    earlier = book.earlier_outcome(key, source)
                    if earlier is not None:
                        book.remember_uid(source)
                        return earlier
                    if mail is None:
                        return self.handler.quarantine(book, arrival, failure)
                    return self.handler.handle(book, arrival, mail)
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
                log.debug("processing failed", exc_info=True)
                with self.store.transaction() as session:
                    reason = f"processing error: {_summary(exc)}"
                    return self.handler.quarantine(SqlCaseBook(session), arrival, reason)
        raise AssertionError("unreachable")

    def delivery_failed(self, session: Any, failed: FailedMail) -> None:
        """The sender's report of a mail refused for good, inside the transaction that marks
        it failed (`store.outbox.OnFailed`)."""
        self.handler.delivery_failed(SqlCaseBook(session), failed, self.clock())


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
        with self.store.engine_for_reading().connect() as connection:
            cases = repo.digest_rows(connection)
        return build_digests(cases, self.config, self.clock())

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
