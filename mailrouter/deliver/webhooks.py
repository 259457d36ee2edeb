"""Posts to chat channels and webhooks (`notify:`): the transport of the outbox rows of kind
`notify`. A row names its target; the URL is read from the configuration of the moment,
never stored, never logged (a Slack or Teams webhook URL is all it takes to post).

A connection error, a timeout, 429 or a 5xx answer is `TemporaryFailure` (retried with the
outbox's backoff); any other answer outside 2xx is `PermanentFailure`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mailrouter.config import NotifyTarget
from mailrouter.deliver.transports import Mail, PermanentFailure, TemporaryFailure

if TYPE_CHECKING:
    import requests

ANSWER_BYTES = 4096  # of a refusal's body, kept for the row's last_error


class WebhookTransport:
    def __init__(self, targets: Callable[[], Sequence[NotifyTarget]]) -> None:
        """`targets`: the configured ones, asked at each post (a reload may change them)."""
        self.targets = targets
        # Made at the first post: requests and what it loads weigh several MB, which a
        # daemon whose targets never post (or that has none) need not carry.
        self._session: requests.Session | None = None

    async def send(self, sender: str, recipients: list[str], data: Mail, name: str) -> None:
        (target_name,) = recipients
        target = next((t for t in self.targets() if t.name == target_name), None)
        if target is None:
            raise PermanentFailure(f"no notify target named {target_name!r} in the configuration")
        body = data if isinstance(data, bytes) else await data.whole()  # posts are small
        await asyncio.to_thread(self._post, target, body)

    def _post(self, target: NotifyTarget, data: bytes) -> None:
        import requests

        where = f"{target.kind} target {target.name!r}"
        if self._session is None:
            self._session = requests.Session()
        try:
            # Streamed: of the answer's body only its first ANSWER_BYTES are read (an
            # endpoint is a stranger's server as far as its answers go).
            with self._session.post(
                target.url,
                data=data,
                headers={"Content-Type": "application/json; charset=utf-8"},
                timeout=target.timeout,
                allow_redirects=False,
                stream=True,
            ) as answer:
                status = answer.status_code
                body = b"" if 200 <= status < 300 else answer.raw.read(ANSWER_BYTES)
        except requests.RequestException as exc:
            # The exception's text may hold the URL: only its kind is told.
            raise TemporaryFailure(f"{where}: {type(exc).__name__}") from None
        if 200 <= status < 300:
            return
        said = " ".join(body.decode("utf-8", "replace").split())[:200]
        failure = f"{where}: HTTP {status} {said}".rstrip()
        if status == 429 or status >= 500:
            raise TemporaryFailure(failure)
        raise PermanentFailure(failure)

    async def close(self) -> None:
        if self._session is not None:
            self._session.close()
