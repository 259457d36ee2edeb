"""The shipped defaults as `make run` starts them: a real `mailrouter run` process."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mailrouter.store.db import _sqlite_pragmas
from mailrouter.testing.servers import (
    RecordingRelay,
    children_of,
    free_port,
    smtp_listening,
    wait_until,
)
from tests.conftest import PROJECT, crlf, escalation

pytestmark = pytest.mark.integration


def install(tmp_path: Path) -> Path:
    """A copy of the shipped config.yaml, providers and templates, as an admin deploys them."""
    shutil.copy(PROJECT / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(PROJECT / "providers", tmp_path / "providers")
    shutil.copytree(PROJECT / "templates", tmp_path / "templates")
    return tmp_path / "config.yaml"


def mailrouter(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrouter", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def run_shipped(config: Path) -> tuple[dict[str, str], subprocess.Popen[str], str]:
    """`mailrouter run` on an installed config, an escalation and a stranger's mail sent
    over its SMTP listener, stopped once both outgoing files are written: (the environment
    it ran in, the process, its standard error)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
    env.update(MAILROUTER_LISTEN_PORT=str(port), MAILROUTER_CONFIG=str(config))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mailrouter", "run"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert wait_until(lambda: smtp_listening(port), timeout=30), (
            "the daemon did not start listening"
        )
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail(
                "laura.gomez@example.com",
                ["escalaciones@example.com"],
                crlf(escalation("01-hibot-basic.eml")),
            )
            client.sendmail(
                "soporte@ejemplo-falso.example",
                ["escalaciones@example.com"],
                crlf(escalation("10-spoofed-sender.eml")),
            )
        outbox = config.parent / "var" / "outbox"
        assert wait_until(lambda: outbox.is_dir() and len(list(outbox.glob("*.eml"))) == 2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    return env, daemon, stderr


def test_run_with_shipped_defaults(tmp_path: Path) -> None:
    config = install(tmp_path)
    env, daemon, stderr = run_shipped(config)
    outbox = tmp_path / "var" / "outbox"
    assert daemon.returncode == 0, stderr
    assert "listening on 127.0.0.1" in stderr and "mailrouter stopped" in stderr

    files = sorted(p.name for p in outbox.glob("*.eml"))
    assert files[0].endswith("-forward.eml") and files[1].endswith("-acknowledgement.eml")
    assert envelope_to(outbox / files[0]) == "soporte@hibot.us"
    assert envelope_to(outbox / files[1]) == "laura.gomez@example.com"
    assert (tmp_path / "var" / "mailrouter.db").is_file()

    listing = mailrouter("cases", env=env)
    assert listing.returncode == 0, listing.stderr
    row = listing.stdout.splitlines()[1].split()
    assert row[0] == "ESC-000001"
    # ... priority, status, owner and labels (none: the shipped config has no team).
    assert row[3:] == ["laura.gomez@example.com", "hibot", "ALTA", "open", "-", "-"]

    kept = mailrouter("quarantine", env=env)
    assert kept.returncode == 0, kept.stderr
    assert "soporte@ejemplo-falso.example is not in allowed_senders" in kept.stdout
    message_id = kept.stdout.splitlines()[1].split()[0]
    raw = mailrouter("quarantine", "--show", message_id, env=env)
    assert raw.stdout.replace("\r\n", "\n") == escalation("10-spoofed-sender.eml").decode()
    routed = mailrouter("quarantine", "--show", "1", env=env)  # the escalation, not quarantined
    assert routed.returncode == 1 and "no quarantined message #1" in routed.stderr


def test_route_writes_nothing(tmp_path: Path) -> None:
    config = install(tmp_path)
    env = {**os.environ, "MAILROUTER_CONFIG": str(config)}
    result = mailrouter(
        "route", str(PROJECT.parent / "shared" / "escalations" / "01-hibot-basic.eml"), env=env
    )
    assert result.returncode == 0, result.stderr
    assert "Destination: HIBOT <soporte@hibot.us>" in result.stdout
    assert not (tmp_path / "var").exists()


def test_check_config_via_module(tmp_path: Path) -> None:
    config = install(tmp_path)
    (tmp_path / "providers" / "tech.yaml").write_text("name: Tech\naddress: tech@example.com\n")
    result = mailrouter("--config", str(config), "check-config", env=dict(os.environ))
    assert result.returncode == 1
    assert f"{tmp_path / 'providers' / 'tech.yaml'}:1: template: Field required" in result.stderr


def test_sighup_reload_keeps_last_good_config(tmp_path: Path) -> None:
    config = install(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
    env.update(MAILROUTER_LISTEN_PORT=str(port), MAILROUTER_CONFIG=str(config))
    log = tmp_path / "daemon.log"
    outbox = tmp_path / "var" / "outbox"

    def send(name: str) -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail(
                "andres.perez@example.com", ["escalaciones@example.com"], crlf(escalation(name))
            )

    def forwards() -> list[str]:
        return sorted(p.name for p in outbox.glob("*-forward.eml")) if outbox.is_dir() else []

    with open(log, "w") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "mailrouter", "run"], env=env, stderr=stderr
        )
    try:
        assert wait_until(lambda: "listening on" in log.read_text(), timeout=30)
        panda = tmp_path / "providers" / "panda.yaml"
        good = panda.read_text()
        panda.write_text(good.replace("required:", "requird:"))
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "reload refused" in log.read_text())
        assert f"{panda}:" in log.read_text() and "requird: Extra inputs" in log.read_text()
        send("02-panda-basic.eml")  # the last good config still routes
        assert wait_until(lambda: len(forwards()) == 1)
        assert envelope_to(outbox / forwards()[0]) == "soporte_revendedores@clickpanda.com"

        panda.write_text(
            good.replace("soporte_revendedores@clickpanda.com", "nuevo@clickpanda.example")
        )
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "configuration reloaded" in log.read_text())
        send("07-panda-no-accents.eml")
        assert wait_until(lambda: len(forwards()) == 2)
        assert envelope_to(outbox / forwards()[1]) == "nuevo@clickpanda.example"

        # A template that would fail on the first mail that needs it is refused too.
        ack = tmp_path / "templates" / "acknowledgement.j2"
        good_ack = ack.read_text()
        ack.write_text(good_ack.replace("{{ case.priority }}", "{{ case.prioridad }}"))
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(lambda: log.read_text().count("reload refused") == 2)
        assert f"{ack}:" in log.read_text() and "prioridad" in log.read_text()
        send("03-operaciones-encuestas.eml")  # acknowledged with the template in memory
        assert wait_until(lambda: len(forwards()) == 3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    assert daemon.returncode == 0, log.read_text()


def envelope_to(path: Path) -> str:
    """The recipients a file-transport mail was addressed to (its first line but one)."""
    for line in path.read_bytes().decode().splitlines():
        if line.startswith("X-Envelope-To: "):
            return line.removeprefix("X-Envelope-To: ")
    raise AssertionError(f"{path} has no X-Envelope-To")


def _connect_like_the_store(path: str, start: multiprocessing.synchronize.Barrier) -> None:
    connection = sqlite3.connect(path)
    start.wait()
    _sqlite_pragmas(connection, None)  # what every new connection of the store runs
    connection.close()


def test_processes_opening_a_new_database_together_all_come_up(tmp_path: Path) -> None:
    """Two daemons, or a CLI command beside a starting daemon, open the same new SQLite
    file at once: SQLite refuses the switch to WAL at once ("database is locked", no busy
    wait) to some of them, a few percent of the time here; none may die of it."""
    context = multiprocessing.get_context("fork")
    failed = 0
    for round_ in range(60):
        start = context.Barrier(3)
        path = str(tmp_path / f"{round_}.db")
        openers = [
            context.Process(target=_connect_like_the_store, args=(path, start)) for _ in range(3)
        ]
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join(60)
        failed += sum(opener.exitcode != 0 for opener in openers)
    assert failed == 0


def _gone(pid: int) -> bool:
    """Exited: no process, or a zombie nobody has reaped yet (in a container without init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_sender_process_is_started_restarted_reloaded_and_stopped_with_the_daemon(
    tmp_path: Path, relay: RecordingRelay, write_config: Callable[..., Path]
) -> None:
    port = free_port()
    config = write_config(
        {
            "intake": {"source": "smtp", "listen": {"host": "127.0.0.1", "port": port}},
            "outbound": {
                "transport": "smtp",
                "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
                "sender_process": True,
            },
        }
    )
    log = tmp_path / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "mailrouter", "--config", str(config), "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def send(name: str) -> None:
        assert wait_until(lambda: smtp_listening(port), timeout=30), log.read_text()
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail(
                "agent@example.com", ["escalaciones@example.com"], crlf(escalation(name))
            )

    daemon = start()
    try:
        send("01-hibot-basic.eml")
        assert wait_until(lambda: len(relay.messages) == 2), log.read_text()
        (child,) = children_of(daemon.pid)
        command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        assert b"--sender-only" in command

        # Killed, it is started again, and mail flows on through the new one.
        os.kill(child, signal.SIGKILL)
        assert wait_until(lambda: children_of(daemon.pid) not in ([], [child]), timeout=30)
        send("02-panda-basic.eml")
        assert wait_until(lambda: len(relay.messages) == 4), log.read_text()
        assert "the sender process exited with status -9; starting it again" in log.read_text()

        # SIGHUP reloads both (the sender's failure notices are rendered from templates).
        daemon.send_signal(signal.SIGHUP)
        assert wait_until(lambda: log.read_text().count("configuration reloaded") == 2)
        (child,) = children_of(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    assert daemon.returncode == 0, log.read_text()
    assert wait_until(lambda: _gone(child), timeout=30)

    # A daemon killed outright takes its sender process with it (its input ends).
    daemon = start()
    found: list[int] = []

    def one_child() -> bool:
        found[:] = children_of(daemon.pid)
        return len(found) == 1

    assert wait_until(one_child, timeout=30), log.read_text()
    (child,) = found
    daemon.kill()
    daemon.wait(30)
    assert wait_until(lambda: _gone(child), timeout=30), log.read_text()
    assert len(relay.to("soporte@hibot.us")) == 1  # nothing sent twice across the restarts


def test_a_sender_process_that_cannot_start_is_tried_again(
    write_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Starting the sender process fails (its interpreter is gone, say): the daemon logs it,
    waits, and starts it again; stopping then closes its input and waits for it."""
    import asyncio

    from mailrouter.config import load_config
    from mailrouter.daemon import Daemon

    daemon = Daemon(load_config(write_config({"outbound": {"sender_process": True}})))
    # The second start runs a stand-in that, like the real one, ends when its input does.
    commands = iter(
        [["/nonexistent/python"], [sys.executable, "-c", "import sys; sys.stdin.read()"]]
    )
    daemon._sender_command = lambda: next(commands)  # type: ignore[method-assign]

    async def scenario() -> int | None:
        keeper = asyncio.create_task(daemon._keep_sender_process())
        while daemon.sender_process is None:
            assert not keeper.done()
            await asyncio.sleep(0.05)
        daemon.stop()
        await asyncio.wait_for(keeper, 30)
        return daemon.sender_process.returncode

    assert asyncio.run(scenario()) == 0
    failed = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert len(failed) == 1 and "trying again in 1 s" in failed[0]
    daemon.store.close()


def test_the_scheduler_forgets_the_old_address_log_at_start(
    write_config: Callable[..., Path],
) -> None:
    """The daemon's scheduler deletes the address log's rows older than two days when it
    starts (and hourly), and keeps the recent ones."""
    import asyncio
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert

    from mailrouter.config import load_config
    from mailrouter.daemon import Daemon
    from mailrouter.store.tables import ADDRESS_LOG

    daemon = Daemon(load_config(write_config()))
    now = datetime.now(UTC)
    with daemon.store.engine.begin() as connection:
        connection.execute(
            insert(ADDRESS_LOG),
            [
                {
                    "address": f"agent{days}@example.com",
                    "kind": "reply",
                    "at": now - timedelta(days),
                }
                for days in (30, 3, 1)
            ],
        )

    def left() -> list[str]:
        with daemon.store.engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT address FROM address_log")
            return sorted(str(address) for (address,) in rows)

    async def scenario() -> None:
        scheduler = daemon._start_scheduler(lambda: None)
        try:
            for _ in range(200):
                if left() == ["agent1@example.com"]:
                    return
                await asyncio.sleep(0.05)
        finally:
            scheduler.shutdown(wait=False)

    asyncio.run(scenario())
    assert left() == ["agent1@example.com"]
    daemon.store.close()


def test_a_scheduled_job_that_fails_is_one_line_and_runs_again_next_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from mailrouter.daemon import _scheduled
    from mailrouter.model import TemporaryFailure

    def database_down() -> int:
        raise TemporaryFailure("the database is restarting")

    def bug() -> int:
        raise KeyError("x")

    assert asyncio.run(_scheduled("reminder run", "trying again", lambda: 3)) == 3
    assert asyncio.run(_scheduled("reminder run", "trying again", database_down)) is None
    assert asyncio.run(_scheduled("digest run", "the next run", bug)) is None
    lines = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert lines == [
        ("WARNING", "reminder run: the database is restarting; trying again", False),
        ("ERROR", "digest run failed; the next run", True),
    ]


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    """`mailrouter route big.eml | head -1`: the pipe closes under the command."""
    big = tmp_path / "big.eml"
    text = escalation("01-hibot-basic.eml").replace(b"Gracias,", b"Detalle: " + b"x " * 200_000)
    big.write_bytes(text)
    command = [sys.executable, "-m", "mailrouter", "--config", str(PROJECT / "config.yaml")]
    reader = subprocess.Popen(
        [*command, "route", str(big)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(100)
    reader.stdout.close()
    errors = reader.stderr.read().decode()
    reader.stderr.close()
    assert reader.wait(60) == 0, errors
    assert "Traceback" not in errors and "BrokenPipe" not in errors


def test_json_logs_one_object_a_line(tmp_path: Path) -> None:
    config = install(tmp_path)
    config.write_text(config.read_text() + "\nlogging: {format: json}\n")
    _, _, stderr = run_shipped(config)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    routed = [line for line in lines if line.get("case") == "ESC-000001"]
    assert routed and "routed" in routed[0]["message"]
    assert any(line["level"] == "WARNING" and "quarantined" in line["message"] for line in lines)
    assert not [line for line in lines if line["logger"].startswith("apscheduler")]
