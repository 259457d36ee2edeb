"""HTTP: the daemon's /healthz, /readyz and /metrics, served on the daemon's event loop.

A small server on asyncio streams (the stdlib has no asyncio HTTP server; answering on
the daemon's own loop is what lets /healthz mean "the loop is running"): one request per
connection, GET or HEAD, the request's head read within a size and a time limit, and a
4xx for anything else. What blocks (reading the database for /readyz and /metrics) runs
in a thread. It knows nothing of mail: the daemon hands it what to answer with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

HEAD_LIMIT = 16 * 1024  # bytes of request line and headers; Prometheus sends a few hundred
READ_SECONDS = 10.0  # to send them
CLOSE_SECONDS = 5.0  # for the requests in progress to end, when the daemon stops


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


# What answers one path: the request's headers (names in lower case) -> the response.
Handler = Callable[[Mapping[str, str]], Awaitable[Response]]


def json_response(status: int, data: Any) -> Response:
    return Response(status, json.dumps(data).encode() + b"\n")


def health_routes(
    *,
    version: str,
    dead_loops: Callable[[], list[str]],
    checks: Callable[[], Mapping[str, str | None]],
    registry: Collector,
) -> dict[str, Handler]:
    """/healthz: 200 while none of the daemon's loops has stopped (`dead_loops` names those
    that did); /readyz: 200 when every check passes (`checks`, blocking: each name with
    None or what is wrong), else 503 with those that failed; /metrics: `registry` in the
    Prometheus text format (or OpenMetrics, if the scraper asks for it)."""

    async def healthz(headers: Mapping[str, str]) -> Response:
        dead = dead_loops()
        if dead:
            return json_response(503, {"status": "failing", "version": version, "failed": dead})
        return json_response(200, {"status": "ok", "version": version})

    async def readyz(headers: Mapping[str, str]) -> Response:
        found = await asyncio.to_thread(checks)
        failed = [name for name, problem in found.items() if problem is not None]
        return json_response(
            503 if failed else 200,
            {
                "status": "not ready" if failed else "ready",
                "failed": failed,
                "checks": {name: problem or "ok" for name, problem in found.items()},
            },
        )

    async def metrics(headers: Mapping[str, str]) -> Response:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return Response(200, await asyncio.to_thread(encoder, registry), content_type)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


class HttpServer:
    """Serves `routes` on host:port from `start` until `close`."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Handler]) -> None:
        self.host, self.port = host, port
        self.routes = dict(routes)
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=HEAD_LIMIT
        )

    async def close(self) -> None:
        """Stop listening, close the connections still open, and wait until all is closed.
        (Closed, not cancelled: Python 3.11's streams log a cancelled handler as an error.)"""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in self._connections.values():
            writer.close()  # a read in progress ends, a response in progress is dropped
        if self._connections:
            _, late = await asyncio.wait(self._connections, timeout=CLOSE_SECONDS)
            for task in late:  # a handler still reading the database
                task.cancel()
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = writer
        try:
            answer = await self._answer(reader)
            if answer is not None:
                response, with_body = answer
                writer.write(_head(response) + (response.body if with_body else b""))
                await writer.drain()
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._connections.pop(task, None)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool] | None:
        """The response to the request `reader` holds, and whether its body is sent (not
        to HEAD); None when the client closed before saying anything."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_SECONDS)
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            return _error(431), True
        except TimeoutError:
            return _error(408), True
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _error(400), True
        method, target, _ = parts
        handler = self.routes.get(urlsplit(target).path)
        if handler is None:
            return _error(404), True
        if method not in ("GET", "HEAD"):
            return _error(405), True
        headers: dict[str, str] = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        try:
            response = await handler(headers)
        except Exception:
            log.exception("answering %s %s failed", method, target[:200])
            response = _error(500)
        return response, method == "GET"


def _error(status: int) -> Response:
    return json_response(status, {"error": HTTPStatus(status).phrase})


def _head(response: Response) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if response.status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
