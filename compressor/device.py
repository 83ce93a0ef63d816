"""The one place that chooses the device and the CPU thread counts."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

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
    """Cores this process can really use: the affinity mask (taskset, cpusets), capped by a cgroup CPU quota
    (a container's `--cpus`), else the machine's count."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(n, quota)) if quota else n


def _cgroup_cpu_quota() -> int | None:
    """The CPU quota of this process's cgroup in whole cores, rounded up (cgroup v2 cpu.max, v1 cfs files);
    None when there is none."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return math.ceil(int(text[0]) / int(text[1]))
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return math.ceil(quota / period) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def thread_settings() -> dict:
    """What this process's pools were set to (recorded in every checkpoint, so a slow run can be explained)."""
    return {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cores_available": available_cores()}


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
