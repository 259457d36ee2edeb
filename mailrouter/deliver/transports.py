"""Transports: how a mail leaves — a folder of .eml files, or an SMTP relay (aiosmtplib).

A transport sends one mail exactly as it was committed, and says how it failed: 4xx and
connection errors are `TemporaryFailure` (the sender retries with backoff), 5xx is
`PermanentFailure`. A new transport is a new class here with `send` and `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mailrouter.config import Config, SmtpSettings, tls_context

# Try again later (4xx, connection refused, timeout): the model's, which the daemon's
# loops also know (the database away is one too).
from mailrouter.model import TemporaryFailure, is_large
from mailrouter.oauth2 import TokenError, TokenSource

log = logging.getLogger(__name__)

# TemporaryFailure, "try again later" (4xx, connection refused, timeout), is the model's:
# the daemon's loops know it too (the database away is one).
__all__ = ["Mail", "PermanentFailure", "StoredMail", "TemporaryFailure", "Transport"]


class PermanentFailure(Exception):
    """Never try again (5xx)."""


@dataclass(frozen=True)
class StoredMail:
    """A large mail left in the store and read a slice at a time as it goes out, so that a
    sender never holds it whole: `read(offset, length)` gives its bytes (a blocking read,
    run in a thread), `size` how many there are."""

    size: int
    read: Callable[[int, int], bytes]

    async def slices(self, size: int) -> AsyncIterator[bytes]:
        """Its bytes, `size` at a time, in order."""
        for offset in range(0, self.size, size):
            yield await asyncio.to_thread(self.read, offset, size)

    async def whole(self) -> bytes:
        return b"".join([piece async for piece in self.slices(DATA_SLICE_BYTES)])


# What a transport is given: a mail's bytes, or a large one still in the store.
Mail = bytes | StoredMail


class Transport(Protocol):
    async def send(self, sender: str, recipients: list[str], data: Mail, name: str) -> None: ...

    async def close(self) -> None: ...


class FileTransport:
    """Writes each mail as `<dir>/<name>.eml`; rewriting the same row gives the same file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, sender: str, recipients: list[str], data: Mail, name: str) -> None:
        target = self.directory / f"{name}.eml"
        partial = target.with_suffix(".eml.part")
        envelope = f"X-Envelope-From: {sender}\r\nX-Envelope-To: {', '.join(recipients)}\r\n"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed, so a reader never sees half a mail.
            with partial.open("wb") as out:
                out.write(envelope.encode("utf-8", "replace"))
                if isinstance(data, bytes):
                    out.write(data)
                else:
                    async for piece in data.slices(DATA_SLICE_BYTES):
                        out.write(piece)
            os.replace(partial, target)
        except OSError as exc:  # a full disk or a folder we may not write: fixed, it goes
            raise TemporaryFailure(f"cannot write {target}: {exc.strerror or exc}") from exc

    async def close(self) -> None:
        return None


class SmtpTransport:
    """Kept-open aiosmtplib connections to the relay, one per mail in flight (at most
    `connections`, as the sender never has more in flight); a connection that errs is closed."""

    def __init__(self, settings: SmtpSettings, tokens: TokenSource | None = None) -> None:
        self.settings = settings
        self._idle: list[aiosmtplib.SMTP] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.tokens = tokens or (
            TokenSource(settings.oauth2, settings.username, settings.ca_file)
            if settings.oauth2 is not None
            else None
        )

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
        try:
            # aiosmtplib closes a connection that fails before it is made, not one whose
            # STARTTLS fails (an untrusted certificate): that one is ours to close.
            await client.connect()
            if self.tokens is not None:
                await self._oauth2_login(client)
            elif s.username:
                await client.login(s.username, s.password)
        except BaseException:
            # Not handed out, so nobody else would close it (`send` only quits a client
            # `_checkout` returned). Aborted rather than closed: closing a TLS connection
            # waits for the relay's close_notify, which a loop that ends next (a one-shot
            # pass) never receives, leaving the socket open.
            if isinstance(client.transport, asyncio.Transport):
                client.transport.abort()
            client.close()
            # A transport that is closing finishes on the loop's next turns; a one-shot
            # command's loop may end right after this (a failed STARTTLS left the plain
            # one half-closed): let it finish here.
            with contextlib.suppress(BaseException):
                for _ in range(3):
                    await asyncio.sleep(0)
            raise
        return client

    async def _oauth2_login(self, client: aiosmtplib.SMTP) -> None:
        """AUTH XOAUTH2; a refused token is replaced once (revoked or rotated early)."""
        assert self.tokens is not None
        token = await asyncio.to_thread(self.tokens.token)
        try:
            await client.auth_xoauth2(self.settings.username, token)
        except aiosmtplib.SMTPAuthenticationError:
            self.tokens.refused(token)
            token = await asyncio.to_thread(self.tokens.token)
            await client.auth_xoauth2(self.settings.username, token)

    async def check(self) -> str:
        """Connect and log in as for a mail, send nothing: one line saying how it went
        (`mailrouter check-connection`). Raises what a failed connection or login raises."""
        s = self.settings
        client = await self._connect()
        try:
            transport = client.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            tls = ssl_object.version() if ssl_object is not None else "no TLS"
        finally:
            await _quit(client)
        mechanism = "XOAUTH2" if self.tokens else "AUTH" if s.username else "no login"
        who = f" as {s.username}" if s.username else ""
        return f"SMTP {s.host}:{s.port}: {tls}, {mechanism}{who}: ok"

    async def _checkout(self) -> aiosmtplib.SMTP:
        if self._loop is not asyncio.get_running_loop():
            # A connection belongs to the loop that opened it (one-shot commands run several).
            self._idle, self._loop = [], asyncio.get_running_loop()
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        return await self._connect()

    async def send(self, sender: str, recipients: list[str], data: Mail, name: str) -> None:
        client: aiosmtplib.SMTP | None = None
        # An address with a non-ASCII local part goes only to a relay that offers SMTPUTF8
        # (RFC 6531); to any other it cannot be written, and no retry changes that.
        utf8 = not all(address.isascii() for address in [sender, *recipients])
        try:
            client = await self._checkout()
            if not isinstance(data, bytes) or is_large(len(data)):
                errors = await _send_in_slices(client, sender, recipients, data, utf8)
            else:
                options = ["SMTPUTF8"] if utf8 else []
                errors, _ = await client.sendmail(sender, recipients, data, mail_options=options)
        except aiosmtplib.SMTPNotSupported as exc:
            if not utf8 or client is None:  # STARTTLS or AUTH missing: the relay's setup
                await _quit(client)
                raise TemporaryFailure(f"relay: {exc}") from exc
            self._idle.append(client)  # refused before MAIL FROM: the connection is clean
            raise PermanentFailure(
                "a non-ASCII address, and the relay does not offer SMTPUTF8"
            ) from exc
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
        except TemporaryFailure:
            # The store could not give the rest of a stored mail: the DATA is cut short, and
            # so is the connection (a relay discards a mail that ends without its dot).
            if client is not None:
                client.close()
            raise
        except TokenError as exc:
            # No token for the relay: the identity provider's or our configuration, not
            # this mail's fault; the mail waits and is tried again.
            raise TemporaryFailure(f"no OAuth2 token for the relay: {exc}") from exc
        self._idle.append(client)
        if errors:
            # The relay took the mail for the other recipients (a lead beside the agent):
            # it is sent; sending it again would repeat it to them.
            detail = "; ".join(
                f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in errors.items()
            )
            log.warning("%s: sent, but these recipients were refused: %s", name, detail)

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
        yield _on_the_wire(data[start:end])
        start = end


