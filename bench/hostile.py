"""Hostile mail (issue 18) in `make bench`: what each hostile shape costs to route, as a
multiple of a normal escalation timed in the same run, and the daemon's throughput while 1
mail in 20 is hostile, as a share of a clean burst's. Ratios only: absolute times move with
the machine, ratios measured side by side much less.

The route cost is the whole decision path in memory (`testing.book.arrive`, a fresh book
each run): parsing, routing, rendering the forward and the acknowledgement. A mail over
20 KB is compared with a normal escalation padded to its size (`padded_normal`): what a
hostile shape must not cost is more per byte than a normal mail of its size.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailrouter.config import AuthenticationSettings, Config, load_config
from mailrouter.core.handle import Handler
from mailrouter.core.parse import Refused
from mailrouter.model import Arrival, Result, content_hash
from mailrouter.testing.book import MemoryCaseBook, arrive
from mailrouter.testing.factory import escalations
from mailrouter.testing.hostile import (
    AUTHENTICATION,
    AUTHENTICATION_SHAPE,
    BUILDERS,
    LARGE,
    authenticated,
    hostile,
    padded_normal,
)

PROJECT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)
# Under this size a shape is compared with the normal escalation itself: padding a 2 KB
# mail to 6 KB would measure the attachment, not the shape.
SMALL_BYTES = 20 * 1024
HOSTILE_EVERY = 20
# A subject part every clean generated escalation carries into its forward and its
# acknowledgement, and no hostile mail does: the relay counts the clean ones by it.
CLEAN_SUBJECT = "Cliente Prueba"


def handlers() -> tuple[Handler, Handler]:
    """The shipped configuration's handler, and the same requiring authentication (the one
    the Authentication-Results shape is read by)."""
    config = load_config(PROJECT / "config.yaml")
    return Handler(config), Handler(_requiring_authentication(config))


def _requiring_authentication(config: Config) -> Config:
    authentication = AuthenticationSettings.model_validate(AUTHENTICATION)
    settings = config.settings.model_copy(update={"authentication": authentication})
    return replace(config, settings=settings)


def route(handler: Handler, raw: bytes) -> Result:
    """One mail down the daemon's decision path on a fresh in-memory book. A mail the parser
    refuses is quarantined with the reason, as `service.Pipeline.process` does."""
    book = MemoryCaseBook()
    try:
        return arrive(handler, book, raw, NOW)
    except Refused as exc:
        arrival = Arrival(raw, f"sha256:{content_hash(raw)}", None, NOW, None, len(raw))
        return handler.quarantine(book, arrival, str(exc))


def fastest(handler: Handler, raw: bytes, runs: int) -> tuple[float, Result]:
    """The best of `runs`: the one least disturbed by the rest of the machine. The garbage
    of one run is collected before the next, so that no run pays for another's."""
    best, result = float("inf"), None
    for _ in range(runs):
        gc.collect()
        started = time.perf_counter()
        result = route(handler, raw)
        best = min(best, time.perf_counter() - started)
    assert result is not None
    return best, result


def baseline(raw: bytes, authenticating: bool) -> bytes:
    """The normal escalation a shape is measured against: of its size when it is large; and
    passing authentication when the handler requires it (else it is quarantined cheaply)."""
    normal = escalations(1)[0][1] if len(raw) < SMALL_BYTES else padded_normal(len(raw))
    return authenticated(normal) if authenticating else normal


def route_costs(runs: int = 5) -> dict[str, Any]:
    """Per shape: the best time of `runs`, its baseline's, their ratio, and the outcome."""
    plain, strict = handlers()
    baselines: dict[tuple[bool, int], tuple[float, Result]] = {}
    with _quiet():
        shapes = {
            name: _cost(name, strict if name == AUTHENTICATION_SHAPE else plain, runs, baselines)
            for name in BUILDERS
        }
    worst = max(shapes, key=lambda name: shapes[name]["ratio"])
    return {
        "runs": runs,
        "shapes": shapes,
        "worst": {"shape": worst, "ratio": shapes[worst]["ratio"]},
    }


@contextmanager
def _quiet() -> Iterator[None]:
    """Each quarantine logs a warning: the daemon's log wants it, the bench's table not."""
    logger = logging.getLogger("mailrouter")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _cost(
    name: str,
    handler: Handler,
    runs: int,
    baselines: dict[tuple[bool, int], tuple[float, Result]],
) -> dict[str, Any]:
    """One shape against its baseline (timed once per size: the small shapes share one)."""
    authenticating = name == AUTHENTICATION_SHAPE
    raw = hostile(name)
    normal = baseline(raw, authenticating)
    key = (authenticating, len(normal))
    if key not in baselines:
        baselines[key] = fastest(handler, normal, runs)
    normal_seconds, normal_result = baselines[key]
    seconds, result = fastest(handler, raw, runs)
    return {
        "bytes": len(raw),
        "seconds": seconds,
        "baseline_bytes": len(normal),
        "baseline_seconds": normal_seconds,
        # Anything but routed would make the baseline a cheaper path than a normal mail's.
        "baseline_outcome": normal_result.outcome,
        "ratio": seconds / normal_seconds,
        "outcome": result.outcome,
        "reason": result.reason[:120],
    }


def with_hostile(mails: list[bytes], every: int = HOSTILE_EVERY) -> list[bytes]:
    """`mails` with every `every`-th replaced by a hostile shape, the shapes in turn. The
    largest are left out: a burst of thousands would carry several of each (hundreds of
    MB to append and fetch), and the route costs measure them already."""
    names = [name for name in BUILDERS if name not in LARGE]
    out = list(mails)
    for turn, index in enumerate(range(every - 1, len(out), every)):
        # The index as the variant: each hostile mail is an escalation of its own.
        out[index] = hostile(names[turn % len(names)], variant=index)
    return out


def hostile_count(n: int, every: int) -> int:
    return n // every if every else 0


def mixed_burst(run_burst: Callable[[int], dict[str, float]], runs: int) -> dict[str, Any]:
    """`run_burst(every)` (bench.run.burst with `hostile_every`) clean and mixed in turns,
    so that the machine's drift touches both alike."""
    clean, mixed = [], []
    for _ in range(runs):
        clean.append(run_burst(0))
        mixed.append(run_burst(HOSTILE_EVERY))
    return throughput(clean, mixed)


def throughput(clean: list[dict[str, float]], mixed: list[dict[str, float]]) -> dict[str, Any]:
    clean_rate = statistics.median(b["msg_per_s"] for b in clean)
    mixed_rate = statistics.median(b["msg_per_s"] for b in mixed)
    return {
        "hostile_every": HOSTILE_EVERY,
        "clean_msg_per_s": clean_rate,
        "mixed_msg_per_s": mixed_rate,
        "ratio": mixed_rate / clean_rate,
        "clean_runs": [b["msg_per_s"] for b in clean],
        "mixed_runs": [b["msg_per_s"] for b in mixed],
    }
