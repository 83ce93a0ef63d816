"""Run the HTTP app: `serve()` verifies a bundle and runs uvicorn workers; `main()` is `python -m serving`.

The workers build their app with `serving.app:app_from_env`, reading the `ServeConfig` that `serve()` puts
in the environment (never the token: the config names the token file, or says to read COMPRESS_SERVE_TOKEN
from the inherited environment). Before binding, `serve()` refuses an unusable token, a non-loopback host
without a token (unless insecure_no_token), bad settings and a bundle that fails verification; it then
writes the initial bundle into the control file (`serving.swap`) in a state directory it removes on exit.
This module imports uvicorn only inside `serve()`, and never torch or `compressor`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Any

from serving.auth import TOKEN_ENV, is_loopback, resolve_token
from serving.bundle import BundleError, verify_bundle
from serving.config import CONFIG_ENV, DEFAULT_MAX_BODY_BYTES, ServeConfig, pin_threads_to_one
from serving.swap import Target, write_control

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


def _check_control_dir(directory: str) -> None:
    """Whoever can write the control file's directory can swap the served model, token or not: it must be this
    user's own, and writable by nobody else."""
    try:
        st = os.stat(directory)
    except OSError:
        raise ValueError(f"control file directory {directory} does not exist") from None
    if not os.path.isdir(directory):
        raise ValueError(f"control file directory {directory} is not a directory")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ValueError(f"control file directory {directory} must belong to this user and be writable by no one "
                         "else (whoever can write there can swap the served model)")


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
    token_file: str | os.PathLike | None = None,
    insecure_no_token: bool = False,
    control_file: str | os.PathLike | None = None,
    swap_poll_s: float = 1.0,
    model_version: str | None = None,
    admin_swap_owner: str | None = None,
) -> None:
    """Verify the bundle, then run uvicorn with `workers` processes (default: one per core).

    Raises BundleError (before binding any socket) when the bundle fails a check, ValueError
    for bad settings (serving.auth.TokenError, a ValueError, for an unusable token). Each worker loads
    the bundle itself with one ONNX Runtime and one FAISS thread.
    """
    pin_threads_to_one()  # inherited by the worker processes before they import numpy/faiss
    workers = _cores() if workers is None else workers
    if type(workers) is not int or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    token_file = os.path.abspath(token_file) if token_file is not None else None
    token, source = resolve_token(token_file, os.environ)
    if token is None and not insecure_no_token and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without authentication: pass --token-file (or set "
                         f"{TOKEN_ENV}), or --insecure-no-token to accept requests from anyone who can reach it")
    del token  # workers read it again from the same place; it goes in no config, log or file of ours
    config = ServeConfig(
        bundle_path=os.path.abspath(bundle_path), max_k=max_k, max_batch=max_batch, fallback=fallback,
        max_body_bytes=max_body_bytes, load_delay_s=load_delay_s, token_file=token_file,
        token_env=source == "env", swap_poll_s=swap_poll_s, model_version=model_version,
        admin_swap_owner=admin_swap_owner,
    )
    if control_file is not None:
        _check_control_dir(os.path.dirname(os.path.abspath(control_file)))
    started = time.perf_counter()
    verify_bundle(config.bundle_path)  # refuse a corrupt bundle before binding
    logger.info("bundle %s verified in %.2f s", config.bundle_path, time.perf_counter() - started)

    # Lazy: the app (serving.app, which re-exports serve) is importable and testable without uvicorn.
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    state_dir = tempfile.mkdtemp(prefix="compress-serve-")
    # uvicorn's single-process server re-raises a captured SIGTERM once it has shut down, with the handler it
    # found: the default one would end the process before the `finally` below and leave state_dir behind. A
    # handler that exits through Python unwinds it instead (exit status 143, as a killed process reports). Only
    # in the main thread (the only one that may set handlers) and only over the default: a caller's own handler
    # is the caller's to keep.
    own_sigterm = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    try:
        if own_sigterm:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        logger.info("state directory: %s (removed on exit)", state_dir)
        metrics_dir = os.path.join(state_dir, "metrics")
        os.mkdir(metrics_dir)
        control = os.path.abspath(control_file) if control_file is not None else os.path.join(state_dir, "control.json")
        try:
            write_control(control, Target(config.bundle_path, model_version))
        except OSError as exc:
            raise ValueError(f"control file {control}: cannot write it ({exc.strerror or exc})") from None
        logger.info("swap control file: %s (auth: %s)", control,
                    {"file": "token file", "env": TOKEN_ENV}.get(source or "", "none"))
        worker_config = ServeConfig(**{**asdict(config), "metrics_dir": metrics_dir, "control_file": control})
        os.environ[CONFIG_ENV] = json.dumps(asdict(worker_config))
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
        shutil.rmtree(state_dir, ignore_errors=True)
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


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
    parser.add_argument("--token-file", default=None,
                        help=f"file holding the bearer token every endpoint but /healthz and /readyz then requires "
                             f"(default: the {TOKEN_ENV} environment variable, if set)")
    parser.add_argument("--insecure-no-token", action="store_true",
                        help="allow a non-loopback --host without a token (anyone who can reach it may call it)")
    parser.add_argument("--control-file", default=None,
                        help='JSON {"bundle": "/abs/dir", "version": "label"} the workers watch for swaps '
                             "(default: control.json in the server's temporary state directory)")
    parser.add_argument("--swap-poll-s", type=float, default=1.0, help="seconds between control-file checks")
    parser.add_argument("--model-version", default=None,
                        help="version label of BUNDLE (default: the manifest's MLflow model version, else "
                             "sha256:<first 12 hex of the manifest's sha256>)")
    parser.add_argument("--admin-swap-owner", default=None, metavar="WHO",
                        help="WHO alone chooses the served bundle (it writes the control file): POST /admin/swap "
                             "answers 409 naming it")
    parser.add_argument("--load-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)  # tests observe readiness
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    try:
        serve(
            args.bundle, args.host, args.port, args.workers, max_k=args.max_k, max_batch=args.max_batch,
            fallback=None if args.fallback == "none" else args.fallback, max_body_bytes=args.max_body_bytes,
            log_level=args.log_level, access_log=args.access_log, load_delay_s=args.load_delay_s,
            token_file=args.token_file, insecure_no_token=args.insecure_no_token, control_file=args.control_file,
            swap_poll_s=args.swap_poll_s, model_version=args.model_version, admin_swap_owner=args.admin_swap_owner,
        )
    except BundleError as exc:
        msg = str(exc)
        print(f"Error: {msg if msg.startswith(args.bundle) else f'{args.bundle}: {msg}'}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0
