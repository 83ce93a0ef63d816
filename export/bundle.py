"""Write a verified serving bundle from user/item vectors (numpy, onnx, onnxruntime, faiss; no torch).

Bundle format (format_version 1)
================================
A bundle is a directory holding exactly these files:

``model.onnx``
    The user tower: input ``user_index`` int64 ``[batch]`` -> output ``user_vector``
    float32 ``[batch, dim]``. For our two-tower models the serving-time user tower is a
    lookup of the final user vectors (for LightGCN: already propagated), so the graph is
    a single ``Gather(axis=0)`` over an initializer ``user_table`` float32
    ``[num_users, dim]`` embedded in the file (no external data), dynamic batch axis,
    opset ``ONNX_OPSET`` (17) and IR version ``ONNX_IR_VERSION`` (8). It passes
    ``onnx.checker.check_model(full_check=True)``. Note ORT's Gather wraps negative
    indices, so callers range-check indices first (serving does).
``items.faiss``
    ``faiss.write_index`` of the item index. Exact: ``IndexFlatIP`` over the item
    vectors (``query_transform: "none"``). Approximate (any other factory string, e.g.
    ``HNSW32``, ``IVF256,Flat``, ``IVF256,SQ8``, ``IVF256,PQ8``): built with metric L2 over
    items augmented with ``sqrt(max_norm^2 - |x|^2)`` as a last coordinate, queried with a
    0 appended (``query_transform: "ip2l2"``), which turns max inner product into nearest
    neighbour; raw-IP IVF/HNSW lose recall on trained MF vectors whose norms are skewed.
    When a PQ/SQ factory needs a dimension divisible by its code count, zero columns are
    added after that coordinate (``index.index_dim``); they change no distance.
    ``index_factory="auto"`` picks Flat up to ``AUTO_EXACT_MAX_ITEMS`` items, else
    ``AUTO_APPROX_FACTORY`` (falling back to Flat when it misses the recall floor).
    Approximate indexes get the smallest nprobe/efSearch reaching ``recall_floor``
    (``index.search_params``, applied by the loader).
``user_ids.npy``, ``item_ids.npy``
    External ids, numpy unicode arrays (row i = index i), saved with allow_pickle=False.
``seen.npz``
    CSR of each user's training items: ``indptr`` int64 ``[num_users+1]``, ``indices``
    int64; used to exclude seen items and for the popularity fallback.
``manifest.json``
    ``format_version``, ``dim``, ``metric: "inner_product"``, ``num_users``, ``num_items``,
    ``index {factory, requested, auto_note, exact, query_transform, metric_faiss,
    search_params, recall_at_k, k, recall_sample_users, max_norm, index_dim}`` (``auto_note``
    says why ``auto`` fell back to Flat, else null; ``index_dim`` is ``dim`` for "none" and
    ``dim + 1 + padding`` for "ip2l2": queries get zeros appended up to it), ``onnx {opset, ir_version, input, output}``,
    ``files {name: {sha256, bytes}}`` for the five files above, ``lineage`` (caller's dict:
    checkpoint fingerprint, mlflow run id / model version when known), ``metrics`` (the
    student's test metrics), ``versions`` (package, python, numpy, onnx, onnxruntime,
    faiss), ``created_at`` (UTC ISO 8601), ``parity_max_abs_diff`` (ORT vs input user
    vectors over every user), ``reference_topk_users`` (users whose top-k was checked
    against the caller's reference; 0 when none).

Writing is atomic: everything goes to a temp dir beside ``out_dir``, is verified (ONNX
parity for every user, recall of approximate indexes, top-k against a reference for exact
indexes, then the serving loader's own checks), and only then renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from serving.bundle import (
    DATA_FILES,
    FORMAT_VERSION,
    INDEX_FILE,
    ITEM_IDS_FILE,
    MANIFEST_FILE,
    METRIC,
    MODEL_FILE,
    SEEN_FILE,
    USER_IDS_FILE,
    BundleError,
    verify_bundle,
)

__all__ = [
    "AUTO_APPROX_FACTORY",
    "AUTO_EXACT_MAX_ITEMS",
    "ExportError",
    "BundleError",
    "topk_mismatch",
    "verify_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)

ONNX_OPSET = 17  # Gather is unchanged since opset 13; 17 loads in every ORT >= 1.12.
ONNX_IR_VERSION = 8  # the IR version that goes with opset 17
ONNX_INPUT = "user_index"
ONNX_OUTPUT = "user_vector"
ONNX_TABLE = "user_table"
# Protobuf cannot serialise a message over 2 GiB and we refuse external data.
ONNX_MAX_TABLE_BYTES = 2_000_000_000

# `--index auto`: exact IndexFlatIP up to this many items, AUTO_APPROX_FACTORY above.
# Measured on this dev box (2 shared cores, faiss-cpu 1.15.1, 1 OpenMP thread), median of
# 30 single-query IndexFlatIP searches with k=400 (k=100 plus a seen-item over-fetch):
#     items    dim=20    dim=64
#     10k      0.17 ms   0.19 ms
#     50k      0.35 ms   0.46 ms
#     100k     0.66 ms   1.36 ms
#     200k     1.28 ms   3.05 ms
#     500k     3.38 ms   7.15 ms
#     1M       6.41 ms  15.9 ms
# Serving targets p50 <= 2 ms per HTTP request end to end, so the search may take at most
# ~0.5 ms: exact search stays under that up to 50k items at dim 64. Our data sets
# (ML-1M ~3.7k, CiteULike-t ~25k, Gowalla ~41k items) all stay exact.
AUTO_EXACT_MAX_ITEMS = 50_000
# Above the threshold: HNSW32 with the ip2l2 reduction (no training; efSearch tuned to the
# recall floor). Measured here, 100k items, dim 64, k=100, 1 thread: on embedding-like data
# (rank-8 signal + noise) recall@100 0.986 / 0.997 at efSearch 128 / 256, 0.33 / 0.51 ms a
# query, versus 1.36 ms for Flat. On structureless Gaussian vectors no efSearch up to 512
# gets past 0.5 recall, so `auto` falls back to exact Flat when the floor is missed.
AUTO_APPROX_FACTORY = "HNSW32"
# efSearch beyond this buys little recall and costs more than exact search (15 ms at
# efSearch 2048 on 200k items, dim 64, against 3 ms for Flat).
MAX_EF_SEARCH = 512
# Most zero columns appended after the ip2l2 coordinate to suit a PQ/SQ factory.
MAX_INDEX_PAD = 64

RECALL_SAMPLE_USERS = 2000
PARITY_ATOL = 1e-5
PARITY_BATCH = 65_536
TIE_ATOL = 1e-6
_F32_EPS = float(np.finfo(np.float32).eps)


class ExportError(Exception):
    """Export refused; the message is one line saying why."""


# --------------------------------------------------------------------------- helpers
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _as_ids(ids: Any, name: str, expected: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ExportError(f"{name} must be 1-D, got shape {arr.shape}")
    arr = arr.astype(np.str_)
    if arr.shape[0] != expected:
        raise ExportError(f"{name} has {arr.shape[0]} ids but there are {expected} vectors")
    if np.unique(arr).shape[0] != arr.shape[0]:
        raise ExportError(f"{name} contains duplicate external ids")
    return arr


def _as_vectors(vectors: Any, name: str) -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ExportError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ExportError(f"{name} must be floating point, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ExportError(f"{name} contains NaN or inf")
    return arr


def _as_csr(indptr: Any, indices: Any, num_users: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    ptr, idx = np.asarray(indptr), np.asarray(indices)
    if ptr.ndim != 1 or idx.ndim != 1 or (ptr.size and ptr.dtype.kind not in "iu") or (idx.size and idx.dtype.kind not in "iu"):
        raise ExportError("seen_indptr/seen_indices must be 1-D integer arrays")
    ptr, idx = ptr.astype(np.int64), idx.astype(np.int64)
    if ptr.shape[0] != num_users + 1:
        raise ExportError(f"seen_indptr has length {ptr.shape[0]}, expected num_users + 1 = {num_users + 1}")
    if ptr[0] != 0 or ptr[-1] != idx.shape[0] or np.any(np.diff(ptr) < 0):
        raise ExportError("seen_indptr is not a monotone CSR pointer from 0 to len(seen_indices)")
    if idx.size and (idx.min() < 0 or idx.max() >= num_items):
        raise ExportError(f"seen_indices must lie in [0, {num_items})")
    return ptr, idx


def _package_versions(package_version: str) -> dict[str, str]:
    return {
        "package": package_version,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "faiss": faiss.__version__,
    }


# ------------------------------------------------------------------------------ ONNX
def build_user_tower(user_vectors: np.ndarray, *, producer_version: str = "") -> onnx.ModelProto:
    """A single Gather over an embedded user-vector table; checked with full_check."""
    if user_vectors.nbytes > ONNX_MAX_TABLE_BYTES:
        raise ExportError(
            f"user table is {user_vectors.nbytes} bytes, over the {ONNX_MAX_TABLE_BYTES}-byte protobuf limit "
            "for an embedded initializer"
        )
    dim = int(user_vectors.shape[1])
    table = numpy_helper.from_array(user_vectors, name=ONNX_TABLE)
    node = helper.make_node("Gather", [ONNX_TABLE, ONNX_INPUT], [ONNX_OUTPUT], axis=0, name="user_lookup")
    graph = helper.make_graph(
        [node],
        "user_tower",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["batch", dim])],
        initializer=[table],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="compress",
        producer_version=producer_version,
        doc_string="User tower: final user vectors looked up by user index.",
    )
    model.ir_version = ONNX_IR_VERSION
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"{MODEL_FILE}: onnx.checker rejected the user tower ({' '.join(str(exc).split())})") from exc
    return model


def _ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _ort_vectors(session: ort.InferenceSession, users: np.ndarray) -> np.ndarray:
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: users.astype(np.int64)})[0]


def _parity(session: ort.InferenceSession, user_vectors: np.ndarray) -> float:
    """Max |ORT(user) - user_vectors[user]| over every user, in batches."""
    worst = 0.0
    for start in range(0, user_vectors.shape[0], PARITY_BATCH):
        users = np.arange(start, min(start + PARITY_BATCH, user_vectors.shape[0]), dtype=np.int64)
        out = _ort_vectors(session, users)
        if out.shape != (users.size, user_vectors.shape[1]):
            raise ExportError(f"{MODEL_FILE}: ORT output shape {out.shape} != {(users.size, user_vectors.shape[1])}")
        worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - user_vectors[users]))))
    return worst


# ----------------------------------------------------------------------------- FAISS
def ip2l2_items(items: np.ndarray) -> tuple[np.ndarray, float]:
    """Append sqrt(M^2 - |x|^2) so L2 nearest neighbours of [q, 0] are max inner products."""
    sq = np.einsum("ij,ij->i", items.astype(np.float64), items.astype(np.float64))
    max_sq = float(sq.max())
    extra = np.sqrt(np.maximum(max_sq - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([items, extra[:, None]]), dtype=np.float32), float(np.sqrt(max_sq))


def _ip2l2_queries(queries: np.ndarray, index_dim: int) -> np.ndarray:
    """Queries get 0 for the norm coordinate and for any padding."""
    pad = np.zeros((queries.shape[0], index_dim - queries.shape[1]), np.float32)
    return np.ascontiguousarray(np.hstack([queries, pad]))


def resolve_factory(index_factory: str, num_items: int) -> str:
    if index_factory == "auto":
        return "Flat" if num_items <= AUTO_EXACT_MAX_ITEMS else AUTO_APPROX_FACTORY
    return index_factory


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
        raise ExportError(
            f"index factory {factory!r} rejected by faiss ({' '.join(str(first_error).split())[:200]})"
        ) from first_error
    if pad:
        logger.info("index %s: padded ip2l2 vectors from %d to %d dims", factory, dim + 1, dim + 1 + pad)
        augmented = np.ascontiguousarray(np.hstack([augmented, np.zeros((augmented.shape[0], pad), np.float32)]))
    try:
        ivf = faiss.extract_index_ivf(index)
    except Exception:
        ivf = None
    if ivf is not None and ivf.nlist > items.shape[0]:
        raise ExportError(f"index factory {factory!r} has {ivf.nlist} lists but only {items.shape[0]} items to train on")
    try:
        if not index.is_trained:
            index.train(augmented)
        index.add(augmented)
    except Exception as exc:
        raise ExportError(f"building index {factory!r} failed ({' '.join(str(exc).split())[:200]})") from exc
    return index, False, max_norm


def _tunable(index: faiss.Index, k: int) -> tuple[str | None, list[int]]:
    """The search parameter that trades speed for recall and the values to try, cheapest first."""
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except Exception:
        nlist = None
    if nlist is not None:
        values, v = [], max(1, nlist // 64)
        while v < nlist:
            values.append(v)
            v *= 2
        return "nprobe", values + [nlist]
    space = faiss.ParameterSpace()
    try:
        space.set_index_parameter(index, "efSearch", float(max(64, k)))
    except Exception:
        return None, []
    cap = max(MAX_EF_SEARCH, 2 * k)
    values, v = [], max(64, k)
    while v < cap:
        values.append(v)
        v *= 2
    return "efSearch", values + [cap]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(np.intersect1d(f[f >= 0], t).size for f, t in zip(found, truth))
    return hits / (k * truth.shape[0])


def _tune_recall(
    index: faiss.Index, items: np.ndarray, queries: np.ndarray, k: int, recall_floor: float
) -> tuple[dict[str, int], float]:
    """Smallest nprobe/efSearch reaching recall_floor (or the largest tried) and its recall@k."""
    truth_index = faiss.IndexFlatIP(items.shape[1])
    truth_index.add(items)
    _, truth = truth_index.search(queries, k)
    aug_q = _ip2l2_queries(queries, index.d)
    name, values = _tunable(index, k)
    space = faiss.ParameterSpace()
    if name is None:
        _, found = index.search(aug_q, k)
        return {}, _recall(found, truth)
    recall = 0.0
    for value in values:
        space.set_index_parameter(index, name, float(value))
        _, found = index.search(aug_q, k)
        recall = _recall(found, truth)
        logger.info("recall@%d with %s=%d: %.4f", k, name, value, recall)
        if recall >= recall_floor:
            return {name: value}, recall
    return {name: values[-1]}, recall


# ----------------------------------------------------------------------- top-k check
def topk_mismatch(
    user_vector: np.ndarray,
    item_vectors: np.ndarray,
    got: np.ndarray,
    reference: np.ndarray,
    seen: np.ndarray | None = None,
) -> str | None:
    """Why `got` is not an acceptable top-k given `reference`, or None when it is.

    Scores are recomputed in float64. Items whose reference scores tie (within
    TIE_ATOL plus the float32 rounding bound 2*d*eps*sum|q_i x_i|, since reference and
    bundle scored in float32 with different summation orders) are compared as sets;
    elsewhere order must match exactly. The last tie group may hold any tied item
    (the tie can extend past k), so there only the scores must agree.
    """
    got, reference = np.asarray(got, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    if got.shape != reference.shape:
        return f"{got.size} items != reference {reference.size}"
    if np.unique(got).size != got.size:
        return "duplicate items"
    if seen is not None and seen.size and np.isin(got, seen).any():
        return f"contains seen items {got[np.isin(got, seen)][:5].tolist()}"
    if got.size == 0:
        return None
    q = user_vector.astype(np.float64)
    x_got, x_ref = item_vectors[got].astype(np.float64), item_vectors[reference].astype(np.float64)
    s_got, s_ref = x_got @ q, x_ref @ q
    scale = max(float(np.abs(x_got * q).sum(1).max()), float(np.abs(x_ref * q).sum(1).max()))
    tol = TIE_ATOL + 2.0 * q.size * _F32_EPS * scale
    bad = np.flatnonzero(np.abs(s_got - s_ref) > tol)
    if bad.size:
        i = int(bad[0])
        return (
            f"position {i}: item {got[i]} (score {s_got[i]:.7g}) vs reference item {reference[i]} "
            f"(score {s_ref[i]:.7g}), tolerance {tol:.2g}"
        )
    # Tie groups: maximal runs of consecutive reference scores within tol.
    breaks = np.flatnonzero(np.abs(np.diff(s_ref)) > tol) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [reference.size]])
    for start, end in zip(starts[:-1], ends[:-1]):  # all but the last group
        if set(got[start:end].tolist()) != set(reference[start:end].tolist()):
            return f"positions {start}-{end - 1}: items {got[start:end].tolist()} != reference {reference[start:end].tolist()}"
    return None


def _bundle_topk(
    session: ort.InferenceSession,
    index: faiss.Index,
    users: np.ndarray,
    k: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    num_items: int,
) -> list[np.ndarray]:
    """ORT user vector -> FAISS search (over-fetch by seen count) -> seen removed -> first k."""
    vecs = _ort_vectors(session, users)
    seen_len = indptr[users + 1] - indptr[users]
    fetch = int(min(num_items, k + int(seen_len.max(initial=0))))
    _, found = index.search(np.ascontiguousarray(vecs, dtype=np.float32), fetch)
    out = []
    for row, user in enumerate(users.tolist()):
        cand = found[row][found[row] >= 0]
        seen = indices[indptr[user] : indptr[user + 1]]
        out.append(cand[~np.isin(cand, seen)][:k])
    return out


# ------------------------------------------------------------------------- placement
def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ExportError(f"{out} is not empty; pass --overwrite (overwrite=True from Python) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _install(tmp: Path, out: Path) -> None:
    """Rename the verified temp dir into place; an existing bundle is swapped out, not merged."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the previous bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------ main entry
