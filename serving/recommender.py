"""Recommend items for user indices from an opened bundle (the serving hot path).

Two paths, chosen once per bundle:

- exact (Flat) indexes -> dense numpy scoring, no FAISS call: range-check user indices ->
  user vectors (ONNX user tower) -> [users, dim] x [dim, width] float32 product (a
  matrix-vector product for one user) against the item vectors, kept contiguous in
  descending-norm order since load -> seen items set to -inf -> top-k by a threshold ->
  candidates re-scored in float64 -> best first. On the Gowalla student (41k items, dim
  20; 2 shared cores) one user costs ~0.06 ms against ~0.4 ms through `IndexFlatIP.search`
  with over-fetch, and 64 users ~1.8 ms against ~22 ms;
- approximate indexes (HNSW, IVF, SQ/PQ storage) -> FAISS search with over-fetch
  k + len(seen) -> drop -1 padding and seen items -> inner-product scores -> best first.
  Users whose candidates cannot fill the answer go through the dense path.

Dense top-k, exact (every step below only ever drops items that provably cannot be in
the answer):
- norm-ordered pruning: the PREFIX items of largest norm are scored first; their k-th best
  unseen score L bounds the true k-th best from below (up to rounding), and an item's
  score is at most |item| |user| (Cauchy-Schwarz), so only items with
  |item| |user| >= L - margin are scored at all (on Gowalla's student at k=10: the
  2,048-item prefix alone for ~90% of users, at most ~25k of the 41k items for any of
  2,000 sampled users);
- threshold instead of a full argpartition: the k-th best of every `stride`-th scored
  item is also a lower bound of the k-th best (a subset's k-th largest never exceeds the
  whole set's), so `score >= bound - margin` keeps every top-k item among ~stride x k
  candidates, for a partition of width / stride values and one comparison pass;
- `margin` covers the float32 rounding of the BLAS product (|error| <= (d + 2) u |x| |v|
  for any summation order, u = 2^-24, times SAFETY), and the candidates are re-scored in
  float64 (products of float32 values are exact there) and ranked by (score desc, item
  index asc). So the answer does not depend on how BLAS blocked the product: one user
  gets the same items and bit-identical scores alone or in any batch, and the answer is
  the float64 brute-force answer. (The FAISS path ranked by float32 scores, so two items
  within float32 rounding of each other could come out in index order instead.)
- a user whose prefix or sample holds fewer than k unseen items (a user who has seen
  most of the catalogue) is bounded from the whole row; a user with fewer than k unseen
  items gets all of them.
In a batch, users are scored in blocks (at most DENSE_BLOCK_SCORES scores at once), and
within a block the few users whose bound reaches deep into the catalogue are scored
apart from the rest, so one heavy user does not widen everybody's product.

User vectors: the user tower maps each user index to its vector on its own, so when the
table is small (USER_TABLE_MAX_BYTES) ONNX Runtime computes it for every user once at load
and requests look rows up; otherwise ORT runs per call. (An ORT call is ~10 us plus ~30 us
of cache misses in the numpy work after it: a third of a one-user recommendation.)

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
`serving.app.serve()` setting OPENBLAS/OMP/MKL_NUM_THREADS=1 for its worker processes (a
single-process server imported numpy before that could take effect).

This module imports only numpy and faiss, and threadpoolctl lazily if installed (never torch
or `compressor`).
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from serving.bundle import Bundle

logger = logging.getLogger(__name__)

# Over-fetch beyond this fraction of the catalogue goes straight to exact scoring:
# FAISS would have to keep a heap nearly the catalogue's size, a dense dot is cheaper.
EXACT_FETCH_FRACTION = 0.5
# Dense path: users scored per BLAS product, at most this many float32 scores at once
# (2M = 8 MiB: a block of 51 users x 41k items), so a big batch never allocates
# users x items and each block's scores stay cache-resident.
DENSE_BLOCK_SCORES = 1 << 21
DENSE_MAX_BLOCK = 64
# Largest sampling stride of the top-k threshold (see the module docstring).
MAX_STRIDE = 16
# float32 rounding of a d-term dot product: |fl(x.v) - x.v| <= (d + 2) * 2^-24 * |x| |v|
# for any summation order; margins use SAFETY times that.
F32_EPS = 2.0**-24
SAFETY = 2.0
# Items scored first (the largest norms), whose k-th best score bounds which of the rest can
# still make the top k; and the relative slack on the float64 norm bound |item| |user|.
PREFIX = 2048
NORM_RTOL = 1e-9
# In a batch block, rows are grouped by how much of the catalogue they need (within 1/16 of
# it, or more) and each group is scored over the widest cutoff in it, so a few heavy users do
# not widen everybody's product. (More groups measured no faster: per-group overhead.)
GROUP_DIVISORS = (16,)
# The user tower maps each user index to its vector independently of the other rows, so a
# user table of at most this size is computed by ONNX Runtime once at load (in chunks) and
# rows are looked up per request: an ORT call costs ~10 us, and ~30 us more in cache misses
# of the numpy work after it, a third of a one-user recommendation. Larger tables: ORT per call.
USER_TABLE_MAX_BYTES = 64 << 20
USER_TABLE_CHUNK = 4096
_F32_LOWEST = float(np.finfo(np.float32).min)
_F32_LOWEST32 = np.float32(_F32_LOWEST)  # a threshold that keeps every finite (= unseen) score

Result = tuple[np.ndarray, np.ndarray]


def _empty() -> Result:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)


def _rank(items: np.ndarray, scores: np.ndarray, k: int) -> Result:
    """Best first by score, ties by item index; keep k."""
    order = np.lexsort((items, -scores))[:k]
    return items[order].astype(np.int64, copy=False), scores[order].astype(np.float32, copy=False)


def _is_exact_flat(index: faiss.Index) -> bool:
    """A flat index stores the raw float vectors: dense scoring over them is exact search."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _unique_seen_counts(indptr: np.ndarray, indices: np.ndarray, num_items: int) -> np.ndarray:
    """Distinct training items per user (the CSR may repeat an item)."""
    num_users = indptr.size - 1
    lens = np.diff(indptr)
    if indices.size == 0:
        return np.zeros(num_users, dtype=np.int64)
    rows = np.repeat(np.arange(num_users, dtype=np.int64), lens)
    keys = np.unique(rows * num_items + indices)
    return np.bincount(keys // num_items, minlength=num_users).astype(np.int64)


def _limit_blas_threads(threads: int) -> None:
    """Cap numpy's own BLAS pool (not FAISS's, not torch's) at `threads`, if threadpoolctl is there."""
    try:
        from threadpoolctl import ThreadpoolController
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
        # Zero columns appended to queries: the ip2l2 coordinate plus any codec padding.
        self._query_pad = bundle.index.d - bundle.dim
        self._ef_search = bundle.search_params.get("efSearch", 0)
        self._indptr = bundle.seen_indptr
        self._indices = bundle.seen_indices
        # Popularity = how many users had the item in training; computed once.
        self._counts = np.bincount(self._indices, minlength=self._num_items).astype(np.int64)
        self._popular_order = np.lexsort((np.arange(self._num_items), -self._counts))
        # Dense path state. Items are kept in descending norm order, transposed to (d, I)
        # contiguous for a row-major [users, d] x [d, width] product over the first `width`
        # items (a matrix-vector product that streams over items: ~2x faster than items @ vector).
        self.dense = _is_exact_flat(bundle.index)
        items64 = self._items.astype(np.float64)
        item_norms = np.sqrt(np.einsum("ij,ij->i", items64, items64))
        self._perm = np.argsort(-item_norms, kind="stable").astype(np.int64)
        self._neg_norms = -item_norms[self._perm]  # ascending, for searchsorted
        self._sorted_t = np.ascontiguousarray(self._items[self._perm].T)
        inverse = np.empty(self._num_items, dtype=np.int32)
        inverse[self._perm] = np.arange(self._num_items, dtype=np.int32)
        self._seen_pos = inverse[self._indices]  # seen CSR in norm-order positions
        max_norm = float(item_norms.max()) if item_norms.size else 0.0
        # |float32 score - true score| <= this x |user vector|, any BLAS summation order.
        self._err_per_norm = SAFETY * (bundle.dim + 2) * F32_EPS * max_norm
        self._unseen = self._num_items - _unique_seen_counts(self._indptr, self._indices, self._num_items)
        self._block = max(1, min(DENSE_MAX_BLOCK, DENSE_BLOCK_SCORES // max(1, self._num_items)))
        if blas_threads is not None:
            _limit_blas_threads(blas_threads)
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
        return np.ascontiguousarray(b.session.run([b.output_name], {b.input_name: users})[0], dtype=np.float32)

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
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        k = int(k)
        users = self._check_users(user_indices)
        if users.size == 0:
            return []
        if k == 0:
            return [_empty() for _ in range(users.size)]
        vecs = self._tower(users)
        if self.dense:
            return self._dense_topk(vecs, users, k, exclude_seen)

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

        exact_rows = np.array([row for row in range(users.size) if results[row] is None], dtype=np.int64)
        if exact_rows.size:
            for row, answer in zip(exact_rows.tolist(), self._dense_topk(vecs[exact_rows], users[exact_rows], k, exclude_seen)):
                results[row] = answer
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

    # --------------------------------------------------------------- dense path
    def _dense_topk(self, vecs: np.ndarray, users: np.ndarray, k: int, exclude_seen: bool) -> list[Result]:
        """Exact top-k by dense scoring against the item vectors, seen items masked; k >= 1."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if users.size == 1:
            return [self._dense_one(vecs, int(users[0]), k, exclude_seen)]
        out: list[Result] = []
        step = self._block
        for start in range(0, users.size, step):
            out.extend(self._dense_block(vecs[start : start + step], users[start : start + step], k, exclude_seen))
        return out

    def _stride(self, k: int, width: int) -> int:
        # Sample width / stride scores, keep ~stride x k candidates (16 for k=10 over 41k items).
        return max(1, min(MAX_STRIDE, int(math.sqrt(width / k) / 4)))

    def _prefix_width(self, k: int) -> int:
        return min(self._num_items, max(PREFIX, 4 * k))

    def _cutoff(self, lower: float, vec_norm: float, err: float) -> int:
        """How many items (by descending norm) may still score >= the k-th best.

        `lower` is a float32 k-th best score over a subset: the true k-th best is >= lower - err.
        An item's true score is <= |item| |user| (Cauchy-Schwarz), so items whose norm bound is
        below lower - err cannot enter the top k and need not be scored at all.
        """
        floor = lower - err
        if not (floor > 0.0 and vec_norm > 0.0):  # also NaN and -inf: score everything
            return self._num_items
        threshold = floor / (vec_norm * (1.0 + NORM_RTOL))
        return int(np.searchsorted(self._neg_norms, -threshold, side="right"))

    def _cutoffs(self, lower: np.ndarray, vec_norms: np.ndarray, errs: np.ndarray) -> np.ndarray:
        """`_cutoff` for many rows at once."""
        floor = lower - errs
        ok = (floor > 0.0) & (vec_norms > 0.0)  # False for NaN and -inf too
        threshold = np.where(ok, floor, 0.0) / np.where(ok, vec_norms * (1.0 + NORM_RTOL), 1.0)
        found = np.searchsorted(self._neg_norms, -threshold, side="right")
        return np.where(ok, found, self._num_items).astype(np.int64)

    def _bound32(self, lower: float, err: float) -> np.float32:
        """float32 candidate threshold: every item whose true score may reach the k-th best passes.

        `lower` <= the float32 k-th best; true k-th best >= lower - err; a candidate's float32
        score >= its true score - err. Rounded down, so the comparison never drops one.
        """
        bound = lower - 2.0 * err
        bound32 = np.float32(max(bound, _F32_LOWEST))
        if float(bound32) > bound:
            bound32 = np.nextafter(bound32, np.float32(-np.inf))
        return bound32

    def _bounds32(self, lower: np.ndarray, errs: np.ndarray) -> np.ndarray:
        """`_bound32` for many rows at once."""
        bound = np.maximum(lower - 2.0 * errs, _F32_LOWEST)
        bound32 = bound.astype(np.float32)
        return np.where(bound32.astype(np.float64) > bound, np.nextafter(bound32, np.float32(-np.inf)), bound32)

    def _rescore(self, items: np.ndarray, vec_rows: np.ndarray) -> np.ndarray:
        """float64 inner products of items (original indices) with their rows' user vectors.

        Products of float32 values are exact in float64; one code path for one user and for a
        batch, so the same (user, item) always gets the same score and the same rank.
        """
        return np.einsum("ij,ij->i", self._items[items].astype(np.float64), vec_rows.astype(np.float64))

    def _dense_one(self, vecs: np.ndarray, user: int, k: int, exclude_seen: bool) -> Result:
        """`_dense_block` for one user with scalar bookkeeping (the /recommend hot path)."""
        n = self._num_items
        if exclude_seen:
            seen = self._seen_pos[self._indptr[user] : self._indptr[user + 1]]
            avail = int(self._unseen[user])
        else:
            seen = self._seen_pos[:0]
            avail = n
        kk = min(k, avail)
        if kk == 0:
            return _empty()
        vec = vecs[0]
        vec64 = vec.astype(np.float64)
        norm = math.sqrt(float(vec64 @ vec64))
        err = self._err_per_norm * norm
        lower = -math.inf
        width = n
        if kk == k:
            p = self._prefix_width(k)
            scores = vec @ self._sorted_t[:, :p]
            if seen.size:
                scores[seen[seen < p]] = -np.inf
            lower = float(np.partition(scores, p - k)[p - k])
            if math.isfinite(lower):
                width = max(p, self._cutoff(lower, norm, err))
            # width == p: the prefix holds every possible top-k item; `lower` is its k-th score.
            if width > p:
                scores = vec @ self._sorted_t[:, :width]
                if seen.size:
                    scores[seen[seen < width]] = -np.inf
                stride = self._stride(k, width)
                sample = scores[::stride]
                if sample.size >= k:
                    lower = max(lower, float(np.partition(sample, sample.size - k)[sample.size - k]))
                if not math.isfinite(lower):  # fewer than k unseen items in the sample
                    lower = float(np.partition(scores, width - k)[width - k])
            bound32 = self._bound32(lower, err)
        else:
            scores = vec @ self._sorted_t  # fewer than k unseen items: all of them are the answer
            if seen.size:
                scores[seen] = -np.inf
            bound32 = _F32_LOWEST32
        cols = np.flatnonzero(scores >= bound32)
        items = self._perm[cols]
        exact = self._rescore(items, vecs[np.zeros(items.size, dtype=np.intp)])
        take = np.lexsort((items, -exact))[:kk]  # score desc, item index asc
        return items[take], exact[take].astype(np.float32)

    def _seen_entries(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in `users`, norm-order position) of every seen item of `users`."""
        starts, ends = self._indptr[users], self._indptr[users + 1]
        lens = ends - starts
        total = int(lens.sum())
        rows = np.repeat(np.arange(users.size), lens)
        # Positions into the seen CSR of every user's segment, concatenated.
        return rows, self._seen_pos[np.arange(total) + np.repeat(starts - (np.cumsum(lens) - lens), lens)]

    @staticmethod
    def _mask(scores: np.ndarray, rows: np.ndarray, pos: np.ndarray, width: int) -> None:
        """Set scores[rows, pos] to -inf where pos < width (the scored columns)."""
        keep = pos < width
        scores[rows[keep], pos[keep]] = -np.inf

    def _dense_block(self, vecs: np.ndarray, users: np.ndarray, k: int, exclude_seen: bool) -> list[Result]:
        n = self._num_items
        b = users.size
        vec64 = vecs.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", vec64, vec64))
        errs = self._err_per_norm * norms
        if exclude_seen:
            seen_rows, seen_pos = self._seen_entries(users)
            avail = self._unseen[users]
        else:
            seen_rows = seen_pos = np.empty(0, dtype=np.int64)
            avail = np.full(b, n, dtype=np.int64)
        kk = np.minimum(k, avail)  # answer sizes
        full = kk == k  # rows with fewer than k unseen items take all of them
        # k-th best unseen score of each row over the prefix -> how far each row must be scored.
        p = self._prefix_width(k)
        scores = vecs @ self._sorted_t[:, :p]
        self._mask(scores, seen_rows, seen_pos, p)
        scores.partition(p - k, axis=1)
        lower = np.where(full, scores[:, p - k].astype(np.float64), -np.inf)
        width = np.where(full, np.maximum(p, self._cutoffs(lower, norms, errs)), n)

        # Score each group of rows over the widest cutoff in it: rows within a small part of
        # the catalogue together, the (rare) rows that need most or all of it apart.
        tier = np.searchsorted(np.array([max(p, n // d) for d in GROUP_DIVISORS]), width)
        results: list[Result] = [_empty()] * b
        for level in np.unique(tier).tolist():
            group = np.flatnonzero(tier == level)
            if group.size:
                self._dense_group(vecs, k, group, int(width[group].max()), lower, errs, full, kk, seen_rows,
                                  seen_pos, results)
        return results

    def _dense_group(self, vecs, k, group, width, lower, errs, full, kk, seen_rows, seen_pos, results) -> None:
        """Top-k of the block rows `group`, scoring the first `width` items (by norm) of each."""
        scores = vecs[group] @ self._sorted_t[:, :width]
        if seen_rows.size:
            local = np.full(full.size, -1, dtype=np.int64)
            local[group] = np.arange(group.size)
            rows = local[seen_rows]
            mine = rows >= 0
            self._mask(scores, rows[mine], seen_pos[mine], width)
        bounds = np.full(group.size, _F32_LOWEST32, dtype=np.float32)
        in_full = np.flatnonzero(full[group])
        if in_full.size:
            low = lower[group[in_full]]
            if width >= 2 * self._prefix_width(k):  # a sampled k-th score over the wider range may be tighter
                stride = self._stride(k, width)
                sample = scores[in_full, ::stride]  # a copy (fancy index), partitioned in place
                m = sample.shape[1]
                if m >= k:
                    sample.partition(m - k, axis=1)
                    low = np.maximum(low, sample[:, m - k])
            for i in np.flatnonzero(~np.isfinite(low)).tolist():  # < k unseen items in prefix and sample
                row = int(in_full[i])
                low[i] = float(np.partition(scores[row], width - k)[width - k])
            bounds[in_full] = self._bounds32(low, errs[group[in_full]])
        flat = np.flatnonzero(scores >= bounds[:, None])  # row-major; 2-D np.nonzero is ~30x slower
        rows = flat // width
        items = self._perm[flat - rows * width]
        exact = self._rescore(items, vecs[group[rows]])
        order = np.lexsort((items, -exact, rows))  # per row: score desc, item index asc
        # The first kk[row] entries of each row's segment of `order`.
        sizes = kk[group]
        starts = np.cumsum(np.bincount(rows, minlength=group.size)) - np.bincount(rows, minlength=group.size)
        ends = np.cumsum(sizes)
        take = order[np.arange(int(ends[-1])) + np.repeat(starts - (ends - sizes), sizes)]
        cuts = ends[:-1].tolist()
        for row, got, val in zip(group.tolist(), np.split(items[take], cuts),
                                 np.split(exact[take].astype(np.float32), cuts)):
            results[row] = (got, val)

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
