"""End to end against real servers: escalations in, forwards and acknowledgements out."""

from __future__ import annotations

import email
import email.policy
import random
import smtplib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from mailrouter import model
from mailrouter.config import Config, load_config
from mailrouter.intake import imap as intake
from mailrouter.intake.imap import BUSY_POLL_SECONDS, keep_polling
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from mailrouter.testing.factory import VENDORS, escalations
from mailrouter.testing.servers import Dovecot, RecordingRelay, wait_until
from tests.conftest import DaemonThread, crlf, escalation, open_sockets

pytestmark = pytest.mark.integration

# file -> (vendor address, priority, a value of the agent's that the forward must carry)
EXPECTED = {
    "01-hibot-basic.eml": ("soporte@hibot.us", "ALTA", "mrodriguez@lafise.com.ni"),
    "02-panda-basic.eml": ("soporte_revendedores@clickpanda.com", "MEDIA", "compensar_mkt"),
    "03-operaciones-encuestas.eml": ("support@example.hs-inbox.com", "MEDIA", "Incidencia"),
    "04-tech-endoso.eml": ("tech@example.com", "URGENTE", "7781-22"),
}
AGENTS = {
    "01-hibot-basic.eml": "laura.gomez@example.com",
    "02-panda-basic.eml": "andres.perez@example.com",
    "03-operaciones-encuestas.eml": "laura.gomez@example.com",
    "04-tech-endoso.eml": "andres.perez@example.com",
}


def smtp_outbound(relay: RecordingRelay) -> dict[str, Any]:
    return {
        "transport": "smtp",
        "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
    }


