"""Full-ranking evaluation: Recall@K, NDCG@K, MRR@K and MAP@K over all items, the user's training items excluded.

Binary relevance; a user's targets are their held-out items, hits are targets among the top K.
- Recall@K = hits / |targets|.
- NDCG@K = DCG / ideal DCG, the ideal having min(K, |targets|) hits.
- MRR@K = 1 / rank of the first hit (0 without a hit in the top K).
- MAP@K = (sum over hit ranks r <= K of precision@r) / min(K, |targets|): the normaliser is the most hits the top
  K can hold, so a perfect top K scores 1 whether the user has 3 targets or 300 (dividing by |targets| would cap a
  user with more targets than K at K / |targets|, dividing by the hits found would ignore the misses).
Users without targets are skipped; every mean is over the users evaluated. Scores are computed in user blocks, so
nothing of size users x items is allocated (a block is ``block`` x items).

``per_user_metrics`` is the one home of the ranking math: ``evaluate`` is its means, ``evaluate_split`` adds the
cold-item diagnostic (see docs/evaluation.md) and ``report`` the bootstrap confidence intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import bootstrap
from .errors import MismatchError
from .retrieval import scores_buffer, topk_rows

METRICS = ("recall", "ndcg", "mrr", "map")
CLASSIC_METRICS = ("recall", "ndcg")  # what ``evaluate`` returns unless asked: training, result.json, checkpoints


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
                   exclude_indptr: np.ndarray | None, exclude_indices: np.ndarray | None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k item indices [len(users), k] by inner product, excluded items (e.g. training items) masked out.
    ``out``: a ``scores_buffer`` of at least len(users) rows to compute the scores in. The selection is
    ``retrieval.topk_rows`` (torch.topk's values; among exactly tied scores the order may differ from it)."""
    if out is not None and (out.shape[0] < len(users) or out.shape[1] != item_vecs.shape[0]
                            or out.dtype != user_vecs.dtype or out.device != user_vecs.device):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} cannot hold the scores of "
                         f"{len(users)} users x {item_vecs.shape[0]} items ({user_vecs.dtype} on {user_vecs.device})")
    rows = user_vecs[torch.as_tensor(users, device=user_vecs.device)]
    scores = rows @ item_vecs.T if out is None else torch.mm(rows, item_vecs.T, out=out[: len(users)])
    if exclude_indptr is not None:
        r, c = _block_mask(exclude_indptr, exclude_indices, users)
        scores[torch.as_tensor(r, device=scores.device), torch.as_tensor(c, device=scores.device)] = -torch.inf
    return topk_rows(scores, k)[1]


@dataclass(frozen=True)
class UserMetrics:
    """Metrics per evaluated user: ``users`` int64 [n] (user rows with at least one target, ascending) and
    ``values`` {"ndcg@20": float64 [n], ...}, each aligned with ``users``."""

    users: np.ndarray
    values: dict[str, np.ndarray]

    def means(self) -> dict:
        """{"recall@10": mean, ..., "users": n}; 0.0 for every metric when no user has a target."""
        n = len(self.users)
        return {key: float(v.mean()) if n else 0.0 for key, v in self.values.items()} | {"users": int(n)}


@torch.no_grad()
def per_user_metrics(user_vecs: torch.Tensor, item_vecs: torch.Tensor, train_indptr: np.ndarray,
                     train_indices: np.ndarray, target_indptr: np.ndarray, target_indices: np.ndarray, ks=(10, 20),
                     block: int = 1024, metrics=METRICS) -> UserMetrics:
    """Each metric in ``metrics`` (names from METRICS) at each K, per user with at least one target item."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {', '.join(METRICS)}")
    ks = sorted(ks)
    n_items = item_vecs.shape[0]
    kmax = min(max(ks), n_items)
    n_target = np.diff(target_indptr)
    users = np.flatnonzero(n_target > 0)
    values = {f"{m}@{k}": np.zeros(len(users)) for k in ks for m in metrics}
    discounts = 1.0 / np.log2(np.arange(2, kmax + 2))
    ideal_cum = np.cumsum(discounts)
    inv_rank = 1.0 / np.arange(1, kmax + 1)
    buffer = scores_buffer(user_vecs, item_vecs, min(block, len(users)))
    for start in range(0, len(users), block):
        b = users[start:start + block]
        top = topk_excluding(user_vecs, item_vecs, b, kmax, train_indptr, train_indices, buffer).cpu().numpy()
        # hits[r, j] = 1 if the j-th ranked item of user b[r] is a target item
        r, c = _block_mask(target_indptr, target_indices, b)
        target_keys = np.sort(r.astype(np.int64) * n_items + c)
        keys = np.arange(len(b))[:, None].astype(np.int64) * n_items + top
        pos = np.searchsorted(target_keys, keys).clip(max=len(target_keys) - 1)
        hits = (target_keys[pos] == keys).astype(np.float64)
        precision_at = np.cumsum(hits, axis=1) * inv_rank  # precision@r for r = 1..kmax
        nt = n_target[b]
        rows = slice(start, start + len(b))
        for k in ks:
            h = hits[:, :k]
            best = np.minimum(nt, k)  # the most hits a top K can hold
            if "recall" in metrics:
                values[f"recall@{k}"][rows] = h.sum(1) / nt
            if "ndcg" in metrics:
                values[f"ndcg@{k}"][rows] = (h * discounts[:k]).sum(1) / ideal_cum[np.minimum(best, kmax) - 1]
            if "mrr" in metrics:
                values[f"mrr@{k}"][rows] = (h * inv_rank[:k]).max(1)  # 1/rank falls with rank: the first hit's
            if "map" in metrics:
                values[f"map@{k}"][rows] = (h * precision_at[:, :k]).sum(1) / best
    return UserMetrics(users, values)


@torch.no_grad()
def evaluate(user_vecs: torch.Tensor, item_vecs: torch.Tensor, train_indptr: np.ndarray, train_indices: np.ndarray,
             target_indptr: np.ndarray, target_indices: np.ndarray, ks=(10, 20), block: int = 1024,
             metrics=CLASSIC_METRICS) -> dict:
    """Mean metrics over users with at least one target item: {"recall@10": ..., "ndcg@10": ..., "users": n}
    (``metrics=METRICS`` adds "mrr@K" and "map@K")."""
    return per_user_metrics(user_vecs, item_vecs, train_indptr, train_indices, target_indptr, target_indices, ks,
                            block, metrics).means()


# --------------------------------------------------------------------------------------- cold items, reports
def cold_items(train_indices: np.ndarray, num_items: int) -> np.ndarray:
    """bool [num_items]: items without a single training interaction (no model can have learnt them)."""
    return np.bincount(train_indices, minlength=num_items) == 0


def restrict_targets(indptr: np.ndarray, indices: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR with only the items where ``keep`` (bool [num_items]) holds; users may be left with none."""
    kept = keep[indices]
    before = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])  # kept entries before each position
    return before[indptr], indices[kept]


