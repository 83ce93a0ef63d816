"""The serving bundle format: everything the writer (`export.bundle`) and the reader (`serving.bundle`) agree on.

Bundle format (format_version 2; version 1 is still read)
=========================================================
A bundle is a directory holding these files:

``model.onnx`` (``MODEL_FILE``)
    The user tower, of one of two kinds (manifest ``user_tower.kind``, ``USER_TOWER_KINDS``; a manifest without
    ``user_tower`` is an ID tower, as every bundle written before history towers is).

    ID tower (``"id"``): input ``user_index`` (``ONNX_INPUT``) int64 ``[batch]`` -> output ``user_vector``
    (``ONNX_OUTPUT``) float32 ``[batch, dim]``. For our two-tower models the serving-time user tower is a
    lookup of the final user vectors (for LightGCN: already propagated): a ``Gather(axis=0)`` of the rows of
    an initializer ``user_table`` (``ONNX_TABLE``) ``[num_users, dim]`` embedded in the file (no external
    data), dynamic batch axis, opset ``ONNX_OPSET`` and IR version ``ONNX_IR_VERSION``. The table is float32
    (``quantization.user_table: "fp32"``, the graph is the Gather alone), float16 (``"fp16"``: Gather then
    ``Cast`` to float) or int8 with a float32 per-row scale ``user_scale`` (``ONNX_SCALE``) ``[num_users, 1]``
    (``"int8"``: Gather, Cast, times the gathered scale: row = q * scale with q = round(v / scale) in
    [-127, 127], scale = max|v| / 127). It passes ``onnx.checker.check_model(full_check=True)``. ORT's
    Gather wraps negative indices, so callers range-check indices first (serving does).

    History tower (``"history"``, from a ``model.kind: history`` checkpoint): the user vector is computed from
    the user's items, so a user never seen in training is served from the history a request brings. Inputs
    ``history`` (``ONNX_HISTORY``) int64 ``[batch, length]`` (item indices, oldest first, right-padded with any
    valid item index; ``length`` is dynamic, at most ``user_tower.max_len``) and ``lengths``
    (``ONNX_LENGTHS``) int64 ``[batch]`` (each row's count of real entries, ``0 <= lengths <= length``) ->
    ``user_vector`` float32 ``[batch, dim]``. With ``E`` the float32 initializer ``history_table``
    (``ONNX_HISTORY_TABLE``) ``[num_items, dim]``: ``mean = sum(E[h]) / max(len(h), 1)`` over each row's
    real entries (an empty history pools to zeros), ``user = mean + W2 relu(W1 mean + b1) + b2`` (two
    ``Gemm`` with ``transB=1`` over ``mlp_in_weight [hidden, dim]``, ``mlp_in_bias``, ``mlp_out_weight
    [dim, hidden]``, ``mlp_out_bias``). Always float32 (``quantization.user_table: "fp32"``). The history of a
    training user (its ``{"user_id": ...}`` requests) is its row of ``seen.npz``, which for a history bundle
    holds the training items in split order, oldest first: the tower reads the last ``max_len`` of them
    (``csr_histories``; a request's histories are padded by ``pad_histories``).
``items.faiss`` (``INDEX_FILE``)
    ``faiss.write_index`` of the item index. Exact scans (``query_transform: "none"``, metric inner product):
    ``IndexFlatIP`` (``Flat``) over the item vectors, or ``IndexScalarQuantizer`` codes (``SQfp16``, ``SQ8``:
    per-dimension 8-bit range codes) of them; serving scores an exact scan with dense numpy over the vectors
    reconstructed from the index, so its answers are exact for the stored vectors. Approximate (other factory
    strings, e.g. ``HNSW32``, ``IVF256,Flat``, ``IVF256,SQ8``, ``IVF256,PQ8``): built with metric L2 over items
    augmented with ``sqrt(max_norm^2 - |x|^2)`` as a last coordinate (``compressor.retrieval.ip2l2_items``),
    queried with a 0 appended (``query_transform: "ip2l2"``, ``ip2l2_queries``), which turns max inner product
    into nearest neighbour; raw-IP IVF/HNSW lose recall on trained MF vectors whose norms are skewed. When a
    PQ/SQ factory needs a dimension divisible by its code count, zero columns are added after that coordinate
    (``index.index_dim``); they change no distance. Approximate indexes get the smallest nprobe/efSearch
    reaching ``recall_floor`` (``index.search_params``, applied by the loader). ``index_factory="auto"``
    measures candidates and keeps the smallest that serves as well as the exact scan (``export.index_auto``).
User ids, item ids (``ids_file``: ``user_ids.npy`` or ``user_ids.npz``, ``item_ids.*`` alike)
    Row i = index i, no duplicates, loaded without pickle (``decode_ids``). When every id is a canonical
    decimal integer (``0``, ``-12``, ``314``; not ``007``, ``+1``, ``-0``) that fits int64: ``<role>_ids.npy``,
    a 1-D int32 array (int64 when a value needs it); else ``<role>_ids.npz`` (``np.savez_compressed``) with
    ``blob`` uint8 (the UTF-8 bytes of every id, concatenated) and ``offsets`` int64 ``[n + 1]`` (id i is
    ``blob[offsets[i]:offsets[i + 1]]``). Either way the ids round-trip to the exact strings the export got.
    (Version 1: ``user_ids.npy`` / ``item_ids.npy`` as fixed-width numpy unicode arrays.)
``seen.npz`` (``SEEN_FILE``)
    CSR of each user's training items, ``np.savez_compressed``: ``indptr`` ``[num_users+1]`` and ``indices``,
    each int32 when its values fit, else int64 (``check_csr``); used to exclude seen items and for the
    popularity fallback. A row keeps the order the export was given (the writer never sorts it): for a history
    tower that is the user's history, oldest first. (Version 1: both int64, not compressed; the loader reads
    either.)
``manifest.json`` (``MANIFEST_FILE``)
    ``format_version``, ``dim``, ``metric: "inner_product"``, ``num_users``, ``num_items``,
    ``ids {user, item: {file, encoding}}`` (encoding ``int32``, ``int64`` or ``utf8``; version 2 only),
    ``seen {indptr, indices, compressed}`` (their dtypes), ``index {factory, requested, auto_note, exact, codec,
    query_transform, metric_faiss, search_params, recall_at_k, k, recall_sample_users, max_norm, index_dim,
    auto}`` (``exact``: an exact scan of the stored vectors; ``codec``: how the index stores item vectors,
    ``fp32``/``fp16``/``int8``, or ``factory`` when an explicit factory string decides; ``auto``: what
    ``index_factory="auto"`` measured and why it chose, else null; ``auto_note``: that reason in one line;
    ``index_dim`` is ``dim`` for "none" and ``dim + 1 + padding`` for "ip2l2": queries get zeros appended up
    to it), ``quantization {user_table, item_codes, user_max_abs_error, passed, forced, check}`` (``check``: the
    export's measured top-k agreement with the fp32 answers and, with test data, NDCG, null for fp32; ``forced``:
    kept although it failed), ``onnx {opset, ir_version, input, output}`` (a history tower's ``input`` is
    ``history``), ``user_tower`` (``{kind: "id"}``, or ``{kind: "history", max_len, inputs: ["history",
    "lengths"]}``; absent: an ID tower), ``files {name: {sha256, bytes}}`` for the five data files
    (``data_files``), ``lineage`` (caller's dict: checkpoint fingerprint, mlflow run id / model version when
    known), ``metrics`` (the student's test metrics), ``versions`` (package, python, numpy, onnx, onnxruntime,
    faiss), ``created_at`` (UTC ISO 8601), ``parity_max_abs_diff`` (ORT vs the vectors the graph stores, over
    every user), ``reference_topk_users`` (users whose served top-k was checked against a reference; 0 when
    none).

Writing is atomic: everything goes to a temp dir beside the bundle's directory, is verified (ONNX parity for
every user, recall of approximate indexes, the quantization check, then the serving loader's own checks and,
for exact scans, the served top-k against a reference), and only then renamed into place.

The checks here raise `FormatError` with a message naming the rule that failed; the writer and the reader
put their own context (argument or file name) in front. This module imports only numpy and onnxruntime.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
INDEX_FILE = "items.faiss"
SEEN_FILE = "seen.npz"
ID_ROLES = ("user", "item")
# Version 1's id files (numpy unicode arrays); version 2 names them by encoding (`ids_file`).
USER_IDS_FILE = "user_ids.npy"
ITEM_IDS_FILE = "item_ids.npy"
V1_DATA_FILES: tuple[str, ...] = (MODEL_FILE, INDEX_FILE, USER_IDS_FILE, ITEM_IDS_FILE, SEEN_FILE)
ID_ENCODINGS = ("int32", "int64", "utf8")
QUERY_TRANSFORMS = ("none", "ip2l2")
METRIC = "inner_product"
QUANTIZATIONS = ("fp32", "fp16", "int8")

ONNX_INPUT = "user_index"
ONNX_OUTPUT = "user_vector"
ONNX_TABLE = "user_table"
ONNX_SCALE = "user_scale"
# The history tower (``user_tower.kind: "history"``).
USER_TOWER_KINDS = ("id", "history")
ONNX_HISTORY = "history"
ONNX_LENGTHS = "lengths"
ONNX_HISTORY_TABLE = "history_table"
HISTORY_INPUTS = (ONNX_HISTORY, ONNX_LENGTHS)
ONNX_OPSET = 17  # Gather/Cast/Mul are unchanged since opset 13; 17 loads in every ORT >= 1.12.
ONNX_IR_VERSION = 8  # the IR version that goes with opset 17

# A canonical decimal integer: what str(int) writes. "007", "+1", "-0", " 1" and non-ASCII digits are not.
_CANONICAL_INT = re.compile(r"(0|-?[1-9][0-9]*)\Z")
_I32, _I64 = np.iinfo(np.int32), np.iinfo(np.int64)


class FormatError(ValueError):
    """A value breaks the bundle format; the message names the rule, the caller adds where it came from."""


def short_error(exc: BaseException) -> str:
    """An exception's message on one line, at most 200 characters (libraries print multi-line messages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:200] + "..."


