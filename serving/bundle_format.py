"""The serving bundle format: everything the writer (`export.bundle`) and the reader (`serving.bundle`) agree on.

Bundle format (format_version 1)
================================
A bundle is a directory holding exactly these files:

``model.onnx`` (``MODEL_FILE``)
    The user tower: input ``user_index`` (``ONNX_INPUT``) int64 ``[batch]`` -> output ``user_vector``
    (``ONNX_OUTPUT``) float32 ``[batch, dim]``. For our two-tower models the serving-time user tower is a
    lookup of the final user vectors (for LightGCN: already propagated), so the graph is a single
    ``Gather(axis=0)`` over an initializer ``user_table`` (``ONNX_TABLE``) float32 ``[num_users, dim]``
    embedded in the file (no external data), dynamic batch axis, opset ``ONNX_OPSET`` and IR version
    ``ONNX_IR_VERSION``. It passes ``onnx.checker.check_model(full_check=True)``. ORT's Gather wraps
    negative indices, so callers range-check indices first (serving does).
``items.faiss`` (``INDEX_FILE``)
    ``faiss.write_index`` of the item index. Exact: ``IndexFlatIP`` over the item vectors
    (``query_transform: "none"``). Approximate (any other factory string, e.g. ``HNSW32``, ``IVF256,Flat``,
    ``IVF256,SQ8``, ``IVF256,PQ8``): built with metric L2 over items augmented with ``sqrt(max_norm^2 - |x|^2)``
    as a last coordinate (``compressor.retrieval.ip2l2_items``), queried with a 0 appended
    (``query_transform: "ip2l2"``, ``ip2l2_queries``), which turns max inner product into nearest neighbour;
    raw-IP IVF/HNSW lose recall on trained MF vectors whose norms are skewed. When a PQ/SQ factory needs a
    dimension divisible by its code count, zero columns are added after that coordinate (``index.index_dim``);
    they change no distance. ``index_factory="auto"`` picks Flat up to ``export.index_build.AUTO_EXACT_MAX_ITEMS``
    items, else ``AUTO_APPROX_FACTORY`` (falling back to Flat when it misses the recall floor). Approximate
    indexes get the smallest nprobe/efSearch reaching ``recall_floor`` (``index.search_params``, applied by
    the loader).
``user_ids.npy``, ``item_ids.npy`` (``USER_IDS_FILE``, ``ITEM_IDS_FILE``)
    External ids, 1-D numpy unicode arrays without duplicates (row i = index i), saved with
    allow_pickle=False (``check_ids``).
``seen.npz`` (``SEEN_FILE``)
    CSR of each user's training items: ``indptr`` int64 ``[num_users+1]``, ``indices`` int64 (``check_csr``);
    used to exclude seen items and for the popularity fallback.
``manifest.json`` (``MANIFEST_FILE``)
    ``format_version``, ``dim``, ``metric: "inner_product"``, ``num_users``, ``num_items``,
    ``index {factory, requested, auto_note, exact, query_transform, metric_faiss, search_params, recall_at_k,
    k, recall_sample_users, max_norm, index_dim}`` (``auto_note`` says why ``auto`` fell back to Flat, else
    null; ``index_dim`` is ``dim`` for "none" and ``dim + 1 + padding`` for "ip2l2": queries get zeros
    appended up to it), ``onnx {opset, ir_version, input, output}``, ``files {name: {sha256, bytes}}`` for the
    five files above (``DATA_FILES``), ``lineage`` (caller's dict: checkpoint fingerprint, mlflow run id /
    model version when known), ``metrics`` (the student's test metrics), ``versions`` (package, python,
    numpy, onnx, onnxruntime, faiss), ``created_at`` (UTC ISO 8601), ``parity_max_abs_diff`` (ORT vs input
    user vectors over every user), ``reference_topk_users`` (users whose served top-k was checked against
    the caller's reference; 0 when none).

Writing is atomic: everything goes to a temp dir beside the bundle's directory, is verified (ONNX parity for
every user, recall of approximate indexes, then the serving loader's own checks and, for exact indexes, the
served top-k against a reference), and only then renamed into place.

The checks here raise `FormatError` with a message naming the rule that failed; the writer and the reader
put their own context (argument or file name) in front. This module imports only numpy and onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
INDEX_FILE = "items.faiss"
USER_IDS_FILE = "user_ids.npy"
ITEM_IDS_FILE = "item_ids.npy"
SEEN_FILE = "seen.npz"
DATA_FILES: tuple[str, ...] = (MODEL_FILE, INDEX_FILE, USER_IDS_FILE, ITEM_IDS_FILE, SEEN_FILE)
QUERY_TRANSFORMS = ("none", "ip2l2")
METRIC = "inner_product"

ONNX_INPUT = "user_index"
ONNX_OUTPUT = "user_vector"
ONNX_TABLE = "user_table"
ONNX_OPSET = 17  # Gather is unchanged since opset 13; 17 loads in every ORT >= 1.12.
ONNX_IR_VERSION = 8  # the IR version that goes with opset 17


class FormatError(ValueError):
    """A value breaks the bundle format; the message names the rule, the caller adds where it came from."""


def check_ids(ids: np.ndarray, expected: int, count_name: str) -> np.ndarray:
    """External ids: a 1-D unicode array of `expected` distinct ids (`count_name` names that count)."""
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise FormatError(f"expected a 1-D unicode array, got {ids.dtype}{list(ids.shape)}")
    if ids.shape[0] != expected:
        raise FormatError(f"length {ids.shape[0]} != {count_name} {expected}")
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise FormatError("external ids are not unique")
    return ids


def check_csr(indptr: np.ndarray, indices: np.ndarray, num_users: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The seen CSR: a monotone int pointer of num_users + 1 entries from 0 to len(indices), items in range.

    Returns both arrays as int64. An empty array may have any dtype (it holds no value to misread).
    """
    ptr, idx = np.asarray(indptr), np.asarray(indices)
    if ptr.ndim != 1 or idx.ndim != 1 or any(a.size and a.dtype.kind not in "iu" for a in (ptr, idx)):
        raise FormatError("indptr/indices must be 1-D integer arrays")
    ptr, idx = ptr.astype(np.int64), idx.astype(np.int64)
    if ptr.shape[0] != num_users + 1:
        raise FormatError(f"indptr length {ptr.shape[0]} != num_users + 1 = {num_users + 1}")
    if ptr[0] != 0 or ptr[-1] != idx.shape[0] or np.any(np.diff(ptr) < 0):
        raise FormatError("indptr is not a monotone 0..len(indices) CSR pointer")
    if idx.size and (idx.min() < 0 or idx.max() >= num_items):
        raise FormatError(f"indices outside [0, num_items={num_items})")
    return ptr, idx


def ort_session(model: str | bytes, intra_op_num_threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of the user tower (a file path or the model's bytes), one inter-op thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def ip2l2_queries(queries: np.ndarray, index_dim: int) -> np.ndarray:
    """Queries as the index takes them: float32, C-contiguous, zeros appended up to `index_dim`.

    The items carry sqrt(max_norm^2 - |x|^2) and any codec padding in those columns; a query carries 0 in
    each, so L2 order over the index equals inner-product order. For "none" `index_dim` is the query's own.
    """
    queries = np.asarray(queries, dtype=np.float32)
    pad = index_dim - queries.shape[1]
    if pad:
        queries = np.hstack([queries, np.zeros((queries.shape[0], pad), dtype=np.float32)])
    return np.ascontiguousarray(queries)
