"""Every real-world mail in ../shared/corpus goes through the pipeline without a crash."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailrouter.config import load_config
from mailrouter.deliver.sender import Sender
from mailrouter.deliver.transports import SmtpTransport
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from mailrouter.testing.servers import RecordingRelay
from tests.conftest import CORPUS, deliver_due

FILES = sorted(CORPUS.glob("*.eml"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    # The corpus senders are strangers; let them all in so the whole path runs.
    tmp = tmp_path_factory.mktemp("corpus")
    import yaml

    from tests.conftest import PROJECT

    data = yaml.safe_load((PROJECT / "config.yaml").read_text())
    data.update(
        allowed_senders=["*"],
        providers_dir=str(PROJECT / "providers"),
        templates_dir=str(PROJECT / "templates"),
        database=f"sqlite:///{tmp / 'db.sqlite'}",
    )
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    config = load_config(path)
    store = Store(config.database_url)
    yield Pipeline(config, store, lambda: datetime(2026, 11, 16, tzinfo=UTC))
    store.close()


def test_corpus_is_there() -> None:
    assert len(FILES) >= 250


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_corpus_mail_reaches_an_outcome(pipeline: Pipeline, path: Path) -> None:
    raw = path.read_bytes()
    result = pipeline.process(raw)
    assert result.outcome in {"routed", "needs_info", "threaded", "ignored", "quarantined"}
    assert not result.reason.startswith(("processing error", "parse error")), result.reason
    with pipeline.store.transaction() as session:
        from sqlalchemy import select

        from mailrouter.store.tables import Message

        row = session.scalars(
            select(Message).where(Message.direction == "in").order_by(Message.id.desc())
        ).first()
        stored = row.raw if row is not None else None
    if not result.duplicate:
        assert stored == raw


def test_the_corpus_goes_through_and_out_without_a_traceback(
    write_config: Callable[..., Path],
    ascii_relay: RecordingRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every corpus mail in, and everything it causes out through a relay without SMTPUTF8
    (the harder case: some corpus senders have non-ASCII addresses), and not one
    traceback in the log: each mail and each outgoing row ends with a line and a reason."""
    caplog.set_level(logging.DEBUG, logger="mailrouter")
    relay = {"host": ascii_relay.host, "port": ascii_relay.port, "security": "none"}
    config = load_config(
        write_config({"allowed_senders": ["*"], "outbound": {"transport": "smtp", "smtp": relay}})
    )
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, lambda: datetime(2026, 11, 16, tzinfo=UTC))
    sender = Sender(
        store,
        SmtpTransport(config.settings.outbound.smtp),
        config.settings.outbound.retry,
        lambda: datetime(2026, 11, 16, tzinfo=UTC),
        on_failed=pipeline.delivery_failed,
        lanes=2,
    )
    for path in FILES:
        pipeline.process(path.read_bytes())
    for _ in range(3):  # the failure notices the first pass queues, and theirs
        deliver_due(sender)
    rows = store.outbound()
    assert rows and all(m.delivery in ("sent", "failed", "cancelled") for m in rows)
    assert sum(m.delivery == "sent" for m in rows) > len(rows) // 2
    failed = [m.last_error or "" for m in rows if m.delivery == "failed"]
    assert not [e for e in failed if e.startswith("cannot be sent")], failed
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info and r.levelno > 10]
    assert not tracebacks
    assert "Traceback" not in caplog.text
