"""Redis commands and round trips per click: the API and one worker of a source tree, tiny
weights, a redis-server of its own, 20 clicks with Idempotency-Keys; idle polling (measured
for 5-6 s before) is subtracted. A round trip is one command, pipeline or script seen by MONITOR.

    python docs/results/redis_round_trips.py TREE WEIGHTS CT PT > out.json

TREE is a checkout (e.g. a `git worktree add --detach` of an older commit), WEIGHTS a tiny
random checkpoint (tests/conftest.py's tiny_weights recipe), CT/PT a small NIfTI pair.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

tree = Path(sys.argv[1])
weights = sys.argv[2]
ct, pt = sys.argv[3], sys.argv[4]
sys.path.insert(0, str(tree))
from service.bench.processes import free_port, redis_server_binary

port = free_port()
d = tempfile.mkdtemp()
srv = subprocess.Popen(
    [redis_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL
)
time.sleep(0.5)
env = {k: v for k, v in os.environ.items() if not k.startswith("ICR_")}
env.update(REDIS_URL=f"redis://127.0.0.1:{port}/0", ICR_WEIGHTS=weights, ICR_DEVICE="cpu", ICR_TORCH_THREADS="1", PYTHONPATH=str(tree))
api_port = free_port()
api = subprocess.Popen(
    [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve", "--port", str(api_port)],
    env=env,
    cwd=tree,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
wk = subprocess.Popen(
    [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "worker"],
    env=env,
    cwd=tree,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
url = f"http://127.0.0.1:{api_port}"
r = redis.Redis(port=port)
try:
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    files = {"ct": ("ct.nii.gz", open(ct, "rb").read()), "pet": ("pt.nii.gz", open(pt, "rb").read())}
    sid = httpx.post(url + "/v1/sessions", files=files, timeout=120).json()["id"]

    def total():
        return sum(v["calls"] for k, v in r.info("commandstats").items())

    r.config_resetstat()
    t0 = time.monotonic()
    time.sleep(6)
    idle = (total() - 1) / (time.monotonic() - t0)
    import threading

    seen = []
    stop = threading.Event()

    def watch():
        with redis.Redis(port=port).monitor() as m:
            for c in m.listen():
                seen.append(
                    (
                        c.get("client_type"),
                        c["command"].split()[0].upper() if c["command"] else "",
                        c.get("client_address"),
                        c.get("client_port"),
                        time.monotonic(),
                    )
                )
                if stop.is_set():
                    break

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    time.sleep(0.5)
    tm0 = time.monotonic()
    time.sleep(5)
    tm1 = time.monotonic()
    n = 20
    r.config_resetstat()
    t0 = time.monotonic()
    for i in range(n):
        resp = httpx.post(
            f"{url}/v1/sessions/{sid}/clicks",
            json={"clicks": [{"label": "foreground", "voxel": [10 + i % 10, 12, 14]}]},
            headers={"Idempotency-Key": f"k{i}"},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
    elapsed = time.monotonic() - t0
    t1 = time.monotonic()
    time.sleep(0.3)
    stop.set()
    r.ping()
    th.join(2)

    def trips(lo, hi):
        n_rt = 0
        in_multi = {}
        for kind, cmd, addr, cport, at in seen:
            if not (lo <= at <= hi) or kind == "lua":
                continue
            key = (addr, cport)
            if cmd == "MULTI":
                in_multi[key] = True
                continue
            if cmd == "EXEC":
                in_multi[key] = False
                n_rt += 1
                continue
            if in_multi.get(key):
                continue
            n_rt += 1
        return n_rt

    idle_trips = trips(tm0, tm1) / (tm1 - tm0)
    click_trips = trips(t0, t1)
    calls = total() - 1
    stats = {k: v["calls"] for k, v in r.info("commandstats").items()}
    print(
        json.dumps(
            {
                "tree": str(tree),
                "clicks": n,
                "elapsed_s": round(elapsed, 2),
                "idle_cmds_per_s": round(idle, 2),
                "commands": calls,
                "per_click_raw": round(calls / n, 1),
                "per_click_net_of_idle": round((calls - idle * elapsed) / n, 1),
                "round_trips_per_click_net_of_idle": round((click_trips - idle_trips * (t1 - t0)) / n, 1),
                "idle_round_trips_per_s": round(idle_trips, 2),
                "by_command": stats,
            }
        )
    )
finally:
    for p in (api, wk, srv):
        p.terminate()
