"""Sender: sends what the outbox holds, exactly as it was committed.

It claims due rows from `store.outbox`, sends them through a transport down a few lanes
(a case's mails down one lane, in the order they were decided), and marks them: a row's
id goes to the sender's journal the moment the relay answers 250, and its "sent" to the
database soon after, in one write with the others sent meanwhile — a crash between the
two does not repeat the mail (the journal tells). A temporary failure is retried with
exponential backoff and jitter; a permanent one is reported as a `FailedMail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

from mailrouter.config import RetrySettings
from mailrouter.core.notify import NOTIFY_KIND
from mailrouter.deliver.journal import SentJournal, claim_is_dead, listed, process_identity
from mailrouter.deliver.transports import (
    Mail,
    PermanentFailure,
    StoredMail,
    TemporaryFailure,
    Transport,
)
from mailrouter.model import is_large
from mailrouter.store.db import Store
from mailrouter.store.outbox import OnFailed, Outbox, OutboxRow

log = logging.getLogger(__name__)

RELEASE_EVERY_SECONDS = 5.0
MARK_GATHER_SECONDS = 0.02


def file_name(row_id: int, kind: str) -> str:
    """What a transport names a mail by: ours alone (an address can be any length and any
    character; the recipient is inside the file)."""
    return f"{row_id:06d}-{re.sub(r'[^a-z_]', '_', kind[:32])}"


class Sender:
    """Delivers due outbox rows. Several senders (daemons) may share one database: a sender
    claims rows before sending them, so no row is sent by two. A claim whose process died
    on this host is released at once; one from another host when its lease runs out."""

    LEASE = timedelta(minutes=10)

    def __init__(
        self,
        store: Store,
        transport: Transport,
        retry: RetrySettings,
        clock: Callable[[], datetime],
        rng: random.Random | None = None,
        on_failed: OnFailed | None = None,
        lanes: int = 1,
        on_try: Callable[[str, str], None] = lambda kind, result: None,
        posts: Transport | None = None,
    ) -> None:
        """`on_failed(session, failed)` runs in the transaction that marks a row failed;
        `lanes` is how many mails may be in flight at once; `on_try(kind, result)` is told
        of each mail the relay took ("sent") or deferred ("deferred"), as it answers."""
        self.lanes = lanes
        self.on_try = on_try
        # Where the rows of kind "notify" go (chat channels, webhooks); none: they fail.
        self.posts = posts
        self.store = store
        self.outbox = Outbox(store)
        self.transport = transport
        self.retry = retry
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_failed = on_failed
        self.identity = process_identity()
        self._batches = 0
        self.journal = SentJournal(store.journal_dir, self.identity)
        self._swept = False
        self._next_release = 0.0  # monotonic time of the next look for stale claims
        # Rows the relay took whose "sent" is not yet in the database, queued for the
        # `_marking` task (which writes all those queued at once, in one transaction).
        self._unmarked: list[tuple[int, datetime]] = []
        self._marking: asyncio.Task[Exception | None] | None = None

    def close(self) -> None:
        """Write the "sent" marks still queued, then remove this sender's journal. A mark
        that cannot be written leaves the journal on disk for whoever releases our claims."""
        writing = self._marking is not None and not self._marking.done()
        if self._unmarked and not writing:
            try:
                self._mark_sent(self._unmarked)
                self._unmarked = []
            except Exception:
                log.exception(
                    "could not record %d sent mails; kept in %s",
                    len(self._unmarked),
                    self.journal.path,
                )
        self.journal.close(remove=not self._unmarked and not writing)

    def release_stale_claims(self) -> int:
        """Put back rows claimed by a sender that died before sending them; record as sent
        those its journal lists (the relay had accepted them)."""
        here = socket.gethostname()
        # Each pass asks, but a claim goes stale only when its sender dies: with several
        # daemons (whose live claims are always there) looking every few seconds is enough.
        if time.monotonic() < self._next_release:
            return 0
        self._next_release = time.monotonic() + RELEASE_EVERY_SECONDS
        if not self.outbox.any_claimed():
            if not self._swept:  # once: journals of dead senders whose rows are all settled
                for path in self.journal.dead_files():
                    path.unlink(missing_ok=True)
                self._swept = True
            return 0  # the usual case, answered without taking the write lock

        def delivered_by(owners: set[str]) -> set[int]:
            return listed([path for owner in owners for path in self.journal.files_of(owner, here)])

        released = self.outbox.release_stale(
            self.clock(), lambda owner: claim_is_dead(owner, here), delivered_by
        )
        # Their owners are gone and what they listed is recorded now. (A live owner whose
        # lease ran out keeps writing its journal: it is left be.)
        for owner in released.dead_owners:
            for path in self.journal.files_of(owner, here):
                path.unlink(missing_ok=True)
        if released.stale:
            log.warning(
                "released %d outbox rows claimed by a sender that stopped (%d of them it had "
                "sent: recorded as sent, not sent again)",
                released.stale,
                released.delivered,
            )
        return released.stale

    def claim_due(self, limit: int = 100) -> list[tuple[int, int | None]]:
        """Claim the due pending rows, in order, skipping every case that has an earlier row
        waiting or being sent; return (id, case id) of the rows now ours."""
        return self._claim(limit)[0]

    def _claim(self, limit: int = 100) -> tuple[list[tuple[int, int | None]], dict[int, OutboxRow]]:
        """`claim_due`, with the rows to send (small mails with their bytes)."""
        self._batches += 1
        token = f"{self.identity}:{self._batches}"
        return self.outbox.claim_and_read(token, self.clock(), self.LEASE, limit)

    def next_wakeup(self) -> datetime | None:
        return self.outbox.next_wakeup()

    async def deliver_due(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Send every row that is due now, up to `lanes` at once; return how many were sent.
        A case's mails go down one lane in order, and stop at the first that fails."""
        await self._marks_committed()  # any left by a failed write of the last pass
        await asyncio.to_thread(self.release_stale_claims)
        # One read for the batch (small mails with their bytes) instead of one per mail.
        claimed, rows = await asyncio.to_thread(self._claim)
        by_case: dict[object, list[int]] = {}
        for row_id, case_id in claimed:
            by_case.setdefault(case_id if case_id is not None else ("row", row_id), []).append(
                row_id
            )
        queue = list(by_case.values())
        sent = 0
        one_large_mail = asyncio.Lock()

        settled: set[int] = set()  # rows whose outcome is recorded: nothing to hand back

        async def lane() -> None:
            nonlocal sent
            while queue and not should_stop():
                for row_id in queue.pop(0):
                    row = rows.pop(row_id, None)
                    if should_stop():
                        break
                    delivered = await self.deliver_one(row_id, one_large_mail, row)
                    settled.add(row_id)
                    if not delivered:
                        break
                    sent += 1

        try:
            outcomes = await asyncio.gather(
                *(lane() for _ in range(min(self.lanes, len(queue)))), return_exceptions=True
            )
            # Every lane has ended (none is left sending) before anything is handed back.
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        finally:
            # Whatever we claimed but did not try goes back for the next pass (or daemon).
            untried = [row_id for row_id, _ in claimed if row_id not in settled]
            if untried:
                await asyncio.to_thread(self._unclaim, untried)
            await self._marks_committed()
            self.journal.clear()  # every "sent" of the batch is committed (or handed back)
        return sent

    def _unclaim(self, row_ids: list[int]) -> None:
        self.outbox.unclaim(row_ids, self.identity)

    async def deliver_one(
        self,
        row_id: int,
        one_large_mail: asyncio.Lock | None = None,
        row: OutboxRow | None = None,
    ) -> bool:
        """Send one row this sender has claimed (`row`: as `_read_rows` gave it). Mails over
        `LARGE_MAIL_BYTES` are sent one at a time (under `one_large_mail` and the store's
        large-mail turn), read from the store a slice at a time as they go out."""
        row = row or self.outbox.read_rows([row_id]).get(row_id)
        if row is None or row.delivery != "sending":
            return False
        large = is_large(row.size)
        async with (
            one_large_mail if large and one_large_mail else contextlib.nullcontext(),
            self._large_mail_turn() if large else contextlib.nullcontext(),
        ):
            raw: Mail
            if row.raw is not None:
                raw = row.raw
            elif large:
                raw = StoredMail(row.size, functools.partial(self.store.read_raw_slice, row_id))
            else:
                raw = self.store.read_raw(row_id)
            transport = self.posts if row.kind == NOTIFY_KIND else self.transport
            try:
                if transport is None:
                    raise PermanentFailure("no notify targets configured (notify:)")
                await transport.send(
                    row.sender, list(row.recipients), raw, file_name(row_id, row.kind)
                )
                # Before anything else: from here a kill no longer repeats the mail.
                self.journal.record(row_id)
            except TemporaryFailure as exc:
                self.on_try(row.kind, "deferred")
                await asyncio.to_thread(self._retry_later, row_id, str(exc))
                return False
            except PermanentFailure as exc:
                await asyncio.to_thread(self._fail, row_id, str(exc))
                return False
            except Exception as exc:
                # A mail our own code cannot send (a bug, or bytes no transport takes): it
                # fails alone, once, with the reason, and every other mail keeps moving.
                reason = f"cannot be sent: {type(exc).__name__}: {exc}"[:500]
                await asyncio.to_thread(self._fail, row_id, reason)
                return False
            finally:
                del raw
        self._unmarked.append((row_id, self.clock()))
        self._start_marking()
        self.on_try(row.kind, "sent")
        return True

    def _start_marking(self) -> None:
        if self._unmarked and (self._marking is None or self._marking.done()):
            self._marking = asyncio.create_task(self._mark_unmarked())

    async def _mark_unmarked(self) -> Exception | None:
        """Write the queued "sent" marks until none is left, all those queued meanwhile in
        one transaction: the lanes go on sending, and one write serves many mails instead of
        each mail queueing for the database's writer turn with the intake. Returns the
        error of a write that failed (its marks go back in the queue, still journaled)."""
        while self._unmarked:
            # A moment for the other lanes' marks to join: one transaction for several
            # mails (each is in the journal already; a pass ends at most this much later).
            await asyncio.sleep(MARK_GATHER_SECONDS)
            batch, self._unmarked = self._unmarked, []
            try:
                await asyncio.to_thread(self._mark_sent, batch)
            except BaseException as exc:
                # Still journaled; written again later (harmless if this write got through
                # after all, as it may when only our wait for it was cancelled).
                self._unmarked[:0] = batch
                if not isinstance(exc, Exception):
                    raise
                return exc
        return None

    async def _marks_committed(self) -> None:
        """Every "sent" so far is in the database; a failed write raises here."""
        self._start_marking()
        if self._marking is not None:
            # Shielded: a cancelled pass does not stop a write half done.
            error = await asyncio.shield(self._marking)
            if error is not None:
                raise error

    @contextlib.asynccontextmanager
    async def _large_mail_turn(self) -> AsyncIterator[None]:
        """The store's turn for large mails, waited for without blocking the loop (and so
        that a cancelled wait never leaves it taken)."""
        turn = self.store.large_mail_turn
        while not turn.acquire(blocking=False):
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            turn.release()

    def _mark_sent(self, marks: list[tuple[int, datetime]]) -> None:
        self.journal.sync()  # before the database write, which may wait for its turn
        self.outbox.mark_sent(marks)

    def _retry_later(self, row_id: int, error: str) -> None:
        self.outbox.retry_later(row_id, error, self.clock(), self.retry, self.rng, self.on_failed)

    def _fail(self, row_id: int, error: str) -> None:
        self.outbox.fail(row_id, error, self.on_failed)
