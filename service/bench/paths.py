"""Engine-only measurements: the naive baseline and the optimised paths on the same inputs."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from service.bench.stats import BenchError, ratio, summary_ms, timed
from service.engine.checkpoints import (
    LoadedCheckpoint,
)
from service.engine.clicks import ClickEncoding, click_maps, reference_click_maps
from service.engine.ensemble import Engine
from service.engine.fastpath import (
    autocast_dtype,
    cpu_has_bfloat16,
    cudnn_autotuning,
)
from service.science.dataset import PreparedCase
from service.science.metrics import dice
from service.science.simulator import next_click
from service.store.codec import (
    decode_array,
    encode_array,
    encode_probability,
)
from service.store.contract import Click

log = logging.getLogger(__name__)


class WindowableSegmenter(Protocol):
    """An engine-like path: the Segmenter interface, plus the count of clicks new since ``previous``."""

    def initial_probability(self, images: np.ndarray) -> np.ndarray: ...

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray: ...




class NaiveBaseline:
    """What the method needs done, done plainly: eager float32 forwards, one member after
    another, the whole volume every time, MONAI's click maps, no cuDNN autotuning."""

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device) -> None:
        self.device = device
        self.encoding = checkpoint.click_encoding
        self.initial = [m.to(device) for m in checkpoint.stages["initial"]]
        self.refinement = [m.to(device) for m in checkpoint.stages["refinement"]]

    def _mean_sigmoid(self, members: Sequence[torch.nn.Module], inputs: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[None].to(self.device)
        with torch.no_grad(), cudnn_autotuning(False):
            outputs = [torch.sigmoid(member(batch)) for member in members]
        return torch.stack(outputs).mean(dim=0)[0, 0].cpu().numpy()

    def initial_probability(self, images: np.ndarray) -> np.ndarray:
        return self._mean_sigmoid(self.initial, images)

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray:
        guidance = reference_click_maps(clicks, previous.shape, *self.encoding)
        return self._mean_sigmoid(self.refinement, np.concatenate([images, previous[None], guidance], axis=0))


@dataclass
class BenchPath:
    name: str
    description: str
    segmenter: WindowableSegmenter


def engine_paths(args: argparse.Namespace, checkpoint: LoadedCheckpoint, device: torch.device) -> list[BenchPath]:
    """The baseline, the exact engine, and each fast path the options ask for (window, reduced precision, both)."""
    paths = [
        BenchPath("baseline", "plain MONAI eager float32, members one after another, full volume",
                  NaiveBaseline(checkpoint, device)),
        BenchPath("engine", "exact engine: full volume, float32, local click maps",
                  Engine(checkpoint, device, autocast="off")),
    ]
    precision = bench_autocast(args.autocast, device)
    if precision is not None:
        paths.append(BenchPath("engine-autocast", f"{precision} autocast, full volume",
                               Engine(checkpoint, device, autocast=precision)))
    for name, autocast in (("engine-window", "off"), ("engine-window-autocast", precision)):
        if not args.window or autocast is None:
            continue
        engine = Engine(checkpoint, device, refine_window=args.window, refine_margin=args.margin, autocast=autocast)
        assert engine.window_plan is not None
        paths.append(BenchPath(
            name,
            f"refinement on a {engine.window_plan.size}^3 window around the new click, "
            f"{engine.window_plan.margin} voxels discarded per side, {engine.precision}",
            engine,
        ))
    return paths


def bench_autocast(requested: str | None, device: torch.device) -> str | None:
    """The dtype of the reduced-precision paths: as requested, or by default the one this device runs
    fast (float16 on CUDA, bfloat16 on a CPU with bfloat16 instructions; none on other CPUs)."""
    if requested == "off":
        return None
    if requested is not None:
        try:
            autocast_dtype(requested, device)
        except ValueError as error:  # float16 on a CPU
            raise BenchError(f"--autocast: {error}") from error
        return requested
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if cpu_has_bfloat16() else None


def simulated_session(
    segmenter: WindowableSegmenter, images: np.ndarray, truth: np.ndarray, initial: np.ndarray, clicks: int, seed: int
) -> tuple[list[Click], list[np.ndarray]]:
    """The simulated user's clicks on ``segmenter``'s own outputs, and every version's probability."""
    rng = np.random.default_rng(seed)
    made: list[Click] = []
    versions = [initial]
    for _ in range(clicks):
        simulated = next_click(versions[-1] > 0.5, truth, rng)
        if simulated is None:
            break
        made.append(Click(simulated.label, simulated.voxel))
        versions.append(segmenter.refine(images, versions[-1], made, new_clicks=1))
    return made, versions


def replay(segmenter: WindowableSegmenter, images: np.ndarray, initial: np.ndarray, clicks: Sequence[Click]) -> list[np.ndarray]:
    """Every version's probability when ``segmenter`` gets the same clicks, one at a time, from its own outputs."""
    versions = [initial]
    for count in range(1, len(clicks) + 1):
        versions.append(segmenter.refine(images, versions[-1], clicks[:count], new_clicks=1))
    return versions


def fidelity(versions: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict[str, Any]:
    """How far a path's outputs are from the baseline's, version by version."""
    dices = [dice(a > 0.5, b > 0.5) for a, b in zip(versions, reference)]
    differences = [np.abs(a - b) for a, b in zip(versions, reference)]
    return {
        "mask_dice_per_click": [round(d, 6) for d in dices],
        "mask_dice_min": round(min(dices), 6),
        "mask_dice_final": round(dices[-1], 6),
        "max_abs_probability_difference": float(max(d.max() for d in differences)),
        "mean_abs_probability_difference": float(np.mean([d.mean() for d in differences])),
        "voxels_flipped_final": int(np.count_nonzero((versions[-1] > 0.5) != (reference[-1] > 0.5))),
    }


@contextmanager
def vram_peak(device: torch.device, into: dict[str, Any]) -> Iterator[None]:
    """Record the peak CUDA memory allocated inside the block (nothing on CPU)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    torch.cuda.synchronize(device)
    into["peak_vram_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def bench_engine(
    paths: Sequence[BenchPath], case: PreparedCase, device: torch.device, repeats: int, clicks: int, seed: int
) -> tuple[dict[str, Any], list[Click], list[np.ndarray]]:
    """Time every path and compare each one's click-by-click outputs with the baseline's."""
    images = case.images
    report: dict[str, Any] = {}
    reference: list[np.ndarray] = []
    made: list[Click] = []
    for path in paths:
        log.info("engine: %s", path.name)
        entry: dict[str, Any] = {"description": path.description}
        with vram_peak(device, entry):
            initial_times, initial = timed(partial(path.segmenter.initial_probability, images), repeats)
            if not reference:  # the baseline decides the clicks every path then gets
                made, reference = simulated_session(path.segmenter, images, case.truth, initial, clicks, seed)
                versions = reference
            else:
                versions = replay(path.segmenter, images, initial, made)
            refine_times: list[float] = []
            if made:
                refine_times, _ = timed(partial(path.segmenter.refine, images, initial, made[:1], new_clicks=1), repeats)
        entry["initial"] = summary_ms(initial_times)
        entry["refine"] = summary_ms(refine_times)
        entry["fidelity"] = fidelity(versions, reference)
        report[path.name] = entry
    baseline = report[paths[0].name]
    for entry in report.values():
        entry["speedup"] = {
            "initial_p50": ratio(baseline["initial"], entry["initial"]),
            "initial_p95": ratio(baseline["initial"], entry["initial"], "p95_ms"),
            "refine_p50": ratio(baseline["refine"], entry["refine"]),
            "refine_p95": ratio(baseline["refine"], entry["refine"], "p95_ms"),
        }
    return report, made, reference


def bench_click_maps(
    clicks: Sequence[Click], shape: Sequence[int], encoding: ClickEncoding, repeats: int
) -> dict[str, Any]:
    """MONAI's whole-volume Gaussian filtering against ball-by-ball click maps (``encoding``: the checkpoint's)."""
    if not clicks:
        return {"clicks": 0}
    monai_times, monai = timed(lambda: reference_click_maps(clicks, shape, *encoding), repeats)
    local_times, local = timed(lambda: click_maps(clicks, shape, *encoding), repeats)
    return {
        "clicks": len(clicks),
        "monai": summary_ms(monai_times),
        "local": summary_ms(local_times),
        "speedup_p50": ratio(summary_ms(monai_times), summary_ms(local_times)),
        "max_abs_difference": float(np.abs(monai - local).max()),
    }


def bench_codec(images: np.ndarray, versions: Sequence[np.ndarray], repeats: int) -> dict[str, Any]:
    """Stored bytes per probability version, and the time to encode and decode one."""
    blobs = [encode_probability(p) for p in versions]
    encode_times: list[float] = []
    decode_times: list[float] = []
    for probability, blob in zip(versions, blobs):
        encode_times += timed(partial(encode_probability, probability), repeats)[0]
        decode_times += timed(partial(decode_array, blob), repeats)[0]
    exact_masks = all(np.array_equal(decode_array(b) > 0.5, p >= 0.5) for b, p in zip(blobs, versions))
    sizes = [len(b) for b in blobs]
    raw = int(versions[0].size * 4)
    return {
        "versions": len(blobs),
        "stored_bytes_mean": round(float(np.mean(sizes)), 1),
        "stored_bytes_max": int(max(sizes)),
        "raw_float32_bytes": raw,
        "compression_ratio": round(raw / float(np.mean(sizes)), 1),
        "encode": summary_ms(encode_times),
        "decode": summary_ms(decode_times),
        "mask_kept_exactly": bool(exact_masks),
        "session_images_bytes": len(encode_array(images.astype(np.float16))),
    }


