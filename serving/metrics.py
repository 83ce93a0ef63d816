"""Prometheus metrics for the HTTP app, summed over uvicorn worker processes.

Each worker owns one small file of float64 slots (`worker-<pid>-<token>.bin` in a directory the
`serve()` parent creates), mapped with numpy and written only by that worker's event-loop thread,
so no locks are needed. `/metrics` in any worker sums the files of every worker: counters and
histograms over all files (a worker that died keeps its counts, as Prometheus counters should),
gauges (in-flight requests, ready workers) over the files of live processes only. Without a
directory (an app built in-process, e.g. by a test) the slots live in memory and cover this
process alone.

Label values are a fixed set so the layout is a fixed array; anything else is counted as
`endpoint="other"` / `status="other"`. The one free-form label, the model version a worker serves, lives
in a small text file beside that worker's slots (`worker-<pid>-<token>.version`, replaced atomically).

Threads: the request counters are written by the event-loop thread only; the swap counters, the version
and the ready flag by whoever holds the swap lock of `serving.swap.BundleSlot` (the loader/watcher thread
or the event loop during POST /admin/swap), so each slot still has one writer at a time.
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ENDPOINTS: tuple[str, ...] = (
    "/recommend", "/recommend/batch", "/healthz", "/readyz", "/metadata", "/metrics", "/openapi.json", "/admin/swap",
    "other",
)
STATUSES: tuple[str, ...] = ("200", "400", "401", "403", "404", "405", "408", "413", "422", "500", "503", "other")
# Seconds; chosen around the 2 ms p50 target with room for big batches.
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
USER_OUTCOMES: tuple[str, ...] = ("ok", "unknown", "fallback")

_E, _S, _B, _O = len(ENDPOINTS), len(STATUSES), len(BUCKETS) + 1, len(USER_OUTCOMES)
# Slot layout of one worker's array.
_REQ = 0  # [E, S] request counts
_HIST = _REQ + _E * _S  # [E, B+1] per-bucket (non-cumulative) latency counts, last = +Inf
_SUM = _HIST + _E * _B  # [E] latency sums
_USERS = _SUM + _E  # [O] users answered, by outcome
_INFLIGHT = _USERS + _O  # gauge
_READY = _INFLIGHT + 1  # gauge: 1 once this worker's bundle is loaded
_SWAPS = _READY + 1  # bundle swaps this worker completed
_SWAP_FAILURES = _SWAPS + 1  # swaps refused (bundle failed to load or verify, unreadable control file)
_AUTH_FAILURES = _SWAP_FAILURES + 1  # requests refused with 401
SLOTS = _AUTH_FAILURES + 1

_ENDPOINT_INDEX = {e: i for i, e in enumerate(ENDPOINTS)}
_STATUS_INDEX = {s: i for i, s in enumerate(STATUSES)}
_OUTCOME_INDEX = {o: i for i, o in enumerate(USER_OUTCOMES)}

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def endpoint_label(path: str) -> str:
    return path if path in _ENDPOINT_INDEX else "other"


class Metrics:
    """This worker's slots, plus the Prometheus text of all workers' sums."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._dir = Path(directory) if directory else None
        self._path: Path | None = None
        if self._dir is not None:
            self._path = self._dir / f"worker-{os.getpid()}-{secrets.token_hex(4)}.bin"
            np.zeros(SLOTS, dtype=np.float64).tofile(self._path)
            self._slots = np.memmap(self._path, dtype=np.float64, mode="r+", shape=(SLOTS,))
        else:
            self._slots = np.zeros(SLOTS, dtype=np.float64)
        self._version: str | None = None

    # ------------------------------------------------------------------ writes (hot path)
    def request_started(self) -> None:
        self._slots[_INFLIGHT] += 1

    def request_finished(self, endpoint: str, status: int, seconds: float) -> None:
        e = _ENDPOINT_INDEX.get(endpoint, _E - 1)
        s = _STATUS_INDEX.get(str(status), _S - 1)
        slots = self._slots
        slots[_INFLIGHT] -= 1
        slots[_REQ + e * _S + s] += 1
        slots[_HIST + e * _B + bisect.bisect_left(BUCKETS, seconds)] += 1
        slots[_SUM + e] += seconds

    def users(self, outcome: str, n: int = 1) -> None:
        self._slots[_USERS + _OUTCOME_INDEX[outcome]] += n

    def set_ready(self, ready: bool) -> None:
        self._slots[_READY] = 1.0 if ready else 0.0

    def auth_failed(self) -> None:
        self._slots[_AUTH_FAILURES] += 1

    def swapped(self) -> None:
        self._slots[_SWAPS] += 1

    def swap_failed(self) -> None:
        self._slots[_SWAP_FAILURES] += 1

    def set_version(self, label: str) -> None:
        """The model version this worker serves now (a label `serving.schema.version_problem` accepts)."""
        self._version = label
        if self._path is not None:
            tmp = self._path.with_name(f".{self._path.stem}.version.tmp")
            try:
                tmp.write_text(label, encoding="utf-8")
                os.replace(tmp, _version_path(self._path))
            except OSError as exc:  # metrics must never stop a swap
                logger.warning("could not record the model version for /metrics: %s", exc)

    def close(self) -> None:
        """Mark this worker not ready and not busy (its counts stay for the others to report)."""
        self._slots[_READY] = 0.0
        self._slots[_INFLIGHT] = 0.0
        if isinstance(self._slots, np.memmap):
            self._slots.flush()

    # ------------------------------------------------------------------------- read
    def _gather(self) -> tuple[np.ndarray, np.ndarray, int, set[str]]:
        """(sum over all workers, sum over live workers, live worker count, versions live workers serve)."""
        if self._dir is None:
            return self._slots.copy(), self._slots.copy(), 1, {self._version} if self._version else set()
        total = np.zeros(SLOTS, dtype=np.float64)
        live = np.zeros(SLOTS, dtype=np.float64)
        n_live = 0
        versions: set[str] = set()
        for path in self._dir.glob("worker-*.bin"):
            try:
                arr = np.fromfile(path, dtype=np.float64)
            except OSError:
                continue
            if arr.shape != (SLOTS,):
                continue
            total += arr
            if _alive(path):
                live += arr
                n_live += 1
                try:
                    versions.add(_version_path(path).read_text(encoding="utf-8"))
                except OSError:
                    pass  # not loaded yet
        return total, live, n_live, versions

    def render(self) -> str:
        total, live, n_live, versions = self._gather()
        out: list[str] = []
        add = out.append
        add("# HELP compress_http_requests_total HTTP requests answered, by endpoint and status code.")
        add("# TYPE compress_http_requests_total counter")
        for e, endpoint in enumerate(ENDPOINTS):
            for s, status in enumerate(STATUSES):
                value = total[_REQ + e * _S + s]
                if value:
                    add(f'compress_http_requests_total{{endpoint="{endpoint}",status="{status}"}} {_num(value)}')
        add("# HELP compress_http_request_duration_seconds Time from request start to response sent.")
        add("# TYPE compress_http_request_duration_seconds histogram")
        for e, endpoint in enumerate(ENDPOINTS):
            counts = total[_HIST + e * _B : _HIST + (e + 1) * _B]
            if not counts.any():
                continue
            cumulative = np.cumsum(counts)
            for bound, c in zip(BUCKETS, cumulative[:-1]):
                add(f'compress_http_request_duration_seconds_bucket{{endpoint="{endpoint}",le="{bound}"}} {_num(c)}')
            add(f'compress_http_request_duration_seconds_bucket{{endpoint="{endpoint}",le="+Inf"}} {_num(cumulative[-1])}')
            add(f'compress_http_request_duration_seconds_sum{{endpoint="{endpoint}"}} {float(total[_SUM + e])!r}')
            add(f'compress_http_request_duration_seconds_count{{endpoint="{endpoint}"}} {_num(cumulative[-1])}')
        add("# HELP compress_http_requests_in_flight Requests being handled now (this one included).")
        add("# TYPE compress_http_requests_in_flight gauge")
        add(f"compress_http_requests_in_flight {_num(live[_INFLIGHT])}")
        add("# HELP compress_recommend_users_total Users answered by /recommend and /recommend/batch, by outcome.")
        add("# TYPE compress_recommend_users_total counter")
        for o, outcome in enumerate(USER_OUTCOMES):
            add(f'compress_recommend_users_total{{outcome="{outcome}"}} {_num(total[_USERS + o])}')
        add("# HELP compress_workers Live worker processes.")
        add("# TYPE compress_workers gauge")
        add(f"compress_workers {n_live}")
        add("# HELP compress_workers_ready Live worker processes with the bundle loaded and verified.")
        add("# TYPE compress_workers_ready gauge")
        add(f"compress_workers_ready {_num(live[_READY])}")
        for name, slot, help_text in (
            ("compress_swaps_total", _SWAPS, "Bundle swaps completed, one per worker that switched to a new bundle."),
            ("compress_swap_failures_total", _SWAP_FAILURES,
             "Swaps refused (bundle failed to load or verify, or bad control file): per worker and control-file "
             "change, plus refused POST /admin/swap requests."),
            ("compress_auth_failures_total", _AUTH_FAILURES, "Requests refused with 401 (missing or wrong bearer token)."),
            ("compress_fallbacks_total", _USERS + _OUTCOME_INDEX["fallback"],
             "Answers from the popular-items fallback (unknown users with --fallback popular)."),
        ):
            add(f"# HELP {name} {help_text}")
            add(f"# TYPE {name} counter")
            add(f"{name} {_num(total[slot])}")
        add("# HELP compress_model_version_info Model versions served now: one series, value 1, per version that at "
            "least one live worker serves (several while a swap reaches the workers).")
        add("# TYPE compress_model_version_info gauge")
        for version in sorted(versions):
            add(f'compress_model_version_info{{version="{_label(version)}"}} 1')
        return "\n".join(out) + "\n"


def _version_path(slots: Path) -> Path:
    return slots.with_suffix(".version")


def _label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _alive(path: Path) -> bool:
    try:
        pid = int(path.name.split("-")[1])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
