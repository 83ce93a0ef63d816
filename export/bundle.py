"""Write a verified serving bundle from user/item vectors (numpy, onnx, onnxruntime, faiss; no torch).

The format (files, manifest keys) is documented in `serving.bundle_format`, which both this writer and the
serving loader import. `write_bundle` puts everything in a temp dir beside `out_dir`, verifies it (ONNX
parity for every user, recall of approximate indexes, the serving loader's own checks, and for exact indexes
the served top-k against the caller's reference), and only then renames it into place.

The parts: `export.onnx_tower` (ID user tower at fp32/fp16/int8 + parity), `export.history_tower` (the history
user tower of `model.kind: history` + parity), `export.index_build` (explicit factories,
build, recall tuning), `export.index_auto` (`index_factory="auto"`: candidates measured, smallest kept),
`export.served` (the serving recommender over a bundle being written), `export.quantize_check` (a quantized
bundle's answers against fp32), `export.topk_check` (served top-k against a reference).
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

from export.errors import ExportError
from export.history_tower import HistoryTower, build_history_tower, check_history_parity
from export.index_auto import choose_index
from export.index_build import RecallSample, build_item_index
from export.onnx_tower import build_user_tower, check_parity, quantize_user_table
from export.quantize_check import check_quantized
from export.served import ServedProbe
from export.topk_check import check_served_topk, topk_mismatch
from serving.bundle import BundleError, open_bundle, verify_bundle
from serving.bundle_format import (FORMAT_VERSION, ID_ROLES, INDEX_FILE, MANIFEST_FILE, METRIC, MODEL_FILE, ONNX_HISTORY,
                                   ONNX_INPUT, ONNX_IR_VERSION, ONNX_OPSET, ONNX_OUTPUT, QUANTIZATIONS, SEEN_FILE,
                                   FormatError, UserTower, check_csr, check_ids, data_files, encode_ids, ids_file,
                                   smallest_int)

__all__ = [
    "QUANTIZATIONS",
    "ExportError",
    "BundleError",
    "build_user_tower",
    "topk_mismatch",
    "verify_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)


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


def _as_ids(ids: Any, name: str, expected: int, count_name: str) -> np.ndarray:
    try:
        return check_ids(np.asarray(ids).astype(np.str_), expected, count_name)
    except FormatError as exc:
        raise ExportError(f"{name}: {exc}") from None


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


def _as_reference(reference_topk: tuple[np.ndarray, np.ndarray] | None, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(users, items [users, k]) of the caller's reference; no users when there is none."""
    if reference_topk is None:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.int64)
    users = np.asarray(reference_topk[0], dtype=np.int64)
    items = np.asarray(reference_topk[1], dtype=np.int64)
    if items.ndim != 2 or items.shape[0] != users.shape[0]:
        raise ExportError(f"reference_topk items shape {items.shape} does not match {users.shape[0]} users")
    if users.size and (users.min() < 0 or users.max() >= num_users):
        raise ExportError("reference_topk users out of range")
    return users, items


