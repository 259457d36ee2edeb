"""IMAP intake: an imapclient poller for a shared mailbox. A thin adapter, no decisions.

Each message is handed to `hooks.ingest` and committed, and only then moved to the
processed (or quarantine) folder; a message whose UID is already known (`hooks.known`)
is just moved. It waits with IDLE where the server offers it, else polls; while mail
keeps coming it looks again every 50 ms instead of waiting.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from mailrouter.config import ImapSettings, tls_context
from mailrouter.model import ImapSource, IntakeHooks, Result, TemporaryFailure
from mailrouter.oauth2 import TokenError, TokenSource

log = logging.getLogger(__name__)

IDLE_REISSUE_SECONDS = 29 * 60  # RFC 2177: servers may drop an IDLE older than 30 minutes
# While mail keeps coming, look again every BUSY_POLL_INTERVAL rather than IDLE: servers
# hold IDLE notifications back (Dovecot by about 0.5 s) to batch them, which would be
# added to every mail of a steady stream. After BUSY_POLL_SECONDS without new mail, IDLE.
BUSY_POLL_INTERVAL = 0.05
BUSY_POLL_SECONDS = 2.0
FETCH_BATCH = 50
# Bodies are fetched in groups of at most this many bytes (a bigger mail alone), so a
# backlog of mails with large attachments is never all in memory at once.
FETCH_BYTES = 4 * 1024 * 1024
# Small mails fetched together are committed together, this many at a time: one transaction
# and one write to disk for them all (`IntakeHooks.ingest_group`). More would hold the
# database's writer turn, which the sender's claims and marks wait for, for longer.
COMMIT_GROUP = 16


class ImapIntake:
    """Polls one IMAP folder; `run_pass` is one complete sweep of it."""

    def __init__(
        self,
        settings: ImapSettings,
        hooks: IntakeHooks,
        on_committed: Callable[[], None] = lambda: None,
        stop: threading.Event | None = None,
        tokens: TokenSource | None = None,
        on_state: Callable[[bool], None] = lambda connected: None,
    ) -> None:
        """`on_state(connected)`: called on each login to the mailbox (True) and each loss of
        the connection, or the end of the intake (False)."""
        self.settings = settings
        self.hooks = hooks
        self.on_committed = on_committed
        self.on_state = on_state
        self.stop = stop or threading.Event()
        s = settings
        self.mailbox = f"imap://{s.username}@{s.host}:{s.port}/{s.folder}"
        # One token source for every connection (IDLE, reconnects): a token is fetched once
        # an hour, not once a login.
        self.tokens = tokens or (
            TokenSource(s.oauth2, s.username, s.ca_file) if s.oauth2 is not None else None
        )

    def check(self) -> str:
        """Log in and look at the folders the intake uses, creating none: one line saying
        what was found (`mailrouter check-connection`). Raises what a failed login raises."""
        s = self.settings
        client = self.connect(create_folders=False)
        try:
            sock = client.socket()
            tls = sock.version() if isinstance(sock, ssl.SSLSocket) else "no TLS"
            folders = [
                f"{name} {'ok' if client.folder_exists(name) else 'missing (created at start)'}"
                for name in (s.folder, s.processed_folder, s.quarantine_folder)
            ]
        finally:
            _logout(client)
        mechanism = "XOAUTH2" if self.tokens is not None else "LOGIN"
        return f"IMAP {s.host}:{s.port}: {tls}, {mechanism} as {s.username}: ok; " + ", ".join(
            folders
        )

    def connect(self, create_folders: bool = True) -> IMAPClient:
        s = self.settings
        context = tls_context(s.ca_file) if s.security != "none" else None
        client = IMAPClient(
            s.host, port=s.port, ssl=s.security == "tls", ssl_context=context, timeout=s.timeout
        )
        try:
            if s.security == "starttls":
                client.starttls(context)
            if self.tokens is not None:
                self._oauth2_login(client)
            else:
                client.login(s.username, s.password)
            for folder in (s.processed_folder, s.quarantine_folder) if create_folders else ():
                if not client.folder_exists(folder):
                    client.create_folder(folder)
        except BaseException:
            # Refused, or cut off before the folders were ready: nobody else will close it.
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    def _oauth2_login(self, client: IMAPClient) -> None:
        """AUTHENTICATE XOAUTH2; a refused token is replaced once (it may have been revoked
        or rotated before it ran out), a second refusal is the account's."""
        assert self.tokens is not None
        token = self.tokens.token()
        try:
            client.oauth2_login(self.settings.username, token)
        except LoginError:
            self.tokens.refused(token)
            client.oauth2_login(self.settings.username, self.tokens.token())

    def _folder_for(self, result: Result) -> str:
        if result.outcome == "quarantined":
            return self.settings.quarantine_folder
        return self.settings.processed_folder

    def _move(self, client: IMAPClient, uids: list[int], folder: str) -> None:
        if not uids:
            return
        if client.has_capability("MOVE"):
            client.move(uids, folder)
        else:
            client.copy(uids, folder)
            client.delete_messages(uids)
            if client.has_capability("UIDPLUS"):
                client.uid_expunge(uids)
            else:
                client.expunge()

    def run_pass(self, client: IMAPClient) -> int:
        """Process every message in the folder; return how many were new."""
        info = client.select_folder(self.settings.folder)
        uidvalidity = int(info[b"UIDVALIDITY"])
        uids = sorted(client.search(["NOT", "DELETED"]))
        processed = 0
        for start in range(0, len(uids), FETCH_BATCH):
            if self.stop.is_set():
                break
            batch = uids[start : start + FETCH_BATCH]
            destinations: dict[str, list[int]] = {}
            known = self.hooks.known(self.mailbox, uidvalidity, batch)
            unknown = [uid for uid in batch if uid not in known]
            # Committed before a crash, not yet moved: finish the move only. Claimed first,
            # as new mail is: when a daemon dies, every other daemon sees its mails left
            # behind, and two moving one mail at once can both copy it.
            left = [uid for uid in batch if uid in known and not known[uid].in_other_hands]
            left = self._still_here(client, self.hooks.claim(self.mailbox, uidvalidity, left))
            for uid in left:
                destinations.setdefault(self._folder_for(known[uid]), []).append(uid)
            # Another daemon on the same database may be processing some of them.
            unknown = self.hooks.claim(self.mailbox, uidvalidity, unknown)
            claims = _Claims(self, uidvalidity, [*left, *unknown])
            for uid, result in self._process_new(client, uidvalidity, unknown, claims.still_ours):
                if result.in_other_hands:
                    continue
                if not result.duplicate:
                    processed += 1
                self.on_committed()
                destinations.setdefault(self._folder_for(result), []).append(uid)
            for folder, moved in destinations.items():
                self._move(client, claims.still_ours(moved), folder)
            self.hooks.release(self.mailbox, uidvalidity, sorted(claims.ours))
        return processed

    def _still_here(self, client: IMAPClient, uids: list[int]) -> list[int]:
        """Those of `uids` still in the folder as the server has it now: another session may
        have moved them since our SEARCH (a daemon that died mid-MOVE, whose claims we
        took over), and this session hears of that only at its next NOOP."""
        if not uids:
            return []
        client.noop()
        present = set(client.search(["UID", ",".join(str(uid) for uid in uids)]))
        return [uid for uid in uids if uid in present]

    def _process_new(
        self,
        client: IMAPClient,
        uidvalidity: int,
        uids: list[int],
        still_ours: Callable[[list[int]], list[int]],
    ) -> Iterator[tuple[int, Result]]:
        """Fetch and commit each of `uids`, small mails a size-bounded group at a time, a
        large one alone, in slices, and within the store's turn for large mails; of a mail
        over `intake.max_message_bytes`, only the header. Only those `still_ours` says are
        ours when their turn comes."""
        if not uids:
            return
        sizes = {
            uid: int(data.get(b"RFC822.SIZE", 0))
            for uid, data in client.fetch(uids, ["RFC822.SIZE"]).items()
        }
        limit = self.hooks.max_bytes
        # A group never adds up to more than the limit, so a mail over it is a group alone.
        for group in _size_groups(sizes, min(FETCH_BYTES, limit)):
            if self.stop.is_set():
                return
            group = still_ours(group)
            if not group:
                continue
            size = sum(sizes[uid] for uid in group)
            if size > limit:
                # Over the limit: only the header is fetched, enough to quarantine it with
                # the reason and tell the agent; the mail itself moves to quarantine whole.
                (uid,) = group
                header = _fetch_header(client, uid)
                if header is not None:
                    source = ImapSource(self.mailbox, uidvalidity, uid)
                    yield uid, self.hooks.ingest(header, source, size)
                continue
            with self.hooks.large_mail(size):
                if size > FETCH_BYTES:
                    (uid,) = group
                    bodies = {uid: _fetch_in_slices(client, uid)}
                else:
                    bodies = {
                        uid: data.get(b"BODY[]")
                        for uid, data in client.fetch(group, ["BODY.PEEK[]"]).items()
                    }
                for chunk in _chunks(group, 1 if size > FETCH_BYTES else COMMIT_GROUP):
                    if self.stop.is_set():
                        return
                    # Those still there (another session may have expunged some meanwhile),
                    # handed over: not kept while the next group is fetched.
                    mails = [
                        (raw, ImapSource(self.mailbox, uidvalidity, uid))
                        for uid in still_ours(chunk)
                        if (raw := bodies.pop(uid, None)) is not None
                    ]
                    yield from zip([m[1].uid for m in mails], self._ingest(mails), strict=True)
                    del mails

    def _ingest(self, mails: list[tuple[bytes, ImapSource]]) -> list[Result]:
        if len(mails) > 1 and self.hooks.ingest_group is not None:
            return self.hooks.ingest_group(mails)
        return [self.hooks.ingest(raw, source, None) for raw, source in mails]

    def _wait_for_mail(self, client: IMAPClient) -> None:
        """Block until new mail may be there, the poll interval passes, or we are stopped."""
        interval = self.settings.poll_interval
        if not client.has_capability("IDLE"):
            self.stop.wait(interval)
            return
        client.idle()
        try:
            deadline = time.monotonic() + min(IDLE_REISSUE_SECONDS, max(interval, 1.0))
            while not self.stop.is_set() and time.monotonic() < deadline:
                responses = client.idle_check(timeout=0.5)
                if any(_is_exists(r) for r in responses):
                    return
        finally:
            client.idle_done()

    def run_forever(self) -> None:
        """Connect, sweep, wait, repeat; on any server trouble reconnect with backoff."""
        delay = 1.0
        state = "starting"
        client: IMAPClient | None = None
        last_new_mail: float | None = None
        while not self.stop.is_set():
            try:
                if client is None:
                    client = self.connect()
                    self.on_state(True)
                    if state != "connected":
                        log.info("IMAP connected to %s", self.mailbox)
                    state, delay = "connected", 1.0
                if self.run_pass(client):
                    last_new_mail = time.monotonic()
                if self.stop.is_set():
                    break
                if keep_polling(last_new_mail, time.monotonic()):
                    self.stop.wait(BUSY_POLL_INTERVAL)
                else:
                    self._wait_for_mail(client)
            except Exception as exc:
                # Server down, connection lost, login refused, or the database busy: all
                # are waited out with backoff; log once per change of state, not per try.
                if state != f"error:{type(exc).__name__}":
                    level = logging.WARNING if _is_network(exc) else logging.ERROR
                    log.log(
                        level,
                        "IMAP %s: %s: %s; retrying with backoff",
                        self.mailbox,
                        type(exc).__name__,
                        exc,
                        exc_info=not _is_network(exc),
                    )
                    state = f"error:{type(exc).__name__}"
                _logout(client)
                client = None
                self.on_state(False)
                self.stop.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max)
        _logout(client)
        self.on_state(False)