def _on_the_wire(lines: bytes) -> bytes:
    """Whole lines of a mail as they go after DATA (only the last may lack its line end)."""
    piece = _LEADING_DOT.sub(b"..", _LINE_END.sub(b"\r\n", lines))
    return piece if piece.endswith(b"\r\n") else piece + b"\r\n"


async def whole_lines(mail: StoredMail, size: int = DATA_SLICE_BYTES) -> AsyncIterator[bytes]:
    """A stored mail's bytes in pieces of about `size` that end at a line end (the last
    piece as the mail ends), so that each piece can be put on the wire alone: a CR LF is
    never split, and each piece begins a line. A mail without line ends is one piece."""
    rest = b""
    async for read in mail.slices(size):
        pending = rest + read
        cut = pending.rfind(b"\n") + 1 or _after_lone_cr(pending)
        if cut:
            yield pending[:cut]
        rest = pending[cut:]
    if rest:
        yield rest


def _after_lone_cr(data: bytes) -> int:
    """Just after the last CR that ends a line in `data` (one followed by another byte,
    not LF), or 0."""
    cr = data.rfind(b"\r", 0, len(data) - 1)
    return cr + 1 if cr >= 0 else 0


async def wire_pieces(data: Mail) -> AsyncIterator[bytes]:
    """`data` as it goes on the wire after DATA, a slice at a time."""
    if isinstance(data, bytes):
        for piece in data_slices(data):
            yield piece
        return
    async for lines in whole_lines(data):
        yield _on_the_wire(lines)


async def wire_size(data: Mail) -> int:
    """How many bytes `wire_pieces(data)` gives, counted without preparing them (a stored
    mail is read once for this: the SIZE announced before its DATA)."""
    if isinstance(data, bytes):
        return data_size(data)
    return sum([data_size(lines) async for lines in whole_lines(data)])


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
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: Mail, utf8: bool
) -> dict[str, aiosmtplib.SMTPResponse]:
    """`sendmail` for a large mail. aiosmtplib prepares the whole mail at once (twice
    when the relay announces SIZE), which costs about five times the mail in memory;
    here the DATA is prepared and written a slice at a time, waiting for the socket
    to take each one (and a stored mail is read from the store a slice at a time)."""
    if client.is_ehlo_or_helo_needed:
        await client.ehlo()
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={await wire_size(data)}")
    if utf8:
        if not client.supports_extension("smtputf8"):
            raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
        options.append("SMTPUTF8")
    encoding = "utf-8" if utf8 else "ascii"
    await client.mail(sender, options=options, encoding=encoding)
    refused = []
    for recipient in recipients:
        try:
            await client.rcpt(recipient, encoding=encoding)
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
    async for piece in wire_pieces(data):
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


def make_transport(config: Config) -> Transport:
    outbound = config.settings.outbound
    if outbound.transport == "smtp":
        return SmtpTransport(outbound.smtp)
    return FileTransport(config.outbox_dir)


def outbound_lanes(config: Config) -> int:
    """Mails in flight at once: one per relay connection; a folder is written one at a time."""
    outbound = config.settings.outbound
    return outbound.smtp.connections if outbound.transport == "smtp" else 1
