"""Top-K items for a set of users by inner product, via FAISS.

The one module that owns "top-K items for these users" (steps 1-2 of RCE-KD, evaluation
candidates, RRD's teacher lists). numpy float32 in, numpy out; never a users x items matrix.
Its one sibling is ``cluster_search`` (``distill.index: UserClusters``), which answers the same question for
every user at once with torch, and so stays out of this torch-free module that export imports.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from .files import atomic_write_bytes

__all__ = ["EXACT_FACTORIES", "Searcher", "TopKSearcher", "TrainedQuantizer", "ip2l2_items", "measure_recall",
           "recall_at_k", "recall_sample", "scores_buffer", "set_thread_count", "topk_cached", "blocked_torch_topk"]

logger = logging.getLogger("compressor.retrieval")

EXACT_FACTORIES = frozenset({"Flat", "FlatIP"})  # factory strings of the exact search
# (user, item) pairs per block when recomputing the true scores of approximate results: bounds the sparse
# pattern's index arrays (pair_products.listed_inner_products).
_RESCORE_BLOCK_PAIRS = 1 << 24


def set_thread_count(n: int) -> None:
    """Set FAISS's OpenMP thread count (and nothing else)."""
    faiss.omp_set_num_threads(int(n))


def _as_f32(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {arr.shape}")
    return arr


@dataclass(frozen=True, eq=False)  # (no equality over a FAISS index)
class TrainedQuantizer:
    """The trained, empty structure of an approximate searcher (an IVF coarse quantizer, searched through the
    ip2l2 reduction: ``index.d == dim + 1``): what the next searcher of the same factory and dimension starts
    from instead of training k-means again (``TopKSearcher(trained_like=...)``)."""

    factory: str
    dim: int
    index: faiss.Index

    def to_bytes(self) -> np.ndarray:
        """uint8 [n]: a run saves it with its resume state, so a resumed refresh starts from the same quantizer."""
        return faiss.serialize_index(self.index)

    @classmethod
    def from_bytes(cls, factory: str, dim: int, blob: np.ndarray) -> TrainedQuantizer:
        """``to_bytes`` read back; ValueError when the blob is not an empty IVF structure of that dimension."""
        index = faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        if _try_extract_ivf(index) is None:
            raise ValueError(f"a {type(index).__name__} structure, not the IVF one a {factory} refresh keeps")
        if index.d != dim + 1 or index.ntotal != 0:
            raise ValueError(f"a trained {factory} structure of dim {index.d - 1} with {index.ntotal} vectors; "
                             f"expected an empty one of dim {dim}")
        return cls(factory, dim, index)


class TopKSearcher:
    """Maximum-inner-product search over a fixed set of item vectors.

    ``factory`` is a FAISS index-factory string. "Flat"/"FlatIP" is exact (IndexFlatIP);
    anything else (e.g. "IVF64,Flat", "HNSW32") is approximate and searched through the
    inner-product -> L2 reduction (``transform == "ip2l2"``). ``params`` holds search-time
    parameters such as {"nprobe": 16} or {"efSearch": 128}. Scores returned are always the
    true inner products.
    """

    def __init__(
        self,
        item_vectors: np.ndarray,
        factory: str = "Flat",
        use_gpu: bool = False,
        params: Mapping[str, int | float] | None = None,
        seed: int = 0,
        trained_like: TrainedQuantizer | None = None,
    ) -> None:
        """``trained_like``: an earlier searcher's trained structure (``trained``, an IVF coarse quantizer),
        reused instead of trained again when its factory and dimension match: only the new vectors are added.
        The per-epoch refresh of a moving student keeps it while the measured recall holds."""
        items = _as_f32(item_vectors, "item_vectors")
        self.factory = factory
        self.is_exact = factory in EXACT_FACTORIES
        self.n_items, self.dim = items.shape
        self.params = dict(params or {})
        self.on_gpu = False
        self._items = items  # kept to recompute true scores for approximate results
        self._gpu_res = None
        self.trained: TrainedQuantizer | None = None  # an empty trained copy, for the next searcher (IVF only)
        self.reused_training = False

        if self.is_exact:
            self.transform = "none"
            index = faiss.IndexFlatIP(self.dim)
            index.add(items)
        else:  # approximate: searched through the inner-product -> L2 reduction (ip2l2_items)
            self.transform = "ip2l2"
            aug, self._max_norm = ip2l2_items(items)
            if trained_like is not None and trained_like.factory == factory and trained_like.dim == self.dim:
                index = faiss.clone_index(trained_like.index)  # the trained quantizer, no vectors
                self.reused_training = True
            else:
                index = faiss.index_factory(self.dim + 1, factory, faiss.METRIC_L2)
                ivf = _try_extract_ivf(index)
                if ivf is not None:
                    ivf.cp.seed = int(seed)  # reproducible k-means
                if not index.is_trained:
                    index.train(aug)
            # An empty trained copy, for the next searcher to start from (IVF only: HNSW has nothing to reuse).
            if _try_extract_ivf(index) is not None:
                empty = faiss.clone_index(index)
                empty.reset()
                self.trained = TrainedQuantizer(factory, self.dim, empty)
            index.add(aug)

        ivf = _try_extract_ivf(index) if not self.is_exact else None
        self._nlist = None if ivf is None else int(ivf.nlist)
        if use_gpu:
            index = self._to_gpu(index)
        self.index = index
        self._apply_params()

    def release(self) -> TrainedQuantizer | None:
        """Drop the searchable index and the vectors, returning what ``trained_like`` reuses (None for an exact
        or HNSW index). The searcher cannot search afterwards."""
        self.index = None
        self._items = None
        self._gpu_res = None
        return self.trained

    def _to_gpu(self, index: faiss.Index) -> faiss.Index:
        """Move the index to GPU 0 when this FAISS build can; otherwise warn and stay on CPU."""
        if not faiss_has_gpu():
            logger.warning("use_gpu requested but FAISS has no usable GPU; searching on CPU")
            return index
        try:
            self._gpu_res = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        except RuntimeError as exc:  # e.g. HNSW has no GPU implementation
            logger.warning("could not move %r index to GPU (%s); searching on CPU", self.factory, exc)
            self._gpu_res = None
            return index
        self.on_gpu = True
        return gpu_index

    @property
    def nlist(self) -> int | None:
        """The IVF list count of an IVF index (None for any other; read before a move to the GPU, whose IVF
        indexes FAISS's extract_index_ivf does not see)."""
        return self._nlist

    def set_params(self, **params) -> None:
        """Change search-time parameters (e.g. nprobe=32) of a built index."""
        self.params.update(params)
        self._apply_params()

    def _apply_params(self) -> None:
        if not self.params:
            return
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        for name, value in self.params.items():
            space.set_index_parameter(self.index, name, value)

    def search(
        self, user_vectors: np.ndarray, k: int, block: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per user, best first.

        user_vectors [n, dim] -> (scores [n, k] float32 true inner products,
        ids [n, k] int64). Searches ``block`` users at a time. An approximate index that
        finds fewer than k items for a user pads with id -1 and score -inf.
        """
        users = _as_f32(user_vectors, "user_vectors")
        if users.shape[1] != self.dim:
            raise ValueError(f"user_vectors have dim {users.shape[1]}, items have {self.dim}")
        if not 0 < k <= self.n_items:
            raise ValueError(f"k must be in 1..{self.n_items}, got {k}")
        n = users.shape[0]
        scores = np.empty((n, k), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int64)
        for start in range(0, n, block):
            q = users[start : start + block]
            if self.is_exact:
                s, i = self.index.search(q, k)
            else:
                s, i = self._search_ip2l2(q, k)
            scores[start : start + len(q)] = s
            ids[start : start + len(q)] = i
        return scores, ids

    def _search_ip2l2(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # Put each query on the items' sphere (norm R). The item order is unchanged, since
        # |q' - x'|^2 = |q'|^2 + R^2 - 2 q'.x for every x, but a query left near the origin
        # would rank IVF centroids (norm < R) by their norm, not their direction.
        q_norm = np.linalg.norm(q, axis=1, keepdims=True)
        scale = np.where(q_norm > 0, self._max_norm / np.maximum(q_norm, 1e-30), 1.0)
        q_aug = np.hstack([q * scale.astype(np.float32), np.zeros((len(q), 1), dtype=np.float32)])
        q_aug = np.ascontiguousarray(q_aug, dtype=np.float32)
        _, ids = self.index.search(q_aug, k)
        ids = ids.astype(np.int64, copy=False)
        valid = ids >= 0
        # L2 distances of the augmented vectors lose precision for large norms, so recompute
        # the true inner products of the returned ids and re-sort by them.
        from .pair_products import listed_inner_products  # lazy: this module stays torch-free for export

        s = listed_inner_products(q, self._items, np.where(valid, ids, 0), block=_RESCORE_BLOCK_PAIRS)
        s[~valid] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)


def faiss_has_gpu() -> bool:
    """True when this FAISS build can search on a CUDA device (faiss-gpu and a visible GPU)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_SPLIT_SCORES = 1 << 20  # scores from which _selected splits its rows over threads (below, not worth it)
_POOLS: dict[int, ThreadPoolExecutor] = {}  # by thread count; a forked child starts without (its threads are gone)
os.register_at_fork(after_in_child=_POOLS.clear)


def topk_rows(scores, k: int):
    """``torch.topk(scores, k, dim=1)`` for [n, c] scores on the CPU: (values, column indices) best first, the same
    values (NaN ranked first, as torch does); the columns differ only where exact ties straddle the k-th place or
    share a value.

    torch's CPU topk selects over every score of a row one at a time (~6 ns per score here, docs/benchmarks.md 4j)
    and sorts its k; numpy's introselect and a sort of the k chosen cost about half of it on 1,000-column rows.
    Where a row is long against k (c >= 25 k) it is cheaper still in three passes: the row is cut into
    b ~ sqrt(c / k) blocks of interleaved columns (block j: columns j, j + m, j + 2m, ... for m = c // b, so that
    their maxima are an element-wise max of b contiguous slices), the k blocks with the largest maxima are chosen,
    and the top-k is taken among those blocks' k b scores. Exact: an element of the row's top-k lies in a chosen
    block, since every chosen block holds a distinct element at least as large as the k-th chosen maximum, so a
    block not chosen, whose maximum is no larger, can hold none above it. The columns past the last whole block
    are always candidates. Elsewhere (other devices, dtypes numpy lacks, k = c) it is torch.topk."""
    import torch  # lazy, as exact_topk_on_device

    n, c = scores.shape
    if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64) or n == 0 or not 0 < k < c:
        top = torch.topk(scores, k, dim=1)
        return top.values, top.indices
    if c < 25 * k:
        return _selected(scores, k)
    block = max(2, round(math.sqrt(c / k)))
    m = c // block
    maxima = scores.contiguous()[:, : m * block].view(n, block, m).amax(dim=1)  # [n, m]: block j's maximum
    cols = (_selected(maxima, k, ordered=False)[1].unsqueeze(2) + m * torch.arange(block)).view(n, k * block)
    if m * block < c:
        cols = torch.cat([cols, torch.arange(m * block, c).expand(n, -1)], dim=1)
    values, picked = _selected(scores.gather(1, cols), k)
    return values, cols.gather(1, picked)


def _selected(scores, k: int, ordered: bool = True):
    """(values, columns) of each row's k largest by numpy's introselect, best first if ``ordered`` (a stable sort
    of the k); numpy releases the GIL there, so a large input's rows are split over torch's thread count."""
    import torch

    a, threads = scores.detach().numpy(), torch.get_num_threads()
    if threads < 2 or a.size < _SPLIT_SCORES or a.shape[0] < 2 * threads:
        values, cols = _selected_rows(a, k, ordered)
    else:
        pool = _POOLS.get(threads) or _POOLS.setdefault(threads, ThreadPoolExecutor(threads, "topk"))
        try:
            parts = list(pool.map(lambda rows: _selected_rows(a[rows[0]:rows[-1] + 1], k, ordered),
                                  np.array_split(np.arange(a.shape[0]), threads)))
            values, cols = np.concatenate([v for v, _ in parts]), np.concatenate([c for _, c in parts])
        except RuntimeError:  # no new work after the interpreter began to shut down: on this thread
            values, cols = _selected_rows(a, k, ordered)
    return torch.from_numpy(values), torch.from_numpy(cols)


def _selected_rows(a: np.ndarray, k: int, ordered: bool) -> tuple[np.ndarray, np.ndarray]:
    cols = np.argpartition(a, a.shape[1] - k, axis=1)[:, a.shape[1] - k:]
    values = np.take_along_axis(a, cols, 1)
    if ordered:  # (NaN first, as torch.topk ranks it)
        order = np.argsort(np.where(np.isnan(values), -np.inf, -values), axis=1, kind="stable")
        values, cols = np.take_along_axis(values, order, 1), np.take_along_axis(cols, order, 1)
    return values, cols


def scores_buffer(user_vecs, item_vecs, rows: int):
    """An uninitialised [rows, n_items] block that a loop over user blocks computes every block's scores into
    (``torch.mm(..., out=)``). A fresh block per iteration pays its first touch (page faults over ~170 MB at 1,024 x
    41k items), which at 20 dims took longer than the product itself (docs/benchmarks.md 3d)."""
    import torch  # lazy, as exact_topk_on_device

    return torch.empty((rows, item_vecs.shape[0]), dtype=user_vecs.dtype, device=user_vecs.device)


def exact_topk_on_device(user_vectors, item_vectors, k: int, block: int | None = None):
    """Exact top-k by inner product with torch on the tensors' own device (blocked matmul + topk).

    The exact refresh of a distillation run on the CPU (faster than IndexFlatIP there, docs/benchmarks.md 4l) and
    on CUDA when FAISS has no GPU support (milliseconds on a GPU, and the ids never leave the device); also the
    recall check and UserClusters' candidate lists. user_vectors [n, d], item_vectors [n_items, d] torch tensors
    -> (scores [n, k], ids [n, k] int64) on their device, best first. Same answer as IndexFlatIP up to the order
    of exact ties.
    """
    import torch  # lazy: this module stays torch-free for export, which imports it for ip2l2 and recall

    n_items = item_vectors.shape[0]
    if not 0 < k <= n_items:
        raise ValueError(f"k must be in 1..{n_items} (the number of items), got {k}")
    # <= 1 GiB of scores; on the CPU 256 MiB, as topk_rows' introselect adds int64 column indices twice their size
    block = block or max(1, min(8192, (1 << (28 if user_vectors.device.type != "cpu" else 26)) // n_items))
    n = user_vectors.shape[0]
    scores = torch.empty((n, k), dtype=item_vectors.dtype, device=item_vectors.device)
    ids = torch.empty((n, k), dtype=torch.int64, device=item_vectors.device)
    with torch.no_grad():
        items_t = item_vectors.t().contiguous()
        buffer = scores_buffer(user_vectors, item_vectors, min(block, n))
        for start in range(0, n, block):
            rows = user_vectors[start:start + block]
            scores[start:start + len(rows)], ids[start:start + len(rows)] = topk_rows(
                torch.mm(rows, items_t, out=buffer[: len(rows)]), k)
    return scores, ids


def _try_extract_ivf(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


class Searcher(Protocol):
    """What the refresh's recall floor (``kd_retrieval``) and ``measure_recall`` use of a top-k search over fixed
    items: ``TopKSearcher`` and ``cluster_search.UserClusterSearcher``."""

    is_exact: bool
    params: dict

    def search(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def set_params(self, **params) -> None: ...


def measure_recall(searcher: Searcher, user_vectors: np.ndarray, item_vectors: np.ndarray, k: int,
                   sample_users: int = 1000, seed: int = 0) -> float:
    """Recall@k of ``searcher`` against exact search, on a random sample of users.

    Mean over sampled users of |approx top-k ∩ exact top-k| / k.
    """
    users = _as_f32(user_vectors, "user_vectors")
    sample = users[recall_sample(users.shape[0], sample_users, seed)]
    _, exact = TopKSearcher(item_vectors, "Flat").search(sample, k)
    _, approx = searcher.search(sample, k)
    return recall_at_k(approx, exact)


def recall_sample(n: int, size: int, seed: int = 0) -> np.ndarray:
    """The rows, ascending, of the users a recall check samples from n: min(size, n) distinct, fixed by seed."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Recall of an approximate top-k against the exact one: mean over rows of |found ∩ truth| / k.

    found [n, k'] item ids (-1 = padding, ignored), truth [n, k] exact ids; k = truth's width."""
    found, truth = np.asarray(found), np.asarray(truth)
    if truth.size == 0:
        return 1.0
    hits = sum(np.intersect1d(f[f >= 0], t).size for f, t in zip(found, truth))
    return hits / (truth.shape[0] * truth.shape[1])


def ip2l2_items(items: np.ndarray) -> tuple[np.ndarray, float]:
    """The inner-product -> L2 reduction of item vectors (Bachrach et al. 2014).

    Appends sqrt(R^2 - |x|^2) to every item, R the largest item norm, so that for a query q with 0 appended
    |q' - x'|^2 = |q|^2 + R^2 - 2 q.x: L2 order is inner-product order. items [n, d] -> (float32 [n, d + 1], R).
    Trained MF item norms are very skewed; IVF/HNSW over raw inner products cluster by direction and miss the
    long vectors that win most queries. After the reduction every item has norm R and k-means works."""
    items = np.asarray(items, dtype=np.float32)
    sq = np.einsum("ij,ij->i", items, items, dtype=np.float64)
    max_sq = float(sq.max()) if sq.size else 0.0
    extra = np.sqrt(np.maximum(max_sq - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([items, extra[:, None]]), dtype=np.float32), float(np.sqrt(max_sq))


def _cache_name(fingerprint: str, k: int, factory: str) -> str:
    key = json.dumps([fingerprint, int(k), factory], separators=(",", ":"))
    return "topk-" + hashlib.sha256(key.encode("utf-8")).hexdigest() + ".npy"


def topk_cached(
    cache_dir: str | os.PathLike,
    fingerprint: str,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    factory: str = "Flat",
    compute: Callable[[], np.ndarray] | None = None,
) -> np.ndarray:
    """Top-k item ids per user [n, k] int64, computed once and kept in ``cache_dir``.

    The file name is a sha256 of (fingerprint, k, factory); ``fingerprint`` must identify the
    vectors (e.g. the teacher checkpoint's hash) and whatever else decides the lists. ``compute``
    replaces the FAISS search with the caller's own (a masked exact search, say). A cached array
    with the wrong shape is recomputed. Writes are atomic (``files.atomic_write_bytes``).
    """
    cache = Path(cache_dir)
    path = cache / _cache_name(fingerprint, k, factory)
    n_users = np.asarray(user_vectors).shape[0]
    if path.exists():
        ids = np.load(path, allow_pickle=False)
        if ids.shape == (n_users, k) and ids.dtype == np.int64:
            logger.info("top-%d cache reused: %s", k, path)
            return ids
        logger.warning("top-%d cache %s has shape %s, expected %s; recomputing",
                       k, path, ids.shape, (n_users, k))
    if compute is not None:
        ids = np.ascontiguousarray(compute(), dtype=np.int64)
    else:
        _, ids = TopKSearcher(item_vectors, factory).search(user_vectors, k)
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    logger.info("top-%d computed (%s) and cached: %s", k, factory, path)
    return ids


def blocked_torch_topk(
    user_vectors: np.ndarray, item_vectors: np.ndarray, k: int, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: matmul + torch.topk over ``block`` users at a time.

    user_vectors [n, dim], item_vectors [n_items, dim] (numpy or torch) ->
    (scores [n, k] float32, ids [n, k] int64), best first.
    """
    import torch  # only this baseline needs torch

    users = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32))
    items = torch.as_tensor(np.asarray(item_vectors, dtype=np.float32))
    scores, ids = exact_topk_on_device(users, items, k, block=block)
    return scores.numpy(), ids.numpy().astype(np.int64)
