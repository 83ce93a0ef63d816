"""Load and check a serving bundle written by `export.bundle.write_bundle`.

The bundle format (files, manifest keys, the shared checks) is `serving.bundle_format`; the checks of
model.onnx, for either kind of user tower, are `serving.tower`. This module imports only numpy, onnx,
onnxruntime and faiss: never torch, `compressor` or mlflow, not even transitively.

Every check reads the bytes that were hashed (each file is read once, hashed, and
parsed from memory), so a file swapped between the hash check and the parse cannot
slip through. A failed check raises `BundleError("<file>: <check that failed>")`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort

from serving.bundle_format import (
    FORMAT_VERSION,
    INDEX_FILE,
    ITEM_IDS_FILE,
    MANIFEST_FILE,
    METRIC,
    MODEL_FILE,
    QUERY_TRANSFORMS,
    READABLE_FORMAT_VERSIONS,
    SEEN_FILE,
    USER_IDS_FILE,
    FormatError,
    UserTower,
    check_csr,
    check_ids,
    check_inflated,
    data_files,
    decode_ids,
    read_user_tower,
)
from serving.bundle_format import short_error as _short
from serving.tower import load_tower

logger = logging.getLogger(__name__)


class BundleError(Exception):
    """A bundle failed a check; the message is one line: '<file>: <check that failed>'."""


@dataclass(eq=False)
class Bundle:
    """Everything the recommender needs, loaded and cross-checked.

    `item_vectors` are reconstructed from the FAISS index (without the ip2l2 extra
    coordinate): exact for Flat/HNSW-Flat/IVF-Flat storage, the codec's approximation
    for SQ/PQ storage. They are used to compute inner-product scores of results.
    """

    path: Path
    manifest: dict[str, Any]
    session: ort.InferenceSession
    input_name: str
    output_name: str
    index: faiss.Index
    item_vectors: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_index: dict[str, int]
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    dim: int
    query_transform: str
    search_params: dict[str, int]
    # HNSW ignores k > efSearch (it returns fewer results), so the recommender
    # raises efSearch per call to the over-fetch size; only valid for a bare IndexHNSW.
    is_hnsw: bool = False
    checks: list[str] = field(default_factory=list)
    # What model.onnx computes from (manifest `user_tower`): a user index, or a history of items.
    user_tower: UserTower = field(default_factory=UserTower)

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    def seen(self, user: int) -> np.ndarray:
        """Training item indices of one user index (a view into the CSR)."""
        return self.seen_indices[self.seen_indptr[user] : self.seen_indptr[user + 1]]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fail(name: str, what: str) -> BundleError:
    # Keep messages on one line whatever the underlying library printed.
    return BundleError(f"{name}: {' '.join(str(what).split())}")


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise _fail(MANIFEST_FILE, f"missing in {root}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(MANIFEST_FILE, f"not parseable JSON ({_short(exc)})") from exc
    if not isinstance(manifest, dict):
        raise _fail(MANIFEST_FILE, "top level is not a JSON object")
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise _fail(
            MANIFEST_FILE,
            f"format_version {manifest.get('format_version')!r} unsupported (this reader reads "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}; the newest is {FORMAT_VERSION})",
        )
    for key, typ in (
        ("dim", int),
        ("num_users", int),
        ("num_items", int),
        ("metric", str),
        ("index", dict),
        ("onnx", dict),
        ("files", dict),
    ):
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise _fail(MANIFEST_FILE, f"key {key!r} missing or not {typ.__name__}")
    if manifest["metric"] != METRIC:
        raise _fail(MANIFEST_FILE, f"metric {manifest['metric']!r} unsupported (expected {METRIC!r})")
    for key in ("dim", "num_users", "num_items"):
        if manifest[key] <= 0:
            raise _fail(MANIFEST_FILE, f"{key} must be positive, got {manifest[key]}")
    index = manifest["index"]
    if index.get("query_transform") not in QUERY_TRANSFORMS:
        raise _fail(MANIFEST_FILE, f"index.query_transform {index.get('query_transform')!r} not in {QUERY_TRANSFORMS}")
    if not isinstance(index.get("search_params", {}), dict):
        raise _fail(MANIFEST_FILE, "index.search_params is not an object")
    for key in ("input", "output"):
        if not isinstance(manifest["onnx"].get(key), str):
            raise _fail(MANIFEST_FILE, f"onnx.{key} missing or not a string")
    try:
        read_user_tower(manifest)
    except FormatError as exc:
        raise _fail(MANIFEST_FILE, str(exc)) from None
    return manifest


def _read_hashed(root: Path, manifest: dict[str, Any], checks: list[str]) -> dict[str, bytes]:
    files = manifest["files"]
    try:
        names = data_files(manifest)
    except FormatError as exc:
        raise _fail(MANIFEST_FILE, str(exc)) from None
    blobs: dict[str, bytes] = {}
    for name in names:
        entry = files.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise _fail(MANIFEST_FILE, f"files.{name} missing sha256/bytes")
        path = root / name
        if not path.is_file():
            raise _fail(name, "missing")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise _fail(name, f"size {len(data)} bytes != manifest {entry['bytes']} (truncated or replaced)")
        if sha256_bytes(data) != entry["sha256"]:
            raise _fail(name, "sha256 does not match manifest (file modified)")
        blobs[name] = data
    checks.append("files: size and sha256 match manifest for " + ", ".join(names))
    return blobs


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set the manifest's search parameters (nprobe, efSearch) on `index`; raises naming the one that fails."""
    space = faiss.ParameterSpace()
    for key, value in params.items():
        try:
            space.set_index_parameter(index, str(key), float(value))
        except Exception as exc:
            raise ValueError(f"cannot apply search param {key}={value} ({_short(exc)})") from exc


