"""The benchmark still works (tiny sizes). It measures; it asserts no time."""

from __future__ import annotations

import json

import pytest

from .conftest import PROJECT

pytestmark = pytest.mark.integration


def test_bench_quick_run_produces_every_figure() -> None:
    from bench.run import main

    assert main(["--quick"]) == 0
    results = json.loads((PROJECT / "var" / "bench" / "results.json").read_text())
    assert results["quick"] is True
    assert results["burst"]["median_msg_per_s"] > 0 and results["ceiling"]["msg_per_s"] > 0
    assert results["memory"]["attachments_intact"] == results["memory"]["mails"]
    assert results["latency"]["imap_idle"]["count"] > 0
    assert results["latency"]["smtp_listener"]["count"] > 0
    assert results["cost_growth"]["digest"]["digests"] > 0
