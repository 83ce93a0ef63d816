"""`retrieval.topk_rows` against `torch.topk` at the shapes the refresh ranks, alternated in one process.

A UserClusters refresh takes, per block of a cluster's users, the top-M of [users, candidates] scores; its candidate
lists are the top-candidates of [clusters, items]. torch's CPU topk spends about 6 ns per score there;
`topk_rows` selects by introselect, through maxima of interleaved blocks where rows are long (docs/benchmarks.md
4j, 4k). Scores: products of random 20-dim vectors (the selection's cost does not depend on where the top-k lie).

    python benchmarks/topk_rows.py --out bench-out/topk_rows
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {  # name: (rows, columns, k)
    "UserClusters at 1M users: a cluster's 488 users x 4,000 candidates, top-100": (488, 4000, 100),
    "UserClusters at 100k users: 146 users x 4,000 candidates, top-100": (146, 4000, 100),
    "UserClusters at Gowalla: a cluster's 117 users x 1,000 candidates, top-100": (117, 1000, 100),
    "candidate lists at 1M users: 256 centroids x 200,000 items, top-4,000": (256, 200_000, 4000),
    "exact refresh, Gowalla: 512 users x 40,979 items, top-100": (512, 40_979, 100),
    "the refresh's recall check, Gowalla: 500 users x 40,979 items, top-100": (500, 40_979, 100),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json (created)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()

    import torch

    from compressor.device import configure_threads
    from compressor.retrieval import topk_rows
    from kd_speed import load_note

    a.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    res: dict = {"command": " ".join(sys.argv), "load_at_start": load_note(), "torch": torch.__version__,
                 "threads": {}}
    for threads in a.threads:
        configure_threads(threads)
        rows_out = {}
        for name, (n, c, k) in SHAPES.items():
            scores = torch.randn(n, 20, generator=gen) @ torch.randn(20, c, generator=gen)
            ways = {"torch.topk": lambda: torch.topk(scores, k, dim=1), "topk_rows": lambda: topk_rows(scores, k)}
            assert torch.equal(ways["torch.topk"]().values, ways["topk_rows"]()[0])  # the same values
            times = {w: [] for w in ways}
            for rep in range(a.repeats):
                for w in (list(ways) if rep % 2 == 0 else list(ways)[::-1]):
                    t0 = time.perf_counter()
                    ways[w]()
                    times[w].append((time.perf_counter() - t0) * 1e3)
            med = {w: statistics.median(v) for w, v in times.items()}
            rows_out[name] = {"ms": times, "median_ms": med, "ratio_torch_over_rows": med["torch.topk"] / med["topk_rows"],
                              "paired_ratios": [x / y for x, y in zip(times["torch.topk"], times["topk_rows"])]}
            print(f"{threads} thread(s), {name}: torch.topk {med['torch.topk']:.2f} ms, topk_rows "
                  f"{med['topk_rows']:.2f} ms ({rows_out[name]['ratio_torch_over_rows']:.2f}x)", flush=True)
        res["threads"][str(threads)] = rows_out
    res["load_at_end"] = load_note()
    (a.out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