def reconstruct_items(index: faiss.Index, num_items: int, dim: int) -> np.ndarray:
    """The item vectors as the index stores them (an SQ/PQ codec's reconstruction), without ip2l2 columns."""
    # IVF indexes need a direct map for reconstruct(); it is dropped again so that the index stays as it was
    # (a writer serialises it afterwards, and a direct map would add 8 bytes per item to the file).
    try:
        ivf = faiss.extract_index_ivf(index)
    except Exception:
        ivf = None
    added = ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap
    if added:
        ivf.make_direct_map()
    try:
        vectors = index.reconstruct_n(0, num_items)
    finally:
        if added:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
    return np.ascontiguousarray(vectors[:, :dim], dtype=np.float32)


def is_hnsw_index(index: faiss.Index) -> bool:
    """A bare HNSW index (its efSearch is raised per call to the over-fetch size)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


def _load_index(data: bytes, manifest: dict[str, Any], checks: list[str]) -> tuple[faiss.Index, np.ndarray, bool]:
    spec = manifest["index"]
    dim, num_items = manifest["dim"], manifest["num_items"]
    try:
        # A bytearray-backed array: faiss wants a writable buffer (one copy, not two).
        index = faiss.deserialize_index(np.frombuffer(bytearray(data), dtype=np.uint8))
    except Exception as exc:
        raise _fail(INDEX_FILE, f"cannot be read by faiss ({_short(exc)})") from exc
    ip2l2 = spec["query_transform"] == "ip2l2"
    # ip2l2 adds the norm coordinate plus any zero padding a PQ/SQ codec needed.
    want_d = spec.get("index_dim", dim + 1 if ip2l2 else dim)
    if not isinstance(want_d, int) or (want_d < dim + 1 if ip2l2 else want_d != dim):
        raise _fail(MANIFEST_FILE, f"index.index_dim {want_d!r} inconsistent with dim {dim} and {spec['query_transform']!r}")
    if index.d != want_d:
        raise _fail(
            INDEX_FILE,
            f"index dim {index.d} != manifest dim {dim}" + (f" + {want_d - dim} (ip2l2)" if ip2l2 else ""),
        )
    want_metric = faiss.METRIC_L2 if ip2l2 else faiss.METRIC_INNER_PRODUCT
    if index.metric_type != want_metric:
        raise _fail(
            INDEX_FILE,
            f"metric {index.metric_type} != {'L2' if ip2l2 else 'inner product'} required by query_transform {spec['query_transform']!r}",
        )
    if index.ntotal != num_items:
        raise _fail(INDEX_FILE, f"ntotal {index.ntotal} != num_items {num_items}")
    if not index.is_trained:
        raise _fail(INDEX_FILE, "index is not trained")
    checks.append(f"{INDEX_FILE}: d={index.d}, metric matches {spec['query_transform']!r}, ntotal={num_items}")

    params = spec.get("search_params", {}) or {}
    try:
        apply_search_params(index, params)
    except Exception as exc:
        raise _fail(INDEX_FILE, _short(exc)) from exc
    if params:
        checks.append(f"{INDEX_FILE}: applied search params {params}")
    try:
        vectors = reconstruct_items(index, num_items, dim)
    except Exception as exc:
        raise _fail(INDEX_FILE, f"cannot reconstruct item vectors for scoring ({_short(exc)})") from exc
    checks.append(f"{INDEX_FILE}: item vectors reconstructed ({num_items}x{dim})")
    return index, vectors, is_hnsw_index(index)


def _load_ids(manifest: dict[str, Any], role: str, blobs: dict[str, bytes], checks: list[str]) -> np.ndarray:
    """The `role` ("user"/"item") ids as a unicode array, from version 1's or version 2's layout."""
    if manifest["format_version"] == 1:
        name, encoding = (USER_IDS_FILE if role == "user" else ITEM_IDS_FILE), "unicode"
    else:
        name, encoding = manifest["ids"][role]["file"], manifest["ids"][role]["encoding"]
    expected, what = manifest[f"num_{role}s"], f"num_{role}s"
    try:
        ids = decode_ids(blobs[name], encoding, expected)
    except FormatError as exc:
        raise _fail(name, str(exc)) from None
    except Exception as exc:
        raise _fail(name, f"not a loadable .npy/.npz without pickle ({_short(exc)})") from exc
    try:
        check_ids(ids, expected, what)
    except FormatError as exc:
        raise _fail(name, str(exc)) from None
    checks.append(f"{name}: {expected} unique ids ({encoding})")
    return ids


def _load_seen(data: bytes, num_users: int, num_items: int, checks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            # indptr: one int64 per user + 1; indices: at most every (user, item) pair
            check_inflated(npz, {"indptr": 8 * (num_users + 1), "indices": 8 * num_users * num_items})
            indptr, indices = npz["indptr"], npz["indices"]
    except FormatError as exc:
        raise _fail(SEEN_FILE, str(exc)) from None
    except Exception as exc:
        raise _fail(SEEN_FILE, f"not a loadable .npz with indptr and indices ({_short(exc)})") from exc
    try:
        indptr, indices = check_csr(indptr, indices, num_users, num_items)
    except FormatError as exc:
        raise _fail(SEEN_FILE, str(exc)) from None
    checks.append(f"{SEEN_FILE}: CSR {num_users} users x {num_items} items, {indices.shape[0]} entries")
    return indptr, indices


def _load(path: str | Path, intra_op_num_threads: int, faiss_threads: int | None) -> Bundle:
    root = Path(path)
    if not root.is_dir():
        raise _fail(str(root), "bundle directory does not exist")
    if faiss_threads is not None:
        # Serving answers one small query per request: OpenMP fan-out only adds latency
        # and fights the HTTP workers for cores.
        faiss.omp_set_num_threads(faiss_threads)
    checks: list[str] = []
    manifest = _read_manifest(root)
    checks.append(f"{MANIFEST_FILE}: parsed, format_version {manifest['format_version']}")
    blobs = _read_hashed(root, manifest, checks)
    tower = read_user_tower(manifest)
    try:
        session, input_name, output_name = load_tower(blobs[MODEL_FILE], manifest, tower, intra_op_num_threads, checks)
    except FormatError as exc:
        raise _fail(MODEL_FILE, str(exc)) from exc
    index, item_vectors, is_hnsw = _load_index(blobs[INDEX_FILE], manifest, checks)
    user_ids = _load_ids(manifest, "user", blobs, checks)
    item_ids = _load_ids(manifest, "item", blobs, checks)
    indptr, indices = _load_seen(blobs[SEEN_FILE], manifest["num_users"], manifest["num_items"], checks)
    search_params = {str(k): int(v) for k, v in (manifest["index"].get("search_params") or {}).items()}
    bundle = Bundle(
        path=root,
        manifest=manifest,
        session=session,
        input_name=input_name,
        output_name=output_name,
        index=index,
        item_vectors=item_vectors,
        user_ids=user_ids,
        item_ids=item_ids,
        user_index={uid: i for i, uid in enumerate(user_ids.tolist())},
        seen_indptr=indptr,
        seen_indices=indices,
        dim=manifest["dim"],
        query_transform=manifest["index"]["query_transform"],
        search_params=search_params,
        is_hnsw=is_hnsw,
        checks=checks,
        user_tower=tower,
    )
    logger.info(
        "opened bundle %s: %d users, %d items, dim %d, index %s",
        root, bundle.num_users, bundle.num_items, bundle.dim, manifest["index"].get("factory"),
    )
    return bundle


def open_bundle(path: str | Path, *, intra_op_num_threads: int = 1, faiss_threads: int | None = 1) -> Bundle:
    """Open a bundle directory, running every check; raises BundleError on the first failure.

    `faiss_threads` sets FAISS's process-wide OpenMP thread count (None leaves it alone).
    """
    return _load(path, intra_op_num_threads, faiss_threads)


def verify_bundle(path: str | Path) -> list[str]:
    """Run every check `open_bundle` runs and return their descriptions; raises BundleError."""
    return list(_load(path, 1, None).checks)
