"""One rank of the sharding checks in test_distributed.py (run under torchrun, or alone as the one-process reference).

    python tests/dist_worker.py OUT TEACHER_CKPT STUDENT_CKPT DATA K M

Writes OUT/qt-RANK.npy (the rank's teacher top-K, from its own block), OUT/pm-RANK.npy (the student's top-M of
the rank's users), OUT/grad-RANK.json (its gradients of one global batch against one process's), and after a
short real training run on the block OUT/items-RANK.npy (the rank's replicated
item table) and, on rank 0, OUT/train.json (the run's per-epoch gradient statistics).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import api, distributed  # noqa: E402
from compressor.checkpoint import load_checkpoint  # noqa: E402
from compressor.distill import load_teacher  # noqa: E402
from compressor.kd_retrieval import KDRetrieval  # noqa: E402
from compressor.objectives import Scratch, bpr_base_loss  # noqa: E402
from compressor.trainer import Trainer  # noqa: E402


class Vectors:
    """A model as KDRetrieval sees it: its users' vectors and every item's."""

    def __init__(self, u, i):
        self.u, self.i = u, i

    def vectors(self):
        return self.u, self.i


def gradient_check(dist, data, ckpt) -> dict:
    """Largest |difference| between one process's gradients of a global batch and this rank's (its users' rows;
    the item table's summed over ranks), for every way the sum can go: dense all_reduce, gathered rows, row-sparse
    gradients, and a batch in which this rank has nothing (every interaction belongs to rank 0's users)."""
    lo, hi = dist.lo, dist.hi
    users_all, items_all = data.train.users, data.train.items
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(users_all))[:300]
    in_first = np.flatnonzero(users_all < dist.blocks[0][1])[:200]
    neg_all = rng.integers(0, data.num_items, len(users_all))
    report = {}
    for case, batch, row_sums, sparse in (("dense", pick, False, False), ("rows", pick, True, False),
                                          ("sparse", pick, True, True), ("empty_rank", in_first, True, True),
                                          ("empty_rank_dense", in_first, False, False)):
        u, p, n = (torch.as_tensor(a[batch]) for a in (users_all, items_all, neg_all))
        whole = load_checkpoint(ckpt).build_model().train()
        loss, _, _ = bpr_base_loss(whole, u, p, n, sparse_grads=sparse)
        loss.backward()
        ref_u, ref_i = (t.grad.to_dense() for t in (whole.user_emb.weight, whole.item_emb.weight))
        local = load_checkpoint(ckpt).build_model().train()
        local.user_emb.weight = torch.nn.Parameter(local.user_emb.weight.detach()[lo:hi].clone())
        mine = (u >= lo) & (u < hi)
        loss, _, _ = bpr_base_loss(local, u[mine] - lo, p[mine], n[mine], sparse_grads=sparse)
        loss.backward()
        dist.row_sums = row_sums
        dist.sum_replicated_grads([local.item_emb.weight], sparse=sparse)
        got_u = local.user_emb.weight.grad
        got_u = torch.zeros_like(local.user_emb.weight) if got_u is None else got_u.to_dense()
        report[case] = {"item": float((local.item_emb.weight.grad.to_dense() - ref_i).abs().max()),
                        "user": float((got_u - ref_u[lo:hi]).abs().max()),
                        "scale": float(ref_i.abs().max()), "local_rows": int(mine.sum())}
    dist.row_sums = True
    return report


def main(out, teacher_ckpt, student_ckpt, data_path, k, m):
    out = Path(out)
    dist = distributed.setup("cpu")
    torch.set_num_threads(1)
    cfg = api.make_config(None, [f"data.path={data_path}", "data.format=users_dat", "model.dim=8",
                                 "train.epochs=2", "train.batch_size=256", "train.threads=1"])
    data = api.load_data(cfg)
    lo, hi = dist.assign(data.train.indptr)
    teacher = load_teacher(teacher_ckpt, data)
    if dist.active:
        teacher = teacher.user_block(lo, hi)
    retrieval = KDRetrieval(teacher, torch.device("cpu"), out / "cache", "Flat", {})
    np.save(out / f"qt-{dist.rank}.npy", retrieval.teacher_topk(k).numpy())
    with torch.no_grad():
        u, i = load_checkpoint(student_ckpt).build_model().vectors()
    topm, _ = retrieval.student_topm(Vectors(u[lo:hi], i), m)
    np.save(out / f"pm-{dist.rank}.npy", topm.numpy())

    (out / f"grad-{dist.rank}.json").write_text(json.dumps(gradient_check(dist, data, student_ckpt)))

    trainer = Trainer(cfg, data, Scratch(), out / "run", dist.device, progress=False, dist=dist)
    trainer.fit()
    np.save(out / f"items-{dist.rank}.npy", trainer.model.item_emb.weight.detach().numpy())
    if dist.is_main:
        (out / "train.json").write_text(json.dumps({"blocks": dist.blocks, "history": trainer.history}))
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
