"""Every real-world mail in ../shared/corpus goes through the pipeline without a crash."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailrouter.config import load_config
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from tests.conftest import CORPUS

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
