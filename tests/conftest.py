"""Shared fixtures: real servers on 127.0.0.1 only (Dovecot, aiosmtpd), temp configs."""

from __future__ import annotations

import asyncio
import copy
import email
import email.policy
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller

from mailrouter.deliver.sender import Sender
from mailrouter.testing.postgres import PostgresCluster, start_postgres
from mailrouter.testing.servers import (
    Dovecot,
    RecordingRelay,
    dovecot_binary,
    free_port,
    start_dovecot,
    stop_dovecot,
)

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
ESCALATIONS = SHARED / "escalations"
CORPUS = SHARED / "corpus"


def escalation(name: str) -> bytes:
    return (ESCALATIONS / name).read_bytes()


def crlf(data: bytes) -> bytes:
    """Wire form of a sample file (they are stored with bare LF, as MUAs save them)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


BACKENDS = ("sqlite", "postgresql")
TEMPLATE_DB = "mailrouter_template"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every integration and end-to-end test that uses a database runs on SQLite and on
    PostgreSQL (`[sqlite]`, `[postgresql]` in its id), unless marked `sqlite_only`; the
    unit tests need no database of their own."""
    if "database_url" not in metafunc.fixturenames:
        return
    path = Path(str(metafunc.definition.path))
    both = path.parent.name in ("integration", "e2e")
    backends = BACKENDS if both else ("sqlite",)
    if metafunc.definition.get_closest_marker("sqlite_only"):
        backends = ("sqlite",)
    if metafunc.definition.get_closest_marker("postgresql_only"):
        backends = ("postgresql",)
    metafunc.parametrize("database_url", backends, indirect=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The session's private PostgreSQL, with a migrated database to copy for each test."""
    try:
        cluster = start_postgres()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        cluster.sql(f'CREATE DATABASE "{TEMPLATE_DB}"')
        from mailrouter.store.db import Store

        Store(cluster.url(TEMPLATE_DB)).close()  # migrated once; each test gets a copy
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database for the test: an SQLite file, or a PostgreSQL database."""
    if getattr(request, "param", "sqlite") == "postgresql":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        return cluster.new_database(TEMPLATE_DB)
    return f"sqlite:///{tmp_path / 'mailrouter.db'}"


@pytest.fixture
def write_config(tmp_path: Path, database_url: str) -> Callable[..., Path]:
    """Write the shipped config.yaml, with overrides, into a temp dir; return its path."""

    def write(overrides: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
        data = yaml.safe_load((PROJECT / "config.yaml").read_text(encoding="utf-8"))
        data = _merge(
            data,
            {
                "providers_dir": str(PROJECT / "providers"),
                "templates_dir": str(PROJECT / "templates"),
                "database": database_url,
                "outbound": {"file": {"dir": str(tmp_path / "outbox")}},
                # Not the shipped weekday mornings: a daemon started in a test would catch up
                # on that day's digests, and a test's mail count would hang on the hour it
                # runs at. Tests of digests give their own schedule.
                "digest": {"schedule": "0 3 29 2 *"},
            },
        )
        data = _merge(data, overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), "utf-8")
        return path

    return write


def open_sockets() -> int:
    """How many sockets this process holds open now (a connection left to the garbage
    collector is still one)."""
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if _is_socket(fd))


def _is_socket(fd: Path) -> bool:
    try:
        return fd.readlink().name.startswith("socket:")
    except OSError:
        return False  # closed since it was listed


def deliver_due(sender: Sender) -> int:
    """`asyncio.run(sender.deliver_due())`, closing the relay connections the pass opened
    before its loop is closed (once it is, they can no longer be closed, only leaked)."""

    async def deliver() -> int:
        try:
            return await sender.deliver_due()
        finally:
            await sender.transport.close()

    return asyncio.run(deliver())


def headers_of(data: bytes) -> email.message.EmailMessage:
    """A sent or received mail as the modern API reads it (folded headers unfolded)."""
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


@pytest.fixture
def relay() -> Iterator[RecordingRelay]:
    port = free_port()
    recorder = RecordingRelay("127.0.0.1", port)
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield recorder
    finally:
        controller.stop()


@pytest.fixture
def ascii_relay() -> Iterator[RecordingRelay]:
    """A relay that does not offer SMTPUTF8 (RFC 6531); aiosmtpd's Controller (the `relay`
    fixture) offers it by default, as Postfix and Exchange Online do."""
    port = free_port()
    recorder = RecordingRelay("127.0.0.1", port)
    controller = Controller(recorder, hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    controller.start()
    try:
        yield recorder
    finally:
        controller.stop()


@pytest.fixture
def private_dovecot() -> Iterator[Dovecot]:
    """A Dovecot of the test's own, which it may stop and start."""
    binary = dovecot_binary()
    if binary is None:
        pytest.fail("Dovecot is not installed: `make test` installs dovecot-imapd (as root)")
    server, result = start_dovecot(binary)
    assert result.returncode == 0, (server.base / "startup.log").read_text(errors="replace")
    try:
        yield server
    finally:
        server.logout_clients()
        stop_dovecot(server)
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[Dovecot]:
    binary = dovecot_binary()
    if binary is None:
        pytest.fail("Dovecot is not installed: `make test` installs dovecot-imapd (as root)")
    server, result = start_dovecot(binary)
    if result.returncode != 0:
        log = (server.base / "startup.log").read_text(errors="replace")
        pytest.fail(f"Dovecot did not start: {log}")
    try:
        yield server
    finally:
        stop_dovecot(server)
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def dovecot(dovecot_server: Dovecot) -> Iterator[Dovecot]:
    """The session's Dovecot; the IMAP clients a test opened on it are logged out after it."""
    try:
        yield dovecot_server
    finally:
        dovecot_server.logout_clients()