def check_ids(ids: np.ndarray, expected: int, count_name: str) -> np.ndarray:
    """External ids: a 1-D unicode array of `expected` distinct ids (`count_name` names that count)."""
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise FormatError(f"expected a 1-D unicode array, got {ids.dtype}{list(ids.shape)}")
    if ids.shape[0] != expected:
        raise FormatError(f"length {ids.shape[0]} != {count_name} {expected}")
    if np.unique(ids).shape[0] != ids.shape[0]:
        raise FormatError("external ids are not unique")
    return ids


def ids_file(role: str, encoding: str) -> str:
    """The version-2 file of the `role` ("user"/"item") ids stored as `encoding`."""
    return f"{role}_ids.npy" if encoding in ("int32", "int64") else f"{role}_ids.npz"


# Bounds on what a compressed array may inflate to before it is read (a small file can inflate a thousandfold).
MAX_ID_BYTES = 8192  # UTF-8 bytes of one external id (a long URL fits)
NPY_HEADER_BYTES = 4096


def encode_ids(ids: np.ndarray) -> tuple[str, bytes]:
    """A unicode id array -> (encoding, the file's bytes): integers when every id is canonical, else UTF-8 + offsets."""
    values = ids.tolist()
    if values and all(len(v) <= 20 and _CANONICAL_INT.match(v) for v in values):  # int64 has <= 20 chars
        ints = [int(v) for v in values]
        lo, hi = min(ints), max(ints)
        if _I64.min <= lo and hi <= _I64.max:
            encoding = "int32" if _I32.min <= lo and hi <= _I32.max else "int64"
            buf = io.BytesIO()
            np.save(buf, np.array(ints, dtype=encoding), allow_pickle=False)
            return encoding, buf.getvalue()
    try:
        encoded = [v.encode("utf-8") for v in values]
    except UnicodeEncodeError as exc:
        raise FormatError(f"id {exc.object!r} is not encodable as UTF-8") from None
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    if lengths.size and int(lengths.max()) > MAX_ID_BYTES:
        raise FormatError(f"an id is longer than {MAX_ID_BYTES} UTF-8 bytes ({int(lengths.max())})")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, blob=np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets=offsets)
    return "utf8", buf.getvalue()


