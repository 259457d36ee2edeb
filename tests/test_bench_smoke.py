"""The benchmark still works (tiny sizes). It measures; it asserts no time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import PROJECT, Dovecot

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
    assert results["peer"] == {"skipped": "--quick"}


def test_the_peer_ingests_every_mail_when_its_virtualenv_is_there(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    from bench.run import PEER_VENV, peer

    if not (PEER_VENV / "installed").exists():
        pytest.skip(f"{PEER_VENV} is built by the first full `make bench` (it needs PyPI)")
    measured = peer(dovecot, tmp_path, 5)
    assert measured["tickets"] == 5 and measured["left_in_inbox"] == 0
