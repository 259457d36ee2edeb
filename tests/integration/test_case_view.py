"""The case view in the terminal (issue 22, part 4): `cases` filtered, `case ESC-n` with its
timeline, JSON for scripts, and errors as one line (the traceback only with --debug)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailrouter.cli import main
from mailrouter.config import load_config
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from tests.conftest import escalation

NOW = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)


@pytest.fixture
def config(write_config: Callable[..., Path]) -> Path:
    path = write_config()
    loaded = load_config(path)
    store = Store(loaded.database_url)
    pipeline = Pipeline(loaded, store, lambda: NOW)
    for name in ("01-hibot-basic.eml", "02-panda-basic.eml", "06-hibot-missing-correo.eml"):
        pipeline.process(escalation(name))
    store.close()
    return path


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


def test_cases_are_filtered_and_listed_as_json(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config, "cases", "--json") == 0
    every = json.loads(capsys.readouterr().out)
    assert [c["case"] for c in every] == ["ESC-000003", "ESC-000002", "ESC-000001"]
    assert run(config, "cases", "--status", "open", "--provider", "hibot", "--json") == 0
    (hibot,) = json.loads(capsys.readouterr().out)
    assert (hibot["case"], hibot["priority"], hibot["client"]) == (
        "ESC-000001",
        "ALTA",
        "Lafise Nicaragua",
    )
    assert run(config, "cases", "--status", "needs_info", "--json") == 0
    assert [c["case"] for c in json.loads(capsys.readouterr().out)] == ["ESC-000003"]
    assert run(config, "cases", "--agent", "LAURA.GOMEZ@example.com", "--json") == 0
    assert [c["case"] for c in json.loads(capsys.readouterr().out)] == ["ESC-000001"]
    # Overdue: past its follow-up time, which these cases are not yet (the clock is now).
    assert run(config, "cases", "--status", "overdue", "--json") == 0
    overdue = {c["case"] for c in json.loads(capsys.readouterr().out)}
    assert "ESC-000003" not in overdue  # waiting for fields has no follow-up
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert run(config, "cases", "--since", tomorrow) == 0
    assert "(no cases)" in capsys.readouterr().out


def test_a_case_and_its_timeline(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "case", "ESC-1") == 0
    out = capsys.readouterr().out
    assert out.startswith("ESC-000001  open  ALTA  to hibot")
    assert "cliente: Lafise Nicaragua" in out
    lines = out.splitlines()
    timeline = [line for line in lines if line.startswith("2026-11-16")]
    assert [line.split()[2:4] for line in timeline[:1]] == [["in:", "escalation"]]
    assert any(
        "out: forward" in line and "to soporte@hibot.us: pending" in line for line in timeline
    )
    assert any("event: opened" in line for line in timeline)
    assert run(config, "case", "ESC-000001", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["case"] == "ESC-000001"
    assert {"in: escalation", "out: forward", "out: acknowledgement", "event: opened"} <= {
        entry["what"] for entry in shown["timeline"]
    }


@pytest.mark.sqlite_only  # the database made a folder; on PostgreSQL: test_postgres.py
def test_errors_are_one_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config, "case", "ESC-999") == 1
    assert capsys.readouterr().err.strip() == "no case ESC-000999"
    assert run(config, "case", "nonsense") == 2
    assert "is not a case: give it as ESC-123" in capsys.readouterr().err
    # Something nobody planned for: the database is a folder.
    folder = tmp_path / "db-folder"
    folder.mkdir()
    broken = config.read_text().replace(str(tmp_path / "mailrouter.db"), str(folder))
    config.write_text(broken)
    assert run(config, "cases") == 1
    err = capsys.readouterr().err
    assert err.startswith("mailrouter: ") and "(--debug shows more)" in err
    assert "Traceback" not in err
    with pytest.raises(Exception):  # noqa: B017 - whatever it is, --debug lets it through
        run(config, "--debug", "cases") if False else main(
            ["--debug", "--config", str(config), "cases"]
        )
