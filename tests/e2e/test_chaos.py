"""Fault injection against real Dovecot and aiosmtpd: kill -9, server outages, relay errors,
UIDVALIDITY resets, two daemons. `make test` runs the short form; `make chaos` the full one
(CHAOS_SCALE=full). Each scenario adds a row to the summary table printed at the end."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError

from mailrouter.testing.factory import VENDORS, escalations
from mailrouter.testing.servers import Dovecot, RecordingRelay, wait_until
from tests.conftest import headers_of

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.sqlite_only]

FULL = os.environ.get("CHAOS_SCALE") == "full"
REPORT: list[dict[str, Any]] = []


def scale(short: int, full: int) -> int:
    return full if FULL else short


class DaemonProcess:
    """`python -m mailrouter run` as a real process we can kill at any moment."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailrouter", "--config", str(self.config), "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def terminate(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill_if_alive(self) -> None:
        if self.alive():
            self.kill()


@dataclass
class Rig:
    tmp: Path
    imap: Dovecot
    user: str
    relay: RecordingRelay
    config: Path
    database_url: str
    folder: str = "INBOX"
    # Every daemon made, so that those a failed scenario leaves running are killed.
    daemons: list[DaemonProcess] = field(default_factory=list)

    def mailbox(self) -> IMAPClient:
        return self.imap.client(self.user)

    def daemon(self) -> DaemonProcess:
        self.daemons.append(DaemonProcess(self.config, self.tmp / "daemon.log"))
        return self.daemons[-1]

    def append(self, mails: list[tuple[str, bytes]]) -> None:
        client = self.mailbox()
        for _, raw in mails:
            client.append(self.folder, raw)
        client.logout()

    def db(self, query: str) -> list[tuple[Any, ...]]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.exec_driver_sql(query)]
        finally:
            engine.dispose()

    def count(self, folder: str) -> int:
        client = self.mailbox()
        try:
            if not client.folder_exists(folder):
                return 0
            client.select_folder(folder, readonly=True)
            return len(client.search("ALL"))
        finally:
            client.logout()

    def drained(self, expected_cases: int) -> bool:
        try:
            if self.count(self.folder) != 0:
                return False
            cases = self.db("select count(*) from cases")[0][0]
            busy = self.db(
                "select count(*) from messages where direction='out' "
                "and delivery in ('pending', 'sending')"
            )[0][0]
        except (DBAPIError, OSError):  # the database restarting, the mailbox busy
            return False
        return bool(cases == expected_cases and busy == 0)

    def log(self) -> str:
        path = self.tmp / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def rig_for(
    tmp_path: Path, relay: RecordingRelay, write_config: Callable[..., Path], database_url: str
) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(
        imap: Dovecot,
        folder: str = "INBOX",
        password: str = "",
        sender_process: bool = False,
        **imap_extra: Any,
    ) -> Rig:
        user = imap.new_user()
        client = imap.client(user)
        if not client.folder_exists(folder):
            client.create_folder(folder)
        client.logout()
        config = write_config(
            {
                "intake": {
                    "source": "imap",
                    "imap": {
                        **imap.imap_settings(
                            user, folder=folder, poll_interval=0.5, reconnect_max=2, **imap_extra
                        ),
                        **({"password": password} if password else {}),
                    },
                },
                "outbound": {
                    "transport": "smtp",
                    "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
                    "retry": {"first_delay": 0.2, "max_delay": 1.0, "give_up_after": 3600},
                    "sender_process": sender_process,
                },
            }
        )
        rigs.append(Rig(tmp_path, imap, user, relay, config, database_url, folder))
        return rigs[-1]

    yield make
    for rig in rigs:
        for daemon in rig.daemons:
            daemon.kill_if_alive()


def received_ids(relay: RecordingRelay) -> Counter[str]:
    return Counter(received_ids_in_order(relay))


def check_exactly_once(rig: Rig, mails: list[tuple[str, bytes]]) -> tuple[int, int]:
    """Every escalation has one case and its forward arrived; return (lost, duplicates)."""
    cases = rig.db("select count(*) from cases")[0][0]
    per_mail = rig.db(
        "select dedupe_key, count(*) from messages where direction='in' group by dedupe_key"
    )
    assert all(count == 1 for _, count in per_mail)
    outbound = rig.db("select message_id, kind from messages where direction='out'")
    ids = received_ids(rig.relay)
    lost = sum(1 for message_id, _ in outbound if ids[message_id] == 0)
    duplicates = sum(count - 1 for count in ids.values() if count > 1)
    assert cases == len(mails), f"{cases} cases for {len(mails)} escalations"
    for vendor_id, address in VENDORS.items():
        expected = sum(1 for kind, _ in mails if kind == vendor_id)
        assert len({m.data for m in rig.relay.to(address)}) == expected
    assert rig.count(rig.folder) == 0
    assert rig.count("Processed") == len(mails)
    assert rig.count("Quarantine") == 0
    assert rig.db("select count(*) from messages where outcome='quarantined'")[0][0] == 0
    return lost, duplicates