def text_of(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def assert_delivered(relay: RecordingRelay, store: Store) -> None:
    """Each vendor got exactly one forward with the tag and fields; each agent one ack per case."""
    cases = {c.provider: c for c in store.cases()}
    assert len(cases) == 4
    for vendor, priority, value in EXPECTED.values():
        forwards = relay.to(vendor)
        assert len(forwards) == 1, f"{vendor} got {len(forwards)} forwards"
        msg = email.message_from_bytes(forwards[0].data, policy=email.policy.default)
        tag = f"[ESC-{int(msg['Subject'].split(']')[0].split('-')[1]):06d}]"
        assert msg["Subject"].startswith(tag)
        assert msg["Reply-To"] == "escalaciones@example.com"
        assert msg["Message-ID"].endswith("@example.com>")
        assert value in text_of(forwards[0].data)
        assert msg["Auto-Submitted"] is None  # the vendor's ticket robot must still answer
        case = next(c for c in cases.values() if f"{c.id:06d}" in tag)
        assert case.priority == priority
        assert case.status == "open"
        stored_ids = [m.message_id for m in store.outbound(case.id)]
        assert msg["Message-ID"].strip("<>") in stored_ids
    for agent in set(AGENTS.values()):
        acks = relay.to(agent)
        expected = sum(1 for a in AGENTS.values() if a == agent)
        assert len(acks) == expected
        for ack in acks:
            msg = email.message_from_bytes(ack.data, policy=email.policy.default)
            assert msg["Auto-Submitted"] == "auto-generated"
            assert "Prioridad:" in text_of(ack.data) and "Seguimiento:" in text_of(ack.data)
    # 04 is URGENTE: the team lead is alerted at once (one more mail).
    (alert,) = relay.to("lider.soporte@example.com")
    assert "URGENTE" in str(
        email.message_from_bytes(alert.data, policy=email.policy.default)["Subject"]
    )
    assert len(relay.messages) == 9


def test_imap_intake_end_to_end(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    for name in EXPECTED:
        mailbox.append("INBOX", escalation(name))
    mailbox.append("INBOX", escalation("10-spoofed-sender.eml"))
    config = write_config(
        {
            "intake": {"source": "imap", "imap": dovecot.imap_settings(user)},
            "outbound": smtp_outbound(relay),
        }
    )

    daemon = run_daemon(config)
    assert wait_until(lambda: len(relay.messages) >= 9, timeout=30)
    mailbox.select_folder("INBOX")
    assert wait_until(lambda: not mailbox.noop() or not mailbox.search("ALL"), timeout=10)
    daemon.stop()

    store = Store(daemon.config.database_url)
    assert_delivered(relay, store)
    mailbox.select_folder("INBOX")
    assert mailbox.search("ALL") == []
    mailbox.select_folder("Processed")
    assert len(mailbox.search("ALL")) == 4
    mailbox.select_folder("Quarantine")
    assert len(mailbox.search("ALL")) == 1
    quarantined = [m for m in store.inbound() if m.outcome == "quarantined"]
    assert len(quarantined) == 1 and "allowed_senders" in (quarantined[0].reason or "")

    # A restart finds nothing new to do: no second case, no second forward.
    mailbox.select_folder("Processed")
    mailbox.copy(mailbox.search("ALL"), "INBOX")  # an admin drags them back to INBOX
    daemon = run_daemon(config)
    mailbox.select_folder("INBOX")
    assert wait_until(lambda: not mailbox.noop() or not mailbox.search("ALL"), timeout=15)
    daemon.stop()
    assert len(store.cases()) == 4
    assert len(relay.messages) == 9


def test_imap_crash_between_commit_and_move(
    dovecot: Dovecot, relay: RecordingRelay, write_config: Callable[..., Path]
) -> None:
    """Outcome committed but the daemon died before MOVE: a later pass only moves it, once
    the mail has been committed longer than a worker takes to move its batch (until then it
    may be another daemon's on the same mailbox, about to move it itself)."""
    from mailrouter.config import load_config
    from mailrouter.intake.imap import ImapIntake
    from mailrouter.model import ImapSource
    from mailrouter.service import Pipeline
    from mailrouter.store.repo import MOVE_GRACE_SECONDS

    now = [datetime(2026, 11, 23, 14, 0, tzinfo=UTC)]

    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    mailbox.append("INBOX", escalation("01-hibot-basic.eml"))
    config = load_config(
        write_config({"intake": {"source": "imap", "imap": dovecot.imap_settings(user)}})
    )
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, lambda: now[0])
    intake = ImapIntake(config.settings.intake.imap, pipeline.intake_hooks())
    info = mailbox.select_folder("INBOX")
    (uid,) = mailbox.search("ALL")
    raw = mailbox.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    first = pipeline.process(raw, ImapSource(intake.mailbox, int(info[b"UIDVALIDITY"]), uid))
    assert first.outcome == "routed"

    client = intake.connect()
    now[0] += timedelta(seconds=MOVE_GRACE_SECONDS / 2)
    assert intake.run_pass(client) == 0  # not processed again, and not moved yet
    mailbox.select_folder("INBOX")
    assert mailbox.search("ALL") == [uid]
    now[0] += timedelta(seconds=MOVE_GRACE_SECONDS)
    assert intake.run_pass(client) == 0  # nothing new processed...
    client.logout()
    mailbox.select_folder("INBOX")
    assert mailbox.search("ALL") == []  # ...but the message was moved
    assert len(store.cases()) == 1
    assert len(store.outbound()) == 2


def test_small_mails_fetched_together_are_committed_in_groups_then_moved(
    dovecot: Dovecot, write_config: Callable[..., Path]
) -> None:
    from dataclasses import replace

    from mailrouter.intake.imap import COMMIT_GROUP, ImapIntake

    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    count = COMMIT_GROUP + 4
    for _, raw in escalations(count, seed=11):
        mailbox.append("INBOX", raw)
    config = load_config(
        write_config({"intake": {"source": "imap", "imap": dovecot.imap_settings(user)}})
    )
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, lambda: datetime(2026, 11, 23, 14, 0, tzinfo=UTC))
    groups: list[int] = []
    hooks = pipeline.intake_hooks()

    def grouped(mails: list[tuple[bytes, model.ImapSource]]) -> list[model.Result]:
        mailbox.select_folder("INBOX")
        assert len(mailbox.search("ALL")) == count  # nothing moved before its commit
        groups.append(len(mails))
        return pipeline.process_group(mails)

    intake = ImapIntake(config.settings.intake.imap, replace(hooks, ingest_group=grouped))
    client = intake.connect()
    assert intake.run_pass(client) == count
    client.logout()
    assert groups == [COMMIT_GROUP, 4]
    mailbox.select_folder("INBOX")
    assert mailbox.search("ALL") == []
    assert len(store.cases()) == count


