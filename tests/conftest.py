"""Shared fixtures: real servers on 127.0.0.1 only (Dovecot, aiosmtpd), temp configs."""

from __future__ import annotations

import asyncio
import copy
import email
import email.policy
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from imapclient import IMAPClient

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
ESCALATIONS = SHARED / "escalations"
CORPUS = SHARED / "corpus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def smtp_listening(port: int) -> bool:
    """Whether an SMTP server answers on 127.0.0.1:`port` (a daemon's listener is up)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=2) as probe:
            probe.noop()
        return True
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    """The processes `pid` started and that still run (none once it is gone)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


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


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write the shipped config.yaml, with overrides, into a temp dir; return its path."""

    def write(overrides: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
        data = yaml.safe_load((PROJECT / "config.yaml").read_text(encoding="utf-8"))
        data = _merge(
            data,
            {
                "providers_dir": str(PROJECT / "providers"),
                "templates_dir": str(PROJECT / "templates"),
                "database": f"sqlite:///{tmp_path / 'mailrouter.db'}",
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


def headers_of(data: bytes) -> email.message.EmailMessage:
    """A sent or received mail as the modern API reads it (folded headers unfolded)."""
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class RecordingRelay:
    """An aiosmtpd server standing in for the outbound relay and every vendor's mailbox."""

    host: str
    port: int
    messages: list[Received] = field(default_factory=list)
    # Scripted answers: address -> SMTP reply line given at RCPT (e.g. "550 5.1.1 no such user").
    refuse: dict[str, str] = field(default_factory=dict)
    # While > 0, every DATA is answered with this reply and the counter decremented.
    fail_data_times: int = 0
    fail_data_reply: str = "451 4.3.0 try again later"
    # Seconds each DATA takes, and how many were in progress at once at most.
    data_delay: float = 0.0
    most_at_once: int = 0
    _at_once: int = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.fail_data_times > 0:
            self.fail_data_times -= 1
            return self.fail_data_reply
        if self.data_delay:
            self._at_once += 1
            self.most_at_once = max(self.most_at_once, self._at_once)
            await asyncio.sleep(self.data_delay)
            self._at_once -= 1
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        return "250 2.0.0 OK"

    def to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address in m.rcpt_tos]


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


def _dovecot_binary() -> str | None:
    return shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None
    )


@dataclass
class Dovecot:
    host: str
    port: int
    base: Path

    password = "secret"

    def start(self) -> None:
        """(Re)start this instance on its own config, port and maildir."""
        binary = _dovecot_binary()
        assert binary is not None
        with open(self.base / "startup.log", "ab") as log:
            subprocess.run(
                [binary, "-c", str(self.base / "dovecot.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=30,
                check=True,
            )

    def stop(self) -> None:
        stop_dovecot(self)

    def new_user(self) -> str:
        return f"u{uuid.uuid4().hex[:10]}"

    def client(self, user: str) -> IMAPClient:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = IMAPClient(self.host, port=self.port, ssl=False, timeout=10)
                client.login(user, self.password)
                return client
            except Exception:
                # Dovecot answers before its auth process is ready (TESTING-NOTES).
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def imap_settings(self, user: str, **extra: Any) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "security": "none",
            "username": user,
            "password": self.password,
            "poll_interval": 1,
            **extra,
        }


def _start_dovecot(binary: str) -> tuple[Dovecot, subprocess.CompletedProcess[bytes]]:
    """A private Dovecot as root on loopback; the traps are in ../shared/TESTING-NOTES.md."""
    base = Path(tempfile.mkdtemp(prefix="mr-dovecot-"))
    mail = base / "mail"
    mail.mkdir()
    for path in (base, mail):
        path.chmod(0o755)
    os.chown(mail, 65534, 65534)
    port = free_port()
    conf = base / "dovecot.conf"
    conf.write_text(
        f"""
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
instance_name = mailrouter-test-{port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{mail}/%n/Maildir
mail_uid = 65534
mail_gid = 65534
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = static
  args = password={Dovecot.password}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={mail}/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
""",
        encoding="utf-8",
    )
    # Dovecot daemonizes; its children would hold a pipe open, so log to a file.
    with open(base / "startup.log", "wb") as log:
        result = subprocess.run(
            [binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, timeout=30
        )
    return Dovecot("127.0.0.1", port, base), result


def stop_dovecot(server: Dovecot) -> None:
    pid_file = server.base / "run" / "master.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip())
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            return
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)


@pytest.fixture
def private_dovecot() -> Iterator[Dovecot]:
    """A Dovecot of the test's own, which it may stop and start."""
    binary = _dovecot_binary()
    if binary is None:
        pytest.fail("Dovecot is not installed: `make test` installs dovecot-imapd (as root)")
    server, result = _start_dovecot(binary)
    assert result.returncode == 0, (server.base / "startup.log").read_text(errors="replace")
    try:
        yield server
    finally:
        stop_dovecot(server)
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    binary = _dovecot_binary()
    if binary is None:
        pytest.fail("Dovecot is not installed: `make test` installs dovecot-imapd (as root)")
    server, result = _start_dovecot(binary)
    if result.returncode != 0:
        log = (server.base / "startup.log").read_text(errors="replace")
        pytest.fail(f"Dovecot did not start: {log}")
    try:
        yield server
    finally:
        stop_dovecot(server)
        shutil.rmtree(server.base, ignore_errors=True)


class DaemonThread:
    """The real daemon on its own asyncio loop in a background thread."""

    def __init__(self, config_path: Path) -> None:
        import asyncio
        import threading

        from mailrouter.config import load_config
        from mailrouter.daemon import Daemon

        self.config = load_config(config_path)
        self.daemon = Daemon(self.config)
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None

        def main() -> None:
            try:
                self.loop.run_until_complete(self.daemon.run())
            except BaseException as exc:  # surfaced by stop()
                self.error = exc

        self.thread = threading.Thread(target=main, daemon=True)

    def __enter__(self) -> DaemonThread:
        self.thread.start()
        assert self.daemon.ready.wait(15), "daemon did not start"
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.daemon.stop)
            self.thread.join(30)
        assert not self.thread.is_alive(), "daemon did not stop"
        if self.error:
            raise self.error

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def run_daemon() -> Iterator[Callable[[Path], DaemonThread]]:
    started: list[DaemonThread] = []

    def start(config_path: Path) -> DaemonThread:
        daemon = DaemonThread(config_path).__enter__()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault-injection table (its figures go in the README's Reliability section)."""
    from . import test_chaos

    if test_chaos.REPORT:
        form = "full" if test_chaos.FULL else "short"
        terminalreporter.write_sep("=", f"fault-injection summary ({form} form)")
        terminalreporter.write_line(test_chaos.summary_table())
