"""Loop protection on the real store (issue 19, item 2): the address log, the text digest
and the queries behind them, through `Pipeline.process`, and `Pipeline.process_group`
whose decisions ask them before the group's writes are made (at its commit)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest
from sqlalchemy import event

from mailrouter.config import load_config
from mailrouter.model import ImapSource
from mailrouter.service import Followup, Pipeline
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


def _commits(store: Store) -> list[object]:
    commits: list[object] = []
    event.listen(store.engine, "commit", commits.append)
    return commits


def test_a_burst_of_200_from_one_agent_in_groups(write_config: Callable[..., Path]) -> None:
    """The replies counted to the agent and the text it sent are asked of the mails before
    it in its group too, which are written only at the group's commit."""
    config = load_config(write_config())
    store = Store(config.database_url)
    ticks = count()
    pipeline = Pipeline(config, store, lambda: START + timedelta(seconds=5 * next(ticks)))
    commits = _commits(store)
    mails = [(escalation(n), ImapSource("INBOX", 1, n + 1)) for n in range(200)]
    for start in range(0, 200, 16):
        results = pipeline.process_group(mails[start : start + 16])
        assert [r.outcome for r in results] == ["routed"] * len(results)
    assert len(commits) == 13  # each group in one transaction: none gave way
    kinds = [m.kind for m in store.outbound()]
    assert kinds.count("forward") == 200 and kinds.count("acknowledgement") == 10
    assert kinds.count("replies_stopped") == 1


@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "in-a-group"])
def test_the_same_text_twice_is_answered_once(
    write_config: Callable[..., Path], grouped: bool
) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    pipeline = Pipeline(config, store, lambda: START)
    robot = "tickets@example.com"
    texts = [compose(robot, "Su solicitud fue recibida. Gracias.") for _ in range(3)]
    if grouped:  # the earlier ones not written yet when the later ones are decided
        commits = _commits(store)
        pipeline.process_group([(raw, ImapSource("INBOX", 1, n)) for n, raw in enumerate(texts)])
        assert len(commits) == 1
    else:
        for raw in texts:
            pipeline.process(raw)
    answers = [m for m in store.outbound() if robot in m.recipients]
    assert [m.kind for m in answers] == ["needs_info"]
    assert [m.kind for m in store.outbound()].count("replies_stopped") == 1


def _address_log(store: Store) -> list[tuple[str, str]]:
    with store.engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT address, kind FROM address_log ORDER BY id")
        return [(str(address), str(kind)) for address, kind in rows]


def test_the_address_log_forgets_what_no_question_looks_back_to(
    write_config: Callable[..., Path],
) -> None:
    """Every automatic reply adds a row; rows older than two days are deleted, a chunk at a
    time, and the caps still count what is recent."""
    config = load_config(write_config())
    store = Store(config.database_url)
    now = [START]
    pipeline = Pipeline(config, store, lambda: now[0])
    for n in range(12):  # 10 answered (the cap), each logged
        now[0] = START + timedelta(minutes=n)
        pipeline.process(escalation(n))
    old = _address_log(store)
    assert old.count((LAURA, "reply")) == 10
    now[0] = START + timedelta(days=2, hours=1)
    assert pipeline.process(escalation(100)).outcome == "routed"
    assert len(_address_log(store)) == len(old) + 1  # answered again: a new hour
    followup = Followup(config, store, lambda: now[0])
    assert followup.forget_old_addresses(chunk=3) == len(old)
    assert _address_log(store) == [(LAURA, "reply")]
    assert followup.forget_old_addresses(chunk=3) == 0
    # The one recent row still counts toward the cap: nine more answers, then none.
    for n in range(101, 112):
        now[0] += timedelta(minutes=1)
        pipeline.process(escalation(n))
    assert _address_log(store).count((LAURA, "reply")) == 10
