"""`icr loadtest`: its bookkeeping of lost and duplicated clicks, its quantiles, and a real run."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

import pytest

from service.bench import scrape
from service.bench.loadtest import SessionRun, _loopback, format_summary
from service.bench.processes import free_port, start_process, wait_ready
from service.cli import build_parser

FG = "foreground"


def test_session_check_counts_lost_duplicated_and_late_clicks() -> None:
    a, b, c = (FG, (1, 1, 1)), (FG, (2, 2, 2)), ("background", (3, 3, 3))
    exact = SessionRun(0, acknowledged=[a, b], final=[a, b])
    assert exact.check() == {"lost": 0, "duplicated": 0, "landed_after_error": 0, "exact": 1}
    applied_twice = SessionRun(1, acknowledged=[a, b], final=[a, a, b])
    assert applied_twice.check()["duplicated"] == 1 and applied_twice.check()["exact"] == 0
    lost_and_late = SessionRun(2, acknowledged=[a, b], failed=[c], final=[a, c])
    assert lost_and_late.check() == {"lost": 1, "duplicated": 0, "landed_after_error": 1, "exact": 0}
    unchecked = SessionRun(3, acknowledged=[a])  # the final state could not be read
    assert unchecked.check()["lost"] == 0


def test_quantile_follows_prometheus_histogram_quantile() -> None:
    cumulative = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert scrape.quantile(0.25, cumulative) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert scrape.quantile(0.5, cumulative) == pytest.approx(0.1 + 0.4 * 10 / 20)
    assert scrape.quantile(0.99, {1.0: 5.0, math.inf: 10.0}) == 1.0  # in +Inf: the largest finite bound
    assert scrape.quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None


def test_only_loopback_targets_without_allow_remote() -> None:
    assert _loopback("http://127.0.0.1:8000") and _loopback("http://localhost:8000")
    assert not _loopback("http://192.0.2.1:8000")  # TEST-NET-1, never a loopback address


@pytest.mark.slow  # starts an icr serve process
def test_loadtest_against_a_running_service(tiny_weights: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICR_") and k != "REDIS_URL"}
    env.update({"ICR_WEIGHTS": str(tiny_weights), "ICR_DEVICE": "cpu", "ICR_TORCH_THREADS": "1",
                "ICR_REDIS_PREFIX": f"load-{uuid.uuid4().hex[:8]}", "PYTHONUNBUFFERED": "1"})
    port = free_port()
    api = start_process("serve", [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env, tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        out = tmp_path / "report.json"
        args = build_parser("loadtest").parse_args(["loadtest", f"http://127.0.0.1:{port}", "--sessions", "2", "--clicks", "2",
                                          "--cases", "1", "--out", str(out)])
        assert args.run(args) == 0
    finally:
        api.stop()
    report = json.loads(out.read_text())
    assert (report["sessions_created"], report["clicks_acknowledged"], report["sessions_exact"]) == (2, 4, 2)
    assert report["lost_clicks"] == report["duplicated_clicks"] == report["landed_after_error"] == 0
    assert report["errors"] == {}
    assert report["server"]["click"]["n"] == 4
    assert {"validation", "queue_wait", "engine", "encode", "commit"} <= set(report["server"]["refine_phases"])
    assert "lost 0, duplicated 0" in format_summary(report)
