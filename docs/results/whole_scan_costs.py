"""What whole-scan sessions cost against the service before them, in the same run.

For each source tree (BASE: a `git worktree add --detach` of the commit before whole-scan
sessions; HEAD: this checkout), in turns so both see the same machine: a redis-server of its
own, `icr serve` as a pure API and one `icr worker`, the weights given, one torch thread.
On one whole-body case with the GTVt's centre of mass as `centre`:

- session creation (POST /v1/sessions, round trip), SESSIONS times;
- CLICKS simulated clicks inside the first window (the simulator of service.science.simulator
  on the window, sent as `voxel`), each round trip, and the Redis bytes each version adds
  (`MEMORY USAGE` of the session's keys before and after the click);
- HEAD only: a background click MOVE_MM below the tumour (in the CT, outside the first
  window): its round trip and bytes, against an in-window click and session creation.

    python docs/results/whole_scan_costs.py BASE HEAD WEIGHTS CASE_PREFIX > out.json

CASE_PREFIX is `<dir>/<case>` of a HECKTOR-layout case (`_ct`, `_pt`, `_gtvt.nii.gz`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import redis

from service.bench.processes import free_port, start_process, start_redis, wait_ready
from service.imaging.grid import WorkingGrid, resample
from service.imaging.nifti import load_nifti_file
from service.imaging.volume import Volume
from service.science.simulator import next_click
from service.store.codec import decode_mask

SESSIONS, CLICKS, ROUNDS, MOVE_MM = 3, 5, 2, 300.0

base_tree, head_tree, weights, prefix = (Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
files = {role: (f"{role}.nii.gz", Path(f"{prefix}_{suffix}.nii.gz").read_bytes())
         for role, suffix in (("ct", "ct"), ("pet", "pt"))}
label = load_nifti_file(Path(f"{prefix}_gtvt.nii.gz"), role="gtvt")
gtvt = Volume((label.array > 0).astype(np.float32), label.affine)
com = label.affine[:3, :3] @ np.argwhere(label.array > 0).mean(axis=0) + label.affine[:3, 3]
ct_affine = nib.load(f"{prefix}_ct.nii.gz").affine


def session_bytes(r: redis.Redis, sid: str) -> int:
    return sum(int(r.memory_usage(key, samples=0) or 0) for key in r.scan_iter(match=f"*:s:{sid}:*"))


def measure(tree: Path, moving: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"create_s": [], "click_s": [], "version_bytes": [], "scan_bytes": [],
                                   "move_s": [], "move_bytes": []}
    scratch = Path(tempfile.mkdtemp())
    server, redis_url = start_redis(scratch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICR_")}
    env.update(REDIS_URL=redis_url, ICR_WEIGHTS=weights, ICR_DEVICE="cpu", ICR_TORCH_THREADS="1",
               ICR_MAX_UPLOAD_MB="512", ICR_MAX_IMAGE_MB="4096", PYTHONPATH=str(tree))
    command = [sys.executable, "-P", "-m", "service.cli", "--log-level", "WARNING"]  # -P: the tree's service, not ./
    api_port = free_port()
    api = start_process("serve", [*command, "serve", "--port", str(api_port)], env, scratch)
    worker = start_process("worker", [*command, "worker"], env, scratch)
    url = f"http://127.0.0.1:{api_port}"
    r = redis.Redis.from_url(redis_url)
    try:
        wait_ready(url, api)
        with httpx.Client(base_url=url, timeout=600) as client:
            for session in range(SESSIONS):
                started = time.perf_counter()
                created = client.post("/v1/sessions", files=files, data={"centre": ",".join(f"{v:.3f}" for v in com)})
                out["create_s"].append(time.perf_counter() - started)
                body = created.json()
                sid = body["id"]
                out["scan_bytes"].append(session_bytes(r, sid))
                grid = WorkingGrid(tuple(body["grid"]["shape"]), body["grid"]["spacing_mm"], tuple(body["grid"]["origin_mm"]))
                truth = resample(gtvt, grid, order=1, fill=0.0) > 0.5
                rng = np.random.default_rng([0, session])
                for _ in range(CLICKS):
                    click = next_click(decode_mask(body["mask"]), truth, rng)
                    if click is None:
                        break
                    before = session_bytes(r, sid)
                    started = time.perf_counter()
                    answer = client.post(f"/v1/sessions/{sid}/clicks",
                                         json={"clicks": [{"label": click.label, "voxel": list(click.voxel)}]})
                    out["click_s"].append(time.perf_counter() - started)
                    assert answer.status_code == 200, answer.text
                    body = answer.json()
                    out["version_bytes"].append(session_bytes(r, sid) - before)
                if moving:
                    far = [float(com[0]), float(com[1]), float(com[2] - MOVE_MM)]
                    before = session_bytes(r, sid)
                    started = time.perf_counter()
                    answer = client.post(f"/v1/sessions/{sid}/clicks",
                                         json={"clicks": [{"label": "background", "world_mm": far}]})
                    out["move_s"].append(time.perf_counter() - started)
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["window"]["offset"] != [0, 0, 0]
                    out["move_bytes"].append(session_bytes(r, sid) - before)
                client.delete(f"/v1/sessions/{sid}")
    finally:
        for process in (worker, api, server):
            process.stop()
    return out


samples: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
for _ in range(ROUNDS):
    for name, tree in (("base", base_tree), ("head", head_tree)):
        for key, values in measure(tree, moving=name == "head").items():
            samples[name].setdefault(key, []).extend(values)


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 4) if values else None


report = {name: {key: median(values) for key, values in data.items()} | {"n_clicks": len(data["click_s"])}
          for name, data in samples.items()}
base, head = report["base"], report["head"]
report["ratios_head_to_base"] = {
    key: round(head[key] / base[key], 3) for key in ("create_s", "click_s", "version_bytes", "scan_bytes")
    if head.get(key) and base.get(key)
}
report["move_click_to_in_window_click"] = round(head["move_s"] / head["click_s"], 3) if head["move_s"] else None
report["setup"] = {"sessions": SESSIONS, "clicks": CLICKS, "rounds": ROUNDS, "move_mm": MOVE_MM, "case": prefix,
                   "weights": weights, "torch_threads": 1}
print(json.dumps(report, indent=1))
