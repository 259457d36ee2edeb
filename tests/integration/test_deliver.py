"""The outbox sender against a real aiosmtpd relay and a real folder."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from mailrouter import model
from mailrouter.config import Config, RetrySettings, SmtpSettings, load_config
from mailrouter.deliver import transports as deliver
from mailrouter.deliver.sender import Sender
from mailrouter.deliver.transports import FileTransport, SmtpTransport
from mailrouter.model import TemporaryFailure
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from mailrouter.store.outbox import backoff_delay, queue_mail
from mailrouter.testing.factory import escalations
from mailrouter.testing.servers import RecordingRelay
from tests.conftest import PROJECT, deliver_due, escalation, headers_of, open_sockets


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def smtp_setup(
    write_config: Callable[..., Path], relay: RecordingRelay, clock: Clock, lanes: int = 1
) -> tuple[Pipeline, Sender]:
    config = load_config(
        write_config(
            {
                "outbound": {
                    "transport": "smtp",
                    "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
                }
            }
        )
    )
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, clock)
    sender = Sender(
        store,
        SmtpTransport(config.settings.outbound.smtp),
        config.settings.outbound.retry,
        clock,
        random.Random(1),
        on_failed=pipeline.delivery_failed,
        lanes=lanes,
    )
    return pipeline, sender


def test_a_sender_stopped_mid_batch_hands_back_only_what_it_did_not_send(
    write_config: Callable[..., Path], clock: Clock
) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, clock)
    for _, raw in escalations(3, seed=8):
        pipeline.process(raw)
    sender = Sender(store, FileTransport(config.outbox_dir), config.settings.outbound.retry, clock)
    # Stop once the first mail is out: the batch claimed every due row.
    sent_first = asyncio.run(sender.deliver_due(should_stop=lambda: config.outbox_dir.exists()))
    assert sent_first == 1
    rows = {(m.delivery, m.claimed_by is None) for m in store.outbound()}
    assert rows == {("sent", True), ("pending", True)}  # no row left claimed
    rest = asyncio.run(sender.deliver_due())
    assert sent_first + rest == len(store.outbound())
    assert {m.delivery for m in store.outbound()} == {"sent"}
    assert len(list(config.outbox_dir.iterdir())) == len(store.outbound())  # each file once


def test_a_batch_sent_whole_is_not_handed_back(
    write_config: Callable[..., Path], clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Handing back costs a write transaction per batch; a batch sent whole has nothing to
    # hand back.
    config = load_config(write_config())
    store = Store(config.database_url)
    Pipeline(config, store, clock).process(escalation("01-hibot-basic.eml"))
    sender = Sender(store, FileTransport(config.outbox_dir), config.settings.outbound.retry, clock)
    handed_back: list[list[int]] = []
    monkeypatch.setattr(sender, "_unclaim", handed_back.append)
    assert asyncio.run(sender.deliver_due()) == 2
    assert handed_back == []


def test_file_transport_writes_each_row_once(
    write_config: Callable[..., Path], clock: Clock, tmp_path: Path
) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, clock)
    pipeline.process(escalation("01-hibot-basic.eml"))
    sender = Sender(store, FileTransport(config.outbox_dir), config.settings.outbound.retry, clock)
    assert asyncio.run(sender.deliver_due()) == 2
    assert asyncio.run(sender.deliver_due()) == 0
    files = sorted(p.name for p in config.outbox_dir.iterdir())
    assert files == [
        "000002-forward.eml",
        "000003-acknowledgement.eml",
    ]
    text = (config.outbox_dir / files[0]).read_bytes()
    assert b"X-Envelope-To: soporte@hibot.us" in text
    assert all(m.delivery == "sent" and m.sent_at == clock.now for m in store.outbound())


def test_smtp_temporary_failure_is_retried_with_backoff(
    write_config: Callable[..., Path], relay: RecordingRelay, clock: Clock
) -> None:
    pipeline, sender = smtp_setup(write_config, relay, clock)
    pipeline.process(escalation("01-hibot-basic.eml"))
    relay.fail_data_times = 1
    assert deliver_due(sender) == 0
    forward, ack = sender.store.outbound()
    assert forward.delivery == "pending" and forward.attempts == 1
    assert "451" in (forward.last_error or "")
    assert forward.next_attempt_at is not None and forward.next_attempt_at > clock.now
    # The acknowledgement of the same case waits behind its forward: order per case.
    assert ack.delivery == "pending" and relay.messages == []
    clock.now = forward.next_attempt_at
    assert deliver_due(sender) == 2
    assert [m.rcpt_tos for m in relay.messages] == [
        ["soporte@hibot.us"],
        ["laura.gomez@example.com"],
    ]


def test_smtp_permanent_failure_marks_case_undeliverable(
    write_config: Callable[..., Path], relay: RecordingRelay, clock: Clock
) -> None:
    pipeline, sender = smtp_setup(write_config, relay, clock)
    relay.refuse["soporte@hibot.us"] = "550 5.1.1 no such mailbox"
    hibot = pipeline.process(escalation("01-hibot-basic.eml")).case_id
    panda = pipeline.process(escalation("02-panda-basic.eml")).case_id
    assert hibot is not None and panda is not None  # both escalations open a case
    deliver_due(sender)
    deliver_due(sender)  # the failure notice queued by the first pass
    by_case = {c.id: c for c in sender.store.cases()}
    assert by_case[hibot].status == "undeliverable"
    assert by_case[panda].status == "open"
    forward = sender.store.outbound(hibot)[0]
    assert forward.delivery == "failed" and "550" in (forward.last_error or "")
    assert "delivery_failed" in [e.kind for e in sender.store.events(hibot)]
    # The agent is told it failed, never that it was sent; everything else still went out.
    kinds = {m.kind: m.delivery for m in sender.store.outbound(hibot)}
    assert kinds == {"forward": "failed", "acknowledgement": "cancelled", "undeliverable": "sent"}
    (notice,) = relay.to("laura.gomez@example.com")
    assert b"NO se pudo entregar a HIBOT" in notice.data or b"NO se pudo entregar" in notice.data
    assert b"550 5.1.1 no such mailbox" in notice.data
    assert len(relay.to("soporte_revendedores@clickpanda.com")) == 1
    assert len(relay.to("andres.perez@example.com")) == 1
    assert len(relay.messages) == 3


def test_relay_down_is_temporary(
    write_config: Callable[..., Path], relay: RecordingRelay, clock: Clock
) -> None:
    pipeline, sender = smtp_setup(write_config, relay, clock)
    sender.transport = SmtpTransport(sender.transport.settings.model_copy(update={"port": 1}))  # type: ignore[attr-defined]
    pipeline.process(escalation("02-panda-basic.eml"))
    deliver_due(sender)
    assert all(m.delivery == "pending" and m.attempts <= 1 for m in sender.store.outbound())


def test_gives_up_after_the_configured_time(
    write_config: Callable[..., Path], relay: RecordingRelay, clock: Clock
) -> None:
    pipeline, sender = smtp_setup(write_config, relay, clock)
    pipeline.process(escalation("02-panda-basic.eml"))
    relay.fail_data_times = 10_000
    clock.now += timedelta(hours=25)
    deliver_due(sender)
    forward = sender.store.outbound()[0]
    assert forward.delivery == "failed" and "gave up" in (forward.last_error or "")


def test_backoff_grows_and_is_capped() -> None:
    retry = RetrySettings(first_delay=30, max_delay=3600, give_up_after=86400)
    rng = random.Random(0)
    delays = [backoff_delay(n, retry, rng) for n in range(1, 12)]
    assert 15 <= delays[0] <= 30
    assert 60 <= delays[2] <= 120
    assert all(1800 <= d <= 3600 for d in delays[8:])


def test_lanes_send_cases_side_by_side_and_each_case_in_order(
    write_config: Callable[..., Path], relay: RecordingRelay, clock: Clock
) -> None:
    pipeline, sender = smtp_setup(write_config, relay, clock, lanes=3)
    for _, raw in escalations(6, seed=3):
        pipeline.process(raw)
    relay.data_delay = 0.05  # a slow relay: what lanes are for
    assert deliver_due(sender) == 12
    assert relay.most_at_once == 3  # three mails in flight, each on its own connection
    arrival = {
        "".join(str(headers_of(m.data)["Message-ID"]).split()).strip("<>"): n
        for n, m in enumerate(relay.messages)
    }
    for case in pipeline.store.cases():
        forward, ack = pipeline.store.outbound(case.id)
        assert (forward.kind, ack.kind) == ("forward", "acknowledgement")
        assert forward.message_id is not None and ack.message_id is not None
        assert arrival[forward.message_id] < arrival[ack.message_id]
    assert all(row.delivery == "sent" for row in pipeline.store.outbound())


def test_large_mails_leave_one_at_a_time_beside_small_ones(
    write_config: Callable[..., Path],
    relay: RecordingRelay,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every forward here is "large" and every acknowledgement small: lanes keep sending
    # the small ones while the large ones take turns, so at most one is read and in flight.
    pipeline, sender = smtp_setup(write_config, relay, clock, lanes=3)
    for _, raw in escalations(6, seed=5):
        pipeline.process(raw)
    sizes = {row.message_id: len(row.raw) for row in pipeline.store.outbound()}
    forwards = [len(r.raw) for r in pipeline.store.outbound() if r.kind == "forward"]
    acks = [len(r.raw) for r in pipeline.store.outbound() if r.kind == "acknowledgement"]
    assert max(acks) < min(forwards)
    monkeypatch.setattr(model, "LARGE_MAIL_BYTES", min(forwards) - 1)
    relay.data_delay = 0.05
    in_flight: list[str] = []
    most_large = 0
    real_send = sender.transport.send

    async def watching_send(sender_: str, rcpts: list[str], data: bytes, name: str) -> None:
        nonlocal most_large
        mid = "".join(str(headers_of(data)["Message-ID"]).split()).strip("<>")
        in_flight.append(mid)
        most_large = max(most_large, sum(model.is_large(sizes[m]) for m in in_flight))
        try:
            await real_send(sender_, rcpts, data, name)
        finally:
            in_flight.remove(mid)

    monkeypatch.setattr(sender.transport, "send", watching_send)
    assert deliver_due(sender) == len(sizes)
    assert most_large == 1
    assert relay.most_at_once >= 2
    assert all(row.delivery == "sent" for row in pipeline.store.outbound())


def _awkward_mail(size: int, seed: int) -> bytes:
    """Lines ending in CRLF, bare LF or bare CR, some starting with a dot, some long."""
    rng = random.Random(seed)
    lines, total = [b"Subject: big\r\n\r\n"], 0
    while total < size:
        body = bytes(rng.choice(b"abc .\r") for _ in range(rng.choice([0, 1, 5, 76, 300])))
        line = rng.choice([b"", b".", b".."]) + body + rng.choice([b"\r\n", b"\n", b"\r"])
        lines.append(line)
        total += len(line)
    return b"".join(lines)


@pytest.mark.parametrize("seed", range(5))
def test_large_mail_data_is_prepared_slice_by_slice_as_aiosmtplib_prepares_it(seed: int) -> None:
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    data = _awkward_mail(200_000, seed)
    whole = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data))
    for size in (1, 100, 4096, 65536, 10**6):
        assert b"".join(deliver.data_slices(data, size)) == whole


@pytest.mark.parametrize(
    "data",
    [b"", b".", b"\r", b"\n", b"\r\n", b"a", b".\n.", b"a\r.b", b"\r\r\n.", b"..\r\n..", b"x\n\r"],
)
def test_the_size_announced_is_that_of_the_data_sent(data: bytes) -> None:
    assert deliver.data_size(data) == len(b"".join(deliver.data_slices(data)))


@pytest.mark.parametrize("seed", range(5))
def test_the_size_announced_of_an_awkward_mail_is_that_of_the_data_sent(seed: int) -> None:
    data = _awkward_mail(100_000, seed)
    assert deliver.data_size(data) == len(b"".join(deliver.data_slices(data)))


def _stored(data: bytes) -> deliver.StoredMail:
    return deliver.StoredMail(len(data), lambda offset, length: data[offset : offset + length])


@pytest.mark.parametrize("seed", range(5))
def test_a_stored_mail_read_slice_by_slice_goes_out_as_the_whole_would(seed: int) -> None:
    """A large mail read from the store a slice at a time: the slices end anywhere, a CR LF
    or a line's leading dot may straddle two. On the wire it must be the same, and so must
    the size announced before it."""
    data = _awkward_mail(50_000, seed)

    async def pieces(mail: deliver.Mail, size: int) -> list[bytes]:
        if isinstance(mail, bytes):
            return [piece async for piece in deliver.wire_pieces(mail)]
        lines = [p async for p in deliver.whole_lines(mail, size)]
        assert b"".join(lines) == data
        assert all(p.endswith((b"\n", b"\r")) for p in lines[:-1])
        return [piece async for piece in deliver.wire_pieces(mail)]

    whole = b"".join(deliver.data_slices(data))
    for size in (7, 100, 4096, 10**6):
        assert b"".join(asyncio.run(pieces(_stored(data), size))) == whole
    assert asyncio.run(deliver.wire_size(_stored(data))) == len(whole)


@pytest.mark.parametrize(
    "data", [b"", b".", b"\r", b"\r\r", b"a\rb\r.c", b"\r\n.", b"x" * 3000, b".x\r" * 999]
)
def test_a_stored_mail_of_odd_line_ends_goes_out_as_the_whole_would(data: bytes) -> None:
    stored = _stored(data)
    sent = asyncio.run(_collect(deliver.wire_pieces(stored)))
    assert b"".join(sent) == b"".join(deliver.data_slices(data))
    assert asyncio.run(deliver.wire_size(stored)) == deliver.data_size(data)


def test_a_stored_mail_of_bare_cr_line_ends_is_still_read_a_few_lines_at_a_time() -> None:
    # Old Mac line ends: no LF to cut at, but a CR that ends a line will do.
    data = b".line\r" * 1000
    lines = asyncio.run(_collect(deliver.whole_lines(_stored(data), 64)))
    assert b"".join(lines) == data
    assert max(map(len, lines)) <= 64 + 6


async def _collect(pieces: Any) -> list[bytes]:
    return [piece async for piece in pieces]


@pytest.mark.parametrize("transport", ["smtp", "file"])
def test_a_large_mail_goes_out_read_from_the_store_a_slice_at_a_time(
    write_config: Callable[..., Path],
    relay: RecordingRelay,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
) -> None:
    """Issue 24: the sender never holds a large mail whole (it reads the store a slice at
    a time as the mail goes out), and the relay or the folder gets it byte for byte."""
    from aiosmtplib.protocol import normalize_message_line_endings

    pipeline, sender = smtp_setup(write_config, relay, clock)
    config = pipeline.config
    if transport == "file":
        sender.transport = FileTransport(config.outbox_dir)
    data = _awkward_mail(3 * 1024 * 1024, seed=11)
    outgoing = model.OutgoingMail(
        "forward", "big@example.com", "router@example.com", ["soporte@hibot.us"], "big", data
    )
    with pipeline.store.transaction() as session:
        queue_mail(session, None, clock(), outgoing)
    reads: list[int] = []
    read_slice = sender.store.read_raw_slice

    def reading_slice(row_id: int, offset: int, length: int) -> bytes:
        reads.append(length)
        return read_slice(row_id, offset, length)

    def whole(row_id: int) -> bytes:
        raise AssertionError("read whole")

    monkeypatch.setattr(sender.store, "read_raw_slice", reading_slice)
    monkeypatch.setattr(sender.store, "read_raw", whole)
    assert deliver_due(sender) == 1
    # Twice over (the size announced, then the data) for the relay, once for the folder.
    assert len(reads) == (2 if transport == "smtp" else 1) * -(-len(data) // max(reads))
    assert max(reads) <= deliver.DATA_SLICE_BYTES
    if transport == "smtp":
        (received,) = relay.messages
        assert received.data == normalize_message_line_endings(data)
    else:
        (written,) = config.outbox_dir.iterdir()
        envelope = b"X-Envelope-From: router@example.com\r\nX-Envelope-To: soporte@hibot.us\r\n"
        assert written.read_bytes() == envelope + data
    assert {row.delivery for row in pipeline.store.outbound()} == {"sent"}


def test_a_store_that_fails_while_a_large_mail_goes_out_leaves_it_for_a_retry(
    write_config: Callable[..., Path],
    relay: RecordingRelay,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database gone in the middle of a large mail's DATA is not the mail's fault: the
    relay gets nothing (the connection is dropped before the final dot), and the mail is
    tried again later, whole."""
    from aiosmtplib.protocol import normalize_message_line_endings

    from mailrouter.store.db import Unavailable

    pipeline, sender = smtp_setup(write_config, relay, clock)
    data = _awkward_mail(3 * 1024 * 1024, seed=12)
    outgoing = model.OutgoingMail(
        "forward", "big@example.com", "router@example.com", ["soporte@hibot.us"], "big", data
    )
    with pipeline.store.transaction() as session:
        queue_mail(session, None, clock(), outgoing)
    read_slice, reads = sender.store.read_raw_slice, []

    def failing_later(row_id: int, offset: int, length: int) -> bytes:
        reads.append(offset)
        if len(reads) == 10:  # past the SIZE's pass (7 slices), 2 slices into the DATA
            raise Unavailable("the database restarted")
        return read_slice(row_id, offset, length)

    monkeypatch.setattr(sender.store, "read_raw_slice", failing_later)
    assert deliver_due(sender) == 0
    (row,) = pipeline.store.outbound()
    assert row.delivery == "pending" and row.attempts == 1
    assert "the database restarted" in (row.last_error or "")
    assert relay.messages == []
    monkeypatch.setattr(sender.store, "read_raw_slice", read_slice)
    assert row.next_attempt_at is not None
    clock.now = row.next_attempt_at
    assert deliver_due(sender) == 1
    (received,) = relay.messages
    assert received.data == normalize_message_line_endings(data)


