"""`icr bench` runs to completion on a tiny configuration and writes its report (behaviour only, no timings)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.bench.command import register

pytestmark = pytest.mark.slow  # starts icr serve, icr worker and redis-server processes

TINY = ["--random", "--grid", "32", "--members", "2", "--channels", "4,8,16", "--strides", "1,2",
        "--res-units", "1", "--repeats", "2", "--clicks", "2", "--window", "16", "--margin", "4",
        "--device", "cpu", "--threads", "1"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="icr")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(autouse=True)
def torch_threads_restored() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_measures_every_part_and_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "bench.json"
    args = parse([*TINY, "--autocast", "bfloat16", "--json", str(target)])
    assert args.run(args) == 0
    report = json.loads(target.read_text())

    assert report["format"] == "icr-bench/1"
    config = report["config"]
    assert config["device"] == "cpu" and config["threads"] == 1
    assert config["architecture"] == {"channels": [4, 8, 16], "strides": [1, 2], "num_res_units": 1}
    assert config["members"] == {"initial": 2, "refinement": 2} and config["grid"] == [32, 32, 32]
    assert config["dtype"] == {"baseline": "float32", "engine": "float32", "engine-autocast": "bfloat16",
                               "engine-window": "float32", "engine-window-autocast": "bfloat16"}
    clicks = config["clicks_made"]
    assert 1 <= clicks <= 2

    assert list(report["engine"]) == ["baseline", "engine", "engine-autocast", "engine-window", "engine-window-autocast"]
    for entry in report["engine"].values():
        for stage in ("initial", "refine"):
            assert entry[stage]["n"] == 2 and entry[stage]["p50_ms"] > 0 and entry[stage]["p95_ms"] > 0
        assert set(entry["speedup"]) == {"initial_p50", "initial_p95", "refine_p50", "refine_p95"}
        assert len(entry["fidelity"]["mask_dice_per_click"]) == clicks + 1
    assert report["engine"]["baseline"]["fidelity"]["mask_dice_min"] == 1.0
    assert report["engine"]["engine"]["fidelity"]["max_abs_probability_difference"] < 1e-4  # the exact path is exact
    assert 0.0 <= report["engine"]["engine-window"]["fidelity"]["mask_dice_min"] <= 1.0
    lowered = report["engine"]["engine-autocast"]["fidelity"]["max_abs_probability_difference"]
    assert 0 < lowered < 0.05  # bfloat16 moves the output, a little

    assert report["click_maps"]["clicks"] == clicks and report["click_maps"]["max_abs_difference"] <= 1e-6
    codec = report["codec"]
    assert codec["versions"] == clicks + 1 and codec["raw_float32_bytes"] == 4 * 32**3
    assert 0 < codec["stored_bytes_max"] < codec["raw_float32_bytes"] and codec["mask_kept_exactly"]
    assert report["memory"]["bench_peak_rss_mib"] > 0

    for mode, processes in (("embedded", {"serve"}), ("redis", {"serve", "worker"})):
        entry = report["http"][mode]
        assert entry["create_session"]["n"] == 2 and entry["create_session"]["p95_ms"] > 0
        assert 2 <= entry["click"]["n"] <= 4 and entry["click_response_bytes_mean"] > 0
        assert set(entry["peak_rss_mib"]) == processes

    table = capsys.readouterr().out
    for row in ("baseline", "engine-window", "Click maps", "Stored probability", "embedded", "redis"):
        assert row in table


def test_bench_can_leave_out_http_and_redis(tmp_path: Path) -> None:
    target = tmp_path / "bench.json"
    args = parse([*TINY, "--window", "0", "--autocast", "off", "--clicks", "1", "--skip-http", "--json", str(target)])
    assert args.run(args) == 0
    report = json.loads(target.read_text())
    assert "http" not in report and list(report["engine"]) == ["baseline", "engine"]


def test_bench_refuses_unusable_weights_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--weights", str(tmp_path / "absent"), "--skip-http"])
    assert args.run(args) == 2
    assert "no manifest.json" in capsys.readouterr().err
    args = parse([*TINY, "--autocast", "float16", "--skip-http"])
    assert args.run(args) == 2
    assert "float16 autocast needs CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--random", "--weights", str(tmp_path)])
    with pytest.raises(SystemExit):
        parse(["--random", "--channels", "4,x"])
