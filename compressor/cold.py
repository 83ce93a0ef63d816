"""The cold-user protocol and its baselines: users held out of training entirely (``data.cold_users``), each
served from a history.

Every held-out user's training part (split order) is fed as its history; its test (or validation) part is
ranked over all items with the history excluded, with the metrics of ``evaluation.evaluate``. Every scorer is
expressed as (user vectors [C, d], item vectors [I, d]) so that one evaluation serves them all:
  * a history model: ``encode`` of the padded history (what the exported ONNX graph computes);
  * ``popular``: training interaction counts (d = 1); an ID model has no vector for an unseen user, and
    serving answers it with this list, so it is the ID students' cold-user score;
  * ``item_knn``: sum over the history of the cosine similarity of item columns of the training matrix X
    (users x items, binary): scores = H Dn X^T X Dn with Dn = diag(1 / sqrt(item counts)), i.e. user
    vectors H Dn X^T [C, U] and item vectors Dn X^T [I, U];
  * ``ease``: EASE (Steck, 2019), B = I - P / diag(P) with P = (X^T X + lambda I)^-1 and a zero diagonal,
    scores = H B; an items x items inverse, so only for catalogues up to ``EASE_MAX_ITEMS``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .data import ColdUsers, Dataset, Split
from .evaluation import evaluate
from .models import padded_histories

BASELINES = ("popular", "item_knn", "ease")
EVAL_USERS = ("warm", "cold")  # whom `compress evaluate --users` ranks: users seen in training, or held out
EASE_MAX_ITEMS = 10_000  # the dense items x items inverse: 10k^2 float64 is 800 MB
EASE_LAMBDAS = (100.0, 300.0, 1000.0, 3000.0)  # chosen on the cold users' validation part
ENCODE_BLOCK = 4096  # cold users per call of a history model's encode
KNN_MAX_CELLS = 500_000_000  # item-kNN's dense item factor [I, U]: 2 GB of float32


def _matrix(split: Split, num_items: int) -> sp.csr_matrix:
    ones = np.ones(len(split), dtype=np.float32)
    return sp.csr_matrix((ones, (split.users, split.items)), shape=(split.num_users, num_items))


def cold_targets(cold: ColdUsers, split: str) -> Split:
    if split not in ("valid", "test"):
        raise ValueError(f"split {split!r}; expected valid or test")
    return cold.valid if split == "valid" else cold.test


def evaluate_cold(user_vecs: torch.Tensor, item_vecs: torch.Tensor, cold: ColdUsers, split: str = "test",
                  ks=(10, 20), block: int = 1024) -> dict:
    """Full-ranking metrics of the cold users from their vectors [C, d], their histories excluded."""
    target = cold_targets(cold, split)
    return evaluate(user_vecs, item_vecs, cold.history.indptr, cold.history.items, target.indptr, target.items,
                    ks=ks, block=block)


@torch.no_grad()
def history_model_vectors(model, cold: ColdUsers) -> tuple[torch.Tensor, torch.Tensor]:
    """(cold user vectors [C, d], item vectors [I, d]) of a model with ``encode`` (the history tower)."""
    device = next(model.parameters()).device
    hist, lengths = padded_histories(cold.history.indptr, cold.history.items, model.max_len)
    parts = [model.encode(torch.as_tensor(hist[s:s + ENCODE_BLOCK], device=device),
                          torch.as_tensor(lengths[s:s + ENCODE_BLOCK], device=device))
             for s in range(0, len(hist), ENCODE_BLOCK)]
    return torch.cat(parts), model.item_emb.weight.detach()


def popular_vectors(data: Dataset, num_cold: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = np.bincount(data.train.items, minlength=data.num_items).astype(np.float32)
    return torch.ones((num_cold, 1)), torch.from_numpy(counts[:, None])


def item_knn_vectors(data: Dataset, cold: ColdUsers) -> tuple[torch.Tensor, torch.Tensor]:
    cells = data.num_items * data.num_users
    if cells > KNN_MAX_CELLS:
        raise ValueError(f"item_knn: {data.num_items:,} items x {data.num_users:,} users is beyond the dense "
                         f"[items, users] factor this baseline builds ({KNN_MAX_CELLS:,} cells)")
    x = _matrix(data.train, data.num_items)
    counts = np.asarray(x.sum(axis=0)).ravel()
    dn = sp.diags(np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0).astype(np.float32))
    item_side = (dn @ x.T).tocsr()  # [I, U]
    user_side = _matrix(cold.history, data.num_items) @ item_side  # [C, U]
    return (torch.from_numpy(np.asarray(user_side.todense(), dtype=np.float32)),
            torch.from_numpy(np.asarray(item_side.todense(), dtype=np.float32)))


def ease_weights(data: Dataset, lam: float) -> np.ndarray:
    """EASE's item-item matrix B [I, I] (zero diagonal) of the training interactions."""
    x = _matrix(data.train, data.num_items)
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32)


def ease_vectors(data: Dataset, cold: ColdUsers, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = np.asarray(_matrix(cold.history, data.num_items).todense(), dtype=np.float32)
    return torch.from_numpy(h), torch.from_numpy(np.ascontiguousarray(ease_weights(data, lam).T))


def cold_user_vectors(model, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """How a trained model scores the held-out users: a history model encodes their histories; an ID model has
    no vector for a user it never saw, and serving answers such a user with the popular list (the bundle
    leaves held-out users out), so that is its score."""
    if hasattr(model, "encode"):
        return history_model_vectors(model, data.cold)
    return popular_vectors(data, len(data.cold.users))


def ease_lambda(data: Dataset, ks=(10, 20)) -> float:
    """EASE's lambda from ``EASE_LAMBDAS`` with the best NDCG@max(ks) on the cold users' validation part."""
    return max(EASE_LAMBDAS, key=lambda lam: evaluate_cold(*ease_vectors(data, data.cold, lam), data.cold, "valid",
                                                           ks)[f"ndcg@{max(ks)}"])


def baseline_vectors(name: str, data: Dataset, ks=(10, 20)) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """(cold user vectors, item vectors, settings) of a baseline; None for EASE beyond ``EASE_MAX_ITEMS``."""
    cold = data.cold
    if cold is None:
        raise ValueError("the data has no cold users (data.cold_users is 0)")
    if name == "popular":
        return (*popular_vectors(data, len(cold.users)), {})
    if name == "item_knn":
        return (*item_knn_vectors(data, cold), {})
    if name == "ease":
        if data.num_items > EASE_MAX_ITEMS:
            return None
        lam = ease_lambda(data, ks)
        return (*ease_vectors(data, cold, lam), {"lambda": lam})
    raise ValueError(f"baseline {name!r}; expected one of {', '.join(BASELINES)}")


def evaluate_baselines(data: Dataset, split: str = "test", ks=(10, 20), names=BASELINES) -> dict[str, dict]:
    """{baseline: metrics (and settings: EASE's ``lambda``, chosen on validation)} of the cold users; EASE is
    skipped beyond ``EASE_MAX_ITEMS`` items."""
    out: dict[str, dict] = {}
    for name in names:
        made = baseline_vectors(name, data, ks)
        if made is not None:
            u, i, settings = made
            out[name] = evaluate_cold(u, i, data.cold, split, ks) | settings
    return out
