"""Real servers on 127.0.0.1 for the tests and the benchmark: a private Dovecot (IMAP), an
aiosmtpd relay that records what it is sent, and the small waits around them. The traps
of running them here are in ../shared/TESTING-NOTES.md."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imapclient import IMAPClient


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


def dovecot_binary() -> str | None:
    return shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None
    )


@dataclass
class Dovecot:
    host: str
    port: int
    base: Path
    # The clients `client` handed out that may still be connected, for `logout_clients`.
    _clients: list[IMAPClient] = field(default_factory=list, init=False, repr=False, compare=False)

    password = "secret"

    def start(self) -> None:
        """(Re)start this instance on its own config, port and maildir."""
        binary = dovecot_binary()
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

    def take_down(self) -> None:
        """Stop as a mailbox server goes down: with the sessions it was serving (a stopped
        Dovecot's IMAP processes go on serving the connections they have)."""
        master = int((self.base / "run" / "master.pid").read_text())
        sessions = children_of(master)
        self.stop()
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in sessions))

    def new_user(self) -> str:
        return f"u{uuid.uuid4().hex[:10]}"

    def client(self, user: str) -> IMAPClient:
        """A client logged in as `user`; log it out, or leave that to `logout_clients`."""
        deadline = time.monotonic() + 10
        while True:
            client: IMAPClient | None = None
            try:
                client = IMAPClient(self.host, port=self.port, ssl=False, timeout=10)
                client.login(user, self.password)
            except Exception:
                if client is not None:  # connected, but the login was refused
                    _close(client)
                # Dovecot answers before its auth process is ready (TESTING-NOTES).
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            else:
                self._clients = [c for c in self._clients if _connected(c)]
                self._clients.append(client)
                return client

    def logout_clients(self) -> None:
        """Log out the clients `client` handed out that are still connected (a test's
        mailbox is often kept to its end, or left open when an assertion fails)."""
        clients, self._clients = self._clients, []
        for client in clients:
            if _connected(client):
                _close(client)

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


def _connected(client: IMAPClient) -> bool:
    return bool(client.socket().fileno() != -1)


def _close(client: IMAPClient) -> None:
    """Log out, or at least close the connection (it may be gone already)."""
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()


def start_dovecot(
    binary: str, introspection_url: str | None = None
) -> tuple[Dovecot, subprocess.CompletedProcess[bytes]]:
    """A private Dovecot as root on loopback; the traps are in ../shared/TESTING-NOTES.md.
    With `introspection_url`, it also takes XOAUTH2/OAUTHBEARER logins, checking each token
    there (its `oauth2` passdb, RFC 7662 introspection)."""
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
auth_mechanisms = plain login{" xoauth2 oauthbearer" if introspection_url else ""}
mail_location = maildir:{mail}/%n/Maildir
mail_uid = 65534
mail_gid = 65534
first_valid_uid = 1
first_valid_gid = 1
passdb {{
  driver = static
  mechanisms = plain login
  args = password={Dovecot.password}
}}
{_oauth2_passdb(base, introspection_url)}
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


def _oauth2_passdb(base: Path, introspection_url: str | None) -> str:
    if introspection_url is None:
        return ""
    settings = base / "dovecot-oauth2.conf.ext"
    settings.write_text(
        f"""introspection_mode = post
introspection_url = {introspection_url}
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
""",
        encoding="utf-8",
    )
    return f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {settings}
}}"""


def stop_dovecot(server: Dovecot) -> None:
    pid_file = server.base / "run" / "master.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip())
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            return
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