class DaemonThread:
    """The real daemon on its own asyncio loop in a background thread."""

    def __init__(self, config_path: Path, clock: Callable[[], datetime] | None = None) -> None:
        import threading

        from mailrouter.config import load_config
        from mailrouter.daemon import Daemon

        self.config = load_config(config_path)
        self.daemon = Daemon(self.config, clock) if clock else Daemon(self.config)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None

        def main() -> None:
            # As asyncio.run does: cancel what is left, shut the executor down and close
            # the loop (an unclosed loop, or its self-pipe sockets, is a ResourceWarning).
            with asyncio.Runner(loop_factory=lambda: self.loop) as runner:
                try:
                    runner.run(self.daemon.run())
                except BaseException as exc:  # surfaced by stop()
                    self.error = exc

        self.thread = threading.Thread(target=main, daemon=True)

    def __enter__(self) -> DaemonThread:
        self.thread.start()
        assert self.daemon.ready.wait(15), "daemon did not start"
        return self

    def stop(self) -> None:
        if self.thread.ident is None:  # never started: its loop is closed here
            self.loop.close()
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.stop)
            self.thread.join(30)
        assert not self.thread.is_alive(), "daemon did not stop"
        if self.error:
            raise self.error

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def run_daemon() -> Iterator[Callable[..., DaemonThread]]:
    """Start the daemon of a config (with `clock=`, on that clock instead of the real one)."""
    started: list[DaemonThread] = []

    def start(config_path: Path, clock: Callable[[], datetime] | None = None) -> DaemonThread:
        daemon = DaemonThread(config_path, clock)
        started.append(daemon)  # stopped at teardown even if it did not come up in time
        return daemon.__enter__()

    yield start
    for daemon in started:
        daemon.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault-injection table (its figures go in the README's Reliability section)."""
    from tests.e2e import test_chaos

    if test_chaos.REPORT:
        form = "full" if test_chaos.FULL else "short"
        terminalreporter.write_sep("=", f"fault-injection summary ({form} form)")
        terminalreporter.write_line(test_chaos.summary_table())
