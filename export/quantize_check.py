"""The export's own check of a quantized bundle: does it still answer what the fp32 bundle answers?

- top-k agreement: mean over the reference users of |served top-k ∩ fp32 top-k| / k (`recall_at_k`), the served
  answers read through the serving `Recommender` of the quantized bundle; it must reach AGREEMENT_FLOOR. The fp32
  answers are those of the fp32 bundle: for an exact scan the caller's reference top-k or, without one, the exact
  top-k of the true vectors for a seeded sample of users with at least k unseen items; for an explicit
  approximate factory (whose codes the factory string fixes) the same index's served answers to the fp32 user
  vectors, so that the index's own recall is not charged to the quantization;
- with test data (a CSR of held-out items per user): test NDCG@NDCG_K of the served answers may fall at most
  NDCG_MAX_REL_DROP (relative) below that of the fp32 answers, seen items excluded in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressor.retrieval import recall_at_k
from serving.dense_topk import DenseTopK
from serving.recommender import Recommender

AGREEMENT_FLOOR = 0.99
AGREEMENT_USERS = 2000
AGREEMENT_SEED = 0
NDCG_K = 20
NDCG_MAX_REL_DROP = 0.005
NDCG_MAX_USERS = 20_000  # a seeded sample beyond this; both answers are scored on the same users
NDCG_BLOCK = 4096  # users per recommend call


@dataclass
class QuantCheck:
    """The measured numbers of one quantized bundle and whether they pass."""

    agreement: float
    k: int
    users: int
    reference: str
    ndcg: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "topk_agreement": self.agreement,
            "agreement_floor": AGREEMENT_FLOOR,
            "agreement_definition": "mean over users of |served top-k ∩ fp32 top-k| / k, seen items excluded",
            "k": self.k,
            "users": self.users,
            "reference": self.reference,
            "ndcg": self.ndcg,
            "failures": list(self.failures),
        }


def _stack(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Per-user item lists -> [users, k], -1 where a user had fewer than k items to recommend."""
    out = np.full((len(results), k), -1, dtype=np.int64)
    for row, (items, _) in enumerate(results):
        out[row, : items.size] = items
    return out


def _blocks(users: np.ndarray) -> list[np.ndarray]:
    return np.array_split(users, max(1, -(-users.size // NDCG_BLOCK)))


def served_topk(served: Recommender, users: np.ndarray, k: int) -> np.ndarray:
    """What `served` answers (seen items excluded), [users, k]."""
    if users.size == 0:
        return np.empty((0, k), dtype=np.int64)
    return np.concatenate([_stack(served.recommend(block, k, exclude_seen=True), k) for block in _blocks(users)])


def fp32_topk(users_f32: np.ndarray, items_f32: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
              users: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k of the true vectors (seen items excluded): an fp32 exact bundle's answers, [users, k]."""
    if users.size == 0:
        return np.empty((0, k), dtype=np.int64)
    dense = DenseTopK(items_f32, indptr, indices)
    return np.concatenate([_stack(dense.topk(users_f32[block], block, k, True), k) for block in _blocks(users)])


def ndcg_at_k(top: np.ndarray, users: np.ndarray, test_indptr: np.ndarray, test_indices: np.ndarray) -> float:
    """Mean NDCG@k (binary relevance, k = top's width, -1 = no item) of `top` for `users` with >= 1 test item."""
    k = top.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)
    total = 0.0
    for row, user in enumerate(users.tolist()):
        relevant = test_indices[test_indptr[user] : test_indptr[user + 1]]
        hits = np.isin(top[row], relevant) & (top[row] >= 0)
        total += float(discounts[hits].sum()) / float(ideal[min(np.unique(relevant).size, k) - 1])
    return total / max(users.size, 1)


def _agreement_sample(indptr: np.ndarray, num_items: int, k: int) -> np.ndarray:
    # np.diff counts duplicate training rows twice, so this never admits a user with < k unseen items.
    eligible = np.flatnonzero(num_items - np.diff(indptr) >= k)
    rng = np.random.default_rng(AGREEMENT_SEED)
    return np.sort(rng.choice(eligible, min(AGREEMENT_USERS, eligible.size), replace=False)).astype(np.int64)


def check_quantized(
    served: Recommender,
    users_f32: np.ndarray,
    items_f32: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    k: int,
    reference: tuple[np.ndarray, np.ndarray] | None,
    test: tuple[np.ndarray, np.ndarray] | None,
    fp32_served: Recommender | None = None,
) -> tuple[QuantCheck, np.ndarray, np.ndarray]:
    """Measure `served` (the quantized bundle) against fp32 (`fp32_served`: the fp32 bundle of an approximate
    index, else exact search); returns the check, its users and their served top-k."""

    def fp32_answers(users: np.ndarray, k: int) -> np.ndarray:
        if fp32_served is not None:
            return served_topk(fp32_served, users, k)
        return fp32_topk(users_f32, items_f32, indptr, indices, users, k)

    if fp32_served is not None:
        users = _agreement_sample(indptr, items_f32.shape[0], k)
        truth = fp32_answers(users, k)
        source = "the same index's served answers to the fp32 user vectors"
    elif reference is not None and reference[0].size:
        users, truth = reference
        source = "caller's reference top-k"
    else:
        users = _agreement_sample(indptr, items_f32.shape[0], k)
        truth = fp32_answers(users, k)
        source = "exact top-k of the fp32 vectors"
    kk = truth.shape[1]
    got = served_topk(served, users, kk)
    agreement = float(recall_at_k(got, truth))
    check = QuantCheck(round(agreement, 6), int(kk), int(users.size), source)
    if users.size == 0:
        # No user has k unseen items to compare: an empty comparison would pass anything.
        check.failures.append(f"top-k agreement not measurable: no user has {kk} unseen items")
    elif agreement < AGREEMENT_FLOOR:
        check.failures.append(f"top-k agreement {agreement:.4f} < {AGREEMENT_FLOOR} (k={kk}, {users.size} users)")
    if test is not None:
        test_indptr, test_indices = test
        test_users = np.flatnonzero(np.diff(test_indptr) > 0).astype(np.int64)
        if test_users.size > NDCG_MAX_USERS:
            rng = np.random.default_rng(AGREEMENT_SEED)
            test_users = np.sort(rng.choice(test_users, NDCG_MAX_USERS, replace=False))
        k_ndcg = min(NDCG_K, items_f32.shape[0])
        base = ndcg_at_k(fp32_answers(test_users, k_ndcg), test_users, test_indptr, test_indices)
        mine = ndcg_at_k(served_topk(served, test_users, k_ndcg), test_users, test_indptr, test_indices)
        drop = (base - mine) / base if base > 0 else 0.0
        check.ndcg = {"k": k_ndcg, "users": int(test_users.size), "fp32": round(base, 6), "quantized": round(mine, 6),
                      "relative_drop": round(drop, 6), "max_relative_drop": NDCG_MAX_REL_DROP}
        if drop > NDCG_MAX_REL_DROP:
            check.failures.append(f"test NDCG@{k_ndcg} {mine:.4f} vs fp32 {base:.4f} "
                                  f"({-100 * drop:+.2f}% < -{100 * NDCG_MAX_REL_DROP:.1f}%)")
    return check, users, got
