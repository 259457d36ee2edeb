"""Outbox: the whole state machine of outgoing mail, in one place.

An outgoing mail is a `messages` row with direction "out" and a `delivery` state:

    pending --claim--> sending --sent--> sent
       ^                  |  \\--refused (5xx) or retries exhausted--> failed
       |                  |
       +--retry later-----+   (temporary failure: attempts + 1, next_attempt_at = backoff)
       +--release stale---+   (the claimant died, or its lease ran out)
    pending/sending --cancel--> cancelled   (an acknowledgement whose forward failed)

A row is queued inside the transaction that decided it, so it leaves only if that
commits. Mails of one case leave in the order they were decided.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Select, bindparam, case, exists, func, null, or_, select, update
from sqlalchemy.orm import Session

from mailrouter.config import RetrySettings
from mailrouter.model import FailedMail, OutgoingMail
from mailrouter.store.db import Store, on_postgresql, put_message
from mailrouter.store.tables import BODIES, MESSAGES, Message, is_open

log = logging.getLogger(__name__)

# Said in every query on the rows still to send, beside any narrower condition: then both
# SQLite and PostgreSQL use the partial index on those rows (`ix_messages_outbox`).
OPEN = is_open(MESSAGES.c.delivery)


def queue_mail(session: Session, case_id: int | None, now: datetime, mail: OutgoingMail) -> None:
    """Put one mail in the outbox, inside the caller's transaction: it leaves only if that
    transaction commits, and the sender delivers it as stored."""
    # Heard at the commit by every daemon (Store.listen), once however many mails it queued.
    put_message(
        session,
        mail.data,
        wake=on_postgresql(session),
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


def backoff_delay(attempts: int, retry: RetrySettings, rng: random.Random) -> float:
    """Exponential backoff with jitter: half fixed, half random, so retries spread out."""
    delay = min(retry.max_delay, retry.first_delay * 2 ** max(0, attempts - 1))
    return float(delay * (0.5 + rng.random() / 2))


# What the sender is told of a mail refused for good, inside the transaction that marks it
# failed: the service records it on the case (and may queue the agent's notice there).
OnFailed = Callable[[Session, FailedMail], None]

PRELOAD_BYTES = 64 * 1024  # mails up to this size are read with their batch


# Built once: composing a statement costs more than running it on this path.
_ROWS_TO_SEND = (
    select(
        MESSAGES.c.id,
        MESSAGES.c.kind,
        MESSAGES.c.sender,
        MESSAGES.c.recipients,
        MESSAGES.c.delivery,
        func.length(BODIES.c.raw).label("size"),
        case((func.length(BODIES.c.raw) <= bindparam("small"), BODIES.c.raw), else_=null()).label(
            "raw"
        ),
    )
    .join_from(MESSAGES, BODIES, BODIES.c.id == MESSAGES.c.id)
    .where(MESSAGES.c.id.in_(bindparam("ids", expanding=True)))
)
_MARK_SENT = (
    update(MESSAGES)
    .where(MESSAGES.c.id == bindparam("row_id"))
    .values(
        delivery="sent",
        sent_at=bindparam("sent_at"),
        last_error=None,
        claimed_by=None,
        claimed_until=None,
    )
)


@dataclass(frozen=True)
class OutboxRow:
    """A claimed row as the sender needs it; `raw` is None for a mail over PRELOAD_BYTES
    (read when it is sent, with `Store.read_raw`)."""

    id: int
    kind: str
    sender: str
    recipients: list[str]
    delivery: str
    size: int
    raw: bytes | None


@dataclass(frozen=True)
class Released:
    """What `release_stale` did: rows handed back, those recorded as sent instead, and the
    dead claimants whose journals are now settled."""

    stale: int
    delivered: int
    dead_owners: set[str]


def _due_statement(locked: bool) -> Select[int]:
    """The pending rows due now, in order, but none of a case that has an earlier row
    waiting for a retry or being sent (with `locked`: or not among the `available` rows
    this sender holds locked, which another sender is claiming). Asked of the database,
    which finds each case's earlier rows by its index, rather than by reading every open
    row into Python: that grew with the backlog (about 1 ms an outgoing mail with 900
    queued)."""
    earlier = MESSAGES.alias("earlier")
    blocking = or_(earlier.c.delivery == "sending", earlier.c.next_attempt_at > bindparam("now"))
    if locked:
        blocking = or_(blocking, earlier.c.id.not_in(bindparam("available", expanding=True)))
    blocked = exists().where(
        earlier.c.case_id == MESSAGES.c.case_id,
        earlier.c.id < MESSAGES.c.id,
        is_open(earlier.c.delivery),
        blocking,
    )
    query = select(MESSAGES.c.id).where(
        OPEN,
        MESSAGES.c.delivery == "pending",
        or_(MESSAGES.c.next_attempt_at.is_(None), MESSAGES.c.next_attempt_at <= bindparam("now")),
        ~blocked,
    )
    if locked:
        query = query.where(MESSAGES.c.id.in_(bindparam("available", expanding=True)))
    return query.order_by(MESSAGES.c.id).limit(bindparam("limit"))


_DUE = _due_statement(locked=False)
_DUE_OF_LOCKED = _due_statement(locked=True)


def _due_rows(
    session: Session, now: datetime, limit: int, available: set[int] | None = None
) -> list[int]:
    """Ids of the pending rows due now, in order, skipping every case that has an earlier row
    waiting for a retry or being sent. `available`: the rows this sender holds locked; any
    other is being claimed by another sender, and blocks its case as a row being sent does."""
    if available is None:
        found = session.execute(_DUE, {"now": now, "limit": limit})
    else:
        params = {"now": now, "limit": limit, "available": sorted(available)}
        found = session.execute(_DUE_OF_LOCKED, params)
    return [int(row_id) for (row_id,) in found]


def _read_rows(connection: Connection, row_ids: list[int]) -> dict[int, OutboxRow]:
    if not row_ids:
        return {}
    found = connection.execute(_ROWS_TO_SEND, {"ids": row_ids, "small": PRELOAD_BYTES})
    return {
        row.id: OutboxRow(
            row.id, row.kind, row.sender, list(row.recipients), row.delivery, row.size, row.raw
        )
        for row in found
    }


def _lock_due(session: Session, now: datetime, limit: int) -> set[int]:
    """PostgreSQL: lock the first pending rows due now that no other sender is claiming
    (`FOR UPDATE SKIP LOCKED`), so that senders on several daemons never wait for each other
    nor take the same row."""
    return set(
        session.scalars(
            select(Message.id)
            .where(OPEN, Message.delivery == "pending", Message.next_attempt_at <= now)
            .order_by(Message.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


class Outbox:
    """The outbox's state changes, each its own short transaction on `store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def claim_due(
        self, token: str, now: datetime, lease: timedelta, limit: int = 100
    ) -> list[tuple[int, int | None]]:
        """pending -> sending: claim the due rows for `token`, in order, skipping every case
        that has an earlier row waiting or being sent; return (id, case id) of those claimed."""
        return self.claim_and_read(token, now, lease, limit)[0]

    def claim_and_read(
        self, token: str, now: datetime, lease: timedelta, limit: int = 100
    ) -> tuple[list[tuple[int, int | None]], dict[int, OutboxRow]]:
        """`claim_due`, and the claimed rows as the sender needs them (`read_rows`), read in
        the claim's transaction: one round of BEGIN and COMMIT a batch instead of two."""
        if not self.store.postgresql:
            # A snapshot answers the usual "nothing due" without SQLite's write lock; the
            # choice is then made again under the lock, so two senders never split one
            # case's mails. (On PostgreSQL, locking the due rows answers it as cheaply.)
            with self.store.reading() as session:
                if not _due_rows(session, now, 1):
                    return [], {}
        with self.store.transaction() as session:
            locked = _lock_due(session, now, limit) if self.store.postgresql else None
            if locked is not None and not locked:
                return [], {}
            due = _due_rows(session, now, limit, locked)
            if not due:
                return [], {}
            mine = session.execute(
                update(Message)
                .where(Message.id.in_(due), Message.delivery == "pending")
                .values(delivery="sending", claimed_by=token, claimed_until=now + lease)
                .returning(Message.id, Message.case_id)
            ).all()
            claimed = sorted((row_id, case_id) for row_id, case_id in mine)
            return claimed, _read_rows(session.connection(), [row_id for row_id, _ in claimed])

    def next_wakeup(self) -> datetime | None:
        """When the earliest pending row is due."""
        with self.store.reading() as session:
            return session.scalar(
                select(Message.next_attempt_at)
                .where(OPEN, Message.delivery == "pending")
                .order_by(Message.next_attempt_at)
                .limit(1)
            )

    def read_rows(self, row_ids: list[int]) -> dict[int, OutboxRow]:
        """The rows to send, with their bytes when small (the others are read when sent)."""
        if not row_ids:
            return {}
        # Ended by a commit, not a rollback: psycopg forgets its prepared statements at
        # every rollback (and sends DEALLOCATE ALL), which would cost each statement of
        # the hot path its next five runs unprepared.
        with self.store.engine_for_reading().begin() as connection:
            return _read_rows(connection, row_ids)

    def mark_sent(self, marks: list[tuple[int, datetime]]) -> None:
        """sending -> sent, for every (row id, when) given, in one transaction."""
        self.store.write(_MARK_SENT, [{"row_id": row_id, "sent_at": at} for row_id, at in marks])

    def unclaim(self, row_ids: list[int], identity: str) -> None:
        """sending -> pending: rows this process claimed and did not try."""
        if not row_ids:
            return
        with self.store.transaction() as session:
            session.execute(
                update(Message)
                .where(
                    Message.id.in_(row_ids),
                    Message.delivery == "sending",
                    Message.claimed_by.like(f"{identity}:%"),
                )
                .values(delivery="pending", claimed_by=None, claimed_until=None)
            )

    def retry_later(
        self,
        row_id: int,
        error: str,
        now: datetime,
        retry: RetrySettings,
        rng: random.Random,
        on_failed: OnFailed | None,
    ) -> None:
        """sending -> pending, due after a backoff; or failed once `retry.give_up_after`
        seconds have passed since the row was queued."""
        with self.store.transaction() as session:
            row = session.get(Message, row_id)
            if row is None:
                return
            row.attempts += 1
            row.last_error = error
            row.claimed_by = row.claimed_until = None
            if (now - row.created_at).total_seconds() >= retry.give_up_after:
                log.error(
                    "giving up on outbox row %s after %d tries: %s", row_id, row.attempts, error
                )
                _mark_failed(
                    session, row, f"gave up after {row.attempts} tries: {error}", on_failed
                )
                return
            delay = backoff_delay(row.attempts, retry, rng)
            row.delivery = "pending"
            row.next_attempt_at = now + timedelta(seconds=delay)
            log.warning(
                "outbox row %s: temporary failure (%s); retry in %.0f s", row_id, error, delay
            )

    def fail(self, row_id: int, error: str, on_failed: OnFailed | None) -> None:
        """sending -> failed: refused for good."""
        with self.store.transaction() as session:
            row = session.get(Message, row_id)
            if row is not None:
                row.attempts += 1
                row.claimed_by = row.claimed_until = None
                log.error(
                    "outbox row %s to %s failed permanently: %s", row_id, row.recipients, error
                )
                _mark_failed(session, row, error, on_failed)

    def any_claimed(self) -> bool:
        with self.store.reading() as session:
            found = session.scalar(
                select(Message.id).where(OPEN, Message.delivery == "sending").limit(1)
            )
        return found is not None

    def release_stale(
        self,
        now: datetime,
        is_dead: Callable[[str], bool],
        delivered_by: Callable[[set[str]], set[int]],
    ) -> Released:
        """sending -> pending for rows whose claimant died (`is_dead(owner)`) or whose lease
        ran out; sending -> sent instead for those the claimant's journal lists as accepted
        by the relay (`delivered_by(owners)`: the sender's journal, handed in)."""
        with self.store.transaction() as session:
            claimed = session.execute(
                select(Message.id, Message.claimed_by, Message.claimed_until).where(
                    OPEN, Message.delivery == "sending"
                )
            ).all()
            dead = {owner for _, owner, _ in claimed if owner and is_dead(owner)}
            stale = {
                row_id: owner
                for row_id, owner, until in claimed
                if owner is None or (until is not None and until < now) or owner in dead
            }
            delivered = delivered_by({owner for owner in stale.values() if owner})
            delivered &= stale.keys()
            if delivered:
                session.execute(
                    update(Message)
                    .where(Message.id.in_(delivered), Message.delivery == "sending")
                    .values(delivery="sent", sent_at=now, claimed_by=None, claimed_until=None)
                )
            if stale.keys() - delivered:
                session.execute(
                    update(Message)
                    .where(Message.id.in_(stale.keys() - delivered), Message.delivery == "sending")
                    .values(delivery="pending", claimed_by=None, claimed_until=None)
                )
        return Released(len(stale), len(delivered), dead)


def _mark_failed(session: Session, row: Message, error: str, on_failed: OnFailed | None) -> None:
    row.delivery, row.last_error = "failed", error
    if on_failed is not None:
        failed = FailedMail(row.id, row.case_id, row.kind, list(row.recipients), error)
        on_failed(session, failed)
