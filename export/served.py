"""What a bundle being written will serve, asked before its files are final: the serving `Recommender` over an
in-memory `Bundle` (the ONNX user tower already written, of either kind, a candidate item index, the seen items).

The index choice (`export.index_auto`) times candidates through it and the quantization check
(`export.quantize_check`) reads its answers, so both measure the code path the server runs: dense numpy scoring for
exact scans, FAISS search with over-fetch for approximate indexes.
"""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from serving.bundle import Bundle, apply_search_params, is_hnsw_index, reconstruct_items
from serving.bundle_format import ONNX_HISTORY, ONNX_INPUT, ONNX_OUTPUT, UserTower, ort_session
from serving.recommender import Recommender
from serving.schema import DEFAULT_K

LATENCY_USERS = 300  # seeded users timed per candidate, one user per call
LATENCY_ROUNDS = 3  # passes over them; candidates alternate user by user so load drifts hit all alike
LATENCY_K = DEFAULT_K  # the k a /recommend request gets by default


class ServedProbe:
    """Recommenders over candidate indexes of one bundle (its user tower: a file or the model's bytes; ids, seen)."""

    def __init__(self, model: Path | bytes, user_ids: np.ndarray, item_ids: np.ndarray, indptr: np.ndarray,
                 indices: np.ndarray, dim: int, user_tower: UserTower = UserTower()) -> None:
        self._session = ort_session(model if isinstance(model, bytes) else str(model))
        self._user_ids, self._item_ids = user_ids, item_ids
        self._indptr, self._indices, self._dim = indptr, indices, dim
        self._tower = user_tower

    @property
    def num_users(self) -> int:
        return int(self._user_ids.shape[0])

    def recommender(self, index: faiss.Index, query_transform: str, search_params: dict[str, int]) -> Recommender:
        """The serving recommender of this bundle with `index` as its item index."""
        apply_search_params(index, search_params)
        bundle = Bundle(
            path=Path("."),
            manifest={},
            session=self._session,
            input_name=ONNX_HISTORY if self._tower.is_history else ONNX_INPUT,
            output_name=ONNX_OUTPUT,
            index=index,
            item_vectors=reconstruct_items(index, self._item_ids.shape[0], self._dim),
            user_ids=self._user_ids,
            item_ids=self._item_ids,
            user_index={},
            seen_indptr=self._indptr,
            seen_indices=self._indices,
            dim=self._dim,
            query_transform=query_transform,
            search_params=dict(search_params),
            is_hnsw=is_hnsw_index(index),
            user_tower=self._tower,
        )
        # blas_threads=None: a probe inside the exporting process must not change its BLAS thread pool.
        return Recommender(bundle, blas_threads=None)


def latency_users(num_users: int) -> np.ndarray:
    """The seeded users every candidate is timed on."""
    n = min(LATENCY_USERS, num_users)
    return np.sort(np.random.default_rng(1).choice(num_users, n, replace=False)).astype(np.int64)


def single_user_p50_us(recommenders: list[Recommender], users: np.ndarray, k: int = LATENCY_K) -> list[float]:
    """Median microseconds of `recommend([user], k, exclude_seen=True)` for each recommender, timed alternately."""
    k = min(k, recommenders[0].bundle.num_items)
    one = [users[i : i + 1] for i in range(users.size)]
    for rec in recommenders:  # warm caches and lazy allocations
        for user in one[: min(20, len(one))]:
            rec.recommend(user, k, exclude_seen=True)
    times: list[list[int]] = [[] for _ in recommenders]
    for _ in range(LATENCY_ROUNDS):
        for user in one:
            for slot, rec in enumerate(recommenders):
                start = time.perf_counter_ns()
                rec.recommend(user, k, exclude_seen=True)
                times[slot].append(time.perf_counter_ns() - start)
    return [float(np.median(t)) / 1e3 for t in times]
