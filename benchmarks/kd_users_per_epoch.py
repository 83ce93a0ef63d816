"""How often the spec computes each user's KD terms per epoch: the number of BPR batches (2,048 interactions,
one shuffled epoch) that hold the user. distill.kd_users once_per_epoch makes it 1. docs/benchmarks.md 2c.

    python benchmarks/kd_users_per_epoch.py
"""
import numpy as np

from compressor.data import load_dataset

for path, mu in (("builtin:citeulike-t", 5), ("../shared/data/gowalla", 0)):
    d = load_dataset(path, min_user_interactions=mu)
    users = d.train.users[np.random.default_rng(0).permutation(len(d.train.users))]
    per_batch = [np.unique(users[s:s + 2048]) for s in range(0, len(users), 2048)]
    counts = np.bincount(np.concatenate(per_batch), minlength=d.num_users)
    print(path, "batches", len(per_batch), "distinct users/batch", round(np.mean([len(b) for b in per_batch])),
          "KD computations per user per epoch: mean", round(counts[counts > 0].mean(), 1))
