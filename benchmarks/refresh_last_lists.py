"""UserClusters with and without the last refresh's lists, on two checkpoints of one run (docs/benchmarks.md 4n).

How much of a student's exact top-M survives from the earlier checkpoint to the later one, and for each candidate
count the recall@M (against exact search, on a sample of users) and the search time of UserClusters on the later
vectors: alone, and with every user's exact list of the earlier checkpoint ranked beside its cluster's candidates
(what a refresh does with its last lists). One process; the times are medians of --repeats, build included.

    python benchmarks/refresh_last_lists.py --out bench-out/refresh_last_lists --earlier RUN/model.safetensors \
        --later RUN/last.safetensors --threads 1 --clusters 256 --candidates 1000 2000 4000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json and results.md (created)")
    ap.add_argument("--earlier", type=Path, required=True, help="checkpoint (or run directory) of the last lists")
    ap.add_argument("--later", type=Path, required=True, help="checkpoint (or run directory) searched")
    ap.add_argument("--m", type=int, default=100, help="top-M per user")
    ap.add_argument("--clusters", type=int, default=256)
    ap.add_argument("--candidates", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recall-users", type=int, default=2000, help="users whose recall@M is checked")
    a = ap.parse_args()

    import torch

    from compressor.checkpoint import load_checkpoint
    from compressor.cluster_search import UserClusterSearcher
    from compressor.device import configure_threads
    from compressor.retrieval import exact_topk_on_device, recall_at_k, recall_sample

    configure_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)

    def vectors(path):
        return [t.detach().float() for t in load_checkpoint(path).build_model().vectors()]

    pu, pi = vectors(a.earlier)
    u, i = vectors(a.later)
    previous = exact_topk_on_device(pu, pi, a.m)[1].numpy().astype(np.int32)
    t0 = time.perf_counter()
    exact = exact_topk_on_device(u, i, a.m)[1].numpy()
    exact_s = time.perf_counter() - t0
    sample = recall_sample(len(u), a.recall_users)
    res = {"args": {k: str(v) for k, v in vars(a).items()}, "users": len(u), "items": len(i),
           "exact_search_s": exact_s, "overlap_earlier_later": recall_at_k(previous, exact), "rows": []}
    un, inp = u.numpy(), i.numpy()
    for count in a.candidates:
        row = {"clusters": a.clusters, "candidates": count}
        for label, prev in (("alone", None), ("with_last_lists", previous)):
            times = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                ids = UserClusterSearcher(inp, un, {"clusters": a.clusters, "candidates": count}).search(
                    un, a.m, previous=prev)[1]
                times.append(time.perf_counter() - t0)
            row[label] = {"recall": recall_at_k(ids[sample], exact[sample]), "s": statistics.median(times)}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    lines = [f"# UserClusters with the last lists: {a.later} (earlier lists: {a.earlier})\n",
             f"{len(u):,} users x {len(i):,} items, top-{a.m}, {a.threads} thread(s); exact search of every user "
             f"{exact_s:.2f} s; the earlier exact lists hold {res['overlap_earlier_later']:.3f} of the later ones.\n",
             "| clusters / candidates | alone: recall@M, s | with the last lists: recall@M, s |", "|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['clusters']} / {r['candidates']:,} | {r['alone']['recall']:.3f}, {r['alone']['s']:.2f} | "
                     f"{r['with_last_lists']['recall']:.3f}, {r['with_last_lists']['s']:.2f} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