def test_a_connection_cut_short_by_the_store_is_closed_at_once(relay: RecordingRelay) -> None:
    """Not handed back for the next mail (it is in the middle of a DATA), nor left open
    for the garbage collector."""
    from mailrouter.store.db import Unavailable

    data = _awkward_mail(2 * 1024 * 1024, seed=13)

    def failing(offset: int, length: int) -> bytes:
        if offset >= 1024 * 1024:
            raise Unavailable("the database restarted")
        return data[offset : offset + length]

    transport = SmtpTransport(SmtpSettings(host=relay.host, port=relay.port, security="none"))

    small = b"Subject: x\r\n\r\nx"

    async def scenario() -> bool:
        before = open_sockets()
        await transport.send("router@example.com", ["soporte@hibot.us"], small, "small")
        with pytest.raises(TemporaryFailure):
            await transport.send(
                "router@example.com",
                ["soporte@hibot.us"],
                deliver.StoredMail(len(data), failing),
                "big",
            )
        # Closed on the loop's next turn; the relay (in this process) closes its end then.
        for _ in range(100):
            if open_sockets() == before:
                break
            await asyncio.sleep(0.05)
        closed = open_sockets() == before
        await transport.close()
        return closed

    assert asyncio.run(scenario())  # the connection the small mail opened went with the big
    assert len(relay.messages) == 1


