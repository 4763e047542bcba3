"""The `icr` command: every subcommand's help, and no torch/MONAI/matplotlib where no network runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import cli
from service.bench.processes import free_port

REPOSITORY = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "matplotlib")

# Prints, as JSON, which of HEAVY the process has imported; appended to each probe script.
REPORT_HEAVY = f"""
import json, sys
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), flush=True)
"""


def heavy_modules_after(script: str, env: dict[str, str] | None = None) -> list[str]:
    """Run ``script`` in a fresh interpreter; the heavy modules it imported (its last output line)."""
    result = subprocess.run([sys.executable, "-c", script + REPORT_HEAVY], cwd=REPOSITORY, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_icr_help_lists_every_command_without_importing_torch() -> None:
    script = """
import contextlib, io
from service import cli
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    cli.main(["--help"])
assert all(name in out.getvalue() for name in ("serve", "worker", "phantoms", *cli.LAZY_COMMANDS)), out.getvalue()
"""
    assert heavy_modules_after(script) == []


def test_the_api_app_imports_no_engine() -> None:
    assert heavy_modules_after("from service.api.app import create_app") == []


@pytest.mark.slow  # starts icr serve
def test_icr_serve_over_redis_is_a_pure_api(redis_url: str, redis_prefix: str) -> None:
    """The real `icr serve` code path with REDIS_URL, up and answering, has imported no torch."""
    port = free_port()
    # The server runs in the main thread, as `icr serve` does; a thread waits for /healthz,
    # reports and ends the process.
    script = f"""
import os, threading, time, httpx
from service import cli

def report_when_up():
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if httpx.get("http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        os._exit(3)
{REPORT_HEAVY.replace(chr(10), chr(10) + "    ")}
    os._exit(0)

threading.Thread(target=report_when_up, daemon=True).start()
cli.main(["--log-level", "WARNING", "serve", "--port", "{port}"])
os._exit(4)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICR_")}
    env.update(REDIS_URL=redis_url, ICR_REDIS_PREFIX=redis_prefix)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPOSITORY, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", [*cli.LAZY_COMMANDS, "serve", "worker", "phantoms"])
def test_every_command_has_its_own_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main([name, "--help"])
    assert stopped.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith(f"usage: icr {name} [-h]")  # the command's own parser (a placeholder has no -h)


def test_a_lazy_command_runs_its_modules_function() -> None:
    from service.bench import command

    assert cli.build_parser("bench").parse_args(["bench"]).run is command.run


def test_a_table_entry_must_name_the_command_its_module_registers() -> None:
    commands = argparse.ArgumentParser(prog="icr").add_subparsers(dest="command")
    with pytest.raises(RuntimeError, match="'not-bench'"):
        cli._register(commands, "not-bench", cli.LAZY_COMMANDS["bench"].module)


def test_unknown_and_missing_commands_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["no-such-command"], []):
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        assert stopped.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
