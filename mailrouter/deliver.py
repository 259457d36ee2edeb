"""Deliver: sends what the outbox holds, exactly as it was committed.

Owns the transports (a folder of .eml files, or an SMTP relay through
aiosmtplib), the classification of failures (4xx and connection errors are
temporary and retried with exponential backoff and jitter; 5xx is permanent),
and the sender loop. A row's id goes to the sender's journal the moment the
relay answers 250, and its "sent" to the database soon after, in one write
with the others sent meanwhile: a crash between the two does not repeat the
mail (the journal tells). Mails of one case leave in the order they were
decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mailrouter.config import RetrySettings, SmtpSettings, tls_context
from mailrouter.model import is_large
from mailrouter.store.db import Store
from mailrouter.store.outbox import OnFailed, Outbox, OutboxRow

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
    """Kept-open aiosmtplib connections to the relay, one per mail in flight (at most
    `connections`, as the sender never has more in flight); a connection that errs is closed."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self._idle: list[aiosmtplib.SMTP] = []
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

    async def _checkout(self) -> aiosmtplib.SMTP:
        if self._loop is not asyncio.get_running_loop():
            # A connection belongs to the loop that opened it (one-shot commands run several).
            self._idle, self._loop = [], asyncio.get_running_loop()
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        return await self._connect()

    async def send(self, sender: str, recipients: list[str], data: bytes, name: str) -> None:
        client: aiosmtplib.SMTP | None = None
        try:
            client = await self._checkout()
            if is_large(len(data)):
                errors = await _send_in_slices(client, sender, recipients, data)
            else:
                errors, _ = await client.sendmail(sender, recipients, data)
        except aiosmtplib.SMTPAuthenticationError as exc:
            await _quit(client)
            # A refused login is the relay's or our configuration, not this mail's fault:
            # keep the mail and retry, so fixing the password delivers the backlog.
            raise TemporaryFailure(f"relay refused our login: {exc.code} {exc.message}") from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await _quit(client)
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            if all(code >= 500 for code in codes):
                raise PermanentFailure(detail) from exc
            raise TemporaryFailure(detail) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await _quit(client)
            failure = PermanentFailure if exc.code >= 500 else TemporaryFailure
            raise failure(f"{exc.code} {exc.message}") from exc
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            await _quit(client)
            raise TemporaryFailure(f"{type(exc).__name__}: {exc}") from exc
        self._idle.append(client)
        if errors:
            # Some recipients refused: every mail we queue has one recipient, so this
            # only happens for hand-made rows; treat it like the all-refused case.
            detail = "; ".join(
                f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in errors.items()
            )
            raise PermanentFailure(detail)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await _quit(client)


# What aiosmtplib does to a whole mail before DATA, done here a slice at a time: lone CR
# or LF become CRLF, and a line starting with "." gets a second one (RFC 5321 4.5.2).
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")
DATA_SLICE_BYTES = 512 * 1024


def data_slices(data: bytes, size: int = DATA_SLICE_BYTES) -> Iterator[bytes]:
    """`data` as it goes on the wire after DATA (without the final "."), in slices of
    about `size` that end at line ends."""
    start = 0
    while start < len(data):
        cut = data.find(b"\n", start + size)
        end = len(data) if cut == -1 else cut + 1
        piece = _LEADING_DOT.sub(b"..", _LINE_END.sub(b"\r\n", data[start:end]))
        if end == len(data) and not piece.endswith(b"\r\n"):
            piece += b"\r\n"
        yield piece
        start = end


def data_size(data: bytes) -> int:
    """`len(b"".join(data_slices(data)))`, counted without preparing the slices: each bare
    CR or LF gains a byte, each line starting with "." one more, and a last line without
    its line end two."""
    crlf = data.count(b"\r\n")
    size = len(data) + (data.count(b"\n") - crlf) + (data.count(b"\r") - crlf)
    size += data.startswith(b".") + data.count(b"\n.") + data.count(b"\r.")
    if data and not data.endswith((b"\n", b"\r")):
        size += 2
    return size