def _as_test(test_indptr: Any, test_indices: Any, num_users: int, num_items: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The caller's held-out test CSR (both arrays or neither)."""
    if test_indptr is None and test_indices is None:
        return None
    if test_indptr is None or test_indices is None:
        raise ExportError("test_indptr and test_indices go together: pass both or neither")
    try:
        return check_csr(test_indptr, test_indices, num_users, num_items)
    except FormatError as exc:
        raise ExportError(f"test_indptr/test_indices: {exc}") from None


def _write_ids(tmp: Path, role: str, ids: np.ndarray) -> dict[str, str]:
    """The `role` ids in their compact file; returns the manifest's ids entry."""
    try:
        encoding, data = encode_ids(ids)
    except FormatError as exc:
        raise ExportError(f"{role}_ids: {exc}") from None
    name = ids_file(role, encoding)
    (tmp / name).write_bytes(data)
    return {"file": name, "encoding": encoding}


def _write_seen(tmp: Path, indptr: np.ndarray, indices: np.ndarray) -> dict[str, str]:
    ptr, idx = smallest_int(indptr), smallest_int(indices)
    np.savez_compressed(tmp / SEEN_FILE, indptr=ptr, indices=idx)
    return {"indptr": str(ptr.dtype), "indices": str(idx.dtype), "compressed": True}


def _package_versions(package_version: str) -> dict[str, str]:
    return {
        "package": package_version,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "faiss": faiss.__version__,
    }


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    """Hash the data files into `manifest["files"]` and write it, fsynced."""
    for name in data_files(manifest):
        _fsync_file(tmp / name)
        manifest["files"][name] = {"sha256": _sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    try:
        text = json.dumps(manifest, indent=2, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{MANIFEST_FILE}: lineage/metrics not JSON serialisable ({exc})") from exc
    (tmp / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")
    _fsync_file(tmp / MANIFEST_FILE)


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
    quantize: str = "fp32",
    force: bool = False,
    overwrite: bool = False,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    reference_topk: tuple[np.ndarray, np.ndarray] | None = None,
    test_indptr: np.ndarray | None = None,
    test_indices: np.ndarray | None = None,
    package_version: str,
    history_tower: HistoryTower | None = None,
) -> dict[str, Any]:
    """Write, verify and atomically install a bundle at `out_dir`; returns the manifest.

    With `history_tower` the bundle's user tower computes user vectors from item histories
    (`export.history_tower`): `user_vectors` are then the reference model's vectors of the training users from
    their histories, which are `seen_indptr`/`seen_indices` in split order (oldest first; written unsorted), and
    ONNX parity is checked over every one of them and the tower's random probe histories. History towers are
    fp32 only (`quantize` must be "fp32").

    `quantize` ("fp32", "fp16", "int8") stores the user table at that precision and, for `index_factory` "auto"
    or "Flat", the item vectors as that codec's exact scan; a quantized bundle is kept only when
    `export.quantize_check` passes on the reference users (and, given `test_indptr`/`test_indices`, a CSR of
    held-out items per user, on test NDCG). Raises ExportError (one-line message) when inputs are inconsistent,
    ONNX parity exceeds PARITY_ATOL, an explicit approximate index's recall@k_max is below `recall_floor` or a
    quantized bundle fails its check (unless `force`: then the numbers are recorded), the serving loader rejects
    the result, or the served top-k of an exact index differs from `reference_topk`. Nothing is left at
    `out_dir` on failure.
    """
    out = Path(out_dir)
    users_f32 = _as_vectors(user_vectors, "user_vectors")
    items_f32 = _as_vectors(item_vectors, "item_vectors")
    if users_f32.shape[1] != items_f32.shape[1]:
        raise ExportError(f"user dim {users_f32.shape[1]} != item dim {items_f32.shape[1]}")
    num_users, dim = users_f32.shape
    num_items = items_f32.shape[0]
    uids = _as_ids(user_ids, "user_ids", num_users, "num_users")
    iids = _as_ids(item_ids, "item_ids", num_items, "num_items")
    try:
        indptr, indices = check_csr(seen_indptr, seen_indices, num_users, num_items)
    except FormatError as exc:
        raise ExportError(f"seen_indptr/seen_indices: {exc}") from None
    if isinstance(k_max, bool) or int(k_max) < 1:
        raise ExportError(f"k_max must be >= 1, got {k_max}")
    if not 0.0 <= recall_floor <= 1.0:
        raise ExportError(f"recall_floor must be in [0, 1], got {recall_floor}")
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if history_tower is not None:
        if quantize != "fp32":
            raise ExportError(f"quantize {quantize}: a history user tower is exported at fp32 only (its table and MLP "
                              "are not quantized); export it without --quantize")
        history_tower.check(num_items, dim)
    tower = history_tower.spec if history_tower is not None else UserTower()
    ref_users, ref_items = _as_reference(reference_topk, num_users)
    test = _as_test(test_indptr, test_indices, num_users, num_items)
    k = min(int(k_max), num_items)
    _prepare_out_dir(out, overwrite)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a serving user must be able to read it
        # 1. ONNX user tower + parity for every user (against the rows it stores, or the reference's history vectors).
        if history_tower is not None:
            onnx.save_model(build_history_tower(history_tower, producer_version=package_version), str(tmp / MODEL_FILE))
            parity, stored_users = check_history_parity(tmp / MODEL_FILE, history_tower, indptr, indices, users_f32)
        else:
            onnx.save_model(build_user_tower(users_f32, quantize=quantize, producer_version=package_version),
                            str(tmp / MODEL_FILE))
            _, stored_users = quantize_user_table(users_f32, quantize)
            parity = check_parity(tmp / MODEL_FILE, stored_users)
        logger.info("ONNX parity over %d users (%s tower): max abs diff %.3g", num_users, tower.kind, parity)

        # 2. Ids and seen CSR.
        ids_entry = {role: _write_ids(tmp, role, ids) for role, ids in zip(ID_ROLES, (uids, iids))}
        seen_entry = _write_seen(tmp, indptr, indices)

        # 3. Item index: chosen by measurement for auto, else the factory asked for (+ recall when approximate).
        probe = ServedProbe(tmp / MODEL_FILE, uids, iids, indptr, indices, dim, tower)
        sample = RecallSample.draw(items_f32, users_f32, stored_users, k)
        if index_factory == "auto":
            item_index = choose_index(items_f32, sample, recall_floor, quantize, probe)
        else:
            item_index = build_item_index(index_factory, items_f32, sample, recall_floor, force, quantize)
        faiss.write_index(item_index.index, str(tmp / INDEX_FILE))
        index_entry, exact = item_index.manifest_entry(), item_index.exact

        # 4. A quantized bundle must answer what fp32 answers (through the serving path, before any file is final).
        check = None
        if quantize != "fp32":
            served = probe.recommender(item_index.index, item_index.query_transform, item_index.search_params)
            fp32_served = None
            if not exact and index_factory != "auto":  # the fp32 bundle of this factory: same index, fp32 users
                fp32_tower = build_user_tower(users_f32, producer_version=package_version).SerializeToString()
                fp32_served = ServedProbe(fp32_tower, uids, iids, indptr, indices, dim).recommender(
                    item_index.index, item_index.query_transform, item_index.search_params)
            reference = (ref_users, ref_items) if ref_users.size else None
            check, check_users, check_items = check_quantized(
                served, users_f32, items_f32, indptr, indices, k, reference, test, fp32_served)
            del served, fp32_served
            if not check.passed:
                msg = f"quantize {quantize} refused: {'; '.join(check.failures)}"
                if not force:
                    raise ExportError(f"{msg}; pass force=True (--force) to keep it")
                logger.warning("forced export: %s", msg)
        del item_index, probe

        # 5. Manifest. An approximate index is allowed to differ from the reference (its recall is recorded
        #    instead), so only an exact fp32 one is compared; a quantized exact scan is compared with the answers
        #    its check measured. The count is what step 7 checks.
        check_reference = exact and quantize == "fp32" and ref_users.size > 0
        check_consistent = exact and check is not None and check_users.size > 0
        if ref_users.size and not exact:
            logger.info("approximate index: reference top-k not compared (recall@%d recorded instead)", index_entry["k"])
        _write_manifest(tmp, {
            "format_version": FORMAT_VERSION,
            "dim": int(dim),
            "metric": METRIC,
            "num_users": int(num_users),
            "num_items": int(num_items),
            "ids": ids_entry,
            "seen": seen_entry,
            "index": index_entry,
            "quantization": {
                "user_table": quantize,
                "item_codes": index_entry["codec"],
                "user_max_abs_error": float(np.max(np.abs(stored_users - users_f32))),
                "passed": None if check is None else check.passed,
                "forced": bool(check is not None and not check.passed),
                "check": None if check is None else check.manifest_entry(),
            },
            "onnx": {"opset": ONNX_OPSET, "ir_version": ONNX_IR_VERSION,
                     "input": ONNX_HISTORY if tower.is_history else ONNX_INPUT, "output": ONNX_OUTPUT},
            "user_tower": tower.manifest_entry(),
            "files": {},  # filled in by _write_manifest
            "lineage": dict(lineage),
            "metrics": dict(metrics),
            "versions": _package_versions(package_version),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "parity_max_abs_diff": parity,
            "reference_topk_users": int(ref_users.size if check_reference else check_users.size if check_consistent else 0),
        })

        # 6. The serving loader's checks (faiss_threads=None: leave this process's FAISS threads alone).
        try:
            bundle = open_bundle(tmp, faiss_threads=None)
        except BundleError as exc:
            raise ExportError(f"serving loader rejects the new bundle: {exc}") from exc
        for role, want, got in (("user", uids, bundle.user_ids), ("item", iids, bundle.item_ids)):
            if not np.array_equal(want, got):
                raise ExportError(f"{ids_entry[role]['file']}: ids read back differ from the {role}_ids written")

        # 7. What the server answers for the reference users, through the loaded bundle.
        if check_reference:
            check_served_topk(bundle, ref_users, ref_items, users_f32, items_f32)
        elif check_consistent:
            check_served_topk(bundle, check_users, check_items, stored_users, bundle.item_vectors,
                              what="the answers its quantization check measured")
        manifest = bundle.manifest
        del bundle
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote bundle %s (%s, %d users, %d items, dim %d)", out, index_entry["factory"], num_users, num_items, dim)
    return manifest
