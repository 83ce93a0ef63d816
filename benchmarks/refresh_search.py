"""The student's top-M refresh search alone, side by side: FAISS IVF against UserClusters, in one process.

docs/benchmarks.md 4g times whole RCE-KD epochs, one process per index, and the box's pace moved 2x between them.
This times only what the two indexes differ in, the search of every user's top-M (the searcher's build included,
as every refresh builds one), alternating the indexes in one process on the same vectors, and reports each one's
median and their ratio. Vectors: `kd_speed.synthetic` (power-law data, a trained-like 20-dim student), or with
`--student` a real checkpoint's (a refresh's cost and recall depend on the student's geometry: docs/benchmarks.md 4i).

    python benchmarks/refresh_search.py --out bench-out/refresh_search --users 1000000 --repeats 3
    python benchmarks/refresh_search.py --out bench-out/refresh_search_gowalla --student RUN_DIR --threads 1 \
        --ivf IVF256,Flat --ivf-params nprobe=16 --clusters-params clusters=256 candidates=1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json (created)")
    ap.add_argument("--student", type=Path, help="search this checkpoint's (or run directory's) user and item "
                    "vectors instead of synthetic ones (--users and --items are then ignored)")
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--m", type=int, default=100, help="top-M per user")
    ap.add_argument("--repeats", type=int, default=3, help="searches per index, alternated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ivf", default="IVF4096,Flat")
    ap.add_argument("--ivf-params", nargs="*", default=["nprobe=96"])
    ap.add_argument("--clusters-params", nargs="*", default=["clusters=2048", "candidates=4000"])
    ap.add_argument("--recall-users", type=int, default=2000, help="users whose recall@M is checked (exact search)")
    a = ap.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    from compressor.checkpoint import load_checkpoint
    from compressor.cluster_search import FACTORY, UserClusterSearcher
    from compressor.device import configure_threads
    from compressor.retrieval import TopKSearcher, recall_at_k
    from kd_speed import load_note, parse_params, synthetic

    threads = configure_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": " ".join(sys.argv), "threads": threads, "load_at_start": load_note(), "users": a.users,
                 "items": a.items, "m": a.m}
    t0 = time.perf_counter()
    if a.student:
        with torch.no_grad():
            s_u, s_i = (x.numpy() for x in load_checkpoint(a.student).build_model().vectors())
        res["student"], res["users"], res["items"] = str(a.student), len(s_u), len(s_i)
    else:
        _, _, _, s_u, s_i, _ = synthetic(a.users, a.items, 7.5, 64, 20, seed=0)
    res["generate_s"] = time.perf_counter() - t0
    a.users = len(s_u)
    sample = np.sort(np.random.default_rng(1).choice(a.users, min(a.recall_users, a.users), replace=False))
    exact = TopKSearcher(s_i, "Flat").search(s_u[sample], a.m)[1]
    ivf_params, cl_params = parse_params(a.ivf_params), parse_params(a.clusters_params)
    searches = {
        f"{a.ivf} {ivf_params}": lambda: TopKSearcher(s_i, a.ivf, params=ivf_params).search(s_u, a.m)[1],
        f"{FACTORY} {cl_params}": lambda: UserClusterSearcher(s_i, s_u, cl_params).search(s_u, a.m)[1],
    }
    times: dict[str, list[float]] = {name: [] for name in searches}
    recall: dict[str, float] = {}
    for rep in range(a.repeats):
        for name, search in searches.items():  # alternated: a change of the box's pace hits both alike
            t = time.perf_counter()
            ids = search()
            times[name].append(time.perf_counter() - t)
            recall[name] = recall_at_k(ids[sample], exact)
            del ids
            print(f"repeat {rep + 1}: {name}: {times[name][-1]:.1f} s, recall@{a.m} {recall[name]:.4f}", flush=True)
    names = list(searches)
    res["searches"] = {n: {"times_s": times[n], "median_s": statistics.median(times[n]), "recall": recall[n]}
                       for n in names}
    res["ratio_first_over_second"] = res["searches"][names[0]]["median_s"] / res["searches"][names[1]]["median_s"]
    res["paired_ratios"] = [x / y for x, y in zip(times[names[0]], times[names[1]])]
    res["load_at_end"] = load_note()
    res["torch"] = torch.__version__
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("searches", "ratio_first_over_second", "paired_ratios")}, indent=1))


if __name__ == "__main__":
    main()
