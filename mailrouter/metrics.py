"""Metrics: what the daemon counts and reports about itself, for /metrics and /readyz.

One `Metrics` per daemon, with a registry of its own (not prometheus_client's global one,
so several daemons can run in one process, as the tests do). The counters and the
histogram are moved by the daemon where the events happen: each mail an intake hands in
(`received`), each mail the relay takes or defers (`sent`). What lives in the database
(the outbox, open and overdue cases) is read at each scrape instead, by `_StoreGauges`,
so it is never stale and nothing has to keep it up to date.

Every label takes values from a small set the code decides (an outcome, a mail's kind, a
configured provider, a quarantine category), never text from a mail: a stranger cannot
grow the number of series.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailrouter import __version__
from mailrouter.config import PRIORITIES
from mailrouter.model import OPEN_STATUSES, REMINDED_STATUSES, Clock, Result
from mailrouter.store import repo
from mailrouter.store.db import Store

log = logging.getLogger(__name__)

# Outcomes of one mail handed in by an intake: a `Result.outcome`, or one of these two.
DUPLICATE = "duplicate"  # processed before: its earlier outcome was given back
ERROR = "error"  # not committed (the database could not be used): the intake retries it
OUTCOMES = ("routed", "needs_info", "threaded", "ignored", "quarantined", DUPLICATE, ERROR)

# What a quarantine reason begins with -> the category it is counted under.
QUARANTINE_CATEGORIES = (
    ("sender ", "sender not allowed"),  # "sender x@y is not in allowed_senders"
    ("unauthenticated sender", "unauthenticated sender"),
    ("message of ", "too large"),  # "message of N bytes is over the N-byte limit"
    ("header over ", "refused shape"),
    ("more than ", "refused shape"),  # header fields, MIME parts, multipart containers
    ("reading the mail took over ", "deadline"),
    ("processing error", "processing error"),
    ("parse error", "processing error"),
    ("unmatched vendor reply", "unmatched vendor reply"),
)
OTHER = "other"
REASONS = tuple(dict.fromkeys([category for _, category in QUARANTINE_CATEGORIES] + [OTHER]))

# Seconds to process and commit one mail: a few ms usually, seconds for a 25 MB mail.
ROUTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# A counter's "_created" series doubles the series for a timestamp nobody reads here.
disable_created_metrics()  # type: ignore[no-untyped-call]


def quarantine_category(reason: str) -> str:
    """The category a quarantine reason is counted under: from how the reason begins
    (the router's own words), never the rest, which holds text from the mail."""
    start = reason.lstrip().lower()
    for prefix, category in QUARANTINE_CATEGORIES:
        if start.startswith(prefix):
            return category
    return OTHER


# Labels are free words (#etiqueta): the gauge shows the most used, not every one.
LABELS_SHOWN = 50


@dataclass(frozen=True)
class Readiness:
    """The checks /readyz makes: each name with None (passed) or what is wrong."""

    checks: dict[str, str | None]

    @property
    def failed(self) -> list[str]:
        return [name for name, problem in self.checks.items() if problem is not None]

    @property
    def ready(self) -> bool:
        return not self.failed


class Metrics:
    """A daemon's metrics and readiness. `source` is its intake (imap or smtp); `providers`
    gives the configured destinations (their cases are reported even when there are none)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        source: str,
        providers: Callable[[], Iterable[str]],
        stuck_outbox_seconds: float,
    ) -> None:
        self.store = store
        self.clock = clock
        self.source = source
        self.providers = providers
        self.stuck_outbox_seconds = stuck_outbox_seconds
        self._intake_up = False
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        registry = self.registry
        Info("mailrouter_build", "The running mailrouter", registry=registry).info(
            {"version": __version__}
        )
        self.received_total = Counter(
            "mailrouter_mails_received_total",
            "Mails handed in by the intake, by intake and outcome",
            ["source", "outcome"],
            registry=registry,
        )
        self.sent_total = Counter(
            "mailrouter_mails_sent_total",
            "Outgoing mails tried, by kind and result (sent: the relay took it; deferred: a "
            "temporary failure, retried later; failed: refused for good or given up on)",
            ["kind", "result"],
            registry=registry,
        )
        self.quarantined_total = Counter(
            "mailrouter_quarantined_total",
            "Mails quarantined, by the category of the reason",
            ["reason"],
            registry=registry,
        )
        self.route_seconds = Histogram(
            "mailrouter_route_seconds",
            "Seconds to process one mail and commit its outcome",
            buckets=ROUTE_BUCKETS,
            registry=registry,
        )
        # Known values start at 0, so a rate is defined from the first scrape on.
        for outcome in OUTCOMES:
            self.received_total.labels(source, outcome)
        for category in REASONS:
            self.quarantined_total.labels(category)
        self.imap_connected = (
            Gauge(
                "mailrouter_imap_connected",
                "1 while the IMAP intake is logged in to its mailbox, else 0",
                registry=registry,
            )
            if source == "imap"
            else None
        )
        ProcessCollector(registry=registry)  # memory, CPU, open files of this process
        registry.register(_StoreGauges(self))

    # --- moved where the events happen (any thread) ---------------------------------------

    def received(self, result: Result, seconds: float) -> None:
        """One mail an intake handed in, and its outcome, committed in `seconds`."""
        outcome = DUPLICATE if result.duplicate or result.in_other_hands else result.outcome
        self.received_total.labels(self.source, outcome).inc()
        self.route_seconds.observe(seconds)
        if outcome == "quarantined":
            self.quarantined_total.labels(quarantine_category(result.reason)).inc()

    def not_received(self) -> None:
        """A mail whose outcome could not be committed (the intake tries it again)."""
        self.received_total.labels(self.source, ERROR).inc()

    def sent(self, kind: str, result: str) -> None:
        """One outgoing mail's try: `result` is sent, deferred or failed."""
        self.sent_total.labels(kind, result).inc()

    def intake_state(self, up: bool) -> None:
        """The intake is logged in (IMAP) or listening (SMTP), or no longer."""
        with self._lock:
            self._intake_up = up
        if self.imap_connected is not None:
            self.imap_connected.set(1 if up else 0)

    # --- read when asked (blocking: call from a thread, not the event loop) ---------------

    def readiness(self) -> Readiness:
        """The database answers a read, the intake is up, and no mail has waited to leave
        longer than `stuck_outbox_seconds`."""
        checks: dict[str, str | None] = {}
        try:
            with self.store.reading() as session:
                pending, oldest = repo.outbox_backlog(session)
        except Exception as exc:
            log.debug("readiness: the database cannot be read", exc_info=True)
            checks["database"] = f"cannot be read ({type(exc).__name__})"
            oldest = None
        else:
            checks["database"] = None
        with self._lock:
            up = self._intake_up
        if self.source == "imap":
            checks["imap"] = None if up else "not connected to the mailbox"
        else:
            checks["smtp"] = None if up else "not listening"
        if checks["database"] is None:
            age = self.waited(oldest)
            checks["outbox"] = (
                f"{pending} mails waiting to leave, the oldest for {age:.0f} s "
                f"(over http.stuck_outbox_seconds, {self.stuck_outbox_seconds:g} s)"
                if age > self.stuck_outbox_seconds
                else None
            )
        return Readiness(checks)

    def waited(self, queued: datetime | None) -> float:
        return 0.0 if queued is None else max(0.0, (self.clock() - queued).total_seconds())


class _StoreGauges(Collector):
    """The gauges read from the database at each scrape. If it cannot be read, they are
    left out of that scrape (and `mailrouter_ready` is 0)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        ready = metrics.readiness()
        yield GaugeMetricFamily(
            "mailrouter_ready", "1 when /readyz answers 200, else 0", value=int(ready.ready)
        )
        try:
            with metrics.store.reading() as session:
                pending, oldest = repo.outbox_backlog(session)
                open_cases = repo.case_counts(session, OPEN_STATUSES)
                overdue = repo.overdue_counts(session, REMINDED_STATUSES, metrics.clock())
                by_label = repo.open_by_label(session, LABELS_SHOWN)
                by_owner = repo.open_by_owner(session)
        except Exception:
            log.warning("metrics: the database cannot be read; its gauges are left out")
            return
        yield GaugeMetricFamily(
            "mailrouter_outbox_pending",
            "Outgoing mails not sent yet (waiting, retrying or being sent)",
            value=pending,
        )
        yield GaugeMetricFamily(
            "mailrouter_outbox_oldest_pending_seconds",
            "Seconds the oldest outgoing mail not sent yet has waited (0: none waiting)",
            value=metrics.waited(oldest),
        )
        providers = list(metrics.providers())
        counts = {(provider, priority): 0 for provider in providers for priority in PRIORITIES}
        for provider, priority, count in open_cases:
            counts[provider, priority] = count
        family = GaugeMetricFamily(
            "mailrouter_cases_open",
            "Cases being worked on (open, vendor replied, awaiting vendor)",
            labels=["provider", "priority"],
        )
        for (provider, priority), count in sorted(counts.items()):
            family.add_metric([provider, priority], count)
        yield family
        late = dict.fromkeys(providers, 0) | dict(overdue)
        family = GaugeMetricFamily(
            "mailrouter_cases_overdue",
            "Cases being worked on whose follow-up is past due",
            labels=["provider"],
        )
        for provider, count in sorted(late.items()):
            family.add_metric([provider], count)
        yield family
        family = GaugeMetricFamily(
            "mailrouter_cases_by_label",
            f"Cases not closed, by stored label (route, #etiqueta; the {LABELS_SHOWN} most "
            "used). The automatic ones are in the other gauges: urgente is priority URGENTE",
            labels=["label"],
        )
        for label, count in by_label:
            family.add_metric([label], count)
        yield family
        family = GaugeMetricFamily(
            "mailrouter_cases_by_owner",
            "Cases not closed, by owner on the escalation team",
            labels=["owner"],
        )
        for owner, count in sorted(by_owner):
            family.add_metric([owner], count)
        yield family
