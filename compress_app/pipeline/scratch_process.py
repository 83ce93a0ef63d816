"""The scratch baseline in a second process beside the teacher (both are independent; each gets half the cores).

Two stages at one thread each on 2 cores are close to twice as fast as one after the other, and a single
process cannot keep 2 threads busy on these small matmuls. The child dies with the pipeline (Linux: the kernel's
parent-death signal; elsewhere: a check after every epoch), so a killed pipeline never leaves an orphan
training into scratch/ while its re-run trains there too.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from pathlib import Path

from compressor.device import configure_threads
from compressor.trainer import Callback, TrainingError

from ..errors import INTERRUPTED_EXIT, USER_ERRORS
from ..logs import PIPELINE_LOGGER, setup_pipeline_logging
from .options import PipelineOptions
from .stages import read_result, run_stage, train_scratch

log = logging.getLogger(PIPELINE_LOGGER)

PR_SET_PDEATHSIG = 1
ORPHAN_EXIT = 3


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the pipeline process dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: ExitWithParent still applies
        pass


class ReclaimCores(Callback):
    """Teacher callback: once the scratch process beside it has finished, give the teacher every core."""

    def __init__(self, proc, threads: int):
        self.proc, self.threads, self.done = proc, threads, False

    def on_epoch_end(self, trainer, row):
        if not self.done and not self.proc.is_alive():
            self.done = True
            n = configure_threads(self.threads)
            log.info("stage teacher  continues with %d thread%s (the scratch process has finished)", n,
                     "" if n == 1 else "s")


class ExitWithParent(Callback):
    """Trainer callback (portable fallback of _die_with_parent): stop after the epoch in which the parent died."""

    def __init__(self, parent: int):
        self.parent = parent

    def on_epoch_end(self, trainer, row):
        if os.getppid() != self.parent:
            os._exit(ORPHAN_EXIT)


def _main(o: PipelineOptions, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the pipeline died before the death signal was armed
        os._exit(ORPHAN_EXIT)
    setup_pipeline_logging(True, o.log_file)
    try:
        run_stage("scratch", o.out / "scratch",
                  lambda resume: train_scratch(o, resume, progress=False, extra_callbacks=[ExitWithParent(parent)]))
    except USER_ERRORS as e:
        log.error("stage scratch  failed: %s", e)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C reaches both processes; the pipeline process says what happened
        raise SystemExit(INTERRUPTED_EXIT) from None


def start(o: PipelineOptions):
    log.info("stage scratch  trains in a second process beside the teacher (%d thread%s each)", o.threads,
             "" if o.threads == 1 else "s")
    proc = multiprocessing.get_context("spawn").Process(target=_main, args=(o, os.getpid()),
                                                        name="compress-scratch", daemon=False)
    proc.start()
    return proc


def join(proc, run_dir: Path) -> None:
    proc.join()
    if proc.exitcode != 0 and read_result(run_dir) is None:
        raise TrainingError(f"stage scratch failed in its process (exit code {proc.exitcode}); its log lines are "
                            "above and in the pipeline's log")


def stop(proc) -> None:
    if proc is not None and proc.is_alive():
        proc.terminate()
        proc.join(10)
