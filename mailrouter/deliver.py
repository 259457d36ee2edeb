"""Deliver: sends what the outbox holds, exactly as it was committed.

Owns the transports (a folder of .eml files, or an SMTP relay through
aiosmtplib), the classification of failures (4xx and connection errors are
temporary and retried with exponential backoff and jitter; 5xx is permanent),
and the sender loop. A row is marked sent in one statement right after the
relay's 250, so a crash can repeat at most that one mail, with the same
Message-ID. Mails of one case leave in the order they were decided.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import aiosmtplib
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailrouter.config import RetrySettings, SmtpSettings, tls_context
from mailrouter.store import Message, Store

log = logging.getLogger(__name__)


class TemporaryFailure(Exception):
    """Try again later (4xx, connection refused, timeout)."""


class PermanentFailure(Exception):
    """Never try again (5xx)."""


class Transport(Protocol):
    async def send(self, sender: str, recipients: list[str], data: bytes, name: str) -> None: ...

    async def close(self) -> None: ...


class FileTransport:
    """Writes each mail as `<dir>/<name>.eml`; rewriting the same row gives the same file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, sender: str, recipients: list[str], data: bytes, name: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{name}.eml"
        partial = target.with_suffix(".eml.part")
        envelope = f"X-Envelope-From: {sender}\r\nX-Envelope-To: {', '.join(recipients)}\r\n"
        # Written aside and renamed, so a reader never sees half a mail.
        partial.write_bytes(envelope.encode() + data)
        os.replace(partial, target)

    async def close(self) -> None:
        return None


class SmtpTransport:
    """One reused aiosmtplib connection to the relay, reopened after any error."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self._client: aiosmtplib.SMTP | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout,
            use_tls=s.security == "tls",
            start_tls=s.security == "starttls",
            tls_context=tls_context(s.ca_file) if s.security != "none" else None,
        )
        await client.connect()
        if s.username:
            await client.login(s.username, s.password)
        return client

    async def send(self, sender: str, recipients: list[str], data: bytes, name: str) -> None:
        if self._loop is not asyncio.get_running_loop():
            # A connection belongs to the loop that opened it (one-shot commands run several).
            self._client, self._loop = None, asyncio.get_running_loop()
        try:
            if self._client is None or not self._client.is_connected:
                self._client = await self._connect()
            errors, _ = await self._client.sendmail(sender, recipients, data)
        except aiosmtplib.SMTPAuthenticationError as exc:
            # A refused login is the relay's or our configuration, not this mail's fault:
            # keep the mail and retry, so fixing the password delivers the backlog.
            await self.close()
            raise TemporaryFailure(f"relay refused our login: {exc.code} {exc.message}") from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await self.close()
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if all(code >= 500 for code in codes):
                raise PermanentFailure(detail) from exc
            raise TemporaryFailure(detail) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self.close()
            failure = PermanentFailure if exc.code >= 500 else TemporaryFailure
            raise failure(f"{exc.code} {exc.message}") from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            raise TemporaryFailure(f"{type(exc).__name__}: {exc}") from exc
        if errors:
            # Some recipients refused: every mail we queue has one recipient, so this
            # only happens for hand-made rows; treat it like the all-refused case.
            detail = "; ".join(
                f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in errors.items()
            )
            raise PermanentFailure(detail)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                client.close()


def backoff_delay(attempts: int, retry: RetrySettings, rng: random.Random) -> float:
    """Exponential backoff with jitter: half fixed, half random, so retries spread out."""
    delay = min(retry.max_delay, retry.first_delay * 2 ** max(0, attempts - 1))
    return float(delay * (0.5 + rng.random() / 2))


def file_name(message: Message) -> str:
    recipient = re.sub(r"[^A-Za-z0-9@._-]", "_", (message.recipients or ["nobody"])[0])
    return f"{message.id:06d}-{message.kind}-{recipient}"


def process_identity() -> str:
    """`host:pid:start` of this process; `start` tells a live process from a reused pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    # Field 22 (starttime), counted after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[19]