async def _send_in_slices(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes
) -> dict[str, aiosmtplib.SMTPResponse]:
    """`sendmail` for a large mail. aiosmtplib prepares the whole mail at once (twice
    when the relay announces SIZE), which costs about five times the mail in memory;
    here the DATA is prepared and written a slice at a time, waiting for the socket
    to take each one."""
    if client.is_ehlo_or_helo_needed:
        await client.ehlo()
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={data_size(data)}")
    await client.mail(sender, options=options)
    refused = []
    for recipient in recipients:
        try:
            await client.rcpt(recipient)
        except aiosmtplib.SMTPRecipientRefused as exc:
            refused.append(exc)
    if len(refused) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(refused)
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None or protocol.transport is None:
        raise aiosmtplib.SMTPServerDisconnected("connection lost before the mail was sent")
    transport = protocol.transport
    assert isinstance(transport, asyncio.WriteTransport)
    for piece in data_slices(data):
        protocol.write(piece)
        while transport.get_write_buffer_size() > DATA_SLICE_BYTES and not transport.is_closing():
            await asyncio.sleep(0.001)
    protocol.write(b".\r\n")
    answer = await protocol.read_response(timeout=client.timeout)
    if answer.code != 250:
        raise aiosmtplib.SMTPDataError(answer.code, answer.message)
    return {exc.recipient: aiosmtplib.SMTPResponse(exc.code, exc.message) for exc in refused}


async def _quit(client: aiosmtplib.SMTP | None) -> None:
    if client is not None and client.is_connected:
        try:
            await client.quit()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            client.close()


def file_name(row_id: int, kind: str, recipients: list[str]) -> str:
    recipient = re.sub(r"[^A-Za-z0-9@._-]", "_", (recipients or ["nobody"])[0])
    return f"{row_id:06d}-{kind}-{recipient}"


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


class SentJournal:
    """The rows a sender has had accepted by the relay but may not have recorded as sent
    yet: a line per mail, written the moment the relay answers 250 (in the kernel's hands
    from then on, so a killed process keeps it) and synced to disk before the database
    write, which can wait its turn behind the intake's transaction. Emptied when those
    writes are committed; removed when the sender closes. If the sender dies, whoever
    releases its claims reads its journal first and records the rows listed there as sent
    instead of sending them again: a kill repeats a mail only in the instant between the
    250 and the line (microseconds for a sender in a process of its own; up to a few
    milliseconds in one process, while the intake's thread holds the interpreter before
    the sender's turn). One file per sender, named after its process
    (`<pid>-<start>-<n>.ids`) in `<database>-sent/` beside an SQLite file."""

    def __init__(self, folder: Path | None, identity: str) -> None:
        self.folder = folder
        _, pid, start = _claimant(identity)
        self.path = folder / f"{pid}-{start}-{id(self):x}.ids" if folder else None
        self._fd: int | None = None
        self._opening = threading.Lock()

    def record(self, row_id: int) -> None:
        if self.path is None:
            return
        with self._opening:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, f"{row_id}\n".encode())  # one short O_APPEND write: whole or not

    def sync(self) -> None:
        """On disk, not only in the kernel: for a power cut, not only a kill."""
        if self._fd is not None:
            os.fsync(self._fd)

    def clear(self) -> None:
        """Every recorded row's "sent" is committed: forget them."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self, *, remove: bool = True) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None and remove:
            self.path.unlink(missing_ok=True)

    def files_of(self, owner: str, here: str) -> list[Path]:
        """The journals of the process that made claim `owner` (`host:pid:start:batch`), if
        it ran on this host (`here`): another host's journal is on that host."""
        host, pid, start = _claimant(owner)
        if host != here or self.folder is None or not self.folder.is_dir() or not pid.isdigit():
            return []
        return sorted(self.folder.glob(f"{pid}-{start}-*.ids"))

    def dead_files(self) -> list[Path]:
        """Journals left by processes of this host that no longer run."""
        if self.folder is None or not self.folder.is_dir():
            return []
        dead = []
        for path in self.folder.glob("*.ids"):
            pid, _, rest = path.stem.partition("-")
            start = rest.rsplit("-", 1)[0]
            if pid.isdigit() and _start_ticks(int(pid)) != start:
                dead.append(path)
        return dead


