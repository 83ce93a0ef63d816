"""Exact top-k by inner product with dense numpy scoring, seen items masked (the serving path of exact bundles).

Every step below only ever drops items that provably cannot be in the answer:
- norm-ordered pruning: items are kept contiguous in descending-norm order, and the PREFIX items of largest
  norm are scored first; their k-th best unseen score L bounds the true k-th best from below (up to
  rounding), and an item's score is at most |item| |user| (Cauchy-Schwarz), so only items with
  |item| |user| >= L - margin are scored at all (for most users the prefix alone);
- threshold instead of a full argpartition: the k-th best of every `stride`-th scored item is also a lower
  bound of the k-th best (a subset's k-th largest never exceeds the whole set's), so
  `score >= bound - margin` keeps every top-k item among ~stride x k candidates, for a partition of
  width / stride values and one comparison pass;
- `margin` covers the float32 rounding of the BLAS product (|error| <= (d + 2) u |x| |v| for any summation
  order, u = 2^-24, times SAFETY), and the candidates are re-scored in float64 (products of float32 values
  are exact there) and ranked by (score desc, item index asc). So the answer does not depend on how BLAS
  blocked the product: one user gets the same items and bit-identical scores alone or in any batch, and
  the answer is the float64 brute-force answer (two items within float32 rounding of each other are
  still ranked by their exact scores);
- a user whose prefix or sample holds fewer than k unseen items (a user who has seen most of the
  catalogue) is bounded from the whole row; a user with fewer than k unseen items gets all of them.
In a batch, users are scored in blocks (at most DENSE_BLOCK_SCORES scores at once), and within a block the
few users whose bound reaches deep into the catalogue are scored apart from the rest, so one heavy user
does not widen everybody's product.

This module imports only numpy.
"""

from __future__ import annotations

import math

import numpy as np

# Users scored per BLAS product, at most this many float32 scores at once (8 MiB), so a big batch never
# allocates users x items and each block's scores stay cache-resident.
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
# not widen everybody's product; every further group adds its own per-group overhead.
GROUP_DIVISORS = (16,)
_F32_LOWEST = float(np.finfo(np.float32).min)
_F32_LOWEST32 = np.float32(_F32_LOWEST)  # a threshold that keeps every finite (= unseen) score

Result = tuple[np.ndarray, np.ndarray]


def empty_result() -> Result:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)