def _claim_is_dead(claimed_by: str, here: str) -> bool:
    """Whether a claim was made by a process on this host that no longer runs."""
    host, _, rest = claimed_by.partition(":")
    pid, _, start = rest.partition(":")
    start = start.split(":", 1)[0]
    if host != here or not pid.isdigit():
        return False  # another machine's claim: only its lease can expire it
    return _start_ticks(int(pid)) != start


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
        on_failed: Callable[[Session, Message, str], None] | None = None,
    ) -> None:
        """`on_failed(session, row, error)` runs in the transaction that marks a row failed."""
        self.store = store
        self.transport = transport
        self.retry = retry
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_failed = on_failed
        self.identity = process_identity()
        self._batches = 0

    def release_stale_claims(self) -> int:
        """Put back rows claimed by a sender that died before sending or recording them."""
        now, here = self.clock(), socket.gethostname()
        with self.store.transaction() as session:
            claimed = session.execute(
                select(Message.id, Message.claimed_by, Message.claimed_until).where(
                    Message.delivery == "sending"
                )
            ).all()
            stale = [
                row_id
                for row_id, owner, until in claimed
                if owner is None
                or (until is not None and until < now)
                or _claim_is_dead(owner, here)
            ]
            if stale:
                session.execute(
                    update(Message)
                    .where(Message.id.in_(stale), Message.delivery == "sending")
                    .values(delivery="pending", claimed_by=None, claimed_until=None)
                )
        if stale:
            log.warning("released %d outbox rows claimed by a sender that stopped", len(stale))
        return len(stale)

    def claim_due(self, limit: int = 100) -> list[tuple[int, int | None]]:
        """Claim the due pending rows, in order, skipping every case that has an earlier row
        waiting or being sent; return (id, case id) of the rows now ours."""
        now = self.clock()
        self._batches += 1
        token = f"{self.identity}:{self._batches}"
        with self.store.transaction() as session:
            rows = session.execute(
                select(Message.id, Message.case_id, Message.delivery, Message.next_attempt_at)
                .where(Message.delivery.in_(("pending", "sending")))
                .order_by(Message.id)
            ).all()
            blocked: set[int] = set()
            due: list[int] = []
            for row_id, case_id, delivery, next_at in rows:
                if case_id is not None and case_id in blocked:
                    continue
                waiting = delivery == "sending" or (next_at is not None and next_at > now)
                if waiting:
                    if case_id is not None:
                        blocked.add(case_id)
                    continue
                due.append(row_id)
                if len(due) >= limit:
                    break
            if not due:
                return []
            session.execute(
                update(Message)
                .where(Message.id.in_(due), Message.delivery == "pending")
                .values(delivery="sending", claimed_by=token, claimed_until=now + self.LEASE)
            )
            mine = session.execute(
                select(Message.id, Message.case_id)
                .where(Message.claimed_by == token, Message.delivery == "sending")
                .order_by(Message.id)
            ).all()
        return [(row_id, case_id) for row_id, case_id in mine]

    def next_wakeup(self) -> datetime | None:
        with self.store.transaction() as session:
            return session.scalar(
                select(Message.next_attempt_at)
                .where(Message.delivery == "pending")
                .order_by(Message.next_attempt_at)
                .limit(1)
            )

    async def deliver_due(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Send every row that is due now; return how many were sent."""
        await asyncio.to_thread(self.release_stale_claims)
        claimed = await asyncio.to_thread(self.claim_due)
        sent = 0
        failed_cases: set[int] = set()
        try:
            for row_id, case_id in claimed:
                if should_stop():
                    break
                if case_id in failed_cases:
                    continue  # a case's mails leave in order: wait behind its failed one
                if await self.deliver_one(row_id):
                    sent += 1
                elif case_id is not None:
                    failed_cases.add(case_id)
        finally:
            # Whatever we claimed but did not try goes back for the next pass (or daemon).
            await asyncio.to_thread(self._unclaim, [row_id for row_id, _ in claimed])
        return sent

    def _unclaim(self, row_ids: list[int]) -> None:
        if not row_ids:
            return
        with self.store.transaction() as session:
            session.execute(
                update(Message)
                .where(
                    Message.id.in_(row_ids),
                    Message.delivery == "sending",
                    Message.claimed_by.like(f"{self.identity}:%"),
                )
                .values(delivery="pending", claimed_by=None, claimed_until=None)
            )

    async def deliver_one(self, row_id: int) -> bool:
        """Send one row this sender has claimed."""
        with self.store.transaction() as session:
            row = session.get(Message, row_id)
            if row is None or row.delivery != "sending":
                return False
            sender, recipients, data, name = row.sender, row.recipients, row.raw, file_name(row)
        try:
            await self.transport.send(sender, list(recipients), data, name)
        except TemporaryFailure as exc:
            await asyncio.to_thread(self._retry_later, row_id, str(exc))
            return False
        except PermanentFailure as exc:
            await asyncio.to_thread(self._fail, row_id, str(exc))
            return False
        # The only window where a crash repeats a mail: keep it to this one statement.
        await asyncio.to_thread(self._mark_sent, row_id)
        return True

    def _mark_sent(self, row_id: int) -> None:
        with self.store.transaction() as session:
            session.execute(
                update(Message)
                .where(Message.id == row_id)
                .values(
                    delivery="sent",
                    sent_at=self.clock(),
                    last_error=None,
                    claimed_by=None,
                    claimed_until=None,
                )
            )

    def _retry_later(self, row_id: int, error: str) -> None:
        now = self.clock()
        with self.store.transaction() as session:
            row = session.get(Message, row_id)
            if row is None:
                return
            row.attempts += 1
            row.last_error = error
            row.claimed_by = row.claimed_until = None
            if (now - row.created_at).total_seconds() >= self.retry.give_up_after:
                log.error(
                    "giving up on outbox row %s after %d tries: %s", row_id, row.attempts, error
                )
                self._mark_failed(session, row, f"gave up after {row.attempts} tries: {error}")
                return
            delay = backoff_delay(row.attempts, self.retry, self.rng)
            row.delivery = "pending"
            row.next_attempt_at = now + timedelta(seconds=delay)
            log.warning(
                "outbox row %s: temporary failure (%s); retry in %.0f s", row_id, error, delay
            )

    def _fail(self, row_id: int, error: str) -> None:
        with self.store.transaction() as session:
            row = session.get(Message, row_id)
            if row is not None:
                row.attempts += 1
                row.claimed_by = row.claimed_until = None
                log.error(
                    "outbox row %s to %s failed permanently: %s", row_id, row.recipients, error
                )
                self._mark_failed(session, row, error)

    def _mark_failed(self, session: Session, row: Message, error: str) -> None:
        row.delivery, row.last_error = "failed", error
        if self.on_failed is not None:
            self.on_failed(session, row, error)
