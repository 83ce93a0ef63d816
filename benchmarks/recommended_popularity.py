"""How popular the items are that models recommend, and that a data set's validation and test splits hold.

A diagnostic for models that agree on validation but not on test (docs/benchmarks.md 10f): for each split, the
mean training count of its held-out items; for each model, the training counts of the top-k items it recommends
(training items excluded, as in evaluation) to a fixed random sample of users.

    python benchmarks/recommended_popularity.py --data ../shared/data/gowalla \
        --models bench-out/gow-teacher-e86 bench-out/gow-teacher-lazy-e86 --out bench-out/popularity.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data directory (as data.path)")
    ap.add_argument("--models", nargs="+", required=True, help="run directories or checkpoints")
    ap.add_argument("--users", type=int, default=5000, help="users sampled (seed 0) for the recommendations")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--top-items", type=int, default=1000, help="the 'most popular items' set's size")
    ap.add_argument("--out", type=Path, help="JSON file for the numbers (created)")
    a = ap.parse_args()

    import torch

    from compressor.data import load_dataset
    from compressor.evaluation import topk_excluding
    from compressor.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    data = load_dataset(a.data)
    train = data.train
    counts = np.bincount(train.items, minlength=data.num_items)
    popular = np.argsort(-counts, kind="stable")[: a.top_items]
    res: dict = {"command": " ".join(sys.argv), "splits": {}, "models": {}}
    for name, split in (("valid", data.valid), ("test", data.test)):
        held = counts[split.items]
        res["splits"][name] = {"interactions": int(len(split.items)), "per_user": len(split.items) / data.num_users,
                               "mean_train_count": float(held.mean()), "median_train_count": float(np.median(held)),
                               "share_in_most_popular": float(np.isin(split.items, popular).mean())}
        print(f"{name}: {len(split.items):,} interactions, mean training count of its items "
              f"{held.mean():.1f} (median {np.median(held):.0f}), in the {a.top_items} most popular "
              f"{np.isin(split.items, popular).mean():.3f}")
    users = np.sort(np.random.default_rng(0).choice(data.num_users, min(a.users, data.num_users), replace=False))
    for model in a.models:
        with torch.no_grad():
            u, i = load_checkpoint(model).build_model().vectors()  # (a run directory: its best model)
        top = topk_excluding(u.float(), i.float(), users, a.k, train.indptr, train.items).numpy()
        got = counts[top]
        res["models"][model] = {"mean_train_count": float(got.mean()), "median_train_count": float(np.median(got)),
                                "share_in_most_popular": float(np.isin(top, popular).mean())}
        print(f"{model}: top-{a.k} items' mean training count {got.mean():.1f} (median {np.median(got):.0f}), "
              f"in the {a.top_items} most popular {np.isin(top, popular).mean():.3f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