def keep_polling(last_new_mail: float | None, now: float) -> bool:
    """Poll again soon rather than IDLE: new mail came in the last BUSY_POLL_SECONDS."""
    return last_new_mail is not None and now - last_new_mail < BUSY_POLL_SECONDS


def _chunks(uids: list[int], size: int) -> list[list[int]]:
    return [uids[start : start + size] for start in range(0, len(uids), size)]


class _Claims:
    """The claims of one batch, kept while it is worked on. A claim runs out after
    `hooks.claim_seconds`, and a batch of large mails can take longer: past half of that,
    the next step renews them all first, and leaves alone those another daemon took once
    ours had run out (it processes and moves them; two sessions moving one mail at once
    can both copy it)."""

    def __init__(self, intake: ImapIntake, uidvalidity: int, uids: list[int]) -> None:
        self.intake, self.uidvalidity = intake, uidvalidity
        self.ours = set(uids)
        self.since = time.monotonic()

    def still_ours(self, uids: list[int]) -> list[int]:
        hooks = self.intake.hooks
        if time.monotonic() - self.since >= hooks.claim_seconds / 2:
            self.since = time.monotonic()  # the renewed claims run from before the call
            renewed = hooks.claim(self.intake.mailbox, self.uidvalidity, sorted(self.ours))
            self.ours = set(renewed)
        return [uid for uid in uids if uid in self.ours]


