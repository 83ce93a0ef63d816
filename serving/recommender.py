"""Recommend items for user indices from an opened bundle (the serving hot path).

Pipeline per request: range-check user indices -> ONNX user tower (ORT) -> user
vectors -> (append 0 coordinates for ip2l2 indexes) -> FAISS search with over-fetch
k + len(seen) -> drop -1 padding and seen items -> inner-product scores -> best first.

Correctness rules (why they exist):
- indices are range-checked before ORT: ORT's Gather accepts negative indices and
  wraps -1 to the last row, which would silently answer for the wrong user;
- over-fetching k + len(seen) makes exclude-seen exact for an exact index: at most
  len(seen) of the fetched candidates can be removed;
- an approximate index may return fewer usable candidates (HNSW below efSearch, IVF
  when the probed lists are short, or too many seen items among them). Then that user
  is answered by exact scoring against all item vectors (`Bundle.item_vectors`,
  reconstructed from the index at load time) with seen items masked, so every answer
  has exactly min(k, number of unseen items) items and never a -1 id. The same exact
  path is taken directly when the over-fetch would cover more than half the catalogue,
  where a brute-force matrix-vector product is cheaper than a huge FAISS heap;
- scores are always recomputed as dot(user vector, item vector) so ip2l2 indexes (which
  return L2 distances) report true inner products; for SQ/PQ storage the item vectors
  are the codec's reconstruction, so scores are those of the stored vectors;
- ties are broken by item index (ascending) so answers are deterministic.

This module imports only numpy and faiss (never torch or `compressor`).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from serving.bundle import Bundle

logger = logging.getLogger(__name__)

# Over-fetch beyond this fraction of the catalogue goes straight to exact scoring:
# FAISS would have to keep a heap nearly the catalogue's size, a dense dot is cheaper.
EXACT_FETCH_FRACTION = 0.5

Result = tuple[np.ndarray, np.ndarray]


def _empty() -> Result:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)


def _rank(items: np.ndarray, scores: np.ndarray, k: int) -> Result:
    """Best first by score, ties by item index; keep k."""
    order = np.lexsort((items, -scores))[:k]
    return items[order].astype(np.int64, copy=False), scores[order].astype(np.float32, copy=False)


class Recommender:
    """Top-k recommendations and a popularity fallback over one `Bundle`."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._items = bundle.item_vectors  # (I, d) float32, C-contiguous
        self._num_items = bundle.num_items
        self._num_users = bundle.num_users
        # Zero columns appended to queries: the ip2l2 coordinate plus any codec padding.
        self._query_pad = bundle.index.d - bundle.dim
        self._ef_search = bundle.search_params.get("efSearch", 0)
        self._indptr = bundle.seen_indptr
        self._indices = bundle.seen_indices
        # Popularity = how many users had the item in training; computed once.
        self._counts = np.bincount(self._indices, minlength=self._num_items).astype(np.int64)
        self._popular_order = np.lexsort((np.arange(self._num_items), -self._counts))

    # ----------------------------------------------------------------- id helpers
    def user_indices(self, external_ids: list[str] | np.ndarray) -> np.ndarray:
        """External user ids -> int64 user indices; raises KeyError naming an unknown id."""
        lookup = self.bundle.user_index
        try:
            return np.fromiter((lookup[str(u)] for u in external_ids), dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"unknown user id {exc.args[0]!r}") from None

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
        if users.size:
            lo, hi = int(users.min()), int(users.max())
            if lo < 0 or hi >= self._num_users:
                bad = lo if lo < 0 else hi
                raise IndexError(f"user index {bad} out of range [0, {self._num_users})")
        return users

    def user_vectors(self, user_indices: np.ndarray) -> np.ndarray:
        """Run the ONNX user tower for range-checked user indices -> float32 (B, d)."""
        users = self._check_users(user_indices)
        if users.size == 0:
            return np.empty((0, self.bundle.dim), dtype=np.float32)
        b = self.bundle
        return b.session.run([b.output_name], {b.input_name: users})[0]

    # ----------------------------------------------------------------- recommend
    def recommend(self, user_indices: np.ndarray, k: int, exclude_seen: bool = True) -> list[Result]:
        """Per user: (item indices int64, inner-product scores float32), best first.

        Each answer has exactly min(k, items not excluded) entries.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        k = int(k)
        users = self._check_users(user_indices)
        if users.size == 0:
            return []
        if k == 0:
            return [_empty() for _ in range(users.size)]
        vecs = self.user_vectors(users)
        n = self._num_items
        if exclude_seen:
            seen_len = self._indptr[users + 1] - self._indptr[users]
        else:
            seen_len = np.zeros(users.size, dtype=np.int64)
        need = np.minimum(k + seen_len, n)
        use_exact = need > EXACT_FETCH_FRACTION * n
        results: list[Result | None] = [None] * users.size

        approx_rows = np.flatnonzero(~use_exact)
        if approx_rows.size:
            fetch = int(need[approx_rows].max())
            scores_idx = self._search(vecs[approx_rows], fetch)
            for row, cand in zip(approx_rows.tolist(), scores_idx):
                results[row] = self._finish(vecs[row], cand, users[row], k, exclude_seen)

        for row in range(users.size):
            if results[row] is None:
                results[row] = self._exact(vecs[row], users[row], k, exclude_seen)
        return results  # type: ignore[return-value]

    def _search(self, vecs: np.ndarray, fetch: int) -> np.ndarray:
        queries = vecs
        if self._query_pad:
            # Items carry sqrt(M^2 - |x|^2) as an extra coordinate; queries carry 0, so
            # L2 order equals inner-product order (padding columns are 0 on both sides).
            queries = np.hstack([vecs, np.zeros((vecs.shape[0], self._query_pad), dtype=np.float32)])
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.bundle.is_hnsw:
            # Per-call parameters, not index.hnsw.efSearch: concurrent requests share the index.
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self._ef_search, fetch)
            _, ids = self.bundle.index.search(queries, fetch, params=params)
        else:
            _, ids = self.bundle.index.search(queries, fetch)
        return ids

    def _finish(self, vec: np.ndarray, cand: np.ndarray, user: int, k: int, exclude_seen: bool) -> Result | None:
        """Filter one user's FAISS candidates; None when they cannot fill the answer."""
        cand = cand[cand >= 0]
        if exclude_seen:
            seen = self.seen(user)
            if seen.size:
                cand = cand[~np.isin(cand, seen)]
                expected = min(k, self._num_items - np.unique(seen).size)
            else:
                expected = min(k, self._num_items)
        else:
            expected = min(k, self._num_items)
        if cand.size < expected:
            logger.debug("user %d: %d candidates < %d needed, exact fallback", user, cand.size, expected)
            return None
        scores = self._items[cand] @ vec
        return _rank(cand, scores, expected)

    def _exact(self, vec: np.ndarray, user: int, k: int, exclude_seen: bool) -> Result:
        """Brute-force inner product over all item vectors with seen items masked."""
        scores = self._items @ vec
        if exclude_seen:
            seen = self.seen(user)
            if seen.size:
                keep = np.ones(self._num_items, dtype=bool)
                keep[seen] = False
                cand = np.flatnonzero(keep)
                scores = scores[cand]
            else:
                cand = np.arange(self._num_items, dtype=np.int64)
        else:
            cand = np.arange(self._num_items, dtype=np.int64)
        kk = min(k, cand.size)
        if kk == 0:
            return _empty()
        if kk < cand.size:
            # Partition, then widen to every item tied with the k-th score so the
            # index tie-break in _rank is deterministic.
            part = np.argpartition(-scores, kk - 1)
            kth = scores[part[kk - 1]]
            top = np.flatnonzero(scores >= kth)
            cand, scores = cand[top], scores[top]
        return _rank(cand, scores, kk)

    # ---------------------------------------------------------------- popularity
    def popular(self, k: int, exclude: np.ndarray | None = None) -> Result:
        """Most-trained-on items (count of users, as float32 scores), best first, minus `exclude`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        k = int(k)
        n_ex = 0 if exclude is None else int(np.asarray(exclude).size)
        cand = self._popular_order[: k + n_ex]
        if n_ex:
            cand = cand[~np.isin(cand, np.asarray(exclude, dtype=np.int64))]
        cand = cand[:k].astype(np.int64, copy=False)
        return cand, self._counts[cand].astype(np.float32)
