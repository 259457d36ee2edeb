"""The workers row's verdict on PostgreSQL's CPU: judged on each turn's pair of bursts."""

from __future__ import annotations

from bench import workers


def _burst(cpu: float) -> dict[str, float]:
    return {"msg_per_s": 50.0, "daemon_cpu_ms_per_msg": cpu, "peak_rss_mb": 100.0}


def test_postgresqls_cpu_is_judged_against_the_sqlite_burst_of_its_own_turn() -> None:
    # The machine slows down between turns (10 to 20 ms); within each turn, 10 % apart.
    sqlite = [10.0, 12.0, 20.0]
    postgresql = [11.0, 13.2, 22.0]
    measured = {
        workers.key("sqlite", 1): [_burst(cpu) for cpu in sqlite],
        workers.key("postgresql", 1): [_burst(cpu) for cpu in postgresql],
        workers.key("postgresql", 2): [_burst(1.0)] * 3,
        workers.key("postgresql", 3): [_burst(1.0)] * 3,
    }
    summary = workers.summarise(measured)
    assert round(summary["pg1_cpu_to_sqlite"], 6) == 1.1
    assert round(summary["pg1_cpu_to_sqlite_of_medians"], 6) == 1.1  # 13.2 / 12
    assert workers.targets(summary)[workers.PG_CPU_TARGET] is True
    measured[workers.key("postgresql", 1)] = [_burst(cpu) for cpu in (13.0, 12.5, 21.0)]
    summary = workers.summarise(measured)
    assert round(summary["pg1_cpu_to_sqlite"], 6) == 1.05  # the median of 1.3, 1.04, 1.05
    assert workers.targets(summary)[workers.PG_CPU_TARGET] is True
    measured[workers.key("postgresql", 1)] = [_burst(cpu) for cpu in (12.0, 14.0, 23.0)]
    assert workers.targets(workers.summarise(measured))[workers.PG_CPU_TARGET] is False


def test_bursts_side_by_side_decide_the_verdict_when_there_are_some() -> None:
    measured = {
        workers.key("sqlite", 1): [_burst(10.0)],
        workers.key("postgresql", 1): [_burst(10.5)],
        workers.key("postgresql", 2): [_burst(1.0)],
        workers.key("postgresql", 3): [_burst(1.0)],
    }
    summary = workers.summarise(measured)
    assert workers.targets(summary)[workers.PG_CPU_TARGET] is True  # 105 % in turns
    pairs = [{"sqlite": 10.0, "postgresql": 12.0}, {"sqlite": 20.0, "postgresql": 24.0}]
    judged = workers.with_side_by_side(summary, pairs)
    assert [round(r, 6) for r in judged["pg1_cpu_to_sqlite_side_by_side"]] == [1.2, 1.2]
    assert workers.targets(judged)[workers.PG_CPU_TARGET] is False
    assert "side by side 120%/120%" in " ".join(" ".join(row[:3]) for row in workers.rows(judged))
