"""`compress train|distill --nproc N`: the same command under torchrun's launcher, for users who do not want to
type `torchrun --nproc-per-node N -m compress_app ...` (which is exactly what this runs, in process).

The ranks inherit this terminal: rank 0 prints the progress and the result; a rank that dies takes the job down
within about a second (torchrun's agent stops the others) and this process names it in one line.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import uuid

from compressor.errors import CompressError

from .errors import PEER_LOST_EXIT

# How a rank exits after printing its own one-line user error (compress_app.errors.user_errors): nothing more to say.
USER_ERROR_EXIT = 1


class LaunchError(CompressError, RuntimeError):
    """The torchrun job could not start, or one of its ranks failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """Refuse a rendezvous port that something else holds, before any rank starts."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise LaunchError(f"--master-port {port}: cannot listen there ({e.strerror}); choose another port or "
                              f"leave it out (a free one is picked)") from None


def strip_launch_options(argv: list[str]) -> list[str]:
    """The command line without --nproc / --master-port (with their values), as each rank runs it."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--master-port"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--master-port=")):
            continue
        out.append(a)
    return out


def _describe(rank: int, failure) -> str:
    code = failure.exitcode
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    return f"rank {rank} (pid {failure.pid}) {how}"


def run_under_torchrun(nproc: int, argv: list[str], master_port: int = 0) -> None:
    """Run ``python -m compress_app ARGV`` as ``nproc`` ranks on this machine; returns when all finished, raises
    LaunchError naming the first rank that failed (SystemExit(1) when it already printed its own error)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise LaunchError(f"--nproc {nproc}: expected at least 1")
    if master_port:
        check_port(master_port)
    port = master_port or free_port()
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its multi-line failure report: replaced by ours
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex[:12],
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "compress_app", *argv)
    except SignalException as e:  # Ctrl-C / SIGTERM: the agent stopped the ranks, each saved what it had
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None  # user_errors: the "interrupted; --resume" line, exit 130
        raise SystemExit(128 + int(e.sigval)) from None
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        # the rank that failed by itself: not one that lost its peers, nor one the agent stopped after it
        first_rank, first = min(failures, key=lambda rf: (rf[1].exitcode in (PEER_LOST_EXIT, -signal.SIGTERM),
                                                          rf[1].timestamp))
        if first.exitcode == USER_ERROR_EXIT:
            raise SystemExit(USER_ERROR_EXIT) from None  # it printed its one-line error already
        raise LaunchError(f"{_describe(first_rank, first)}; the job stopped. Continue it with the same command "
                          f"and --resume (it restarts from the last checkpoint)") from None