def write_bundle(
    out_dir: str | Path,
    *,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    index_factory: str = "auto",
    k_max: int = 100,
    recall_floor: float = 0.95,
    force: bool = False,
    overwrite: bool = False,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    reference_topk: tuple[np.ndarray, np.ndarray] | None = None,
    package_version: str,
) -> dict[str, Any]:
    """Write, verify and atomically install a bundle at `out_dir`; returns the manifest.

    Raises ExportError (one-line message) when inputs are inconsistent, ONNX parity
    exceeds PARITY_ATOL, an approximate index's recall@k_max is below `recall_floor`
    (unless `force`), the exact index's top-k differs from `reference_topk`, or the
    serving loader rejects the result. Nothing is left at `out_dir` on failure.
    """
    out = Path(out_dir)
    users_f32 = _as_vectors(user_vectors, "user_vectors")
    items_f32 = _as_vectors(item_vectors, "item_vectors")
    if users_f32.shape[1] != items_f32.shape[1]:
        raise ExportError(f"user dim {users_f32.shape[1]} != item dim {items_f32.shape[1]}")
    num_users, dim = users_f32.shape
    num_items = items_f32.shape[0]
    uids = _as_ids(user_ids, "user_ids", num_users)
    iids = _as_ids(item_ids, "item_ids", num_items)
    indptr, indices = _as_csr(seen_indptr, seen_indices, num_users, num_items)
    if isinstance(k_max, bool) or int(k_max) < 1:
        raise ExportError(f"k_max must be >= 1, got {k_max}")
    if not 0.0 <= recall_floor <= 1.0:
        raise ExportError(f"recall_floor must be in [0, 1], got {recall_floor}")
    if reference_topk is not None:
        ref_users = np.asarray(reference_topk[0], dtype=np.int64)
        ref_items = np.asarray(reference_topk[1], dtype=np.int64)
        if ref_items.ndim != 2 or ref_items.shape[0] != ref_users.shape[0]:
            raise ExportError(f"reference_topk items shape {ref_items.shape} does not match {ref_users.shape[0]} users")
        if ref_users.size and (ref_users.min() < 0 or ref_users.max() >= num_users):
            raise ExportError("reference_topk users out of range")
    _prepare_out_dir(out, overwrite)
    factory = resolve_factory(index_factory, num_items)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a serving user must be able to read it
        # 1. ONNX user tower + parity for every user.
        model = build_user_tower(users_f32, producer_version=package_version)
        onnx.save_model(model, str(tmp / MODEL_FILE))
        del model
        session = _ort_session(tmp / MODEL_FILE)
        parity = _parity(session, users_f32)
        if parity > PARITY_ATOL:
            raise ExportError(f"{MODEL_FILE}: ONNX Runtime output differs from user_vectors by {parity:.3g} > {PARITY_ATOL}")
        logger.info("ONNX parity over %d users: max abs diff %.3g", num_users, parity)

        # 2. Item index (+ recall for approximate ones).
        index, exact, max_norm = _build_index(factory, items_f32)
        k_rec = min(int(k_max), num_items)
        sample_n = min(RECALL_SAMPLE_USERS, num_users)
        search_params: dict[str, int] = {}
        auto_note: str | None = None
        recall = 1.0
        if not exact:
            sample = np.sort(np.random.default_rng(0).choice(num_users, sample_n, replace=False))
            search_params, recall = _tune_recall(index, items_f32, users_f32[sample], k_rec, recall_floor)
            logger.info("index %s: recall@%d = %.4f with %s", factory, k_rec, recall, search_params)
            if recall < recall_floor:
                msg = (
                    f"index {factory!r} recall@{k_rec} = {recall:.4f} < recall_floor {recall_floor} "
                    f"(best {search_params or 'default params'}); use a more exact index or force=True"
                )
                if index_factory == "auto":
                    # `auto` promises a usable index, not a particular one: exact is always correct.
                    auto_note = f"{factory} reached recall@{k_rec} {recall:.4f} < {recall_floor}; fell back to Flat"
                    logger.warning("auto index: %s", auto_note)
                    factory = "Flat"
                    index, exact, max_norm = _build_index(factory, items_f32)
                    search_params, recall = {}, 1.0
                elif not force:
                    raise ExportError(msg)
                else:
                    logger.warning("forced export: %s", msg)
        index_dim = int(index.d)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        del index

        # 3. Ids and seen CSR.
        np.save(tmp / USER_IDS_FILE, uids, allow_pickle=False)
        np.save(tmp / ITEM_IDS_FILE, iids, allow_pickle=False)
        np.savez(tmp / SEEN_FILE, indptr=indptr, indices=indices)

        # 4. Reference top-k through the written files (exact index only: an approximate
        #    index is allowed to differ, its recall is recorded instead).
        ref_checked = 0
        if reference_topk is not None and ref_users.size:
            if exact:
                written = faiss.read_index(str(tmp / INDEX_FILE))
                got = _bundle_topk(session, written, ref_users, ref_items.shape[1], indptr, indices, num_items)
                for row, user in enumerate(ref_users.tolist()):
                    seen = indices[indptr[user] : indptr[user + 1]]
                    why = topk_mismatch(users_f32[user], items_f32, got[row], ref_items[row], seen)
                    if why is not None:
                        raise ExportError(f"top-k of user {user} ({uids[user]}) differs from the checkpoint's reference: {why}")
                ref_checked = int(ref_users.size)
                logger.info("bundle top-%d equals the reference for %d users", ref_items.shape[1], ref_checked)
            else:
                logger.info("approximate index: reference top-k not compared (recall@%d recorded instead)", k_rec)
        del session

        # 5. Manifest (hashes of the verified files), then the serving loader's checks.
        files = {}
        for name in DATA_FILES:
            _fsync_file(tmp / name)
            files[name] = {"sha256": _sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "dim": int(dim),
            "metric": METRIC,
            "num_users": int(num_users),
            "num_items": int(num_items),
            "index": {
                "factory": factory,
                "requested": index_factory,
                "auto_note": auto_note,
                "exact": exact,
                "query_transform": "none" if exact else "ip2l2",
                "metric_faiss": "inner_product" if exact else "l2",
                "search_params": search_params,
                "recall_at_k": float(recall),
                "k": k_rec,
                "recall_sample_users": 0 if exact and auto_note is None else int(sample_n),
                "max_norm": max_norm,
                "index_dim": index_dim,
            },
            "onnx": {"opset": ONNX_OPSET, "ir_version": ONNX_IR_VERSION, "input": ONNX_INPUT, "output": ONNX_OUTPUT},
            "files": files,
            "lineage": dict(lineage),
            "metrics": dict(metrics),
            "versions": _package_versions(package_version),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parity_max_abs_diff": parity,
            "reference_topk_users": ref_checked,
        }
        try:
            text = json.dumps(manifest, indent=2, default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"{MANIFEST_FILE}: lineage/metrics not JSON serialisable ({exc})") from exc
        (tmp / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")
        _fsync_file(tmp / MANIFEST_FILE)
        try:
            verify_bundle(tmp)
        except BundleError as exc:
            raise ExportError(f"serving loader rejects the new bundle: {exc}") from exc
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    logger.info("wrote bundle %s (%s, %d users, %d items, dim %d)", out, factory, num_users, num_items, dim)
    return manifest
