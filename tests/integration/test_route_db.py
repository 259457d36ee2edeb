"""`mailrouter route FILE --db`: what a mail would do given the cases in a real database,
read only — thread into a case, be a duplicate, open a new case — and nothing written."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from mailrouter.cli import main
from mailrouter.config import load_config
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from tests.conftest import ESCALATIONS

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture
def with_first_case(write_config: Callable[..., Path]) -> tuple[Path, str]:
    """A config whose database holds one case, 01-hibot-basic's (ESC-000001); and the
    Message-ID of its forward to HIBOT."""
    path = write_config()
    config = load_config(path)
    store = Store(config.database_url)
    result = Pipeline(config, store, lambda: NOW).process(
        (ESCALATIONS / "01-hibot-basic.eml").read_bytes()
    )
    assert (result.outcome, result.case_id) == ("routed", 1)
    (forward,) = [m for m in store.outbound() if m.kind == "forward"]
    store.close()
    assert forward.message_id is not None
    return path, forward.message_id


def _route(config: Path, mail: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["--config", str(config), "route", "--db", str(mail)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _database_state(config: Path) -> list[object]:
    engine = create_engine(load_config(config).database_url)
    try:
        with engine.connect() as connection:
            return [
                connection.exec_driver_sql(query).all()
                for query in (
                    "select id, status, priority, follow_up_due, updated_at from cases",
                    "select id, delivery from messages order by id",
                    "select count(*) from events",
                    "select * from imap_state",
                )
            ]
    finally:
        engine.dispose()


def test_a_duplicate_is_explained_and_nothing_is_written(
    with_first_case: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = with_first_case
    before = _database_state(config)
    code, out, _ = _route(config, ESCALATIONS / "08-hibot-duplicate.eml", capsys)
    assert code == 0
    assert "It would:    be added to ESC-000001 as a duplicate escalation" in out
    assert "Outcome:     threaded (duplicate of ESC-000001)" in out
    assert "priority ALTA -> URGENTE" in out
    assert "----- relay_to_vendor to soporte@hibot.us -----" in out
    assert "Dry run: nothing was sent or written." in out
    # The priority was raised in memory only: the case, the outbox and the history are as
    # they were.
    assert _database_state(config) == before


def test_the_same_mail_again_is_already_processed(
    with_first_case: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = with_first_case
    code, out, _ = _route(config, ESCALATIONS / "01-hibot-basic.eml", capsys)
    assert code == 0
    assert "Already processed: routed (route 'proveedor-hibot' matched), case ESC-000001" in out
    assert "-----" not in out  # it would send nothing


def test_a_new_client_opens_the_next_case(
    with_first_case: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = with_first_case
    before = _database_state(config)
    code, out, _ = _route(config, ESCALATIONS / "02-panda-basic.eml", capsys)
    assert code == 0
    assert "It would:    open a new case, ESC-000002" in out
    assert "----- forward to soporte_revendedores@clickpanda.com -----" in out
    assert "[ESC-000002]" in out  # the mails show the number it would get
    assert _database_state(config) == before


def test_a_vendor_reply_threads_into_its_case(
    with_first_case: tuple[Path, str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config, forward_id = with_first_case
    reply = EmailMessage()
    reply["From"] = "Soporte HIBOT <soporte@hibot.us>"
    reply["To"] = "escalaciones@example.com"
    reply["Subject"] = "Re: caso Lafise"
    reply["Message-ID"] = "<vendor-reply-1@hibot.us>"
    reply["In-Reply-To"] = f"<{forward_id}>"
    reply.set_content("Ya revisamos el acceso del usuario; por favor intenten de nuevo.")
    mail = tmp_path / "reply.eml"
    mail.write_bytes(bytes(reply))
    before = _database_state(config)
    code, out, _ = _route(config, mail, capsys)
    assert code == 0
    assert "It would:    thread into ESC-000001" in out
    assert "Outcome:     threaded (vendor reply on ESC-000001)" in out
    assert "----- relay_to_agent to laura.gomez@example.com -----" in out
    assert _database_state(config) == before


@pytest.mark.sqlite_only  # a PostgreSQL database is created by its admin, not by us
def test_without_a_database_it_says_so(
    write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config()
    code, _, err = _route(config, ESCALATIONS / "01-hibot-basic.eml", capsys)
    assert code == 1
    assert "no database at" in err
    assert not Path(load_config(config).database_url.removeprefix("sqlite:///")).exists()