def check_inflated(npz, limits: dict[str, int]) -> None:
    """Refuse an .npz whose arrays would inflate past ``limits`` ({array name: most bytes of its data})."""
    for name, limit in limits.items():
        try:
            size = npz.zip.getinfo(f"{name}.npy").file_size
        except KeyError:
            continue  # a missing array is reported by the caller, by name
        if size > limit + NPY_HEADER_BYTES:
            raise FormatError(f"array {name} would inflate to {size:,} bytes, more than {limit:,} for this bundle")


def decode_ids(data: bytes, encoding: str, expected: int | None = None) -> np.ndarray:
    """A stored id file -> the ids as a 1-D numpy unicode array; `encoding` "unicode" is version 1's .npy.
    With ``expected`` (the manifest's count) a compressed file is refused before it inflates past what that many
    ids of at most MAX_ID_BYTES can take."""
    if encoding == "utf8":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if sorted(npz.files) != ["blob", "offsets"]:
                raise FormatError(f"expected arrays blob and offsets, found {sorted(npz.files)}")
            if expected is not None:
                check_inflated(npz, {"blob": MAX_ID_BYTES * expected, "offsets": 8 * (expected + 1)})
            blob, offsets = npz["blob"], npz["offsets"]
        if blob.ndim != 1 or blob.dtype != np.uint8 or offsets.ndim != 1 or offsets.dtype != np.int64:
            raise FormatError(f"blob must be 1-D uint8 and offsets 1-D int64, got {blob.dtype} and {offsets.dtype}")
        if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != blob.size or np.any(np.diff(offsets) < 0):
            raise FormatError("offsets are not a monotone 0..len(blob) pointer")
        if offsets.size > 1 and int(np.diff(offsets).max()) > MAX_ID_BYTES:
            raise FormatError(f"an id is longer than {MAX_ID_BYTES} UTF-8 bytes")
        raw = blob.tobytes()
        bounds = offsets.tolist()
        try:
            values = [raw[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]
        except UnicodeDecodeError as exc:
            raise FormatError(f"an id is not valid UTF-8 ({exc.reason})") from None
        return np.array(values, dtype=np.str_) if values else np.empty(0, dtype="<U1")
    ids = np.load(io.BytesIO(data), allow_pickle=False)
    if encoding == "unicode":
        return ids
    if encoding not in ("int32", "int64"):
        raise FormatError(f"id encoding {encoding!r} not in {ID_ENCODINGS}")
    if ids.ndim != 1 or ids.dtype != np.dtype(encoding):
        raise FormatError(f"expected a 1-D {encoding} array, got {ids.dtype}{list(ids.shape)}")
    return ids.astype(np.str_)


def data_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The files a manifest's `files` must cover: fixed in version 1, the id files by encoding in version 2."""
    if manifest.get("format_version") == 1:
        return V1_DATA_FILES
    ids = manifest.get("ids")
    if not isinstance(ids, dict):
        raise FormatError("ids missing or not an object")
    names = []
    for role in ID_ROLES:
        entry = ids.get(role)
        if not isinstance(entry, dict) or entry.get("encoding") not in ID_ENCODINGS:
            raise FormatError(f"ids.{role}.encoding missing or not in {ID_ENCODINGS}")
        if entry.get("file") != ids_file(role, entry["encoding"]):
            raise FormatError(f"ids.{role}.file {entry.get('file')!r} != {ids_file(role, entry['encoding'])!r}")
        names.append(entry["file"])
    return (MODEL_FILE, INDEX_FILE, *names, SEEN_FILE)


def smallest_int(values: np.ndarray) -> np.ndarray:
    """int32 when every value fits, else int64 (for the seen CSR)."""
    if values.size == 0 or (_I32.min <= values.min() and values.max() <= _I32.max):
        return values.astype(np.int32)
    return values.astype(np.int64)


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


@dataclass(frozen=True)
class UserTower:
    """What a bundle's ``model.onnx`` computes from: a user index (``"id"``) or a padded history (``"history"``,
    reading at most ``max_len`` items)."""

    kind: str = "id"
    max_len: int = 0

    @property
    def is_history(self) -> bool:
        return self.kind == "history"

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's ``user_tower`` object."""
        if not self.is_history:
            return {"kind": "id"}
        return {"kind": "history", "max_len": self.max_len, "inputs": list(HISTORY_INPUTS)}


def read_user_tower(manifest: dict[str, Any]) -> UserTower:
    """The manifest's ``user_tower`` (absent: an ID tower, as in every bundle written before history towers)."""
    entry = manifest.get("user_tower", {"kind": "id"})
    if not isinstance(entry, dict) or entry.get("kind") not in USER_TOWER_KINDS:
        kind = entry.get("kind") if isinstance(entry, dict) else entry
        raise FormatError(f"user_tower.kind {kind!r} not in {USER_TOWER_KINDS}")
    if entry["kind"] == "id":
        return UserTower()
    max_len = entry.get("max_len")
    if type(max_len) is not int or max_len < 1:
        raise FormatError(f"user_tower.max_len must be a positive integer, got {max_len!r}")
    if entry.get("inputs") != list(HISTORY_INPUTS):
        raise FormatError(f"user_tower.inputs {entry.get('inputs')!r} != {list(HISTORY_INPUTS)}")
    return UserTower("history", max_len)


def pad_histories(histories: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Item-index histories (oldest first) -> the history tower's inputs: ``history`` [n, L] int64 right-padded
    with item 0 (L = the longest row, at least 1) and ``lengths`` [n] int64."""
    if len(histories) == 1 and histories[0].size:  # one request: no padding at all
        return np.asarray(histories[0], dtype=np.int64).reshape(1, -1), np.array([histories[0].size], dtype=np.int64)
    lengths = np.fromiter((h.size for h in histories), dtype=np.int64, count=len(histories))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(histories).astype(np.int64) if histories else np.empty(0, dtype=np.int64)
    return csr_histories(indptr, flat, np.arange(len(histories)), max(int(lengths.max(initial=0)), 1))


def csr_histories(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The history tower's inputs for CSR rows ``rows`` (e.g. training users in ``seen.npz``): the last
    ``max_len`` items of each row, order kept, padded as ``pad_histories`` pads."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = indptr[rows + 1]
    lengths = np.minimum(ends - indptr[rows], max_len).astype(np.int64)
    out = np.zeros((rows.size, max(int(lengths.max(initial=0)), 1)), dtype=np.int64)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[np.repeat(np.arange(rows.size), lengths), cols] = indices[np.repeat(ends - lengths, lengths) + cols]
    return out, lengths


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
