"""The bundle's item index: which FAISS factory, how it is built, and the search parameters that reach the recall floor.

Exact scans (`EXACT_SCAN`: Flat, and the SQfp16/SQ8 codes of a quantized bundle's "Flat") are built with metric
inner product over the item vectors. Every explicit factory string other than "Flat" is built with metric L2 over the ip2l2-augmented items
(`compressor.retrieval.ip2l2_items`), padded with zero columns when a PQ/SQ codec needs it, and gets the smallest
nprobe/efSearch whose recall@k against exact search reaches the floor. `index_factory="auto"` is
`export.index_auto`; "Flat" means the exact scan in the bundle's item codec (`EXACT_SCAN`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from compressor.retrieval import ip2l2_items, recall_at_k
from export.errors import ExportError
from serving.bundle_format import QUANTIZATIONS, ip2l2_queries

logger = logging.getLogger(__name__)

# The exact scan storing item vectors at each quantization: float32, float16 codes, 8-bit per-dimension range
# codes. The export's own quantization check decides whether the codes keep the answers.
EXACT_SCAN = {"fp32": "Flat", "fp16": "SQfp16", "int8": "SQ8"}
EXACT_SCANS = frozenset(EXACT_SCAN.values())
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
    codec: str = "fp32"
    search_params: dict[str, int] = field(default_factory=dict)
    recall: float = 1.0
    sample_users: int = 0
    auto_note: str | None = None
    auto: dict[str, Any] | None = None

    @property
    def query_transform(self) -> str:
        return "none" if self.exact else "ip2l2"

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's `index` object (see serving.bundle_format)."""
        return {
            "factory": self.factory,
            "requested": self.requested,
            "auto_note": self.auto_note,
            "exact": self.exact,
            "codec": self.codec,
            "query_transform": self.query_transform,
            "metric_faiss": "inner_product" if self.exact else "l2",
            "search_params": self.search_params,
            "recall_at_k": float(self.recall),
            "k": self.k,
            "recall_sample_users": self.sample_users,
            "max_norm": self.max_norm,
            "index_dim": int(self.index.d),
            "auto": self.auto,
        }


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def build_index(factory: str, items: np.ndarray, exact_scan: bool = False) -> tuple[faiss.Index, bool, float | None]:
    """Returns (index, exact, max_norm or None): an exact scan (`factory` in EXACT_SCANS) over inner product, any
    other factory string over ip2l2 ("Flat" is always the exact scan)."""
    dim = items.shape[1]
    if factory == "Flat" or exact_scan:
        if factory not in EXACT_SCANS:
            raise ExportError(f"exact scan {factory!r} not in {sorted(EXACT_SCANS)}")
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(items)
            index.add(items)
        except RuntimeError as exc:  # faiss's own errors (e.g. memory), as a one-line refusal
            raise ExportError(f"building exact scan {factory!r} failed ({_one_line(exc)})") from exc
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


@dataclass
class RecallSample:
    """Seeded users whose served vectors query each index, and the exact top-k over the true item vectors."""

    queries: np.ndarray
    truth: np.ndarray
    k: int

    @classmethod
    def draw(cls, items: np.ndarray, true_users: np.ndarray, served_users: np.ndarray, k: int) -> "RecallSample":
        sample_n = min(RECALL_SAMPLE_USERS, true_users.shape[0])
        sample = np.sort(np.random.default_rng(0).choice(true_users.shape[0], sample_n, replace=False))
        truth_index = faiss.IndexFlatIP(items.shape[1])
        truth_index.add(items)
        _, truth = truth_index.search(np.ascontiguousarray(true_users[sample]), k)
        return cls(np.ascontiguousarray(served_users[sample]), truth, k)

    @property
    def users(self) -> int:
        return int(self.queries.shape[0])


def tune_recall(index: faiss.Index, exact: bool, sample: RecallSample, recall_floor: float) -> tuple[dict[str, int], float]:
    """Smallest nprobe/efSearch reaching recall_floor (or the largest tried) and its recall@k."""
    k = sample.k
    queries = sample.queries if exact else ip2l2_queries(sample.queries, index.d)
    name, values = (None, []) if exact else _tunable(index, k)
    if name is None:
        _, found = index.search(queries, k)
        return {}, recall_at_k(found, sample.truth)
    space = faiss.ParameterSpace()
    recall = 0.0
    for value in values:
        space.set_index_parameter(index, name, float(value))
        _, found = index.search(queries, k)
        recall = recall_at_k(found, sample.truth)
        logger.info("recall@%d with %s=%d: %.4f", k, name, value, recall)
        if recall >= recall_floor:
            return {name: value}, recall
    return {name: values[-1]}, recall


def build_item_index(
    index_factory: str,
    items: np.ndarray,
    sample: RecallSample,
    recall_floor: float,
    force: bool,
    quantize: str = "fp32",
) -> ItemIndex:
    """Build the explicit factory `index_factory` ("Flat": the exact scan of `quantize`'s codec); approximate
    indexes are tuned on `sample`. Raises ExportError when one misses `recall_floor` (unless `force`)."""
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize {quantize!r} not in {QUANTIZATIONS}")
    exact_scan = index_factory == "Flat"
    factory = EXACT_SCAN[quantize] if exact_scan else index_factory
    index, exact, max_norm = build_index(factory, items, exact_scan)
    codec = quantize if exact_scan else "factory"
    built = ItemIndex(index, factory, index_factory, exact, max_norm, sample.k, codec=codec)
    if factory == "Flat":
        return built
    built.search_params, built.recall = tune_recall(index, exact, sample, recall_floor)
    built.sample_users = sample.users
    logger.info("index %s: recall@%d = %.4f with %s", factory, sample.k, built.recall, built.search_params)
    if exact or built.recall >= recall_floor:  # an exact scan's codes are judged by the quantization check
        return built
    msg = (
        f"index {factory!r} recall@{sample.k} = {built.recall:.4f} < recall_floor {recall_floor} "
        f"(best {built.search_params or 'default params'}); use a more exact index or force=True"
    )
    if not force:
        raise ExportError(msg)
    logger.warning("forced export: %s", msg)
    return built
