"""Settings of one server: what `serving.server.serve()` hands to every worker's `serving.app.App`, and the
thread pinning of its processes. Imports nothing heavy, so `python -m serving` can pin threads before numpy."""

from __future__ import annotations

import os
from dataclasses import dataclass

from serving.schema import version_problem

# Thread pools each worker would otherwise size to the core count and spin on; a worker answers one small query
# at a time, so OpenMP/BLAS fan-out only adds latency and fights the other workers for cores.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads_to_one() -> None:
    """One thread per pool unless the user chose otherwise; read once, when numpy/faiss/onnxruntime load."""
    for var in THREAD_ENV_VARS:
        os.environ.setdefault(var, "1")

CONFIG_ENV = "COMPRESS_SERVE_CONFIG"  # JSON ServeConfig handed from serve() to each worker process
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full batch of 1,024 ids of 100 characters is ~110 kB
FALLBACKS = (None, "popular")


@dataclass(frozen=True)
class ServeConfig:
    bundle_path: str
    max_k: int = 1000
    max_batch: int = 1024
    fallback: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = 10.0
    metrics_dir: str | None = None
    load_delay_s: float = 0.0  # testing aid: wait this long before loading, so readiness can be observed
    # Authentication: the path of a file holding the token, or (token_env) the token in the inherited
    # environment (serving.auth.TOKEN_ENV). Never the token itself: this config travels in the environment.
    token_file: str | None = None
    token_env: bool = False
    control_file: str | None = None  # JSON file naming the bundle to serve (serving.swap); None: no watching
    swap_poll_s: float = 1.0
    model_version: str | None = None  # label of bundle_path's version; None: derived from its manifest
    # Who alone chooses the served bundle (e.g. a registry alias being followed); POST /admin/swap answers 409.
    admin_swap_owner: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_k", "max_batch", "max_body_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        for name in ("body_timeout_s", "swap_poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.model_version is not None and (problem := version_problem(self.model_version)):
            raise ValueError(f"model version label {problem}")