def _size_groups(sizes: dict[int, int], budget: int) -> list[list[int]]:
    """UIDs in order, grouped so that each group's sizes add up to at most `budget`."""
    groups: list[list[int]] = []
    total = budget
    for uid in sorted(sizes):
        if total + sizes[uid] > budget:
            groups.append([])
            total = 0
        groups[-1].append(uid)
        total += sizes[uid]
    return groups


def _fetch_header(client: IMAPClient, uid: int) -> bytes | None:
    data = client.fetch([uid], ["BODY.PEEK[HEADER]"]).get(uid)
    return None if data is None else bytes(data.get(b"BODY[HEADER]", b""))


def _fetch_in_slices(client: IMAPClient, uid: int) -> bytes | None:
    """One large mail, fetched FETCH_BYTES at a time: a whole FETCH of it holds about three
    copies at its peak, this about two."""
    body = bytearray()
    while True:
        offset = len(body)
        data = client.fetch([uid], [f"BODY.PEEK[]<{offset}.{FETCH_BYTES}>"]).get(uid)
        if data is None:  # expunged meanwhile
            return None
        piece = data.get(f"BODY[]<{offset}>".encode(), b"")
        body += piece
        if len(piece) < FETCH_BYTES:
            return bytes(body)


def _is_network(exc: BaseException) -> bool:
    """A server or the database out of reach: a line in the log, not a traceback."""
    return isinstance(
        exc, (IMAPClientError, OSError, socket.timeout, ssl.SSLError, TokenError, TemporaryFailure)
    )


def _is_exists(response: Iterable[Any] | Any) -> bool:
    return (
        isinstance(response, tuple) and len(response) >= 2 and response[1] in (b"EXISTS", b"RECENT")
    )


def _logout(client: IMAPClient | None) -> None:
    if client is None:
        return
    try:
        client.logout()
    except Exception:  # the connection is already gone; nothing to save
        with contextlib.suppress(Exception):
            client.shutdown()
