"""Prometheus metrics for the HTTP app, summed over uvicorn worker processes.

Each worker owns one small file of float64 slots (`worker-<pid>-<token>.bin` in a directory the
`serve()` parent creates), mapped with numpy and written only by that worker's event-loop thread,
so no locks are needed. `/metrics` in any worker sums the files of every worker: counters and
histograms over all files (a worker that died keeps its counts, as Prometheus counters should),
gauges (in-flight requests, ready workers) over the files of live processes only. Without a
directory (an app built in-process, e.g. by a test) the slots live in memory and cover this
process alone.

Label values are a fixed set so the layout is a fixed array; anything else is counted as
`endpoint="other"` / `status="other"`.
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

ENDPOINTS: tuple[str, ...] = ("/recommend", "/recommend/batch", "/healthz", "/readyz", "/metadata", "/metrics", "other")
STATUSES: tuple[str, ...] = ("200", "400", "404", "405", "408", "413", "422", "500", "503", "other")
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
SLOTS = _READY + 1

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

    def close(self) -> None:
        """Mark this worker not ready and not busy (its counts stay for the others to report)."""
        self._slots[_READY] = 0.0
        self._slots[_INFLIGHT] = 0.0
        if isinstance(self._slots, np.memmap):
            self._slots.flush()

    # ------------------------------------------------------------------------- read
    def _gather(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(sum over all workers, sum over live workers, live worker count)."""
        if self._dir is None:
            return self._slots.copy(), self._slots.copy(), 1
        total = np.zeros(SLOTS, dtype=np.float64)
        live = np.zeros(SLOTS, dtype=np.float64)
        n_live = 0
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
        return total, live, n_live

    def render(self) -> str:
        total, live, n_live = self._gather()
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
        return "\n".join(out) + "\n"


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
