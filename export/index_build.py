"""The bundle's item index: which FAISS factory, how it is built, and the search parameters that reach the recall floor.

Exact (Flat) is IndexFlatIP over the item vectors. Every other factory is built with metric L2 over the
ip2l2-augmented items (`compressor.retrieval.ip2l2_items`), padded with zero columns when a PQ/SQ codec
needs it, and gets the smallest nprobe/efSearch whose recall@k against exact search reaches the floor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from compressor.retrieval import ip2l2_items, recall_at_k
from export.errors import ExportError
from serving.bundle_format import ip2l2_queries

logger = logging.getLogger(__name__)

# `--index auto`: exact IndexFlatIP up to this many items, AUTO_APPROX_FACTORY above. Serving's latency
# budget leaves the search a fraction of a millisecond per request, and exact search stays under it up to
# 50k items at dim 64 (see docs/benchmarks.md).
AUTO_EXACT_MAX_ITEMS = 50_000
# Above the threshold: HNSW32 with the ip2l2 reduction (no training; efSearch tuned to the recall floor).
# On structureless vectors no efSearch reaches the floor, so `auto` then falls back to exact Flat.
AUTO_APPROX_FACTORY = "HNSW32"
# efSearch beyond this buys little recall and costs more than exact search.
MAX_EF_SEARCH = 512
# Most zero columns appended after the ip2l2 coordinate to suit a PQ/SQ factory.
MAX_INDEX_PAD = 64
RECALL_SAMPLE_USERS = 2000


@dataclass
class ItemIndex:
    """A built item index and what the manifest records about it."""

    index: faiss.Index
    factory: str
    requested: str
    exact: bool
    max_norm: float | None
    k: int
    search_params: dict[str, int] = field(default_factory=dict)
    recall: float = 1.0
    sample_users: int = 0
    auto_note: str | None = None

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's `index` object (see serving.bundle_format)."""
        return {
            "factory": self.factory,
            "requested": self.requested,
            "auto_note": self.auto_note,
            "exact": self.exact,
            "query_transform": "none" if self.exact else "ip2l2",
            "metric_faiss": "inner_product" if self.exact else "l2",
            "search_params": self.search_params,
            "recall_at_k": float(self.recall),
            "k": self.k,
            "recall_sample_users": self.sample_users,
            "max_norm": self.max_norm,
            "index_dim": int(self.index.d),
        }


def resolve_factory(index_factory: str, num_items: int) -> str:
    if index_factory == "auto":
        return "Flat" if num_items <= AUTO_EXACT_MAX_ITEMS else AUTO_APPROX_FACTORY
    return index_factory


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _build_index(factory: str, items: np.ndarray) -> tuple[faiss.Index, bool, float | None]:
    """Returns (index, exact, max_norm or None)."""
    dim = items.shape[1]
    if factory == "Flat":
        index = faiss.IndexFlatIP(dim)
        index.add(items)
        return index, True, None
    augmented, max_norm = ip2l2_items(items)
    # PQ/SQ codecs need the dimension to be a multiple of their sub-quantizer count, and
    # ip2l2 makes it d+1 (65 for d=64, which no PQ8/PQ16 accepts). Zero columns change no
    # L2 distance, so pad with the fewest zeros the factory accepts.
    first_error: Exception | None = None
    for pad in range(MAX_INDEX_PAD + 1):
        try:
            index = faiss.index_factory(dim + 1 + pad, factory, faiss.METRIC_L2)
            break
        except Exception as exc:  # faiss raises RuntimeError for unusable factory strings
            first_error = first_error or exc
    else:
        raise ExportError(f"index factory {factory!r} rejected by faiss ({_one_line(first_error)})") from first_error
    if pad:
        logger.info("index %s: padded ip2l2 vectors from %d to %d dims", factory, dim + 1, dim + 1 + pad)
        augmented = np.ascontiguousarray(np.hstack([augmented, np.zeros((augmented.shape[0], pad), np.float32)]))
    ivf = _ivf(index)
    if ivf is not None and ivf.nlist > items.shape[0]:
        raise ExportError(f"index factory {factory!r} has {ivf.nlist} lists but only {items.shape[0]} items to train on")
    try:
        if not index.is_trained:
            index.train(augmented)
        index.add(augmented)
    except Exception as exc:
        raise ExportError(f"building index {factory!r} failed ({_one_line(exc)})") from exc
    return index, False, max_norm


