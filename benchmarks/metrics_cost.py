"""Per-request cost of the server's hand-written metrics against prometheus_client in multiprocess mode.

    python benchmarks/metrics_cost.py [--requests 200000]

Both record what the server records per request (in-flight gauge up and down, a request counter by endpoint and
status, a latency histogram by endpoint), each into its own multiprocess directory; median of 5 rounds, ns per
request. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serving.metrics import Metrics  # noqa: E402


def per_request_ns(fn, n: int, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        times.append((time.perf_counter() - t0) / n * 1e9)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    a = ap.parse_args()
    ours = Metrics(tempfile.mkdtemp(prefix="metrics-ours-"))

    def hand_written(n):
        for _ in range(n):
            ours.request_started()
            ours.request_finished("/recommend", 200, 0.0004)

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-prom-")
    from prometheus_client import Counter, Gauge, Histogram  # after the directory is set, as it requires

    requests = Counter("requests", "requests", ["endpoint", "status"])
    latency = Histogram("latency_seconds", "latency", ["endpoint"])
    in_flight = Gauge("in_flight", "in flight", multiprocess_mode="livesum")

    def client_library(n):
        for _ in range(n):
            in_flight.inc()
            requests.labels("/recommend", "200").inc()
            latency.labels("/recommend").observe(0.0004)
            in_flight.dec()

    print(json.dumps({"hand_written_ns": round(per_request_ns(hand_written, a.requests)),
                      "prometheus_client_multiprocess_ns": round(per_request_ns(client_library, a.requests)),
                      "requests": a.requests, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