def report(scenario: str, messages: int, faults: str, lost: int, dups: int, seconds: float) -> None:
    REPORT.append(
        {
            "scenario": scenario,
            "messages": messages,
            "faults": faults,
            "lost": lost,
            "duplicates": dups,
            "drain_s": round(seconds, 1),
        }
    )


@pytest.mark.parametrize("sender_process", [False, True], ids=["one process", "sender process"])
def test_kill_9_at_random_moments(
    dovecot: Dovecot, rig_for: Callable[..., Rig], sender_process: bool
) -> None:
    """With `outbound.sender_process` only the daemon is killed: its sender process sees
    its input end, finishes the mail in hand and exits, beside the next daemon's."""
    total, kills = scale(60, 300), scale(6, 20)
    rig = rig_for(dovecot, sender_process=sender_process)
    rng = random.Random(2026)
    mails = escalations(total)
    chunk = -(-total // kills)
    started = time.monotonic()
    for round_ in range(kills):
        rig.append(mails[round_ * chunk : (round_ + 1) * chunk])
        daemon = rig.daemon().start()
        # Startup takes ~1 s; the kill lands anywhere from start-up to mid-send.
        time.sleep(rng.uniform(0.3, 1.8))
        daemon.kill()
    daemon = rig.daemon().start()
    assert wait_until(lambda: rig.drained(total), timeout=scale(120, 300), step=0.5), rig.log()
    drained = time.monotonic() - started
    assert daemon.terminate() == 0
    lost, dups = check_exactly_once(rig, mails)
    assert lost == 0
    # Only a kill between the relay's 250 and the commit of "sent" may repeat a mail.
    assert dups <= kills
    print(f"\nkill -9: {kills} kills, {dups} duplicate deliveries (same Message-ID)")
    name = "kill -9, sender process" if sender_process else "kill -9 at random moments"
    report(name, total, f"{kills} kills", lost, dups, drained)


def test_imap_server_outage(private_dovecot: Dovecot, rig_for: Callable[..., Rig]) -> None:
    total, outage = scale(40, 200), scale(5, 30)
    rig = rig_for(private_dovecot)
    mails = escalations(total, seed=11)
    rig.append(mails[: total // 2])
    daemon = rig.daemon().start()
    assert wait_until(lambda: rig.count("Processed") > 0, timeout=30)
    started = time.monotonic()
    private_dovecot.take_down()  # with the daemon's session: stop() alone leaves it served
    time.sleep(outage)
    private_dovecot.start()
    rig.append(mails[total // 2 :])
    assert wait_until(lambda: rig.drained(total), timeout=120, step=0.5), rig.log()
    drained = time.monotonic() - started
    assert daemon.alive(), "the daemon must ride out the outage by itself"
    assert daemon.terminate() == 0
    lost, dups = check_exactly_once(rig, mails)
    assert (lost, dups) == (0, 0)
    assert rig.log().count("unavailable") <= 3, "log once per change of state, not per try"
    report("IMAP server down", total, f"{outage} s outage", lost, dups, drained)


def test_relay_answers_451_then_recovers(dovecot: Dovecot, rig_for: Callable[..., Rig]) -> None:
    total, failing = scale(40, 200), scale(3, 20)
    rig = rig_for(dovecot)
    mails = escalations(total, seed=13)
    rig.relay.fail_data_times = 10**9  # every DATA is deferred...
    rig.append(mails)
    daemon = rig.daemon().start()
    started = time.monotonic()
    time.sleep(failing)
    refused = sum(1 for line in rig.log().splitlines() if "temporary failure" in line)
    rig.relay.fail_data_times = 0  # ...until the relay recovers
    assert wait_until(lambda: rig.drained(total), timeout=120, step=0.5), rig.log()
    drained = time.monotonic() - started
    assert daemon.terminate() == 0
    lost, dups = check_exactly_once(rig, mails)
    assert (lost, dups) == (0, 0)
    assert refused > 0
    # In order per case: each case's forward reached the relay before its acknowledgement.
    order = {m_id: i for i, m_id in enumerate(received_ids_in_order(rig.relay))}
    for case_id, forward, ack in rig.db(
        "select f.case_id, f.message_id, a.message_id from messages f join messages a "
        "on a.case_id = f.case_id and a.kind = 'acknowledgement' where f.kind = 'forward'"
    ):
        assert order[forward] < order[ack], f"case {case_id} out of order"
    report("relay 451 then 250", total, f"{failing} s of 451", lost, dups, drained)


def received_ids_in_order(relay: RecordingRelay) -> list[str]:
    # Read as a receiving system would: unfolded, brackets off.
    return [
        "".join(str(headers_of(m.data)["Message-ID"]).split()).strip("<>") for m in relay.messages
    ]


def test_relay_refuses_one_vendor(dovecot: Dovecot, rig_for: Callable[..., Rig]) -> None:
    total = scale(20, 100)
    rig = rig_for(dovecot)
    mails = escalations(total, seed=17)
    rig.relay.refuse["soporte@hibot.us"] = "550 5.1.1 <soporte@hibot.us>: mailbox unavailable"
    rig.append(mails)
    daemon = rig.daemon().start()
    started = time.monotonic()
    assert wait_until(lambda: rig.drained(total), timeout=120, step=0.5), rig.log()
    drained = time.monotonic() - started
    assert daemon.terminate() == 0
    hibot = sum(1 for kind, _ in mails if kind == "hibot")
    statuses = dict(rig.db("select status, count(*) from cases group by status"))
    assert statuses == {"undeliverable": hibot, "open": total - hibot}
    notices = rig.db("select count(*) from messages where kind='undeliverable' and delivery='sent'")
    assert notices[0][0] == hibot  # every agent told
    assert rig.relay.to("soporte@hibot.us") == []
    for vendor in ("panda", "operaciones", "tech"):
        assert len(rig.relay.to(VENDORS[vendor])) == sum(1 for k, _ in mails if k == vendor)
    report("relay 550 for one vendor", total, f"{hibot} refused", 0, 0, drained)


def test_uidvalidity_change_processes_nothing_twice(
    dovecot: Dovecot, rig_for: Callable[..., Rig]
) -> None:
    total = scale(20, 100)
    rig = rig_for(dovecot, folder="Escalaciones")
    mails = escalations(total, seed=19)
    rig.append(mails)
    daemon = rig.daemon().start()
    assert wait_until(lambda: rig.drained(total), timeout=120, step=0.5), rig.log()
    sent_before = len(rig.relay.messages)
    client = rig.mailbox()
    old = client.folder_status("Escalaciones", ["UIDVALIDITY"])[b"UIDVALIDITY"]
    client.delete_folder("Escalaciones")  # the admin recreates the mailbox...
    client.create_folder("Escalaciones")
    client.logout()
    started = time.monotonic()
    rig.append(mails)  # ...with the same messages in it
    # Read after the APPEND: Dovecot may answer 0 for a folder nothing has opened yet.
    client = rig.mailbox()
    new = client.folder_status("Escalaciones", ["UIDVALIDITY"])[b"UIDVALIDITY"]
    client.logout()
    assert new not in (old, 0)
    assert wait_until(lambda: rig.count("Escalaciones") == 0, timeout=60, step=0.5), rig.log()
    drained = time.monotonic() - started
    assert daemon.terminate() == 0
    assert rig.db("select count(*) from cases")[0][0] == total
    assert len(rig.relay.messages) == sent_before
    assert rig.db("select uidvalidity from imap_state")[0][0] == new
    report("UIDVALIDITY change", total, "mailbox recreated", 0, 0, drained)


@pytest.mark.postgresql_only  # SQLite serves one daemon (test_several_daemons.py)
def test_two_daemons_one_mailbox(dovecot: Dovecot, rig_for: Callable[..., Rig]) -> None:
    total = scale(60, 300)
    rig = rig_for(dovecot)
    mails = escalations(total, seed=23)
    first, second = rig.daemon().start(), rig.daemon().start()
    time.sleep(1.5)
    started = time.monotonic()
    rig.append(mails)
    assert wait_until(lambda: rig.drained(total), timeout=180, step=0.5), rig.log()
    drained = time.monotonic() - started
    assert (first.terminate(), second.terminate()) == (0, 0), rig.log()[-4000:]
    lost, dups = check_exactly_once(rig, mails)
    assert (lost, dups) == (0, 0)
    report("two daemons, one mailbox", total, "2 daemons", lost, dups, drained)


def summary_table() -> str:
    """The scenarios run so far, as the README's Reliability table shows them."""
    lines = [
        f"{'scenario':<28} {'messages':>8} {'faults':>18} {'lost':>5} {'dups':>5} {'drain s':>8}"
    ]
    lines += [
        f"{r['scenario']:<28} {r['messages']:>8} {r['faults']:>18} {r['lost']:>5} "
        f"{r['duplicates']:>5} {r['drain_s']:>8}"
        for r in REPORT
    ]
    return "\n".join(lines)


def test_login_refused_keeps_outbox_flowing(dovecot: Dovecot, rig_for: Callable[..., Rig]) -> None:
    from mailrouter.config import load_config
    from mailrouter.daemon import utc_now
    from mailrouter.service import Pipeline
    from mailrouter.store.db import Store
    from tests.conftest import escalation

    rig = rig_for(dovecot, password="wrong")
    # Mail already decided (e.g. before a password rotation) waits in the outbox.
    config = load_config(rig.config)
    store = Store(config.database_url)
    Pipeline(config, store, utc_now).process(escalation("01-hibot-basic.eml"))
    store.close()
    daemon = rig.daemon().start()
    started = time.monotonic()
    assert wait_until(lambda: len(rig.relay.messages) == 2, timeout=30), rig.log()
    time.sleep(4)  # several reconnection tries (1 s, 2 s, 2 s...)
    assert daemon.alive()
    assert daemon.terminate() == 0
    refusals = [line for line in rig.log().splitlines() if "retrying with backoff" in line]
    assert len(refusals) == 1, refusals  # once per change of state, not once per try
    assert "LoginError" in refusals[0] or "authentication" in refusals[0].lower()
    report("IMAP login refused", 1, "wrong password", 0, 0, time.monotonic() - started)
