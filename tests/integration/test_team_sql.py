"""The escalation team on the database (SQLite and PostgreSQL): the round robin's count kept
across restarts and untouched by a dry run, the fewest-open count, and the `cases` filters
and metrics by owner and label."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from mailrouter.cli import main
from mailrouter.config import load_config
from mailrouter.metrics import Metrics
from mailrouter.service import Pipeline
from mailrouter.store import repo
from mailrouter.store.db import Store
from mailrouter.store.tables import Case
from mailrouter.testing.factory import reply
from tests.conftest import PROJECT

NOW = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)
ANA, PEDRO, SOFIA = "ana.torres@example.com", "pedro.ruiz@example.com", "sofia.mejia@example.com"
LEAD = "lider.pruebas@example.com"


def hibot(client: str, priority: str = "MEDIA") -> bytes:
    user = "u-" + "".join(client.lower().split())
    return reply(
        "Laura Gómez <laura.gomez@example.com>",
        f"Proveedor: HIBOT\nCliente: {client}\nUsuario que tiene el problema: {user}\n"
        f"Correo asociado al usuario: {user}@cliente.example\nPrioridad: {priority}\n"
        "Descripción del problema: no puede ingresar\n",
        subject=f"Escalamiento HIBOT - {client}",
    )


def team_overrides(assign: str = "round_robin") -> dict[str, Any]:
    shipped = yaml.safe_load((PROJECT / "config.yaml").read_text(encoding="utf-8"))
    routes = shipped["routes"]
    routes[0]["labels"] = ["inbound"]
    return {
        "team": {
            "leads": [LEAD],
            "escalation": {"members": [ANA, PEDRO, SOFIA], "assign": assign},
        },
        "routes": routes,
    }


@pytest.fixture
def team_config(write_config: Callable[..., Path]) -> Path:
    return write_config(team_overrides())


def pipeline_on(config_path: Path) -> Pipeline:
    config = load_config(config_path)
    return Pipeline(config, Store(config.database_url), lambda: NOW)


def owners(store: Store) -> list[str | None]:
    return [case.owner for case in sorted(store.cases(), key=lambda c: c.id)]


def test_the_round_robin_goes_on_where_it_stood_after_a_restart(team_config: Path) -> None:
    first = pipeline_on(team_config)
    for client in ("Uno", "Dos"):
        assert first.process(hibot(client)).outcome == "routed"
    first.store.close()
    again = pipeline_on(team_config)  # a restarted daemon: a new process, the same database
    for client in ("Tres", "Cuatro"):
        assert again.process(hibot(client)).outcome == "routed"
    assert owners(again.store) == [ANA, PEDRO, SOFIA, ANA]
    again.store.close()


def test_a_dry_run_on_the_database_does_not_take_a_turn(
    team_config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pipeline = pipeline_on(team_config)
    pipeline.process(hibot("Uno"))
    mail = tmp_path / "dos.eml"
    mail.write_bytes(hibot("Dos"))
    for _ in range(2):
        assert main(["--config", str(team_config), "route", "--db", str(mail)]) == 0
    assert pipeline.process(hibot("Dos")).outcome == "routed"
    assert owners(pipeline.store) == [ANA, PEDRO]
    pipeline.store.close()


def test_least_open_counts_each_members_cases_in_the_database(
    write_config: Callable[..., Path],
) -> None:
    pipeline = pipeline_on(write_config(team_overrides("least_open")))
    for client in ("Uno", "Dos", "Tres"):
        pipeline.process(hibot(client))
    assert owners(pipeline.store) == [ANA, PEDRO, SOFIA]
    with pipeline.store.transaction() as session:
        case = session.get(Case, 1)
        assert case is not None
        case.status = "closed"  # Ana's case done: she has the fewest in progress
    pipeline.process(hibot("Cuatro"))
    assert owners(pipeline.store)[-1] == ANA
    pipeline.store.close()


def test_cases_are_listed_by_owner_and_by_label(
    team_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = pipeline_on(team_config)
    pipeline.process(hibot("Uno", "URGENTE"))
    pipeline.process(hibot("Dos"))
    panda = hibot("Tres").replace(
        b"Proveedor: HIBOT",
        b"Proveedor: Panda\nCampa\xc3\xb1a: Navidad\nEmail en el reseller: r@reseller.example",
    )
    assert pipeline.process(panda).outcome == "routed"  # its route gives no label
    with pipeline.store.reading() as session:
        assert repo.open_by_label(session, 50) == [("inbound", 2)]
        assert sorted(repo.open_by_owner(session)) == [(ANA, 1), (PEDRO, 1), (SOFIA, 1)]
    metrics = Metrics(
        pipeline.store, lambda: NOW, source="smtp", providers=list, stuck_outbox_seconds=900
    )
    scraped = generate_latest(metrics.registry).decode()
    assert 'mailrouter_cases_by_label{label="inbound"} 2.0' in scraped
    assert f'mailrouter_cases_by_owner{{owner="{SOFIA}"}} 1.0' in scraped
    pipeline.store.close()

    def listed(*filters: str) -> list[tuple[str, str, list[str]]]:
        capsys.readouterr()
        assert main(["--config", str(team_config), "cases", "--json", *filters]) == 0
        rows = json.loads(capsys.readouterr().out)
        return [(row["case"], row["owner"], row["labels"]) for row in rows]

    # Opened in 2026 at a vendor that sends ticket numbers, none sent: "sin-acuse" today.
    urgent = ("ESC-000001", ANA, ["inbound", "urgente", "sin-acuse"])
    assert listed("--label", "inbound") == [("ESC-000002", PEDRO, ["inbound", "sin-acuse"]), urgent]
    assert listed("--label", "URGENTE") == [urgent]
    assert listed("--owner", SOFIA) == [("ESC-000003", SOFIA, [])]
    assert listed("--label", "inbound", "--owner", ANA) == [urgent]
    assert listed("--label", "nada") == []


def test_a_case_without_the_vendors_ticket_is_listed_as_sin_acuse(
    team_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = pipeline_on(team_config)  # HIBOT sends ticket numbers (providers/hibot.yaml)
    pipeline.process(hibot("Uno"))
    pipeline.store.close()
    capsys.readouterr()
    assert main(["--config", str(team_config), "cases", "--label", "sin-acuse"]) == 0
    out = capsys.readouterr().out
    # Opened at NOW (2026): hours past the vendor's time to acknowledge, as of today.
    assert "ESC-000001" in out and "sin-acuse" in out
