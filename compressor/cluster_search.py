"""Every user's top-k items through user clusters: the approximate refresh that costs least at many users.

An IVF index (``retrieval.TopKSearcher``) serves one query at a time: it ranks all of its coarse centroids for the
query, then scans the items of the lists it probes through a heap; at a million users that search was half of an
RCE-KD epoch (docs/benchmarks.md 4f). A refresh asks for every user at once, so the work can be shared instead:
spherical k-means groups users whose vectors point alike; each cluster's *candidates* are the items that score
highest against its centroid (one exact search per cluster, not per user); a user's top-k is then exact over its
cluster's candidates, one dense product and one ``topk`` per block of a cluster's users. What it misses is an item
of a user's true top-k that the centroid does not rank among the candidates; like an IVF index's, its recall is
measured against exact search on a sample of users every refresh (``kd_retrieval``), and more candidates buy
recall with time (as many as there are items: the exact search itself). A refresh may also hand each user its
previous list (``search(previous=...)``), which is ranked with the cluster's candidates: a student's top-100
keeps about 90% of its items from one epoch to the next, so what the centroid misses is mostly there already,
and a KD-trained Gowalla student holds the recall floor at a half to a quarter of the candidates (2,000 along a
run, 1,000 once it has converged, against 4,000; docs/benchmarks.md 4n, 4o).

``distill.index: UserClusters`` selects it, ``distill.index_params`` may set ``clusters`` and ``candidates``; unset,
they are sized to the data (``sized_defaults``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import faiss
import numpy as np
import torch

from .retrieval import exact_topk_on_device, topk_rows

FACTORY = "UserClusters"
DEFAULT_PARAMS = {"clusters": 2048, "candidates": 4000}  # the 1M-user point's; a searcher sizes its own
KMEANS_ITERATIONS = 10
KMEANS_POINTS_PER_CLUSTER = 64  # k-means trains on at most this many users per cluster (FAISS samples them)
ASSIGN_BLOCK = 1 << 16  # users per block when assigning users to clusters (block x clusters scores)
SCORE_BLOCK_ELEMS = 1 << 24  # scores per block of one cluster's users x its candidates (64 MiB at float32)


def sized_defaults(n_users: int, n_items: int) -> dict:
    """``clusters`` and ``candidates`` for n_users x n_items, from the two sizes where they were timed, the fastest
    of the settings tried that held the recall floor (docs/benchmarks.md 4g and 4i): 2,048 / 4,000 at 1M users x
    200k items, 256 / 1,000 at Gowalla's 30k x 41k. Clusters grow as the square root of the users (k-means and the
    candidate lists cost per cluster, the users' products per user), rounded to a power of two; candidates are 2%
    of the items, at least 1,000 (a top-100 needs room) and at most every item (the exact search)."""
    clusters = 2 ** round(math.log2(max(1.0, 1.5 * math.sqrt(max(n_users, 1)))))
    return {"clusters": clusters, "candidates": max(1, min(n_items, max(1000, round(0.02 * n_items))))}


def check_params(params: Mapping, sizes: tuple[int, int] | None = None) -> dict:
    """The defaults (``sized_defaults`` for ``sizes`` = (users, items), else ``DEFAULT_PARAMS``) updated by
    ``params``; ValueError naming an unknown key or a value that is not a positive integer."""
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise ValueError(f"{FACTORY} takes {' and '.join(DEFAULT_PARAMS)}, not {', '.join(sorted(unknown))}")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{FACTORY} {key} must be a positive integer, got {value!r}")
    return {**(DEFAULT_PARAMS if sizes is None else sized_defaults(*sizes)), **params}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-30), dtype=np.float32)


class UserClusterSearcher:
    """Top-k items by inner product for users, the items ranked within each user's cluster's candidates.

    Built from the item vectors and the users to cluster (k-means on their directions, ``seed`` fixes it); the
    search may then be asked for any users, each assigned to its nearest centroid. The interface the refresh in
    ``kd_retrieval`` uses: ``search``, ``set_params(candidates=...)``, ``params``, ``is_exact``, ``release``.
    Runs with torch on the CPU (FAISS's k-means included); results depend only on the vectors, the parameters,
    the seed and the thread count.
    """

    is_exact = False
    reused_training = False  # (no trained structure is kept between refreshes)

    def __init__(self, item_vectors: np.ndarray, user_vectors: np.ndarray,
                 params: Mapping[str, int] | None = None, seed: int = 0) -> None:
        items = np.ascontiguousarray(item_vectors, dtype=np.float32)
        users = np.ascontiguousarray(user_vectors, dtype=np.float32)
        if items.ndim != 2 or users.ndim != 2 or items.shape[1] != users.shape[1]:
            raise ValueError(f"item vectors {items.shape} and user vectors {users.shape} must be [n, dim] alike")
        self.params = check_params(params or {}, sizes=(users.shape[0], items.shape[0]))
        self.n_items, self.dim = items.shape
        self._items = torch.from_numpy(items)
        clusters = max(1, min(self.params["clusters"], users.shape[0]))
        kmeans = faiss.Kmeans(self.dim, clusters, niter=KMEANS_ITERATIONS, spherical=True, seed=int(seed),
                              max_points_per_centroid=KMEANS_POINTS_PER_CLUSTER, min_points_per_centroid=1)
        kmeans.train(_unit_rows(users))
        self._centroids = torch.from_numpy(np.ascontiguousarray(kmeans.centroids, dtype=np.float32))
        self._candidates: torch.Tensor | None = None  # [clusters, candidates] item ids, for self.params

    def set_params(self, **params) -> None:
        """Change ``candidates`` (e.g. raised to hold a recall floor); ``clusters`` is fixed once built."""
        if "clusters" in params and params["clusters"] != self.params["clusters"]:
            raise ValueError(f"{FACTORY}: clusters is fixed once the users are clustered")
        self.params = check_params({**self.params, **params})
        self._candidates = None

    def release(self) -> None:
        """Drop the vectors (nothing is kept for the next refresh: clustering the current users is part of it)."""
        self._items = self._centroids = self._candidates = None

    def _candidate_lists(self, count: int) -> torch.Tensor:
        """[clusters, count] int32 item ids (int32: at 1M users the floor may raise count towards every item)."""
        if self._candidates is None or self._candidates.shape[1] != count:
            ids = exact_topk_on_device(self._centroids, self._items, count, block=self._score_rows(self.n_items))[1]
            self._candidates = ids.to(torch.int32)
        return self._candidates

    @staticmethod
    def _score_rows(columns: int) -> int:
        return max(1, SCORE_BLOCK_ELEMS // columns)

    @torch.no_grad()
    def search(self, user_vectors: np.ndarray, k: int,
               previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [n, k] float32 inner products, ids [n, k] int64) of the users' top-k, best first. ``previous``:
        [n, p] integer item ids per user (e.g. its last refresh's list; distinct within a row, which is not
        checked), ranked beside its cluster's candidates, an item in both once."""
        users = torch.from_numpy(np.ascontiguousarray(user_vectors, dtype=np.float32))
        if users.ndim != 2 or users.shape[1] != self.dim:
            raise ValueError(f"user_vectors must be [n, {self.dim}], got {tuple(users.shape)}")
        if not 0 < k <= self.n_items:
            raise ValueError(f"k must be in 1..{self.n_items}, got {k}")
        n = users.shape[0]
        if previous is not None:
            if previous.ndim != 2 or previous.shape[0] != n or not np.issubdtype(previous.dtype, np.integer):
                raise ValueError(f"previous must be [{n}, p] integer item ids, got {previous.dtype} "
                                 f"{tuple(previous.shape)}")
            if previous.size and not (0 <= previous.min() and previous.max() < self.n_items):
                raise ValueError(f"previous holds item ids outside 0..{self.n_items - 1}")
            # (kept in its own dtype, int32 from a refresh; widened per block: [1M, 100] as int64 is 800 MB)
            previous = torch.from_numpy(np.ascontiguousarray(previous)) if previous.shape[1] else None
        count = min(max(self.params["candidates"], k), self.n_items)
        if count == self.n_items:  # every item a candidate: the exact search, without [clusters, items] lists
            scores_t, ids_t = exact_topk_on_device(users, self._items, k, block=self._score_rows(self.n_items))
            return scores_t.numpy(), ids_t.numpy()
        candidates = self._candidate_lists(count)
        units = torch.from_numpy(_unit_rows(users.numpy()))
        assign = torch.cat([torch.argmax(units[s:s + ASSIGN_BLOCK] @ self._centroids.T, dim=1)
                            for s in range(0, n, ASSIGN_BLOCK)]) if n else torch.zeros(0, dtype=torch.long)
        order = torch.argsort(assign, stable=True)
        bounds = torch.searchsorted(assign[order], torch.arange(candidates.shape[0] + 1)).tolist()
        scores = torch.empty((n, k), dtype=torch.float32)
        ids = torch.empty((n, k), dtype=torch.int64)
        # a block's scores, and with previous lists their items' rows ([rows, p, dim]) and products
        rows_per_block = self._score_rows(count + (0 if previous is None else previous.shape[1] * (2 * self.dim + 1)))
        is_candidate = None if previous is None else torch.zeros(self.n_items, dtype=torch.bool)
        for c in range(candidates.shape[0]):
            members = order[bounds[c]:bounds[c + 1]]
            if members.numel() == 0:
                continue
            cand = candidates[c].long()
            cand_t = self._items.index_select(0, cand).T.contiguous()
            if is_candidate is not None:
                is_candidate[cand] = True
            for s in range(0, members.numel(), rows_per_block):
                rows = members[s:s + rows_per_block]
                block = users[rows] @ cand_t
                if previous is None:
                    values, columns = topk_rows(block, k)
                    ids[rows] = cand[columns]
                else:  # the previous lists' items after the candidates; one already a candidate is ranked once
                    # (index_select, not indexing: a tenth of the time for [rows, p] ids)
                    extra = previous.index_select(0, rows).long()
                    extra_rows = self._items.index_select(0, extra.reshape(-1)).view(*extra.shape, self.dim)
                    extra_scores = (extra_rows * users[rows].unsqueeze(1)).sum(-1)
                    extra_scores.masked_fill_(is_candidate[extra], float("-inf"))
                    values, columns = topk_rows(torch.cat([block, extra_scores], dim=1), k)
                    from_extra = columns >= count
                    ids[rows] = torch.where(from_extra, extra.gather(1, (columns - count).clamp(min=0)),
                                            cand[columns.clamp(max=count - 1)])
                scores[rows] = values
            if is_candidate is not None:
                is_candidate[cand] = False
        return scores.numpy(), ids.numpy()