@dataclass(frozen=True)
class SplitEvaluation:
    """One model on one split: per-user metrics on every target and on warm targets only (items with at least one
    training interaction; users left without targets are skipped), and how many target interactions are cold."""

    all: UserMetrics
    warm: UserMetrics
    interactions: int
    cold_interactions: int

    @property
    def cold_share(self) -> float:
        return self.cold_interactions / self.interactions if self.interactions else 0.0


@torch.no_grad()
def evaluate_split(user_vecs: torch.Tensor, item_vecs: torch.Tensor, train_indptr: np.ndarray,
                   train_indices: np.ndarray, target_indptr: np.ndarray, target_indices: np.ndarray, ks=(10, 20),
                   block: int = 1024, metrics=METRICS, trained_items: np.ndarray | None = None) -> SplitEvaluation:
    """``per_user_metrics`` on all targets and on warm targets, with the cold-interaction count. An item is warm
    when it occurs in ``trained_items`` (default ``train_indices``: the excluded items are the training items;
    for users held out of training they are a history instead, and ``trained_items`` the training data's)."""
    cold = cold_items(train_indices if trained_items is None else trained_items, item_vecs.shape[0])
    warm_indptr, warm_indices = restrict_targets(target_indptr, target_indices, ~cold)
    args = (user_vecs, item_vecs, train_indptr, train_indices)
    return SplitEvaluation(per_user_metrics(*args, target_indptr, target_indices, ks, block, metrics),
                           per_user_metrics(*args, warm_indptr, warm_indices, ks, block, metrics),
                           int(len(target_indices)), int(cold[target_indices].sum()))


def _same_users(a: UserMetrics, b: UserMetrics, what: str) -> None:
    if not np.array_equal(a.users, b.users):
        raise MismatchError(f"{what} was evaluated on other users ({len(b.users):,} vs {len(a.users):,}); "
                            "paired comparisons need both models on the same data")


def report(main: SplitEvaluation, other: SplitEvaluation | None = None, scratch: SplitEvaluation | None = None,
           teacher: SplitEvaluation | None = None, n_resamples: int = bootstrap.DEFAULT_RESAMPLES, seed: int = 0,
           level: float = bootstrap.LEVEL) -> dict:
    """A JSON-ready report of ``main`` with paired bootstrap intervals (``bootstrap.summary``; each number is
    {"value", "lo", "hi"}): "metrics", "cold_items" (share of target interactions on cold items), "warm" (metrics on
    warm targets), with ``other`` "compare" (its "metrics" and the "difference" main - other), with ``scratch`` and
    ``teacher`` "gap" (their metrics and the "share" of the scratch -> teacher gap main recovers).
    ``n_resamples=0``: point estimates only."""
    for name, ev in (("the other model", other), ("the scratch model", scratch), ("the teacher", teacher)):
        if ev is not None:
            _same_users(main.all, ev.all, name)
    gap = (scratch.all.values, teacher.all.values) if scratch is not None and teacher is not None else None
    res = bootstrap.summary(main.all.values, other.all.values if other else None, gap, n_resamples, seed, level)
    warm = bootstrap.summary(main.warm.values, None, None, n_resamples, seed, level)
    out = {"users": len(main.all.users), "metrics": res["metrics"],
           "bootstrap": {"resamples": n_resamples, "seed": seed, "level": level},
           "cold_items": {"interactions": main.interactions, "cold_interactions": main.cold_interactions,
                          "share": main.cold_share},
           "warm": {"users": len(main.warm.users), "metrics": warm["metrics"]}}
    if other is not None:
        out["compare"] = {"metrics": res["other"], "difference": res["difference"]}
    if gap is not None:
        out["gap"] = {"scratch": res["scratch"], "teacher": res["teacher"], "share": res["gap_share"]}
    return out