def _two_daemons(
    dovecot: Dovecot,
    write_config: Callable[..., Path],
    mails: list[tuple[str, bytes]],
    now: list[datetime],
) -> tuple[IMAPClient, Config, Pipeline, Pipeline]:
    """A new mailbox holding `mails` (and a Processed folder), and two daemons' pipelines
    on one database at the clock `now[0]`: this host's, and a live one's elsewhere."""
    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    mailbox.create_folder("Processed")
    for _, raw in mails:
        mailbox.append("INBOX", raw)
    config = load_config(
        write_config({"intake": {"source": "imap", "imap": dovecot.imap_settings(user)}})
    )
    one = Pipeline(config, Store(config.database_url), lambda: now[0])
    other = Pipeline(config, Store(config.database_url), lambda: now[0])
    other.identity = "another-host:4242:1"  # a live daemon elsewhere
    return mailbox, config, one, other


def test_mails_a_dead_daemon_left_behind_are_moved_once(
    dovecot: Dovecot, write_config: Callable[..., Path]
) -> None:
    """A daemon committed three mails and died before moving them: the survivors both see
    them left behind. One that finds them claimed by the other leaves them alone; one whose
    view is older than the other's move does not move them again (a mail moved by two
    sessions at once lands in Processed twice)."""
    from dataclasses import replace

    from mailrouter.intake.imap import ImapIntake
    from mailrouter.model import ImapSource
    from mailrouter.store.repo import MOVE_GRACE_SECONDS

    now = [datetime(2026, 11, 23, 14, 0, tzinfo=UTC)]
    mailbox, config, one, other = _two_daemons(dovecot, write_config, escalations(3, seed=5), now)
    settings = config.settings.intake.imap
    box = ImapIntake(settings, one.intake_hooks()).mailbox  # as the intake names it
    validity = int(mailbox.select_folder("INBOX")[b"UIDVALIDITY"])
    uids = mailbox.search("ALL")
    for uid, data in mailbox.fetch(uids, ["BODY.PEEK[]"]).items():
        assert one.process(data[b"BODY[]"], ImapSource(box, validity, uid)).outcome
    now[0] += timedelta(seconds=2 * MOVE_GRACE_SECONDS)  # long enough: left behind

    def held_by_the_other(name: str, validity: int, wanted: list[int]) -> list[int]:
        other.claim_uids(name, validity, wanted)  # the other daemon got there first
        return one.claim_uids(name, validity, wanted)

    first = ImapIntake(settings, replace(one.intake_hooks(), claim=held_by_the_other))
    first_client = first.connect()
    assert first.run_pass(first_client) == 0
    first_client.logout()
    mailbox.select_folder("INBOX")
    assert mailbox.search("ALL") == uids  # not moved: the other holds them
    other.release_uids(box, validity, uids)

    survivor = ImapIntake(settings, other.intake_hooks())
    survivor_client = survivor.connect()
    late = ImapIntake(settings, one.intake_hooks())

    def known_after_the_others_move(name: str, validity: int, batch: list[int]) -> Any:
        assert survivor.run_pass(survivor_client) == 0  # moves them and lets them go
        return one.known_outcomes(name, validity, batch)

    late.hooks = replace(late.hooks, known=known_after_the_others_move)
    late_client = late.connect()
    assert late.run_pass(late_client) == 0  # searched before the move, claims after it
    for client in (late_client, survivor_client):
        client.logout()
    for pipeline in (one, other):
        pipeline.store.close()
    assert mailbox.folder_status("Processed", ["MESSAGES"])[b"MESSAGES"] == 3
    mailbox.select_folder("INBOX")
    assert mailbox.search("ALL") == []


