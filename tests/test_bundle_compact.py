"""Bundle format version 2: compact ids and seen items, quantized students (verified), auto index by measurement,
and version-1 bundles still served."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import onnx
import pytest

from export import quantize_check
from export.bundle import ExportError, write_bundle
from serving.bundle import open_bundle, sha256_bytes, verify_bundle
from serving.bundle_format import (MAX_ID_BYTES, NPY_HEADER_BYTES, V1_DATA_FILES, FormatError, decode_ids,
                                   encode_ids)
from serving.recommender import Recommender

faiss.omp_set_num_threads(1)  # 2 shared cores: keep tests single-threaded

U, I, D = 300, 2000, 16


def low_rank(seed: int = 0, users: int = U, items: int = I, dim: int = D, rank: int = 6) -> dict:
    """Vectors with a low-rank structure (as trained two-tower vectors have) and skewed item norms."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, dim))
    user_vecs = rng.standard_normal((users, rank)) @ basis + 0.1 * rng.standard_normal((users, dim))
    item_vecs = (rng.standard_normal((items, rank)) @ basis + 0.1 * rng.standard_normal((items, dim)))
    item_vecs *= rng.lognormal(0.0, 0.3, (items, 1))
    lens = rng.integers(0, 20, users)
    return {
        "user_vectors": user_vecs.astype(np.float32),
        "item_vectors": item_vecs.astype(np.float32),
        "user_ids": np.array([f"user-{i}" for i in range(users)]),
        "item_ids": np.array([f"item-{i}" for i in range(items)]),
        "seen_indptr": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        "seen_indices": np.concatenate([rng.choice(items, n, replace=False) for n in lens]).astype(np.int64),
    }


def write(out: Path, data: dict, **kw) -> dict:
    kw.setdefault("lineage", {"checkpoint_fingerprint": "test"})
    kw.setdefault("metrics", {})
    kw.setdefault("package_version", "0.0.test")
    return write_bundle(out, **data, **kw)


