"""Recommend items for user indices from an opened bundle (the serving hot path).

Two paths, chosen once per bundle:

- exact scans (Flat, or SQfp16/SQ8 codes scanned by inner product: `query_transform` "none") -> dense numpy
  scoring over the vectors the index stores (reconstructed at load), no FAISS call: range-check user indices ->
  user vectors (ONNX user tower) -> `serving.dense_topk.DenseTopK`: a [users, dim] x [dim, width]
  float32 product (a matrix-vector product for one user) against the item vectors in descending-norm
  order, seen items set to -inf, top-k by a threshold, candidates re-scored in float64, best first.
  Cheaper than `IndexFlatIP.search` with over-fetch, for one user and for batches (docs/benchmarks.md);
- approximate indexes (HNSW, IVF, SQ/PQ storage) -> FAISS search with over-fetch
  k + len(seen) -> drop -1 padding and seen items -> inner-product scores -> best first.
  Users whose candidates cannot fill the answer go through the dense path.

User vectors: the user tower maps each user index to its vector on its own, so when the
table is small (USER_TABLE_MAX_BYTES) ONNX Runtime computes it for every user once at load
and requests look rows up; otherwise ORT runs per call. (A per-request ORT call, and the cache
misses in the numpy work after it, are a sizeable part of a one-user recommendation.) A history
tower (`Bundle.user_tower`) computes a training user's vector from its stored history (the last
max_len items of its seen row) the same way, and a request's own history (`recommend_histories`:
item indices, from `history_indices`) with one ORT call on the [histories, longest] padded batch;
its answer leaves out the history's items (`DenseTopK.topk_excluding`, or the FAISS path with the
history as what is excluded), by the same rules as a user's seen items below.

Correctness rules (why they exist):
- indices are range-checked before ORT: ORT's Gather accepts negative indices and
  wraps -1 to the last row, which would silently answer for the wrong user;
- "exclude seen" is exact on both paths: every answer has exactly min(k, number of
  unseen items) items and never a -1 id or a seen item. Over-fetching k + len(seen)
  makes it exact for FAISS's candidates (at most len(seen) can be removed); an
  approximate index may still return fewer usable candidates (HNSW below efSearch, IVF
  when the probed lists are short), and then that user is answered by the dense path
  over all item vectors (`Bundle.item_vectors`, reconstructed from the index at load
  time). The same happens directly when the over-fetch would cover more than half the
  catalogue, where a dense product is cheaper than a huge FAISS heap;
- scores are always dot(user vector, item vector) so ip2l2 indexes (which return L2
  distances) report true inner products; for SQ/PQ storage the item vectors are the
  codec's reconstruction, so scores are those of the stored vectors;
- ties are broken by item index (ascending) so answers are deterministic.

Threads: the dense path calls numpy's BLAS; `Recommender(blas_threads=1)` (the default)
caps numpy's BLAS pool at one thread when threadpoolctl is installed, on top of
`serving.server.serve()` setting OPENBLAS/OMP/MKL_NUM_THREADS=1 for its worker processes (a
single-process server imported numpy before that could take effect).

This module imports only numpy and faiss, and threadpoolctl lazily if installed (never torch
or `compressor`).
"""

from __future__ import annotations

import logging
from typing import Callable

import faiss
import numpy as np

from serving.bundle import Bundle
from serving.bundle_format import ONNX_HISTORY, ONNX_LENGTHS, csr_histories, ip2l2_queries, pad_histories
from serving.dense_topk import DenseTopK, Result, empty_result

logger = logging.getLogger(__name__)

# Over-fetch beyond this fraction of the catalogue goes straight to exact scoring:
# FAISS would have to keep a heap nearly the catalogue's size, a dense dot is cheaper.
EXACT_FETCH_FRACTION = 0.5
# The user tower maps each user index to its vector independently of the other rows, so a
# user table of at most this size is computed by ONNX Runtime once at load (in chunks) and
# rows are looked up per request. Larger tables: ORT per call.
USER_TABLE_MAX_BYTES = 64 << 20
USER_TABLE_CHUNK = 4096


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    return int(k)


