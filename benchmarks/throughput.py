"""Training throughput, evaluation time and peak memory of `compress train` on real data sets.

Each configuration runs in its own subprocess (so its peak RSS is its own): a few BPR epochs, timing each epoch
(interactions/s = training interactions / epoch seconds, negative sampling included) and one full-ranking
evaluation of the validation split. Reports medians.

    python benchmarks/throughput.py --epochs 3 --threads 2 --out bench-out/throughput.json
    python benchmarks/throughput.py --epochs 2 --threads 1 --optimizers adam lazy_adam --only gowalla-mf-300 \
        --out bench-out/throughput-lazy.json        # train.optimizer: torch Adam against row-sparse lazy Adam
    python benchmarks/throughput.py --epochs 2 --threads 1 --optimizers adam lazy_adam sparse_adamw \
        --only citeulike-t-mf-20 citeulike-t-mf-400 --out bench-out/throughput-sparse-adamw.json

sparse_adamw defers the decay of rows a batch did not touch; the trainer applies it (``catch_up``) before each
evaluation and save. That cost is timed on its own after every epoch (catch-up s), outside the epoch time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compressor.optim import OPTIMIZER_NAMES

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

CASES = [
    ("citeulike-t", "builtin:citeulike-t", 5, "mf", 20),
    ("citeulike-t", "builtin:citeulike-t", 5, "mf", 400),
    ("citeulike-t", "builtin:citeulike-t", 5, "lightgcn", 20),
    ("gowalla", str(SHARED / "gowalla"), 0, "mf", 20),
    ("gowalla", str(SHARED / "gowalla"), 0, "mf", 300),
]


def measure(data_path: str, min_user: int, kind: str, dim: int, epochs: int, threads: int,
            optimizer: str = "adam") -> dict:
    import torch  # the measuring child's imports, not the parent's: each case's peak RSS is its own

    from compressor.config import from_dict
    from compressor.data import load_dataset
    from compressor.device import configure_threads
    from compressor.objectives import Scratch, SetupContext
    from compressor.trainer import Trainer

    configure_threads(threads)
    t0 = time.perf_counter()
    data = load_dataset(data_path, min_user_interactions=min_user)
    load_s = time.perf_counter() - t0
    cfg = from_dict({"data": {"path": data_path, "min_user_interactions": min_user},
                     "model": {"kind": kind, "dim": dim, "init_std": 0.1 if kind == "lightgcn" else 0.01},
                     "train": {"epochs": epochs, "threads": threads, "optimizer": optimizer}})
    tr = Trainer(cfg, data, Scratch(), Path("/tmp/unused"), torch.device("cpu"), progress=False)
    tr.objective.setup(SetupContext(data, tr.sparse_grads))  # lazy_adam on MF: sparse gradients, as in training
    epoch_s, catch_up_s = [], []
    for e in range(1, epochs + 1):
        row = tr._run_epoch(e)
        epoch_s.append(row["time_epoch_s"])
        t = time.perf_counter()
        tr._bring_up_to_date()  # sparse_adamw: the deferred decay of untouched rows; nothing for the others
        catch_up_s.append(time.perf_counter() - t)
    eval_s = []
    for _ in range(2):
        t = time.perf_counter()
        tr._evaluate("valid")
        eval_s.append(time.perf_counter() - t)
    n = len(data.train)
    return {"users": data.num_users, "items": data.num_items, "train_interactions": n, "load_s": load_s,
            "epoch_s_median": statistics.median(epoch_s), "interactions_per_s": n / statistics.median(epoch_s),
            "epoch_s": epoch_s, "catch_up_s_median": statistics.median(catch_up_s),
            "eval_valid_s_median": statistics.median(eval_s),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/throughput.json"))
    ap.add_argument("--optimizers", nargs="+", default=["adam"], choices=OPTIMIZER_NAMES,
                    help="train.optimizer values to measure, each case with each (interleaved per case)")
    ap.add_argument("--only", nargs="+", default=None, metavar="DATA-KIND-DIM",
                    help="measure only these cases, e.g. gowalla-mf-300 citeulike-t-mf-400")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # internal: run one case in this process
    a = ap.parse_args()
    if a.one:
        name, path, mu, kind, dim, optimizer = a.one
        print(json.dumps(measure(path, int(mu), kind, int(dim), a.epochs, a.threads, optimizer)))
        return
    rows = []
    for name, path, mu, kind, dim in CASES:
        if a.only and f"{name}-{kind}-{dim}" not in a.only:
            continue
        if not path.startswith("builtin:") and not Path(path).exists():
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        for optimizer in a.optimizers:
            p = subprocess.run([sys.executable, __file__, "--epochs", str(a.epochs), "--threads", str(a.threads),
                                "--one", name, path, str(mu), kind, str(dim), optimizer], capture_output=True,
                               text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if p.returncode != 0:
                print(p.stderr[-2000:], file=sys.stderr)
                continue
            r = {"data": name, "model": f"{kind}-{dim}", "optimizer": optimizer,
                 **json.loads(p.stdout.strip().splitlines()[-1])}
            rows.append(r)
            print(json.dumps(r), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))
    print("\n| data | model | optimizer | train interactions | epoch s (median) | catch-up s | interactions/s | "
          "full-ranking eval s (valid) | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['model']} | {r['optimizer']} | {r['train_interactions']:,} | "
              f"{r['epoch_s_median']:.2f} | {r['catch_up_s_median']:.3f} | "
              f"{r['interactions_per_s']:,.0f} | {r['eval_valid_s_median']:.2f} | {r['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
