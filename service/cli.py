"""The ``icr`` command: serve, worker (and the science and benchmark commands)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from service.settings import Settings

log = logging.getLogger("icr")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.engine.checkpoints import CheckpointError
    from service.engine.loading import load_engine

    settings = Settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    engine = None
    if not settings.redis_url:
        try:  # refuse to start on unusable weights, before binding the port
            engine = load_engine(settings)
        except (CheckpointError, RuntimeError) as error:
            log.error("cannot start: %s", error)
            return 2
    app = create_app(settings, engine)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level.lower())
    return 0


def _worker(args: argparse.Namespace) -> int:
    from service.engine.checkpoints import CheckpointError
    from service.engine.loading import load_engine
    from service.engine.worker import Worker
    from service.store.contract import StoreUnavailable
    from service.store.redis_backend import connect

    settings = Settings()
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
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the job in hand, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    Worker(engine, store, store, name=args.name, claim_idle_s=settings.claim_idle_s).run(stop)
    return 0


def _phantoms(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.science.phantoms import write_cases

    ids = write_cases(Path(args.out), args.n, args.seed, variety=args.variety)
    print(f"{len(ids)} phantom cases written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    phantoms.add_argument("--variety", choices=("classic", "wide"), default="classic",
                          help="classic: the original generator (sets made before are unchanged); wide: tumour volume, "
                          "uptake, necrosis, field-of-view edge, body size, CT noise and kernel, PET resolution varied")
    phantoms.set_defaults(run=_phantoms)

    for module in ("service.science.training", "service.science.evaluation", "service.science.ablation",
                   "service.bench"):
        _register(commands, module)
    return parser


def _register(commands: argparse._SubParsersAction, module: str) -> None:
    """Science and benchmark commands import torch-heavy code only when they exist."""
    import importlib

    importlib.import_module(module).register(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