def _rank(items: np.ndarray, scores: np.ndarray, k: int) -> Result:
    """Best first by score, ties by item index; keep k."""
    order = np.lexsort((items, -scores))[:k]
    return items[order].astype(np.int64, copy=False), scores[order].astype(np.float32, copy=False)


def is_exact_scan(index: faiss.Index, query_transform: str) -> bool:
    """An index whose search is a full inner-product scan of its stored vectors (Flat, or scalar-quantizer codes).

    Dense scoring over `Bundle.item_vectors` (those stored vectors, reconstructed) is then exact search, and for
    SQ codes it is exact with respect to what the bundle stores, not FAISS's float rounding of the codes.
    """
    return query_transform == "none" and isinstance(
        faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexScalarQuantizer)
    )


def _limit_blas_threads(threads: int) -> None:
    """Cap numpy's own BLAS pool (not FAISS's, not torch's) at `threads`, if threadpoolctl is there."""
    try:
        from threadpoolctl import ThreadpoolController  # optional dependency: only this tuning knob uses it
    except ImportError:  # serve() pins the worker processes through the environment anyway
        logger.debug("threadpoolctl not installed: numpy BLAS threads left to OPENBLAS_NUM_THREADS")
        return
    try:
        controller = ThreadpoolController()
        numpy_blas = [
            lib for lib in controller.lib_controllers
            if lib.user_api == "blas" and "numpy" in str(lib.filepath) and lib.num_threads != threads
        ]
        for lib in numpy_blas:
            lib.set_num_threads(threads)
    except Exception as exc:  # noqa: BLE001 - a tuning knob must never stop serving
        logger.debug("could not limit numpy BLAS threads: %s", exc)