def test_a_batch_that_outlasts_its_claims_renews_them_and_leaves_what_another_daemon_took(
    dovecot: Dovecot, write_config: Callable[..., Path]
) -> None:
    """A batch of large mails can take longer than a claim lasts. Past half of it, the
    intake renews its claims before the next step; mails another daemon claimed once ours
    ran out are its own to process and move: this daemon neither commits nor moves them
    (a mail it committed included), nor lets go of that daemon's claims."""
    from dataclasses import replace

    from mailrouter.intake.imap import COMMIT_GROUP, ImapIntake
    from mailrouter.model import IMAP_CLAIM_SECONDS

    now = [datetime(2026, 11, 23, 14, 0, tzinfo=UTC)]
    mails = escalations(COMMIT_GROUP + 4, seed=17)
    mailbox, config, one, other = _two_daemons(dovecot, write_config, mails, now)
    hooks = one.intake_hooks()
    validity = int(mailbox.select_folder("INBOX")[b"UIDVALIDITY"])
    uids = mailbox.search("ALL")
    late = uids[COMMIT_GROUP:]
    box = ImapIntake(config.settings.intake.imap, hooks).mailbox
    committed: list[int] = []

    def slow_group(mails: list[tuple[bytes, model.ImapSource]]) -> list[model.Result]:
        first = not committed
        committed.extend(source.uid for _, source in mails)
        results = one.process_group(mails)
        if first:  # the first group took longer than a claim lasts
            now[0] += timedelta(seconds=2 * IMAP_CLAIM_SECONDS)
            assert other.claim_uids(box, validity, [uids[0], *late]) == [uids[0], *late]
        return results

    # Renewed at every step: as if each step came after half a claim's time.
    intake = ImapIntake(
        config.settings.intake.imap, replace(hooks, ingest_group=slow_group, claim_seconds=0.0)
    )
    client = intake.connect()
    assert intake.run_pass(client) == COMMIT_GROUP
    client.logout()
    assert committed == uids[:COMMIT_GROUP]
    mailbox.select_folder("INBOX")
    assert mailbox.search("ALL") == [uids[0], *late]  # the other daemon's to move
    assert mailbox.folder_status("Processed", ["MESSAGES"])[b"MESSAGES"] == COMMIT_GROUP - 1
    assert one.claim_uids(box, validity, [uids[0], *late]) == []  # its claims left alone
    for pipeline in (one, other):
        pipeline.store.close()


