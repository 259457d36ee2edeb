"""SMTP intake: the built-in listener (aiosmtpd), on the daemon's own event loop.

It answers 250 only after the mail's outcome is committed (and says nothing of that
outcome), 451 (the client retries) when it cannot commit, so accepting a mail always
means it is stored, and 552 to a mail over `intake.max_message_bytes`, which it does
not keep. A thin adapter:
what it does with a mail is `hooks.ingest`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from mailrouter.config import IntakeSettings
from mailrouter.model import IntakeHooks, Result

log = logging.getLogger(__name__)


class SmtpIntake:
    """aiosmtpd handler: the built-in intake listener."""

    def __init__(
        self,
        hooks: IntakeHooks,
        address: str,
        on_committed: Callable[[], None],
        lmtp: bool = False,
    ) -> None:
        self.hooks = hooks
        self.address = address.lower()
        self.on_committed = on_committed
        self.lmtp = lmtp

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() != self.address:
            return f"550 5.1.1 <{address}>: this server only accepts mail for <{self.address}>"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        try:
            await asyncio.to_thread(self._process, raw)
        except Exception as exc:
            log.warning(
                "could not store an incoming mail (%s: %s); asking the client to retry",
                type(exc).__name__,
                exc,
            )
            return "451 4.3.0 Temporary failure storing the message, try again later"
        self.on_committed()
        # Nothing about what became of it: the sender may be anybody, and the outcome
        # (a stranger's mail quarantined, say) is not theirs to learn.
        queued = f"250 2.0.0 Ok: queued as {hashlib.sha256(raw).hexdigest()[:12]}"
        if self.lmtp:
            # LMTP answers DATA once per accepted recipient (RFC 2033): the one commit
            # stands for each of them.
            return "\r\n".join([queued] * max(1, len(envelope.rcpt_tos)))
        return queued

    def _process(self, raw: bytes) -> Result:
        with self.hooks.large_mail(len(raw)):
            return self.hooks.ingest(raw, None, None)


async def start_smtp_server(
    settings: IntakeSettings, hooks: IntakeHooks, on_committed: Callable[[], None]
) -> asyncio.Server:
    """The listener on `settings.listen` (host:port, or a unix socket), speaking SMTP or,
    with `source: lmtp`, LMTP; serving on the running loop."""
    lmtp = settings.source == "lmtp"
    handler = SmtpIntake(hooks, settings.address, on_committed, lmtp=lmtp)
    protocol = LMTP if lmtp else SMTP

    def serve() -> SMTP:
        return protocol(
            handler,
            hostname=settings.domain,
            # Beyond the limit the listener keeps nothing and answers 552: the sending server
            # tells its user, and a stranger cannot make us store 45 MB.
            data_size_limit=settings.max_message_bytes,
            enable_SMTPUTF8=True,
        )

    loop = asyncio.get_running_loop()
    if settings.listen.socket:
        path = Path(settings.listen.socket)
        if path.is_socket():
            path.unlink()  # left by a daemon that stopped without cleaning up
        server = await loop.create_unix_server(serve, str(path))
        path.chmod(0o660)  # the MTA's group may write to it, nobody else
        return server
    return await loop.create_server(serve, settings.listen.host, settings.listen.port)