class Recommender:
    """Top-k recommendations and a popularity fallback over one `Bundle`."""

    def __init__(self, bundle: Bundle, *, blas_threads: int | None = 1) -> None:
        self.bundle = bundle
        self._items = bundle.item_vectors  # (I, d) float32, C-contiguous
        self._num_items = bundle.num_items
        self._num_users = bundle.num_users
        self._ef_search = bundle.search_params.get("efSearch", 0)
        self._indptr = bundle.seen_indptr
        self._indices = bundle.seen_indices
        # Popularity = how many users had the item in training; computed once.
        self._counts = np.bincount(self._indices, minlength=self._num_items).astype(np.int64)
        self._popular_order = np.lexsort((np.arange(self._num_items), -self._counts))
        self.dense = is_exact_scan(bundle.index, bundle.query_transform)
        self._exact = DenseTopK(self._items, self._indptr, self._indices)
        if blas_threads is not None:
            _limit_blas_threads(blas_threads)
        self.tower = bundle.user_tower
        # A history tower reads request histories by item id; an ID tower never needs this map.
        self._item_lookup = {iid: i for i, iid in enumerate(bundle.item_ids.tolist())} if self.tower.is_history else {}
        self._user_table: np.ndarray | None = None
        if self._num_users * bundle.dim * 4 <= USER_TABLE_MAX_BYTES:
            self._user_table = np.concatenate([
                self._run_tower(np.arange(start, min(start + USER_TABLE_CHUNK, self._num_users), dtype=np.int64))
                for start in range(0, self._num_users, USER_TABLE_CHUNK)
            ])

    # ----------------------------------------------------------------- id helpers
    def user_indices(self, external_ids: list[str] | np.ndarray) -> np.ndarray:
        """External user ids -> int64 user indices; raises KeyError naming an unknown id."""
        lookup = self.bundle.user_index
        try:
            return np.fromiter((lookup[str(u)] for u in external_ids), dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"unknown user id {exc.args[0]!r}") from None

    def history_indices(self, external_ids: list[str]) -> tuple[np.ndarray, int]:
        """A history's external item ids -> (the known ones' item indices int64, order kept; how many are unknown).
        Only a history tower reads histories (ValueError otherwise)."""
        if not self.tower.is_history:
            raise ValueError("this bundle's user tower is looked up by user id; it reads no item history")
        lookup = self._item_lookup
        known = [i for i in map(lookup.get, external_ids) if i is not None]
        return np.array(known, dtype=np.int64), len(external_ids) - len(known)

    def item_external_ids(self, item_indices: np.ndarray) -> np.ndarray:
        """Item indices -> external item ids (numpy unicode array)."""
        return self.bundle.item_ids[np.asarray(item_indices, dtype=np.int64)]

    def seen(self, user: int) -> np.ndarray:
        return self._indices[self._indptr[user] : self._indptr[user + 1]]

    # ---------------------------------------------------------------- user tower
    def _check_users(self, user_indices: np.ndarray) -> np.ndarray:
        users = np.asarray(user_indices)
        if users.ndim != 1:
            raise ValueError(f"user_indices must be 1-D, got shape {users.shape}")
        if users.size and users.dtype.kind not in "iu":
            raise TypeError(f"user_indices must be integers, got {users.dtype}")
        users = users.astype(np.int64, copy=False)
        if users.size == 1:  # the /recommend path: skip two array reductions
            one = int(users[0])
            if not 0 <= one < self._num_users:
                raise IndexError(f"user index {one} out of range [0, {self._num_users})")
        elif users.size:
            lo, hi = int(users.min()), int(users.max())
            if lo < 0 or hi >= self._num_users:
                bad = lo if lo < 0 else hi
                raise IndexError(f"user index {bad} out of range [0, {self._num_users})")
        return users

    def user_vectors(self, user_indices: np.ndarray) -> np.ndarray:
        """The ONNX user tower's output for range-checked user indices -> float32 (B, d)."""
        users = self._check_users(user_indices)
        if users.size == 0:
            return np.empty((0, self.bundle.dim), dtype=np.float32)
        return self._tower(users)

    def _run_tower(self, users: np.ndarray) -> np.ndarray:
        b = self.bundle
        if self.tower.is_history:  # a training user's vector comes from its stored history (its seen row)
            return self._run_histories(*csr_histories(self._indptr, self._indices, users, self.tower.max_len))
        return np.ascontiguousarray(b.session.run([b.output_name], {b.input_name: users})[0], dtype=np.float32)

    def _run_histories(self, history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        b = self.bundle
        out = b.session.run([b.output_name], {ONNX_HISTORY: history, ONNX_LENGTHS: lengths})[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def history_vectors(self, histories: list[np.ndarray]) -> np.ndarray:
        """The history tower's output float32 (B, d) for item-index histories (oldest first, each at most
        max_len items; one ORT call). Indices are range-checked first: ORT's Gather would wrap -1."""
        if not self.tower.is_history:
            raise ValueError("this bundle's user tower is looked up by user id; it reads no item history")
        hs = [np.asarray(h) for h in histories]
        for row, h in enumerate(hs):
            if h.ndim != 1 or (h.size and h.dtype.kind not in "iu"):
                raise TypeError(f"history {row} must be a 1-D integer array, got {h.dtype}{list(h.shape)}")
            if h.size > self.tower.max_len:
                raise ValueError(f"history {row} has {h.size} items, more than the tower's max_len {self.tower.max_len}")
            if h.size and (int(h.min()) < 0 or int(h.max()) >= self._num_items):
                raise IndexError(f"history {row}: item index out of range [0, {self._num_items})")
        if not hs:
            return np.empty((0, self.bundle.dim), dtype=np.float32)
        return self._run_histories(*pad_histories(hs))

    def _tower(self, users: np.ndarray) -> np.ndarray:
        """User vectors of range-checked, non-empty int64 user indices."""
        if self._user_table is not None:
            return self._user_table[users]
        return self._run_tower(users)

    # ----------------------------------------------------------------- recommend
    def recommend(self, user_indices: np.ndarray, k: int, exclude_seen: bool = True) -> list[Result]:
        """Per user: (item indices int64, inner-product scores float32), best first.

        Each answer has exactly min(k, items not excluded) entries.
        """
        k = _check_k(k)
        users = self._check_users(user_indices)
        if users.size == 0:
            return []
        if k == 0:
            return [empty_result() for _ in range(users.size)]
        vecs = self._tower(users)
        if self.dense:
            return self._exact.topk(vecs, users, k, exclude_seen)
        excluded = [self.seen(u) for u in users.tolist()] if exclude_seen else None
        return self._search_excluding(
            vecs, excluded, k, lambda rows: self._exact.topk(vecs[rows], users[rows], k, exclude_seen))

    def recommend_histories(self, histories: list[np.ndarray], k: int, exclude_history: bool = True) -> list[Result]:
        """Per item-index history (oldest first, at most max_len items; a history tower only): (item indices,
        scores), best first, the history's own items left out unless `exclude_history` is false. Exactly
        min(k, items not excluded) entries each, as `recommend`."""
        k = _check_k(k)
        vecs = self.history_vectors(histories)
        if k == 0 or not histories:
            return [empty_result() for _ in histories]
        excluded = [np.asarray(h, dtype=np.int64) for h in histories] if exclude_history else None
        if self.dense:
            return self._exact.topk_excluding(vecs, excluded, k)
        return self._search_excluding(vecs, excluded, k, lambda rows: self._exact.topk_excluding(
            vecs[rows], None if excluded is None else [excluded[r] for r in rows.tolist()], k))

    def _search_excluding(self, vecs: np.ndarray, excluded: list[np.ndarray] | None, k: int,
                          exact: Callable[[np.ndarray], list[Result]]) -> list[Result]:
        """The approximate path: FAISS candidates minus `excluded[row]`; rows it cannot fill go to `exact(rows)`."""
        n = self._num_items
        b = vecs.shape[0]
        excluded_len = (np.fromiter((e.size for e in excluded), dtype=np.int64, count=b) if excluded is not None
                        else np.zeros(b, dtype=np.int64))
        need = np.minimum(k + excluded_len, n)
        use_exact = need > EXACT_FETCH_FRACTION * n
        results: list[Result | None] = [None] * b

        approx_rows = np.flatnonzero(~use_exact)
        # HNSW searches as deep as it fetches (efSearch >= fetch), so a row's answer would depend on the other
        # rows of its call: rows are searched in groups of equal depth, and each user gets the answer it gets alone.
        groups = ([approx_rows[need[approx_rows] == d] for d in np.unique(need[approx_rows])] if self.bundle.is_hnsw
                  else [approx_rows])
        for rows in (g for g in groups if g.size):
            fetch = int(need[rows].max())
            scores_idx = self._search(vecs[rows], fetch)
            for row, cand in zip(rows.tolist(), scores_idx):
                results[row] = self._finish(vecs[row], cand, None if excluded is None else excluded[row], k)

        exact_rows = np.array([row for row in range(b) if results[row] is None], dtype=np.int64)
        if exact_rows.size:
            for row, answer in zip(exact_rows.tolist(), exact(exact_rows)):
                results[row] = answer
        return results  # type: ignore[return-value]

    def _search(self, vecs: np.ndarray, fetch: int) -> np.ndarray:
        queries = ip2l2_queries(vecs, self.bundle.index.d)  # zeros for the ip2l2 coordinate and padding
        if self.bundle.is_hnsw:
            # Per-call parameters, not index.hnsw.efSearch: concurrent requests share the index.
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self._ef_search, fetch)
            _, ids = self.bundle.index.search(queries, fetch, params=params)
        else:
            _, ids = self.bundle.index.search(queries, fetch)
        return ids

    def _finish(self, vec: np.ndarray, cand: np.ndarray, excluded: np.ndarray | None, k: int) -> Result | None:
        """Filter one query's FAISS candidates; None when they cannot fill the answer."""
        cand = cand[cand >= 0]
        if excluded is not None and excluded.size:
            cand = cand[~np.isin(cand, excluded)]
            expected = min(k, self._num_items - np.unique(excluded).size)
        else:
            expected = min(k, self._num_items)
        if cand.size < expected:
            logger.debug("%d candidates < %d needed, exact fallback", cand.size, expected)
            return None
        scores = self._items[cand] @ vec
        return _rank(cand, scores, expected)

    # ---------------------------------------------------------------- popularity
    def popular(self, k: int, exclude: np.ndarray | None = None) -> Result:
        """Most-trained-on items (count of users, as float32 scores), best first, minus `exclude`."""
        k = _check_k(k)
        n_ex = 0 if exclude is None else int(np.asarray(exclude).size)
        cand = self._popular_order[: k + n_ex]
        if n_ex:
            cand = cand[~np.isin(cand, np.asarray(exclude, dtype=np.int64))]
        cand = cand[:k].astype(np.int64, copy=False)
        return cand, self._counts[cand].astype(np.float32)