def test_smtp_listener_end_to_end(
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    from mailrouter.testing.servers import free_port

    port = free_port()
    config = write_config(
        {"intake": {"source": "smtp", "listen": {"port": port}}, "outbound": smtp_outbound(relay)}
    )
    daemon = run_daemon(config)
    with smtplib.SMTP("127.0.0.1", port) as client:
        for name in EXPECTED:
            client.sendmail(AGENTS[name], ["escalaciones@example.com"], crlf(escalation(name)))
        # The same mail again (a client retry): accepted, but nothing is sent twice.
        client.sendmail(
            AGENTS["01-hibot-basic.eml"],
            ["escalaciones@example.com"],
            crlf(escalation("01-hibot-basic.eml")),
        )
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("x@example.com", ["someone@else.example"], b"Subject: x\r\n\r\nhi")
    assert wait_until(lambda: len(relay.messages) >= 9, timeout=20)
    daemon.stop()
    assert_delivered(relay, Store(daemon.config.database_url))


def test_the_listener_says_nothing_of_the_outcome_and_keeps_nothing_over_the_limit(
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    from mailrouter.testing.servers import free_port

    port = free_port()
    limit = 200_000
    config = write_config(
        {
            "intake": {"source": "smtp", "listen": {"port": port}, "max_message_bytes": limit},
            "outbound": smtp_outbound(relay),
        }
    )
    daemon = run_daemon(config)
    stranger = b"From: x@evil.example.org\r\nSubject: hola\r\n\r\nhola\r\n"
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo()
        client.mail("x@evil.example.org")
        client.rcpt("escalaciones@example.com")
        code, text = client.data(stranger)
        assert code == 250
        assert text.startswith(b"2.0.0 Ok: queued as ")
        assert b"quarantine" not in text and b"rout" not in text
        huge = stranger + (b"x" * 75 + b"\r\n") * (2 * limit // 77)
        with pytest.raises(smtplib.SMTPSenderRefused) as declared:  # SIZE said in advance
            client.sendmail("x@evil.example.org", ["escalaciones@example.com"], huge)
        assert declared.value.smtp_code == 552
        client.rset()
        # no SIZE: the data itself is cut off
        client.mail("x@evil.example.org")
        client.rcpt("escalaciones@example.com")
        assert client.data(huge)[0] == 552
    daemon.stop()
    stored = Store(daemon.config.database_url)
    assert [len(m.raw) for m in stored.inbound()] == [len(stranger)]  # the large one: nothing
    stored.close()


def test_imap_idle_takes_new_mail_without_waiting_for_the_poll(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
) -> None:
    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    config = write_config(
        {
            "intake": {"source": "imap", "imap": dovecot.imap_settings(user, poll_interval=120)},
            "outbound": smtp_outbound(relay),
        }
    )
    daemon = run_daemon(config)
    # Let the first sweep of the empty INBOX finish and the IDLE begin.
    assert wait_until(lambda: mailbox.folder_exists("Processed"), timeout=15)
    time.sleep(0.5)
    mailbox.append("INBOX", escalation("02-panda-basic.eml"))
    # Far sooner than the 120 s poll: only IDLE can have woken the daemon.
    assert wait_until(lambda: len(relay.messages) == 2, timeout=20)
    daemon.stop()
    assert len(relay.to("soporte_revendedores@clickpanda.com")) == 1


def test_while_mail_keeps_coming_the_poller_looks_again_instead_of_idling() -> None:
    assert not keep_polling(None, now=100.0)  # nothing yet: IDLE
    assert keep_polling(99.0, now=100.0)  # mail a second ago: look again shortly
    assert not keep_polling(100.0 - BUSY_POLL_SECONDS, now=100.0)  # quiet long enough: IDLE


def test_large_mails_over_imap_are_fetched_in_slices_and_forwarded_intact(
    dovecot: Dovecot,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Scaled down (slices of 64 KB, a 300 KB attachment) to run fast; the same path takes a
    # 10 MB screenshot in 4 MB slices.
    monkeypatch.setattr(intake, "FETCH_BYTES", 64 * 1024)
    monkeypatch.setattr(model, "LARGE_MAIL_BYTES", 100 * 1024)
    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    blobs = {}
    for n, (_, raw) in enumerate(escalations(3, seed=8)):
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        msg.make_mixed()
        blobs[f"captura-{n}.png"] = random.Random(n).randbytes(300_000 + n)
        msg.add_attachment(
            blobs[f"captura-{n}.png"], maintype="image", subtype="png", filename=f"captura-{n}.png"
        )
        mailbox.append("INBOX", msg.as_bytes())
    mailbox.append("INBOX", escalation("01-hibot-basic.eml"))  # a small one among them
    config = write_config(
        {
            "intake": {"source": "imap", "imap": dovecot.imap_settings(user)},
            "outbound": smtp_outbound(relay),
        }
    )
    daemon = run_daemon(config)
    vendors = set(VENDORS.values()) | {"soporte@hibot.us"}
    assert wait_until(
        lambda: sum(bool(set(m.rcpt_tos) & vendors) for m in relay.messages) == 4, timeout=30
    )
    daemon.stop()
    received = {
        part.get_filename(): part.get_payload(decode=True)
        for m in relay.messages
        for part in email.message_from_bytes(m.data, policy=email.policy.default).walk()
        if part.get_filename()
    }
    assert received == blobs


def test_a_mail_over_the_size_limit_is_quarantined_from_its_header_alone(
    dovecot: Dovecot,
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fetching and parsing a mail over the limit would cost several times its size in
    # memory, only to refuse it: its header says who to tell, the server keeps the mail.
    user = dovecot.new_user()
    mailbox = dovecot.client(user)
    msg = email.message_from_bytes(escalation("01-hibot-basic.eml"), policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    msg.make_mixed()
    msg.add_attachment(random.Random(3).randbytes(200_000), maintype="image", subtype="png")
    big = msg.as_bytes()
    mailbox.append("INBOX", big)
    mailbox.append("INBOX", escalation("02-panda-basic.eml"))  # a small one after it
    config = load_config(
        write_config(
            {
                "intake": {
                    "source": "imap",
                    "imap": dovecot.imap_settings(user),
                    "max_message_bytes": 100_000,
                }
            }
        )
    )
    fetched: list[Any] = []
    real_fetch = IMAPClient.fetch

    def spying_fetch(self: IMAPClient, messages: Any, data: Any, *args: Any) -> Any:
        fetched.append(data)
        return real_fetch(self, messages, data, *args)

    monkeypatch.setattr(IMAPClient, "fetch", spying_fetch)
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, lambda: datetime.now(UTC))
    poller = intake.ImapIntake(config.settings.intake.imap, pipeline.intake_hooks())
    client = poller.connect()
    assert poller.run_pass(client) == 2
    assert ["BODY.PEEK[HEADER]"] in fetched
    assert fetched.count(["BODY.PEEK[]"]) == 1  # the small mail's group; never the big one
    big_inbound, small_inbound = store.inbound()
    assert big_inbound.outcome == "quarantined"
    reason = big_inbound.reason or ""
    assert f"message of {len(crlf(big))} bytes is over the 100000-byte limit" in reason
    assert "only its header is stored" in reason
    assert big_inbound.raw.endswith(b"\r\n\r\n") and len(big_inbound.raw) < 2000
    assert small_inbound.outcome == "routed"
    (reply,) = [m for m in store.outbound() if m.kind == "too_large"]
    assert reply.recipients == ["laura.gomez@example.com"]
    # The mail itself is whole in the quarantine folder.
    client.select_folder("Quarantine")
    (uid,) = client.search("ALL")
    kept = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    assert kept == crlf(big)
    client.logout()
    store.close()


@pytest.mark.parametrize("over", ["tcp", "unix socket"])
def test_lmtp_intake_end_to_end(
    over: str,
    relay: RecordingRelay,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
    tmp_path: Path,
) -> None:
    """Postfix or Dovecot hands mail over with LMTP: a reply per recipient, after the
    commit; the mail routed like any other."""
    from mailrouter.testing.servers import free_port

    port, socket_path = free_port(), tmp_path / "lmtp.sock"
    listen = {"socket": str(socket_path)} if over == "unix socket" else {"port": port}
    config = write_config(
        {"intake": {"source": "lmtp", "listen": listen}, "outbound": smtp_outbound(relay)}
    )
    run_daemon(config)
    client = (
        smtplib.LMTP(str(socket_path)) if over == "unix socket" else smtplib.LMTP("127.0.0.1", port)
    )
    with client:
        code, _ = client.ehlo()  # smtplib's LMTP sends LHLO
        assert code == 250
        refused = client.sendmail(
            AGENTS["01-hibot-basic.eml"],
            ["escalaciones@example.com"],
            crlf(escalation("01-hibot-basic.eml")),
        )
        assert refused == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("x@example.com", ["someone@else.example"], b"Subject: x\r\n\r\nhi")
    assert wait_until(lambda: len(relay.to("soporte@hibot.us")) == 1, timeout=20)


@pytest.mark.sqlite_only  # about the IMAP connection alone
def test_a_refused_imap_login_leaves_no_connection_open(
    dovecot: Dovecot, write_config: Callable[..., Path]
) -> None:
    """A wrong password (or a server that cuts us off before the folders are ready) is
    retried with backoff for as long as the daemon runs: each refused connection is
    closed at once, not left to the garbage collector."""
    user = dovecot.new_user()
    settings = dovecot.imap_settings(user, password="wrong")
    config = load_config(write_config({"intake": {"source": "imap", "imap": settings}}))
    pipeline = Pipeline(config, Store(config.database_url), lambda: datetime.now(UTC))
    poller = intake.ImapIntake(config.settings.intake.imap, pipeline.intake_hooks())
    before = open_sockets()
    refusals = []  # each keeps its traceback, and with it the client it was raised in
    for _ in range(2):
        with pytest.raises(LoginError) as refused:
            poller.connect()
        refusals.append(refused)
    assert open_sockets() == before