def brute_force(user_vec: np.ndarray, item_vecs: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """float64 scores, seen items removed, ties by item index."""
    scores = item_vecs.astype(np.float64) @ user_vec.astype(np.float64)
    scores[seen] = -np.inf
    return np.argsort(-scores, kind="stable")[:k]


V1_INDEX_KEYS = ("factory", "requested", "auto_note", "exact", "query_transform", "metric_faiss", "search_params",
                 "recall_at_k", "k", "recall_sample_users", "max_norm", "index_dim")


def to_v1_layout(bundle: Path) -> None:
    """Rewrite an fp32 bundle in format version 1's layout, as the version-1 writer left it: fixed-width unicode
    id arrays, an int64 uncompressed seen CSR, the version-1 manifest keys."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    loaded = open_bundle(bundle, faiss_threads=None)
    for role, ids in (("user", loaded.user_ids), ("item", loaded.item_ids)):
        (bundle / manifest["ids"][role]["file"]).unlink()
        np.save(bundle / f"{role}_ids.npy", ids, allow_pickle=False)
    np.savez(bundle / "seen.npz", indptr=loaded.seen_indptr.astype(np.int64), indices=loaded.seen_indices.astype(np.int64))
    v1 = {key: value for key, value in manifest.items() if key not in ("ids", "seen", "quantization")}
    v1["format_version"] = 1
    v1["index"] = {key: manifest["index"][key] for key in V1_INDEX_KEYS}
    v1["files"] = {}
    for name in V1_DATA_FILES:
        blob = (bundle / name).read_bytes()
        v1["files"][name] = {"sha256": sha256_bytes(blob), "bytes": len(blob)}
    (bundle / "manifest.json").write_text(json.dumps(v1, indent=2))


# ---------------------------------------------------------------------------------------------------- ids
ODD_IDS = ["", " ", "a", "x" * 5000, "ユーザー", "😀 emoji", "é", "e\u0301", "007", "-0", "+1", "1e3", " 12", "12 ",
           "٣", "0x1F", "tab\there", "nul\x00inside", "9" * 30]


@pytest.mark.parametrize(
    "ids, encoding",
    [
        (ODD_IDS, "utf8"),
        (["0", "1", "-5", "2147483647", "-2147483648"], "int32"),
        (["0", "9223372036854775807", "-9223372036854775808"], "int64"),
        (["1", "2", "007"], "utf8"),  # "007" is not what str(int) writes: every id stays a string
        (["1", "2", "9223372036854775808"], "utf8"),  # beyond int64
        (["10", "-0"], "utf8"),
    ],
)
def test_ids_round_trip_exactly(ids, encoding):
    arr = np.array(ids)
    got_encoding, data = encode_ids(arr)
    assert got_encoding == encoding
    back = decode_ids(data, encoding)
    assert back.dtype.kind == "U" and back.tolist() == ids


def test_ids_not_utf8_encodable_refused():
    with pytest.raises(FormatError, match="not encodable as UTF-8"):
        encode_ids(np.array(["ok", "bad\ud800"]))


def test_bundle_ids_round_trip_and_are_compact(tmp_path):
    data = low_rank(users=len(ODD_IDS), items=I)
    data["user_ids"] = np.array(ODD_IDS)
    data["item_ids"] = np.array([str(i * 7 - 300) for i in range(I)])  # canonical integers, some negative
    manifest = write(tmp_path / "b", data, index_factory="Flat")
    assert manifest["format_version"] == 2
    assert manifest["ids"] == {"user": {"file": "user_ids.npz", "encoding": "utf8"},
                               "item": {"file": "item_ids.npy", "encoding": "int32"}}
    assert sorted(manifest["files"]) == ["item_ids.npy", "items.faiss", "model.onnx", "seen.npz", "user_ids.npz"]
    assert np.load(tmp_path / "b" / "item_ids.npy", allow_pickle=False).dtype == np.int32
    bundle = open_bundle(tmp_path / "b")
    assert bundle.user_ids.tolist() == ODD_IDS
    assert bundle.item_ids.tolist() == data["item_ids"].tolist()
    rec = Recommender(bundle)
    assert rec.user_indices(["007", "", "x" * 5000]).tolist() == [8, 0, 3]
    assert rec.item_external_ids(np.array([0, 1])).tolist() == ["-300", "-293"]  # strings, not ints
    # Unpadded: the 5000-character id costs its own bytes, not 4 bytes x 5000 for every id.
    assert manifest["files"]["user_ids.npz"]["bytes"] < 2000


# ----------------------------------------------------------------------------------------------- version 1
def test_version_1_bundle_still_serves(tmp_path):
    data = low_rank()
    write(tmp_path / "v2", data, index_factory="Flat")
    shutil.copytree(tmp_path / "v2", tmp_path / "v1")
    to_v1_layout(tmp_path / "v1")
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == sorted(["manifest.json", *V1_DATA_FILES])
    with np.load(tmp_path / "v1" / "seen.npz") as npz:
        assert npz["indices"].dtype == np.int64
    assert np.load(tmp_path / "v1" / "user_ids.npy").dtype.kind == "U"
    checks = verify_bundle(tmp_path / "v1")
    assert "manifest.json: parsed, format_version 1" in checks
    old, new = open_bundle(tmp_path / "v1"), open_bundle(tmp_path / "v2")
    assert old.user_ids.tolist() == new.user_ids.tolist() and old.item_ids.tolist() == new.item_ids.tolist()
    users = np.arange(U, dtype=np.int64)
    for (a, sa), (b, sb) in zip(Recommender(old).recommend(users, 10), Recommender(new).recommend(users, 10)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sa, sb)


# -------------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("quantize, ops, table_type", [
    ("fp16", ["Gather", "Cast"], onnx.TensorProto.FLOAT16),
    ("int8", ["Gather", "Cast", "Gather", "Mul"], onnx.TensorProto.INT8),
])
def test_quantized_bundle_serves_what_its_check_measured(tmp_path, quantize, ops, table_type):
    data = low_rank()
    users = np.arange(0, U, 3, dtype=np.int64)
    seen = [data["seen_indices"][data["seen_indptr"][u] : data["seen_indptr"][u + 1]] for u in range(U)]
    fp32 = np.stack([brute_force(data["user_vectors"][u], data["item_vectors"], seen[u], 20) for u in users.tolist()])
    manifest = write(tmp_path / quantize, data, index_factory="auto", k_max=20, quantize=quantize,
                     reference_topk=(users, fp32))
    fp32_manifest = write(tmp_path / "fp32", data, index_factory="auto", k_max=20)
    q = manifest["quantization"]
    assert q["user_table"] == quantize and q["item_codes"] == quantize and q["passed"] and not q["forced"]
    assert q["check"]["users"] == users.size and q["check"]["k"] == 20
    assert q["check"]["topk_agreement"] >= quantize_check.AGREEMENT_FLOOR
    assert manifest["index"]["factory"] == {"fp16": "SQfp16", "int8": "SQ8"}[quantize] and manifest["index"]["exact"]
    assert manifest["reference_topk_users"] == users.size
    for name in ("model.onnx", "items.faiss"):
        assert manifest["files"][name]["bytes"] < fp32_manifest["files"][name]["bytes"] * 0.6

    model = onnx.load(str(tmp_path / quantize / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ops
    assert {t.name: t.data_type for t in model.graph.initializer}["user_table"] == table_type
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    index = faiss.downcast_index(faiss.read_index(str(tmp_path / quantize / "items.faiss")))
    assert isinstance(index, faiss.IndexScalarQuantizer) and index.metric_type == faiss.METRIC_INNER_PRODUCT

    # Served answers are exact for the stored vectors and agree with fp32 as the manifest says.
    rec = Recommender(open_bundle(tmp_path / quantize))
    assert rec.dense
    stored_users = rec.user_vectors(np.arange(U, dtype=np.int64))
    assert 0 < np.abs(stored_users - data["user_vectors"]).max() <= q["user_max_abs_error"] + 1e-7
    served = rec.recommend(users, 20, exclude_seen=True)
    hits = 0
    for row, (user, (items, scores)) in enumerate(zip(users.tolist(), served)):
        np.testing.assert_array_equal(items, brute_force(stored_users[user], rec.bundle.item_vectors, seen[user], 20))
        hits += np.intersect1d(items, fp32[row]).size
    assert hits / fp32.size == pytest.approx(q["check"]["topk_agreement"], abs=1e-6)


def adversarial(data: dict) -> dict:
    """One huge item stretches every dimension's 8-bit range, so the other items collapse onto a few codes."""
    bad = dict(data)
    items = data["item_vectors"] * 0.01
    items[0] = 1000.0
    bad["item_vectors"] = items
    return bad


def test_quantized_bundle_failing_its_check_refused_then_forced(tmp_path):
    data = adversarial(low_rank())
    with pytest.raises(ExportError, match=r"quantize int8 refused: top-k agreement 0\.\d{4} < 0\.99 "
                                          r"\(k=20, \d+ users\); pass force=True"):
        write(tmp_path / "b", data, quantize="int8", k_max=20)
    assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    manifest = write(tmp_path / "b", data, quantize="int8", k_max=20, force=True)
    q = manifest["quantization"]
    assert q["passed"] is False and q["forced"] is True
    assert q["check"]["topk_agreement"] < 0.99 and q["check"]["failures"][0].startswith("top-k agreement")
    items, _ = Recommender(open_bundle(tmp_path / "b")).recommend(np.array([1]), 20)[0]
    assert items.size == 20


def test_quantization_check_uses_test_ndcg(tmp_path, monkeypatch):
    data = low_rank()
    rng = np.random.default_rng(5)
    lens = rng.integers(0, 4, U)
    test_indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    test_indices = rng.integers(0, I, int(lens.sum())).astype(np.int64)
    manifest = write(tmp_path / "ok", data, quantize="fp16", k_max=20, test_indptr=test_indptr,
                     test_indices=test_indices)
    ndcg = manifest["quantization"]["check"]["ndcg"]
    assert ndcg["k"] == 20 and ndcg["users"] == int((lens > 0).sum()) and ndcg["relative_drop"] <= 0.005
    assert 0 < ndcg["fp32"] <= 1 and 0 < ndcg["quantized"] <= 1
    monkeypatch.setattr(quantize_check, "NDCG_MAX_REL_DROP", -1.0)  # demand a doubled NDCG: must fail
    with pytest.raises(ExportError, match=r"quantize fp16 refused: test NDCG@20 0\.\d{4} vs fp32 0\.\d{4}"):
        write(tmp_path / "bad", data, quantize="fp16", k_max=20, test_indptr=test_indptr, test_indices=test_indices)
    with pytest.raises(ExportError, match="test_indptr and test_indices go together"):
        write(tmp_path / "bad", data, quantize="fp16", test_indptr=test_indptr)


def test_quantize_must_be_known(tmp_path):
    with pytest.raises(ExportError, match="quantize must be one of fp32, fp16, int8, got 'int4'"):
        write(tmp_path / "b", low_rank(), quantize="int4")


# ------------------------------------------------------------------------------------------- auto by measurement
def test_auto_picks_exact_scan_where_smaller_and_not_slower(tmp_path):
    data = low_rank(users=400, items=20_000, dim=16)
    manifest = write(tmp_path / "b", data, index_factory="auto", k_max=10)
    idx = manifest["index"]
    assert idx["factory"] == "Flat" and idx["exact"] and idx["auto"]["chosen"] == "Flat"
    rows = {row["factory"]: row for row in idx["auto"]["candidates"]}
    assert set(rows) == {"Flat", "IVF512,Flat", "HNSW32"}
    flat = rows["Flat"]
    assert flat["bytes"] > 0 and flat["recall_at_k"] == 1 and flat["p50_us"] > 0 and flat["note"] == "chosen"
    for name in ("IVF512,Flat", "HNSW32"):  # the exact scan's codes plus ids or links: not even built
        assert not rows[name]["eligible"] and rows[name]["note"].startswith("not built: at least"), rows[name]
    assert flat["bytes"] == manifest["files"]["items.faiss"]["bytes"]
    assert idx["auto"]["latency"]["k"] == 10 and idx["auto"]["recall"]["k"] == 10


def test_quantized_user_table_with_an_explicit_approximate_index(tmp_path):
    # The factory string fixes the item codes; the check compares with the same index queried by fp32 users.
    manifest = write(tmp_path / "b", low_rank(), index_factory="HNSW32", quantize="int8", k_max=20)
    q = manifest["quantization"]
    assert manifest["index"]["factory"] == "HNSW32" and not manifest["index"]["exact"]
    assert q["user_table"] == "int8" and q["item_codes"] == "factory" and q["passed"]
    assert q["check"]["reference"] == "the same index's served answers to the fp32 user vectors"
    assert manifest["reference_topk_users"] == 0


def test_compressed_ids_that_would_inflate_past_their_bound_are_refused():
    """A tiny compressed file must not inflate into gigabytes: the loader checks the inflated size first; ids
    longer than the format allows are refused when written and when read."""
    blob = b"x" * (MAX_ID_BYTES * 2 + NPY_HEADER_BYTES + 1000)  # far more than two ids may take
    buf = io.BytesIO()
    np.savez_compressed(buf, blob=np.frombuffer(blob, dtype=np.uint8), offsets=np.array([0, 1, len(blob)]))
    with pytest.raises(FormatError, match="inflate"):
        decode_ids(buf.getvalue(), "utf8", expected=2)
    long_id = "y" * (MAX_ID_BYTES + 1)
    with pytest.raises(FormatError, match="longer than"):
        encode_ids(np.array(["a", long_id]))
    raw = ("a" + long_id).encode()
    buf = io.BytesIO()
    np.savez_compressed(buf, blob=np.frombuffer(raw, dtype=np.uint8), offsets=np.array([0, 1, len(raw)]))
    with pytest.raises(FormatError, match="longer than"):
        decode_ids(buf.getvalue(), "utf8", expected=2)
