"""The printed table of a benchmark report."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)



def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(report: dict[str, Any]) -> str:
    config = report["config"]
    arch = config["architecture"]
    lines = [
        (
            f"icr bench  {report['date_utc']}  {config['device']}"
            f" ({report['machine'].get('gpu') or report['machine']['processor']}), {config['threads']} threads"
        ),
        (
            f"weights {config['weights']}; UNet channels {arch['channels']} strides {arch['strides']}"
            f" res-units {arch['num_res_units']}; {config['members']['initial']}+{config['members']['refinement']}"
            f" members; grid {'x'.join(map(str, config['grid']))}; repeats {config['repeats']}, clicks {config['clicks']}"
        ),
        "",
        "Engine only (ms)         initial p50   p95   refine p50   p95   x init  x refine  Dice min/final  VRAM MiB",
    ]
    for name, entry in report["engine"].items():
        fid, speed = entry["fidelity"], entry["speedup"]
        lines.append(
            f"  {name:<22} {_ms(entry['initial']['p50_ms']):>11} {_ms(entry['initial']['p95_ms']):>5}"
            f" {_ms(entry['refine']['p50_ms']):>12} {_ms(entry['refine']['p95_ms']):>5}"
            f" {_times(speed['initial_p50']):>7} {_times(speed['refine_p50']):>9}"
            f"  {fid['mask_dice_min']:.4f}/{fid['mask_dice_final']:.4f}  {entry.get('peak_vram_mib', '-'):>8}"
        )
    maps = report["click_maps"]
    if maps.get("clicks"):
        lines.append(
            f"Click maps ({maps['clicks']} clicks): MONAI p50 {_ms(maps['monai']['p50_ms'])} ms, local p50"
            f" {_ms(maps['local']['p50_ms'])} ms ({_times(maps['speedup_p50'])}), max |diff| {maps['max_abs_difference']:.1e}"
        )
    codec = report["codec"]
    lines.append(
        f"Stored probability: {codec['stored_bytes_mean']:.0f} B per version (max {codec['stored_bytes_max']}),"
        f" raw float32 {codec['raw_float32_bytes']} B (1:{codec['compression_ratio']:g}); encode p50"
        f" {_ms(codec['encode']['p50_ms'])} ms, decode p50 {_ms(codec['decode']['p50_ms'])} ms;"
        f" session images {codec['session_images_bytes']} B"
    )
    if config["weights"].startswith("random"):
        lines.append("Dice against the baseline says little with random weights: use --weights for fidelity.")
    lines.append(f"Peak RSS of the bench process: {report['memory']['bench_peak_rss_mib']} MiB")
    http = report.get("http", {})
    if http:
        lines += ["", "HTTP (ms)            create p50   p95   click p50   p95  clicks  peak RSS MiB"]
        for mode, entry in http.items():
            if "error" in entry or "skipped" in entry:
                lines.append(f"  {mode:<18} {entry.get('error') or entry.get('skipped')}")
                continue
            create, click = entry["create_session"], entry["click"]
            rss = ", ".join(f"{k} {v}" for k, v in entry["peak_rss_mib"].items())
            lines.append(
                f"  {mode:<18} {_ms(create['p50_ms']):>10} {_ms(create['p95_ms']):>5}"
                f" {_ms(click['p50_ms']):>11} {_ms(click['p95_ms']):>5} {click['n']:>7}  {rss}"
            )
        lines.append(f"  served with refine_window={report['config']['service_refine_window']}"
                     f", autocast={report['config']['service_autocast']}")
    return "\n".join(lines)