def _ivf(index: faiss.Index):
    """The IVF part of an index, or None when it has none."""
    try:
        return faiss.extract_index_ivf(index)
    except Exception:
        return None


def _doubling(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... below stop, then stop."""
    values, v = [], start
    while v < stop:
        values.append(v)
        v *= 2
    return values + [stop]


def _tunable(index: faiss.Index, k: int) -> tuple[str | None, list[int]]:
    """The search parameter that trades speed for recall and the values to try, cheapest first."""
    ivf = _ivf(index)
    if ivf is not None:
        return "nprobe", _doubling(max(1, ivf.nlist // 64), ivf.nlist)
    try:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", float(max(64, k)))
    except Exception:
        return None, []
    return "efSearch", _doubling(max(64, k), max(MAX_EF_SEARCH, 2 * k))


def _tune_recall(
    index: faiss.Index, items: np.ndarray, queries: np.ndarray, k: int, recall_floor: float
) -> tuple[dict[str, int], float]:
    """Smallest nprobe/efSearch reaching recall_floor (or the largest tried) and its recall@k."""
    truth_index = faiss.IndexFlatIP(items.shape[1])
    truth_index.add(items)
    _, truth = truth_index.search(queries, k)
    aug_q = ip2l2_queries(queries, index.d)
    name, values = _tunable(index, k)
    if name is None:
        _, found = index.search(aug_q, k)
        return {}, recall_at_k(found, truth)
    space = faiss.ParameterSpace()
    recall = 0.0
    for value in values:
        space.set_index_parameter(index, name, float(value))
        _, found = index.search(aug_q, k)
        recall = recall_at_k(found, truth)
        logger.info("recall@%d with %s=%d: %.4f", k, name, value, recall)
        if recall >= recall_floor:
            return {name: value}, recall
    return {name: values[-1]}, recall


def build_item_index(
    index_factory: str,
    items: np.ndarray,
    users: np.ndarray,
    k_max: int,
    recall_floor: float,
    force: bool,
) -> ItemIndex:
    """Build the index `index_factory` asks for; approximate ones are tuned on a seeded sample of `users`.

    Raises ExportError when an explicitly requested approximate index misses `recall_floor` (unless
    `force`); `auto` falls back to exact Flat instead.
    """
    num_users, num_items = users.shape[0], items.shape[0]
    factory = resolve_factory(index_factory, num_items)
    k = min(int(k_max), num_items)
    index, exact, max_norm = _build_index(factory, items)
    built = ItemIndex(index, factory, index_factory, exact, max_norm, k)
    if exact:
        return built
    sample_n = min(RECALL_SAMPLE_USERS, num_users)
    sample = np.sort(np.random.default_rng(0).choice(num_users, sample_n, replace=False))
    built.search_params, built.recall = _tune_recall(index, items, users[sample], k, recall_floor)
    built.sample_users = int(sample_n)
    logger.info("index %s: recall@%d = %.4f with %s", factory, k, built.recall, built.search_params)
    if built.recall >= recall_floor:
        return built
    msg = (
        f"index {factory!r} recall@{k} = {built.recall:.4f} < recall_floor {recall_floor} "
        f"(best {built.search_params or 'default params'}); use a more exact index or force=True"
    )
    if index_factory == "auto":
        # `auto` promises a usable index, not a particular one: exact is always correct.
        note = f"{factory} reached recall@{k} {built.recall:.4f} < {recall_floor}; fell back to Flat"
        logger.warning("auto index: %s", note)
        del index, built
        flat, _, _ = _build_index("Flat", items)
        return ItemIndex(flat, "Flat", index_factory, True, None, k, sample_users=int(sample_n), auto_note=note)
    if not force:
        raise ExportError(msg)
    logger.warning("forced export: %s", msg)
    return built
