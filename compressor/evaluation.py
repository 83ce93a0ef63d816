"""Full-ranking evaluation: Recall@K and NDCG@K over all items, the user's training items excluded.

Binary relevance; Recall@K = hits in the top K / number of held-out items; NDCG@K = DCG / ideal DCG with
min(K, |held-out|) ideal hits. Users without held-out items are skipped. Scores are computed in user blocks,
so nothing of size users x items is allocated (a block is ``block`` x items).
"""

from __future__ import annotations

import numpy as np
import torch


def _block_mask(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row within block, item) pairs of the given users' items in a CSR."""
    starts, ends = indptr[users], indptr[users + 1]
    counts = ends - starts
    rows = np.repeat(np.arange(len(users)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = indices[np.repeat(starts, counts) + offsets]
    return rows, cols


@torch.no_grad()
def topk_excluding(user_vecs: torch.Tensor, item_vecs: torch.Tensor, users: np.ndarray, k: int,
                   exclude_indptr: np.ndarray | None, exclude_indices: np.ndarray | None) -> torch.Tensor:
    """Top-k item indices [len(users), k] by inner product, excluded items (e.g. training items) masked out."""
    scores = user_vecs[torch.as_tensor(users, device=user_vecs.device)] @ item_vecs.T
    if exclude_indptr is not None:
        r, c = _block_mask(exclude_indptr, exclude_indices, users)
        scores[torch.as_tensor(r, device=scores.device), torch.as_tensor(c, device=scores.device)] = -torch.inf
    return torch.topk(scores, k, dim=1).indices


@torch.no_grad()
def evaluate(user_vecs: torch.Tensor, item_vecs: torch.Tensor, train_indptr: np.ndarray, train_indices: np.ndarray,
             target_indptr: np.ndarray, target_indices: np.ndarray, ks=(10, 20), block: int = 1024) -> dict:
    """Mean Recall@K and NDCG@K over users with at least one target item. Returns {"recall@10": ..., ...}."""
    ks = sorted(ks)
    kmax = min(max(ks), item_vecs.shape[0])
    n_target = np.diff(target_indptr)
    users = np.flatnonzero(n_target > 0)
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    ideal_cum = np.cumsum(discounts)
    for start in range(0, len(users), block):
        b = users[start:start + block]
        top = topk_excluding(user_vecs, item_vecs, b, kmax, train_indptr, train_indices).cpu().numpy()
        # hits[r, j] = 1 if the j-th ranked item of user b[r] is a target item
        r, c = _block_mask(target_indptr, target_indices, b)
        target_keys = np.sort(r.astype(np.int64) * item_vecs.shape[0] + c)
        keys = np.arange(len(b))[:, None].astype(np.int64) * item_vecs.shape[0] + top
        pos = np.searchsorted(target_keys, keys).clip(max=len(target_keys) - 1)
        hits = (target_keys[pos] == keys).astype(np.float64)
        nt = n_target[b]
        for k in ks:
            h = hits[:, :k]
            sums[f"recall@{k}"] += float((h.sum(1) / nt).sum())
            dcg = (h * discounts[:k]).sum(1)
            idcg = ideal_cum[np.minimum(nt, k) - 1]
            sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
    n = max(len(users), 1)
    return {key: val / n for key, val in sums.items()} | {"users": int(len(users))}
