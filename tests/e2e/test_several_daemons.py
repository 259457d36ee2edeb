"""Several daemons on one mailbox and one PostgreSQL database: kill -9 of any of them and a
crash of the database in the middle of the work, nothing lost, nothing doubled; scheduled
work done once across them. On SQLite, a second daemon is refused. Real processes, real
Dovecot, the session's private PostgreSQL; `make chaos` runs the full form."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from mailrouter.testing.factory import escalations
from mailrouter.testing.postgres import PostgresCluster, start_postgres, wait_for_postgres
from mailrouter.testing.servers import Dovecot, RecordingRelay, free_port, wait_until
from tests.conftest import PROJECT, headers_of
from tests.e2e.test_chaos import DaemonProcess, Rig, check_exactly_once, report, scale
from tests.e2e.test_chaos import rig_for as rig_for  # the fixture, shared

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


@pytest.mark.sqlite_only
def test_a_second_daemon_on_one_sqlite_file_is_refused(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    config = write_config(
        {"intake": {"source": "smtp", "listen": {"host": "127.0.0.1", "port": free_port()}}}
    )
    first = DaemonProcess(config, tmp_path / "first.log").start()
    try:
        assert wait_until(lambda: "listening on" in (tmp_path / "first.log").read_text(), 30)
        second = subprocess.run(
            [sys.executable, "-m", "mailrouter", "--config", str(config), "run"],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "another mailrouter daemon is running on" in second.stderr
        assert "use PostgreSQL" in second.stderr and "Traceback" not in second.stderr
        assert first.alive()
    finally:
        assert first.terminate() == 0
    # Once the first has stopped, the file is free again.
    again = DaemonProcess(config, tmp_path / "again.log").start()
    try:
        assert wait_until(lambda: "listening on" in (tmp_path / "again.log").read_text(), 30)
    finally:
        assert again.terminate() == 0


@pytest.mark.postgresql_only
def test_a_daemon_started_while_the_database_is_down_waits_for_it(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = start_postgres()  # its own: stopped and started by this test
    try:
        url = cluster.new_database()
        cluster.stop()
        port = free_port()
        config = write_config(
            {
                "database": url,
                "intake": {"source": "smtp", "listen": {"host": "127.0.0.1", "port": port}},
            }
        )
        log = tmp_path / "daemon.log"
        daemon = DaemonProcess(config, log).start()
        try:
            assert wait_until(lambda: "cannot start yet" in log.read_text(), 30), log.read_text()
            assert daemon.alive()
            cluster.start()
            assert wait_until(lambda: "listening on" in log.read_text(), 60), log.read_text()
            assert "Traceback" not in log.read_text()
        finally:
            assert daemon.terminate() == 0
    finally:
        cluster.remove()


def _claimant_pids(rig: Rig) -> set[int]:
    """The daemons holding IMAP claims at this moment (mid-batch)."""
    try:
        owners = rig.db("select distinct claimed_by from imap_claims")
    except Exception:  # the database restarting
        return set()
    return {int(owner.split(":")[1]) for (owner,) in owners}


@pytest.mark.postgresql_only
def test_three_daemons_survive_kill_9_and_a_database_crash(
    dovecot: Dovecot, rig_for: Callable[..., Rig], postgres: PostgresCluster
) -> None:
    """Escalations arrive in waves while three daemons work them; a daemon is killed
    (kill -9) and replaced after each wave, at least once one holding IMAP claims, and the
    database crashes (`pg_ctl restart -m immediate`) half way."""
    total, kills = scale(60, 200), scale(4, 10)
    rig = rig_for(dovecot)
    rng = random.Random(321)
    mails = escalations(total, seed=321)

    def start() -> DaemonProcess:
        """A daemon with a log of its own (to tell when it is up)."""
        rig.daemons.append(DaemonProcess(rig.config, rig.tmp / f"daemon-{len(rig.daemons)}.log"))
        return rig.daemons[-1].start()

    def up(daemon: DaemonProcess) -> bool:
        return "mailrouter polling" in daemon.log.read_text(errors="replace")

    def logs() -> str:
        return "".join(d.log.read_text(errors="replace") for d in rig.daemons)

    daemons = [start() for _ in range(3)]
    chunk = -(-total // kills)
    started = time.monotonic()
    killed_a_claimant = False
    for wave in range(kills):
        rig.append(mails[wave * chunk : (wave + 1) * chunk])
        deadline = time.monotonic() + rng.uniform(0.8, 2.5)
        victim = None
        while time.monotonic() < deadline and victim is None and not killed_a_claimant:
            holding = _claimant_pids(rig)
            victim = next((d for d in daemons if d.process and d.process.pid in holding), None)
            time.sleep(0.02)
        if victim is None:
            time.sleep(max(0.0, deadline - time.monotonic()))
            victim = rng.choice(daemons)
        else:
            killed_a_claimant = True
        victim.kill()
        daemons[daemons.index(victim)] = start()
        if wave == kills // 2:
            postgres.restart_immediate()
            wait_for_postgres(postgres)
    assert wait_until(lambda: rig.drained(total), timeout=scale(180, 420), step=0.5), logs()[-4000:]
    drained = time.monotonic() - started
    # Every daemon up (the last replacement may still be starting), then stopped cleanly.
    assert wait_until(lambda: all(up(d) for d in daemons), 30), logs()[-4000:]
    assert [d.terminate() for d in daemons] == [0, 0, 0], logs()[-4000:]
    lost, dups = check_exactly_once(rig, mails)
    assert lost == 0
    assert dups <= kills  # only a kill between the relay's 250 and the "sent" mark repeats one
    assert killed_a_claimant
    assert "Traceback" not in logs()
    report("3 daemons, PostgreSQL", total, f"{kills} kills, 1 db crash", lost, dups, drained)


@pytest.mark.postgresql_only
def test_three_daemons_send_one_digest_per_recipient_and_period(
    dovecot: Dovecot,
    rig_for: Callable[..., Rig],
    relay: RecordingRelay,
) -> None:
    """The digest job fires on all three daemons at the same minute (and each catches up on
    the last run at start): each recipient gets one digest per period."""
    rig = rig_for(dovecot)
    rig.config.write_text(
        rig.config.read_text().replace("0 3 29 2 *", "'* * * * *'")  # every minute
    )
    mails = escalations(12, seed=5)
    rig.append(mails)
    daemons = [rig.daemon().start() for _ in range(3)]
    assert wait_until(lambda: rig.drained(len(mails)), timeout=120, step=0.5), rig.log()[-4000:]

    def periods() -> list[tuple[str, str]]:
        return [(str(r), str(p)) for r, p in rig.db("select recipient, period from digests")]

    # Two periods at least: the start's catch-up and the next minute's run.
    assert wait_until(lambda: len({p for _, p in periods()}) >= 2, timeout=150, step=1)
    assert wait_until(lambda: not rig.db("select id from messages where delivery='pending'"), 30)
    assert [d.terminate() for d in daemons] == [0, 0, 0]
    recorded = Counter(recipient for recipient, _ in periods())
    digest_ids = {f"<{message_id}>" for (message_id,) in rig.db(
        "select message_id from messages where kind = 'digest'"
    )}  # fmt: skip
    received = Counter(
        mail.rcpt_tos[0]
        for mail in relay.messages
        if headers_of(mail.data)["Message-ID"] in digest_ids
    )
    assert received == recorded, (received, recorded)
    assert len(periods()) == len(set(periods()))
