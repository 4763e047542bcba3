"""The ``icr`` command: serve, worker, phantoms, and the science and benchmark commands.

``icr --help``, ``icr serve`` as a pure API (``REDIS_URL`` set) and the API process import
no torch, MONAI or matplotlib: the commands that need them are registered lazily (see
``LAZY_COMMANDS``), and ``serve`` loads an engine only in the embedded mode.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from typing import NamedTuple

from service.settings import Settings

log = logging.getLogger("icr")


class LazyCommand(NamedTuple):
    """A subcommand whose module is imported only when that command runs (or shows its help)."""

    module: str  # defines ``register(commands)``, which calls ``commands.add_parser(<name>, ...)``
    help: str  # the line ``icr --help`` lists, without importing the module


# To add a command: one line here; its module's ``register(commands)`` declares its arguments
# and sets ``run`` (``parser.set_defaults(run=...)``), a function of the parsed arguments
# returning the exit status.
LAZY_COMMANDS: dict[str, LazyCommand] = {
    "train": LazyCommand("service.science.training", "train a method's five-member ensemble(s) into a checkpoint"),
    "evaluate": LazyCommand("service.science.evaluation",
                            "simulated-click evaluation of checkpoints (paper tables, curves, significance)"),
    "ablate": LazyCommand("service.science.ablation",
                          "does a 2S-ICR refinement ensemble use its memory and its click? (first-click DSC per input)"),
    "bench": LazyCommand("service.bench.command",
                         "time the optimised paths against a naive baseline (engine, codec, HTTP in both modes)"),
    "weights": LazyCommand("service.engine.weights_cli",
                           "import MONAI/PyTorch member checkpoints, check an ensemble, export a MONAI Bundle"),
    "localise-eval": LazyCommand("service.science.localisation_eval",
                                 "hit rate of finding the tumour with no centre given (and its 0-click Dice)"),
    "whole-scan-eval": LazyCommand("service.science.whole_scan_eval",
                                   "whole-scan sessions over HTTP: found vs centred window, clicks anywhere in the scan"),
    "evaluate-suggestions": LazyCommand("service.science.suggestion_eval",
                                        "a user who accepts the suggested click against the error-based simulator"),
    "loadtest": LazyCommand("service.bench.loadtest",
                            "drive N sessions x M clicks against a running deployment; errors, latencies, lost clicks"),
}


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _settings() -> Settings | None:
    """The settings from the environment, or None (logged) when they are invalid."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as error:
        for problem in error.errors():
            log.error("cannot start: %s: %s", ".".join(str(p) for p in problem["loc"]) or "settings", problem["msg"])
        return None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service import logs
    from service.api.app import create_app

    logs.configure(args.log_level)
    settings = _settings()
    if settings is None:
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    engine = None
    try:
        if not settings.redis_url:  # embedded: this process runs the engine (a pure API never imports torch)
            from service.engine.loading import load_engine

            # refuse to start on unusable weights (CheckpointError is a RuntimeError), before binding the port
            engine = load_engine(settings)
        app = create_app(settings, engine)
    except (RuntimeError, ValueError) as error:
        log.error("cannot start: %s", error)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level.lower(),
                log_config=None, access_log=False)  # JSON logs; the app logs each request itself
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service import logs
    from service.engine import endpoint
    from service.engine.checkpoints import CheckpointError
    from service.engine.loading import load_engine
    from service.engine.worker import Worker
    from service.store.contract import StoreUnavailable
    from service.store.redis_backend import connect

    logs.configure(args.log_level)
    settings = _settings()
    if settings is None:
        return 2
    if not settings.redis_url:
        log.error("cannot start: a worker needs REDIS_URL (the embedded 'icr serve' runs its own engine)")
        return 2
    try:
        engine = load_engine(settings)
        store = connect(settings.redis_url, session_ttl_s=settings.session_ttl_s,
                        claim_idle_s=settings.claim_idle_s, prefix=settings.redis_prefix)
    except (CheckpointError, RuntimeError, StoreUnavailable) as error:
        log.error("cannot start: %s", error)
        return 2
    if settings.worker_metrics_port is not None:
        endpoint.serve(settings.host, settings.worker_metrics_port)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the job in hand, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    Worker(engine, store, store, name=args.name, claim_idle_s=settings.claim_idle_s,
           honour_clicks=settings.honour_clicks, border_passes=settings.border_passes).run(stop)
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.science.phantoms import write_cases

    if args.field_of_view == "whole-body":
        from service.science.wholebody import write_whole_body_cases

        ids = write_whole_body_cases(Path(args.out), args.n, args.seed, scale=args.scale)
    else:
        ids = write_cases(Path(args.out), args.n, args.seed, variety=args.variety)
    print(f"{len(ids)} phantom cases written to {args.out}")
    if args.dicom:
        from service.dicom.phantoms import write_dicom_cases

        folder = write_dicom_cases(Path(args.out), ids)
        print(f"... and as DICOM (CT, PET, GTVt RTSTRUCT and SEG) under {folder}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``icr`` parser, with the real arguments of ``command`` if it is one of ``LAZY_COMMANDS``.

    The other lazy commands are placeholders: they are listed with their help and take anything.
    """
    parser = argparse.ArgumentParser(prog="icr", description="2S-ICR interactive GTVt segmentation")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP API (embedded engine unless REDIS_URL is set)")
    serve.add_argument("--host", default=None, help="bind address (default ICR_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default ICR_PORT or 8000)")
    serve.set_defaults(run=_serve)

    worker = commands.add_parser("worker", help="run an engine worker against REDIS_URL")
    worker.add_argument("--name", default=None, help="consumer name (default host-pid-random)")
    worker.set_defaults(run=_worker)

    phantoms = commands.add_parser("phantoms", help="write seeded synthetic PET-CT cases (HECKTOR layout)")
    phantoms.add_argument("out", help="output folder")
    phantoms.add_argument("-n", type=int, default=10, help="number of cases")
    phantoms.add_argument("--seed", type=int, default=0, help="seed of the set; each case derives its own")
    phantoms.add_argument("--dicom", action="store_true",
                          help="also write each case as DICOM CT and PET series with its GTVt as RTSTRUCT and SEG")
    phantoms.add_argument("--field-of-view", choices=["head-neck", "whole-body"], default="head-neck",
                          help="head-neck: the HECKTOR crop; whole-body: vertex to thighs (800-1000 mm)")
    phantoms.add_argument("--scale", type=float, default=1.0,
                          help="whole-body only: multiply the voxel sizes (2 = coarser, 8x fewer voxels)")
    phantoms.add_argument("--variety", choices=("classic", "wide"), default="classic",
                          help="classic: the original generator (sets made before are unchanged); wide: tumour volume, "
                          "uptake, necrosis, field-of-view edge, body size, CT noise and kernel, PET resolution varied")
    phantoms.set_defaults(run=_phantoms)

    for name, lazy in LAZY_COMMANDS.items():
        if name == command:
            _register(commands, name, lazy.module)
        else:
            commands.add_parser(name, help=lazy.help, add_help=False)
    return parser


def _register(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, module: str) -> None:
    importlib.import_module(module).register(commands)
    if name not in commands.choices:
        raise RuntimeError(f"{module}.register() did not add the subcommand {name!r} that LAZY_COMMANDS names")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # First pass: which command (the placeholders accept any arguments, so this only fails, and
    # prints the top-level usage, on a missing or unknown command); then the command's own parser.
    chosen, _ = build_parser().parse_known_args(argv)
    args = build_parser(chosen.command).parse_args(argv)
    _configure_logging(args.log_level)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
