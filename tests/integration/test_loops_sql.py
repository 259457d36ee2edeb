"""Loop protection on the real store (issue 19, item 2): the address log, the text digest
and the queries behind them, through `Pipeline.process` on SQLite."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mailrouter.config import load_config
from mailrouter.service import Pipeline
from mailrouter.store.db import Store
from mailrouter.testing.factory import reply as compose

START = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)
LAURA = "laura.gomez@example.com"


def escalation(n: int) -> bytes:
    return compose(
        f"Laura <{LAURA}>",
        f"Proveedor: HIBOT\nCliente: Cliente {n}\nUsuario que tiene el problema: u{n}\n"
        f"Correo asociado al usuario: u{n}@cliente.example\nPrioridad: MEDIA\n"
        "Descripción del problema: no puede ingresar\n",
        subject=f"Escalamiento HIBOT - Cliente {n}",
    )


def test_a_burst_of_200_from_one_agent_on_sqlite(write_config: Callable[..., Path]) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    now = [START]
    pipeline = Pipeline(config, store, lambda: now[0])
    for n in range(200):
        now[0] = START + timedelta(seconds=15 * n)
        assert pipeline.process(escalation(n)).outcome == "routed"
    kinds = [m.kind for m in store.outbound()]
    assert kinds.count("forward") == 200 and kinds.count("acknowledgement") == 10
    assert kinds.count("replies_stopped") == 1
    assert not [m for m in store.inbound() if m.outcome == "quarantined"]
    # The next hour, the agent is answered again.
    now[0] = START + timedelta(hours=2)
    assert pipeline.process(escalation(999)).outcome == "routed"
    assert [m.kind for m in store.outbound()].count("acknowledgement") == 11


def test_the_same_text_twice_is_answered_once_on_sqlite(
    write_config: Callable[..., Path],
) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, lambda: START)
    robot = "tickets@example.com"
    for _ in range(3):
        pipeline.process(compose(robot, "Su solicitud fue recibida. Gracias."))
    answers = [m for m in store.outbound() if robot in m.recipients]
    assert [m.kind for m in answers] == ["needs_info"]
    assert [m.kind for m in store.outbound()].count("replies_stopped") == 1
