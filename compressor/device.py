"""The one place that chooses the device and the CPU thread counts."""

from __future__ import annotations

import logging
import os

import faiss
import torch

from .errors import DeviceError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str = "auto") -> torch.device:
    """auto: CUDA when present, else CPU. Asking for cuda without one is a clear error, not a crash later."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"--device: expected auto, cpu or cuda, got {choice!r}")
    return torch.device(choice)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int = 0, share: int = 1) -> int:
    """Set torch's and FAISS's CPU thread pools deliberately (0 = one per core, or with ``share`` processes on
    this node, e.g. a torchrun job's ranks, this process's share of the cores).

    Both libraries start their own OpenMP pool; leaving both at their defaults oversubscribes small machines,
    which makes FAISS many times slower. Training alternates between them, so each gets all cores in turn.
    """
    n = threads or max(1, available_cores() // max(share, 1))
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n