def _unique_seen_counts(indptr: np.ndarray, indices: np.ndarray, num_items: int) -> np.ndarray:
    """Distinct training items per user (the CSR may repeat an item)."""
    num_users = indptr.size - 1
    lens = np.diff(indptr)
    if indices.size == 0:
        return np.zeros(num_users, dtype=np.int64)
    rows = np.repeat(np.arange(num_users, dtype=np.int64), lens)
    keys = np.unique(rows * num_items + indices)
    return np.bincount(keys // num_items, minlength=num_users).astype(np.int64)


class DenseTopK:
    """Exact top-k over fixed item vectors for users with a seen-items CSR (see the module docstring)."""

    def __init__(self, items: np.ndarray, seen_indptr: np.ndarray, seen_indices: np.ndarray) -> None:
        self._items = items  # (I, d) float32, C-contiguous: re-scoring in float64
        self._num_items = items.shape[0]
        self._indptr = seen_indptr
        # Items in descending norm order, transposed to (d, I) contiguous for a row-major
        # [users, d] x [d, width] product over the first `width` items (a matrix-vector product
        # that streams over items, faster than items @ vector).
        items64 = items.astype(np.float64)
        item_norms = np.sqrt(np.einsum("ij,ij->i", items64, items64))
        self._perm = np.argsort(-item_norms, kind="stable").astype(np.int64)
        self._neg_norms = -item_norms[self._perm]  # ascending, for searchsorted
        self._sorted_t = np.ascontiguousarray(items[self._perm].T)
        self._inverse = np.empty(self._num_items, dtype=np.int32)  # item index -> norm-order position
        self._inverse[self._perm] = np.arange(self._num_items, dtype=np.int32)
        self._seen_pos = self._inverse[seen_indices]  # seen CSR in norm-order positions
        max_norm = float(item_norms.max()) if item_norms.size else 0.0
        # |float32 score - true score| <= this x |user vector|, any BLAS summation order.
        self._err_per_norm = SAFETY * (items.shape[1] + 2) * F32_EPS * max_norm
        self._unseen = self._num_items - _unique_seen_counts(seen_indptr, seen_indices, self._num_items)
        self._block_users = max(1, min(DENSE_MAX_BLOCK, DENSE_BLOCK_SCORES // max(1, self._num_items)))

    def topk(self, vecs: np.ndarray, users: np.ndarray, k: int, exclude_seen: bool) -> list[Result]:
        """Per user (range-checked int64 indices, their vectors): (items, float32 scores), best first; k >= 1.

        Each answer has exactly min(k, items not excluded) entries.
        """
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if users.size == 1:
            return [self._one(vecs, int(users[0]), k, exclude_seen)]
        out: list[Result] = []
        step = self._block_users
        for start in range(0, users.size, step):
            out.extend(self._block_topk(vecs[start : start + step], users[start : start + step], k, exclude_seen))
        return out

    def topk_excluding(self, vecs: np.ndarray, excluded: list[np.ndarray] | None, k: int) -> list[Result]:
        """Per row of `vecs` (query vectors of no stored user, e.g. computed from a request's history): (items,
        float32 scores), best first, leaving out the item indices `excluded[row]` (None: nothing); k >= 1.

        The same computation as `topk`, with the exclusions given instead of read from the seen CSR.
        """
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        n, b = self._num_items, vecs.shape[0]
        if excluded is None:
            excluded = [np.empty(0, dtype=np.int64)] * b
        if b == 1:
            ex = np.asarray(excluded[0], dtype=np.int64)
            return [self._one_excluding(vecs, self._inverse[ex], n - np.unique(ex).size, k)]
        out: list[Result] = []
        step = self._block_users
        for start in range(0, b, step):
            part = [np.asarray(e, dtype=np.int64) for e in excluded[start : start + step]]
            lens = np.fromiter((e.size for e in part), dtype=np.int64, count=len(part))
            flat = np.concatenate(part) if part else np.empty(0, dtype=np.int64)
            avail = n - _unique_seen_counts(np.concatenate([[0], np.cumsum(lens)]), flat, n)
            rows = np.repeat(np.arange(len(part)), lens)
            out.extend(self._block(vecs[start : start + step], rows, self._inverse[flat], avail, k))
        return out

    def _stride(self, k: int, width: int) -> int:
        # Sample width / stride scores, keep ~stride x k candidates.
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

    def _one(self, vecs: np.ndarray, user: int, k: int, exclude_seen: bool) -> Result:
        """`_block` for one user with scalar bookkeeping (the /recommend hot path)."""
        if exclude_seen:
            return self._one_excluding(vecs, self._seen_pos[self._indptr[user] : self._indptr[user + 1]],
                                       int(self._unseen[user]), k)
        return self._one_excluding(vecs, self._seen_pos[:0], self._num_items, k)

    def _one_excluding(self, vecs: np.ndarray, seen: np.ndarray, avail: int, k: int) -> Result:
        """One query's top-k: `seen` the norm-order positions left out, `avail` the items not left out."""
        n = self._num_items
        kk = min(k, avail)
        if kk == 0:
            return empty_result()
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

    def _block_topk(self, vecs: np.ndarray, users: np.ndarray, k: int, exclude_seen: bool) -> list[Result]:
        if exclude_seen:
            seen_rows, seen_pos = self._seen_entries(users)
            return self._block(vecs, seen_rows, seen_pos, self._unseen[users], k)
        none = np.empty(0, dtype=np.int64)
        return self._block(vecs, none, none, np.full(users.size, self._num_items, dtype=np.int64), k)

    def _block(self, vecs: np.ndarray, seen_rows: np.ndarray, seen_pos: np.ndarray, avail: np.ndarray,
               k: int) -> list[Result]:
        """Top-k of a block of queries: (seen_rows, seen_pos) the (row, norm-order position) pairs left out,
        `avail` each row's count of items not left out."""
        n = self._num_items
        b = vecs.shape[0]
        vec64 = vecs.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", vec64, vec64))
        errs = self._err_per_norm * norms
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
        results: list[Result] = [empty_result()] * b
        for level in np.unique(tier).tolist():
            group = np.flatnonzero(tier == level)
            if group.size:
                self._group(vecs, k, group, int(width[group].max()), lower, errs, full, kk, seen_rows,
                                  seen_pos, results)
        return results

    def _group(self, vecs, k, group, width, lower, errs, full, kk, seen_rows, seen_pos, results) -> None:
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
        flat = np.flatnonzero(scores >= bounds[:, None])  # row-major flat indices: cheaper than a 2-D np.nonzero
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