def test_a_large_mail_reaches_the_relay_as_sendmail_would_deliver_it(
    relay: RecordingRelay,
) -> None:
    """Above LARGE_MAIL_BYTES the transport writes the DATA itself, a slice at a time
    (aiosmtplib would hold about five copies of the mail): the relay must get the same
    bytes, dots unstuffed, and a refused recipient must still be told apart."""
    from aiosmtplib.protocol import normalize_message_line_endings

    data = _awkward_mail(3 * 1024 * 1024, seed=7)
    assert model.is_large(len(data))
    transport = SmtpTransport(SmtpSettings(host=relay.host, port=relay.port, security="none"))
    relay.refuse["nobody@vendor.example"] = "550 5.1.1 no such user"

    async def scenario() -> None:
        await transport.send("router@example.com", ["soporte@hibot.us"], data, "big")
        await transport.send("router@example.com", ["soporte@hibot.us"], data, "again")
        with pytest.raises(deliver.PermanentFailure, match="550"):
            await transport.send("router@example.com", ["nobody@vendor.example"], data, "x")
        await transport.close()

    asyncio.run(scenario())
    expected = normalize_message_line_endings(data)
    assert [m.data == expected for m in relay.messages] == [True, True]
    assert relay.messages[0].rcpt_tos == ["soporte@hibot.us"]


