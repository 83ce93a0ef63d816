"""Does leaving validation items among the test candidates change test NDCG? (docs/benchmarks.md section 2a)

For each run directory: test Recall/NDCG with the protocol's exclusion (training items only) and with the
user's validation items excluded too. Usage:

    python benchmarks/exclude_valid_check.py RUN_DIR [RUN_DIR ...]
"""
import sys

import numpy as np
import torch

from compressor import api
from compressor.checkpoint import load_checkpoint
from compressor.config import from_dict
from compressor.evaluation import evaluate as run_eval

torch.set_num_threads(1)
runs = sys.argv[1:]
data = None
def merged(a, b):
    n = len(a.indptr) - 1
    lens = np.diff(a.indptr) + np.diff(b.indptr)
    indptr = np.zeros(n + 1, dtype=np.int64); indptr[1:] = np.cumsum(lens)
    items = np.empty(indptr[-1], dtype=a.items.dtype)
    for u in range(n):
        x = np.concatenate([a.items[a.indptr[u]:a.indptr[u+1]], b.items[b.indptr[u]:b.indptr[u+1]]])
        items[indptr[u]:indptr[u+1]] = x
    return indptr, items
for r in runs:
    ck = load_checkpoint(r)
    if data is None:
        cfg = from_dict(ck.meta["config"], r); data = api.load_data(cfg)
        tv_indptr, tv_items = merged(data.train, data.valid)
    with torch.no_grad():
        u, i = ck.build_model().vectors()
    std = run_eval(u, i, data.train.indptr, data.train.items, data.test.indptr, data.test.items, ks=(10, 20))
    alt = run_eval(u, i, tv_indptr, tv_items, data.test.indptr, data.test.items, ks=(10, 20))
    print(r.split("/")[-1], "test N@20 protocol %.4f  | valid items also excluded %.4f  N@10 %.4f -> %.4f" % (std["ndcg@20"], alt["ndcg@20"], std["ndcg@10"], alt["ndcg@10"]))
