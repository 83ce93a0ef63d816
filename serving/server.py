"""Run the HTTP app: `serve()` verifies a bundle and runs uvicorn workers; `main()` is `python -m serving`.

The workers build their app with `serving.app:app_from_env`, reading the `ServeConfig` that `serve()` puts
in the environment. This module imports uvicorn only inside `serve()`, and never torch or `compressor`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

from serving.bundle import BundleError, verify_bundle
from serving.config import CONFIG_ENV, DEFAULT_MAX_BODY_BYTES, ServeConfig, pin_threads_to_one

logger = logging.getLogger(__name__)


def _cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _log_config(level: str, base: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's logging config `base` with the `serving` loggers at `level` on its default handler."""
    config = copy.deepcopy(base)
    config["loggers"]["serving"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def serve(
    bundle_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int | None = None,
    *,
    max_k: int = 1000,
    max_batch: int = 1024,
    fallback: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
    access_log: bool = False,
    load_delay_s: float = 0.0,
) -> None:
    """Verify the bundle, then run uvicorn with `workers` processes (default: one per core).

    Raises BundleError (before binding any socket) when the bundle fails a check, ValueError
    for bad settings. Each worker loads the bundle itself with one ONNX Runtime and one FAISS thread.
    """
    pin_threads_to_one()  # inherited by the worker processes before they import numpy/faiss
    workers = _cores() if workers is None else workers
    if type(workers) is not int or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    config = ServeConfig(
        bundle_path=os.path.abspath(bundle_path), max_k=max_k, max_batch=max_batch, fallback=fallback,
        max_body_bytes=max_body_bytes, load_delay_s=load_delay_s,
    )
    started = time.perf_counter()
    verify_bundle(config.bundle_path)  # refuse a corrupt bundle before binding
    logger.info("bundle %s verified in %.2f s", config.bundle_path, time.perf_counter() - started)

    # Lazy: the app (serving.app, which re-exports serve) is importable and testable without uvicorn.
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    metrics_dir = tempfile.mkdtemp(prefix="compress-serve-metrics-")
    os.environ[CONFIG_ENV] = json.dumps(asdict(ServeConfig(**{**asdict(config), "metrics_dir": metrics_dir})))
    try:
        uvicorn.run(
            "serving.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            lifespan="on",
            ws="none",
            access_log=access_log,
            log_level=log_level,
            log_config=_log_config(log_level, LOGGING_CONFIG),
            timeout_graceful_shutdown=10,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m serving BUNDLE_DIR [--host ...]`: what `compress serve` runs after resolving its SOURCE."""
    parser = argparse.ArgumentParser(prog="python -m serving", description="Serve a bundle over HTTP.")
    parser.add_argument("bundle", help="bundle directory written by `compress export`")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--max-k", type=int, default=1000)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--fallback", choices=["none", "popular"], default="none")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true")
    parser.add_argument("--load-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)  # tests observe readiness
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    try:
        serve(
            args.bundle, args.host, args.port, args.workers, max_k=args.max_k, max_batch=args.max_batch,
            fallback=None if args.fallback == "none" else args.fallback, max_body_bytes=args.max_body_bytes,
            log_level=args.log_level, access_log=args.access_log, load_delay_s=args.load_delay_s,
        )
    except BundleError as exc:
        msg = str(exc)
        print(f"Error: {msg if msg.startswith(args.bundle) else f'{args.bundle}: {msg}'}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0
