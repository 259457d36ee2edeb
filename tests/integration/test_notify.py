"""Notifications through the outbox to a real HTTP server on 127.0.0.1: down first, then
up, the post arrives once; a server error is retried, a refusal fails the post alone; mail
is never held up by a chat that is down; and the daemon posts what it decides."""

from __future__ import annotations

import asyncio
import json
import smtplib
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mailrouter.config import load_config
from mailrouter.core.notify import NOTIFY_KIND
from mailrouter.deliver.sender import Sender
from mailrouter.deliver.transports import FileTransport
from mailrouter.deliver.webhooks import WebhookTransport
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from mailrouter.testing.servers import free_port, wait_until
from tests.conftest import DaemonThread
from tests.unit.test_handle import hibot_escalation

START = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)


class Hook:
    """A webhook endpoint: records each POST; answers from `answers` (then 200)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.answers: list[int] = []
        self.refusal = b"no such hook"  # the body of an answer other than 200
        self.refusals_read_whole = 0  # refusals whose body the client took to its end
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = hook.answers.pop(0) if hook.answers else 200
                if code == 200:
                    hook.posts.append((self.headers["Content-Type"], json.loads(body)))
                self.send_response(code)
                self.end_headers()
                try:
                    self.wfile.write(b"ok" if code == 200 else hook.refusal)
                    self.wfile.flush()
                except OSError:  # the client hung up before the end
                    return
                if code != 200:
                    hook.refusals_read_whole += 1

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    endpoint = Hook(free_port())  # not listening yet: the endpoint is down
    yield endpoint
    endpoint.stop()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def urgent(client: str = "Clínica Sol") -> bytes:
    return hibot_escalation(client, "usuario1", "URGENTE")


def setup(
    write_config: Callable[..., Path], hook: Hook, clock: Clock
) -> tuple[Pipeline, Sender, Path]:
    config = load_config(
        write_config(
            {
                "notify": [{"kind": "webhook", "url": hook.url, "name": "tablero"}],
                "outbound": {"retry": {"first_delay": 30, "max_delay": 60}},
            }
        )
    )
    store = Store(config.database_url)
    sender = Sender(
        store,
        FileTransport(config.outbox_dir),
        config.settings.outbound.retry,
        clock,
        posts=WebhookTransport(lambda: config.settings.notify),
    )
    return Pipeline(config, store, clock), sender, config.outbox_dir


def deliver(sender: Sender) -> int:
    return asyncio.run(sender.deliver_due())


def test_a_post_to_an_endpoint_down_then_up_arrives_once(
    write_config: Callable[..., Path], hook: Hook
) -> None:
    clock = Clock()
    pipeline, sender, outbox = setup(write_config, hook, clock)
    assert pipeline.process(urgent()).outcome == "routed"
    deliver(sender)  # the endpoint is down
    # The mails left all the same: forward, acknowledgement, the leads' alert.
    assert len(list(outbox.glob("*.eml"))) == 3
    (post,) = [m for m in pipeline.store.outbound() if m.kind == NOTIFY_KIND]
    assert (post.kind, post.delivery, post.attempts) == (NOTIFY_KIND, "pending", 1)
    assert "ConnectionError" in (post.last_error or "") and hook.url not in (post.last_error or "")

    hook.start()
    assert deliver(sender) == 0  # not due yet: backoff
    clock.now += timedelta(minutes=2)
    assert deliver(sender) == 1
    clock.now += timedelta(hours=1)
    assert deliver(sender) == 0
    assert len(hook.posts) == 1
    content_type, body = hook.posts[0]
    assert content_type.startswith("application/json")
    assert body["event"] == "urgent" and body["client"] == "Clínica Sol"
    assert [m.delivery for m in pipeline.store.outbound() if m.kind == NOTIFY_KIND] == ["sent"]


def test_a_server_error_is_retried_and_a_refusal_fails_the_post_alone(
    write_config: Callable[..., Path], hook: Hook
) -> None:
    clock = Clock()
    pipeline, sender, _ = setup(write_config, hook, clock)
    hook.start()
    hook.answers = [503]
    pipeline.process(urgent("Uno"))
    deliver(sender)
    clock.now += timedelta(minutes=2)
    deliver(sender)
    assert [body["client"] for _, body in hook.posts] == ["Uno"]

    hook.answers = [404]
    pipeline.process(urgent("Dos"))
    deliver(sender)
    clock.now += timedelta(hours=2)
    deliver(sender)
    posts = [m for m in pipeline.store.outbound() if m.kind == NOTIFY_KIND]
    assert [m.delivery for m in posts] == ["sent", "failed"]
    assert "HTTP 404 no such hook" in (posts[1].last_error or "")
    # A post that failed is not a mail that failed: the case goes on as it was.
    assert {case.status for case in pipeline.store.cases()} == {"open"}


def test_a_huge_answer_is_read_only_as_far_as_its_first_bytes(
    write_config: Callable[..., Path], hook: Hook
) -> None:
    clock = Clock()
    pipeline, sender, _ = setup(write_config, hook, clock)
    hook.start()
    hook.answers, hook.refusal = [400], b"x" * (64 * 1024 * 1024)  # never read to its end
    pipeline.process(urgent())
    deliver(sender)
    (post,) = [m for m in pipeline.store.outbound() if m.kind == NOTIFY_KIND]
    assert post.delivery == "failed"
    assert (post.last_error or "").startswith("webhook target 'tablero': HTTP 400 xxx")
    assert len(post.last_error or "") < 300
    assert hook.refusals_read_whole == 0


def test_the_daemon_posts_what_it_decides(
    write_config: Callable[..., Path],
    hook: Hook,
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    port = free_port()
    path = write_config(
        {
            "intake": {"source": "smtp", "listen": {"host": "127.0.0.1", "port": port}},
            "notify": [{"kind": "slack", "url": hook.url, "events": ["urgent"]}],
        }
    )
    hook.start()
    run_daemon(path)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("laura.gomez@example.com", ["escalaciones@example.com"], urgent())
    assert wait_until(lambda: len(hook.posts) == 1, timeout=20)
    _, body = hook.posts[0]
    assert body["text"].startswith("🔴 Caso URGENTE: ESC-") and body["blocks"]