_SEND_AND_DIE_BEFORE_RECORDING = """
import asyncio, os, signal, sys
from mailrouter.config import load_config
from mailrouter.daemon import utc_now
from mailrouter.deliver.sender import Sender
from mailrouter.deliver.transports import make_transport
from mailrouter.store.db import Store
config = load_config(sys.argv[1])
store = Store(config.database_url, state_dir=config.state_dir)
transport = make_transport(config)
send, sent = transport.send, []

async def send_the_first_only(*args):
    if sent:  # the second mail waits: the kill comes first
        await asyncio.Event().wait()
    sent.append(args)
    await send(*args)

transport.send = send_the_first_only
sender = Sender(store, transport, config.settings.outbound.retry, utc_now)
# Killed after the relay's 250 and the journal line, before the database hears of it.
store.write = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(sender.deliver_due())
"""


def test_a_mail_the_relay_took_from_a_sender_killed_before_recording_it_is_not_sent_again(
    write_config: Callable[..., Path], relay: RecordingRelay
) -> None:
    from mailrouter.daemon import utc_now
    from mailrouter.deliver.transports import make_transport

    path = write_config(
        {
            "outbound": {
                "transport": "smtp",
                "smtp": {"host": relay.host, "port": relay.port, "security": "none"},
            }
        }
    )
    config = load_config(path)
    store = Store(config.database_url, state_dir=config.state_dir)
    Pipeline(config, store, utc_now).process(escalation("01-hibot-basic.eml"))  # 2 rows
    dying = subprocess.run(
        [sys.executable, "-c", _SEND_AND_DIE_BEFORE_RECORDING, str(path)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dying.returncode == -signal.SIGKILL, dying.stderr
    assert len(relay.messages) == 1
    assert {m.delivery for m in store.outbound()} == {"sending"}  # both claimed, none recorded
    assert store.journal_dir is not None
    journals = list(store.journal_dir.glob("*.ids"))
    assert len(journals) == 1

    sender = Sender(store, make_transport(config), config.settings.outbound.retry, utc_now)
    # The dead sender's claims are released: the mail it had sent recorded, the other sent.
    assert deliver_due(sender) == 1
    sender.close()
    forward, ack = store.outbound()
    assert (forward.delivery, ack.delivery) == ("sent", "sent")
    received = [headers_of(m.data)["Message-ID"] for m in relay.messages]
    assert received == [f"<{forward.message_id}>", f"<{ack.message_id}>"]
    assert not journals[0].exists()
    assert not list(store.journal_dir.glob("*.ids"))


def test_a_live_sender_whose_lease_ran_out_keeps_its_journal_and_its_sent_rows(
    write_config: Callable[..., Path], clock: Clock
) -> None:
    """A claim past its lease is released even though its sender still runs (stuck, say):
    the rows its journal lists are recorded as sent, not sent again, and the journal it
    is still writing is left where it is."""
    config = load_config(write_config())
    store = Store(config.database_url, state_dir=config.state_dir)
    Pipeline(config, store, clock).process(escalation("01-hibot-basic.eml"))
    transport = FileTransport(config.outbox_dir)
    stuck = Sender(store, transport, config.settings.outbound.retry, clock)
    (first, _), (second, _) = stuck.claim_due()
    stuck.journal.record(first)  # the relay took it; the "sent" never got written
    clock.now += Sender.LEASE + timedelta(seconds=1)
    other = Sender(store, transport, config.settings.outbound.retry, clock)
    assert other.release_stale_claims() == 2
    assert {m.id: m.delivery for m in store.outbound()} == {first: "sent", second: "pending"}
    assert stuck.journal.path is not None and stuck.journal.path.exists()
    stuck.close()


class _CountingTransport:
    """A folder transport that says when it has sent `expected` mails."""

    def __init__(self, inner: FileTransport, expected: int) -> None:
        self.inner, self.expected, self.sent = inner, expected, 0
        self.all_sent = threading.Event()

    async def send(self, sender: str, recipients: list[str], data: deliver.Mail, name: str) -> None:
        await self.inner.send(sender, recipients, data, name)
        self.sent += 1
        if self.sent == self.expected:
            self.all_sent.set()
        await asyncio.sleep(0)  # as a relay's answer would, let the loop run in between

    async def close(self) -> None:
        await self.inner.close()


def test_the_sent_marks_of_mails_sent_meanwhile_are_written_together(
    write_config: Callable[..., Path], clock: Clock
) -> None:
    """The lane does not wait for each "sent" to reach the database: while one write
    waits for its turn, the mails sent meanwhile queue and go in the next write, whole
    (the first write may already gather several: it waits MARK_GATHER_SECONDS)."""
    config = load_config(write_config())
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, clock)
    for _, raw in escalations(4, seed=3):
        pipeline.process(raw)
    rows = len(store.outbound())
    transport = _CountingTransport(FileTransport(config.outbox_dir), rows)
    sender = Sender(store, transport, config.settings.outbound.retry, clock)
    writes: list[int] = []
    write = store.write

    def slow_first_write(statement: Any, params: Any = None) -> None:
        if not writes:  # the first write is slow: every other mail is sent during it
            assert transport.all_sent.wait(10)
        writes.append(len(params))
        write(statement, params)

    store.write = slow_first_write  # type: ignore[method-assign]
    assert asyncio.run(sender.deliver_due()) == rows
    assert sum(writes) == rows and len(writes) <= 2 and writes[-1] > 1
    assert {m.delivery for m in store.outbound()} == {"sent"}
    assert {m.sent_at for m in store.outbound()} == {clock.now}


def _database_locked(statement: Any, params: Any = None) -> None:
    raise OperationalError("UPDATE messages", {}, Exception("database is locked"))


def _pass_whose_marks_fail(config: Config, clock: Clock) -> tuple[Store, Sender]:
    """An escalation's mails sent by a pass whose "sent" write the database refuses (the
    pass fails); the store's write is its own again afterwards."""
    store = Store(config.database_url, state_dir=config.state_dir)
    Pipeline(config, store, clock).process(escalation("01-hibot-basic.eml"))
    sender = Sender(store, FileTransport(config.outbox_dir), config.settings.outbound.retry, clock)
    store.write = _database_locked  # type: ignore[method-assign]
    with pytest.raises(OperationalError):
        asyncio.run(sender.deliver_due())
    del store.write  # the class's own again
    return store, sender


def test_sent_marks_that_cannot_be_written_are_kept_and_written_at_the_next_pass(
    write_config: Callable[..., Path], clock: Clock
) -> None:
    """The database refuses the "sent" write: the pass fails, nothing is sent twice, the
    journal keeps the rows, and the next pass records them before doing anything else."""
    config = load_config(write_config())
    store, sender = _pass_whose_marks_fail(config, clock)
    assert len(list(config.outbox_dir.iterdir())) == 2
    assert {m.delivery for m in store.outbound()} == {"sending"}
    assert sender.journal.path is not None
    journaled = {int(line) for line in sender.journal.path.read_text().split()}
    assert journaled == {m.id for m in store.outbound()}

    assert asyncio.run(sender.deliver_due()) == 0
    assert {m.delivery for m in store.outbound()} == {"sent"}
    assert len(list(config.outbox_dir.iterdir())) == 2  # nothing sent again
    assert sender.journal.path.read_text() == ""
    sender.close()
    assert not sender.journal.path.exists()


def test_a_sender_closed_with_marks_it_cannot_write_leaves_its_journal(
    write_config: Callable[..., Path], clock: Clock
) -> None:
    config = load_config(write_config())
    store, sender = _pass_whose_marks_fail(config, clock)
    store.write = _database_locked  # type: ignore[method-assign]
    sender.close()
    assert sender.journal.path is not None and sender.journal.path.exists()
    # Whoever releases the dead claims later reads it: nothing goes twice.
    clock.now += Sender.LEASE + timedelta(seconds=1)
    del store.write  # the class's own again
    other = Sender(store, FileTransport(config.outbox_dir), config.settings.outbound.retry, clock)
    assert asyncio.run(other.deliver_due()) == 0
    assert {m.delivery for m in store.outbound()} == {"sent"}


# --- a mail that cannot leave fails alone (issue 18, item 6) -----------------------------------

UTF8_VENDOR = "Lastßname@hibot.us"


def test_a_non_ascii_recipient_fails_alone_without_smtputf8(
    write_config: Callable[..., Path],
    ascii_relay: RecordingRelay,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = ascii_relay
    monkeypatch.setenv("MAILROUTER_HIBOT_ADDRESS", UTF8_VENDOR)
    pipeline, sender = smtp_setup(write_config, relay, clock, lanes=2)
    hibot = pipeline.process(escalation("01-hibot-basic.eml")).case_id
    panda = pipeline.process(escalation("02-panda-basic.eml")).case_id
    assert hibot is not None and panda is not None
    deliver_due(sender)
    deliver_due(sender)  # the failure notice queued by the first pass
    forward = sender.store.outbound(hibot)[0]
    assert forward.kind == "forward" and forward.delivery == "failed"
    assert forward.attempts == 1  # refused once, never retried
    assert "SMTPUTF8" in (forward.last_error or "")
    assert {c.id: c.status for c in sender.store.cases()} == {
        hibot: "undeliverable",
        panda: "open",
    }
    # Every other mail went, the failure notice among them (to the agent and the lead).
    assert len(relay.to("soporte_revendedores@clickpanda.com")) == 1
    (notice,) = relay.to("laura.gomez@example.com")
    assert b"SMTPUTF8" in notice.data
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_non_ascii_recipient_goes_through_a_relay_with_smtputf8(
    write_config: Callable[..., Path],
    relay: RecordingRelay,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILROUTER_HIBOT_ADDRESS", UTF8_VENDOR)
    pipeline, sender = smtp_setup(write_config, relay, clock)
    pipeline.process(escalation("01-hibot-basic.eml"))
    assert deliver_due(sender) == 2
    (forward,) = relay.to(UTF8_VENDOR)
    assert f"To: {UTF8_VENDOR}".encode() in forward.data
    assert all(m.delivery == "sent" for m in sender.store.outbound())


class _BrokenFor(FileTransport):
    """Fault injection: a transport whose own code raises for one recipient (a bug)."""

    def __init__(self, directory: Path, victim: str) -> None:
        super().__init__(directory)
        self.victim = victim

    async def send(self, sender: str, recipients: list[str], data: deliver.Mail, name: str) -> None:
        if self.victim in recipients:
            raise UnicodeEncodeError("ascii", self.victim, 0, 1, "injected")
        await super().send(sender, recipients, data, name)


def test_an_error_of_our_own_fails_that_row_once_and_the_rest_goes(
    write_config: Callable[..., Path], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, clock)
    transport = _BrokenFor(config.outbox_dir, "soporte@hibot.us")
    sender = Sender(
        store, transport, config.settings.outbound.retry, clock, on_failed=pipeline.delivery_failed
    )
    pipeline.process(escalation("01-hibot-basic.eml"))
    pipeline.process(escalation("02-panda-basic.eml"))
    asyncio.run(sender.deliver_due())
    asyncio.run(sender.deliver_due())
    rows = {(m.kind, tuple(m.recipients)): m for m in store.outbound()}
    broken = rows[("forward", ("soporte@hibot.us",))]
    assert broken.delivery == "failed" and broken.attempts == 1
    assert (broken.last_error or "").startswith("cannot be sent: UnicodeEncodeError")
    assert rows[("forward", ("soporte_revendedores@clickpanda.com",))].delivery == "sent"
    assert rows[("undeliverable", ("laura.gomez@example.com", "lider.soporte@example.com"))]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_outbox_files_are_named_from_ids_whatever_the_address(
    write_config: Callable[..., Path], clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILROUTER_HIBOT_ADDRESS", "a" * 240 + "/../x@hibot.us")
    config = load_config(write_config())
    store = Store(config.database_url)
    Pipeline(config, store, clock).process(escalation("01-hibot-basic.eml"))
    sender = Sender(store, FileTransport(config.outbox_dir), config.settings.outbound.retry, clock)
    assert asyncio.run(sender.deliver_due()) == 2
    assert sorted(p.name for p in config.outbox_dir.iterdir()) == [
        "000002-forward.eml",
        "000003-acknowledgement.eml",
    ]