def _listed(paths: list[Path]) -> set[int]:
    ids: set[int] = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            ids.update(int(line) for line in path.read_text().split() if line.isdigit())
    return ids


def _claimant(claimed_by: str) -> tuple[str, str, str]:
    """(host, pid, start) of the process that made a claim (`host:pid:start[:batch]`)."""
    host, _, rest = claimed_by.partition(":")
    pid, _, start = rest.partition(":")
    return host, pid, start.split(":", 1)[0]


def _claim_is_dead(claimed_by: str, here: str) -> bool:
    """Whether a claim was made by a process on this host that no longer runs."""
    host, pid, start = _claimant(claimed_by)
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
        on_failed: OnFailed | None = None,
        lanes: int = 1,
    ) -> None:
        """`on_failed(session, failed)` runs in the transaction that marks a row failed;
        `lanes` is how many mails may be in flight at once."""
        self.lanes = lanes
        self.store = store
        self.outbox = Outbox(store)
        self.transport = transport
        self.retry = retry
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_failed = on_failed
        self.identity = process_identity()
        self._batches = 0
        self.journal = SentJournal(store.beside("-sent"), self.identity)
        self._swept = False
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
        if not self.outbox.any_claimed():
            if not self._swept:  # once: journals of dead senders whose rows are all settled
                for path in self.journal.dead_files():
                    path.unlink(missing_ok=True)
                self._swept = True
            return 0  # the usual case, answered without taking the write lock

        def delivered_by(owners: set[str]) -> set[int]:
            return _listed(
                [path for owner in owners for path in self.journal.files_of(owner, here)]
            )

        released = self.outbox.release_stale(
            self.clock(), lambda owner: _claim_is_dead(owner, here), delivered_by
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
        self._batches += 1
        token = f"{self.identity}:{self._batches}"
        return self.outbox.claim_due(token, self.clock(), self.LEASE, limit)

    def next_wakeup(self) -> datetime | None:
        return self.outbox.next_wakeup()

    async def deliver_due(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Send every row that is due now, up to `lanes` at once; return how many were sent.
        A case's mails go down one lane in order, and stop at the first that fails."""
        await self._marks_committed()  # any left by a failed write of the last pass
        await asyncio.to_thread(self.release_stale_claims)
        claimed = await asyncio.to_thread(self.claim_due)
        by_case: dict[object, list[int]] = {}
        for row_id, case_id in claimed:
            by_case.setdefault(case_id if case_id is not None else ("row", row_id), []).append(
                row_id
            )
        queue = list(by_case.values())
        sent = 0
        one_large_mail = asyncio.Lock()
        # One read for the batch (small mails with their bytes) instead of one per mail.
        rows = self.outbox.read_rows([row_id for row_id, _ in claimed])

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
        `LARGE_MAIL_BYTES` are read and sent one at a time (under `one_large_mail` and the
        store's large-mail turn): each costs a few copies of itself on the way out."""
        row = row or self.outbox.read_rows([row_id]).get(row_id)
        if row is None or row.delivery != "sending":
            return False
        large = is_large(row.size)
        async with (
            one_large_mail if large and one_large_mail else contextlib.nullcontext(),
            self._large_mail_turn() if large else contextlib.nullcontext(),
        ):
            raw = row.raw if row.raw is not None else self.store.read_raw(row_id)
            try:
                await self.transport.send(
                    row.sender,
                    list(row.recipients),
                    raw,
                    file_name(row_id, row.kind, row.recipients),
                )
                # Before anything else: from here a kill no longer repeats the mail.
                self.journal.record(row_id)
            except TemporaryFailure as exc:
                await asyncio.to_thread(self._retry_later, row_id, str(exc))
                return False
            except PermanentFailure as exc:
                await asyncio.to_thread(self._fail, row_id, str(exc))
                return False
            finally:
                del raw
        self._unmarked.append((row_id, self.clock()))
        self._start_marking()
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
