"""serving.bundle (hash-checked loader) and serving.recommender (top-k, exclude-seen, fallbacks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import onnx
import pytest

from export.bundle import build_user_tower, write_bundle
from serving.bundle import BundleError, open_bundle, sha256_bytes, verify_bundle
from serving.bundle_format import decode_ids, encode_ids
from serving import dense_topk
from serving import recommender as recommender_module
from serving.recommender import Recommender

faiss.omp_set_num_threads(1)  # 2 shared cores: keep tests single-threaded

ROOT = Path(__file__).resolve().parents[1]
U, I, D = 300, 2000, 16
MOSTLY_SEEN_USER = 0  # has seen all but 3 items
NOTHING_SEEN_USER = 1


def make_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((U, D)).astype(np.float32)
    # Skewed item norms, as trained MF vectors have.
    items = (rng.standard_normal((I, D)) * rng.lognormal(0.0, 0.5, (I, 1))).astype(np.float32)
    lens = rng.integers(0, 40, U)
    lens[MOSTLY_SEEN_USER] = I - 3
    lens[NOTHING_SEEN_USER] = 0
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indices = np.concatenate([rng.choice(I, n, replace=False) for n in lens]).astype(np.int64)
    return {
        "user_vectors": users,
        "item_vectors": items,
        "user_ids": np.array([f"user-{i}" for i in range(U)]),
        "item_ids": np.array([f"item-{i}" for i in range(I)]),
        "seen_indptr": indptr,
        "seen_indices": indices,
    }


def write(out: Path, data: dict, **kw) -> dict:
    kw.setdefault("lineage", {"checkpoint_fingerprint": "test"})
    kw.setdefault("metrics", {})
    kw.setdefault("package_version", "0.0.test")
    return write_bundle(out, **data, **kw)


def brute_force(data: dict, user: int, k: int, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores, ties by item index, exactly min(k, unseen) items."""
    scores = data["item_vectors"].astype(np.float64) @ data["user_vectors"][user].astype(np.float64)
    cand = np.arange(scores.size)
    if exclude_seen:
        seen = data["seen_indices"][data["seen_indptr"][user] : data["seen_indptr"][user + 1]]
        cand = np.setdiff1d(cand, seen)
    order = cand[np.argsort(-scores[cand], kind="stable")][:k]
    return order, scores[order]


@pytest.fixture(scope="module")
def data() -> dict:
    return make_data()


@pytest.fixture(scope="module")
def flat_dir(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("flat") / "bundle"
    write(out, data, index_factory="Flat")
    return out


@pytest.fixture(scope="module")
def flat(flat_dir):
    return Recommender(open_bundle(flat_dir))


@pytest.fixture(scope="module")
def hnsw(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("hnsw") / "bundle"
    write(out, data, index_factory="HNSW32")
    return Recommender(open_bundle(out))


@pytest.fixture()
def copy(tmp_path, flat_dir) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(flat_dir, dst)
    return dst


def rehash(bundle: Path, **manifest_updates) -> None:
    """Re-sign the manifest after tampering, so the structural checks behind the hashes run."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(manifest_updates)
    for name in manifest["files"]:
        blob = (bundle / name).read_bytes()
        manifest["files"][name] = {"sha256": sha256_bytes(blob), "bytes": len(blob)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------ loader
def test_open_and_verify(flat_dir, data):
    bundle = open_bundle(flat_dir)
    assert bundle.num_users == U and bundle.num_items == I and bundle.dim == D
    assert bundle.user_index["user-7"] == 7
    np.testing.assert_array_equal(bundle.item_vectors, data["item_vectors"])
    checks = verify_bundle(flat_dir)
    assert any("sha256" in c for c in checks) and any("no external data" in c for c in checks)
    assert sorted(p.name for p in flat_dir.iterdir()) == sorted(
        ["manifest.json", "model.onnx", "items.faiss", "user_ids.npz", "item_ids.npz", "seen.npz"]
    )


def test_serving_imports_neither_torch_nor_compressor():
    code = (
        "import sys, serving.bundle, serving.recommender, serving.app; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'compressor', 'mlflow')]; "
        "assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "name, tamper, message",
    [
        ("model.onnx", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "size"),
        ("items.faiss", lambda p: p.write_bytes(p.read_bytes()[:100]), "size"),
        ("items.faiss", lambda p: p.write_bytes(os.urandom(len(p.read_bytes()))), "sha256"),
        ("user_ids.npz", None, "sha256"),  # same size, one byte changed
        ("seen.npz", lambda p: p.unlink(), "missing"),
    ],
)
def test_tampered_file_fails_hash(copy, name, tamper, message):
    path = copy / name
    if tamper is None:
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    else:
        tamper(path)
    with pytest.raises(BundleError, match=rf"^{name}: .*{message}"):
        open_bundle(copy)


def test_manifest_missing_or_garbage(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"^manifest.json: not parseable"):
        open_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"^manifest.json: missing"):
        open_bundle(copy)


def test_truncated_onnx_rehashed(copy):
    path = copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:200])
    rehash(copy)
    with pytest.raises(BundleError, match=r"^model.onnx: "):
        open_bundle(copy)


def test_garbage_index_rehashed(copy):
    (copy / "items.faiss").write_bytes(b"\x00garbage" * 64)
    rehash(copy)
    with pytest.raises(BundleError, match=r"^items.faiss: cannot be read by faiss"):
        open_bundle(copy)


def _rewrite_ids(path: Path, ids: np.ndarray) -> None:
    encoding, data = encode_ids(ids)
    assert encoding == "utf8"
    path.write_bytes(data)


def test_id_map_length_rehashed(copy):
    ids = decode_ids((copy / "user_ids.npz").read_bytes(), "utf8")
    _rewrite_ids(copy / "user_ids.npz", ids[:-1])
    rehash(copy)
    with pytest.raises(BundleError, match=r"^user_ids.npz: length 299 != num_users 300"):
        open_bundle(copy)


def test_duplicate_item_ids_rehashed(copy):
    ids = decode_ids((copy / "item_ids.npz").read_bytes(), "utf8")
    ids[1] = ids[0]
    _rewrite_ids(copy / "item_ids.npz", ids)
    rehash(copy)
    with pytest.raises(BundleError, match=r"^item_ids.npz: external ids are not unique"):
        open_bundle(copy)


def test_pickled_ids_refused(copy):
    np.savez(copy / "item_ids.npz", blob=np.array([f"i{i}" for i in range(I)], dtype=object), offsets=np.arange(3))
    rehash(copy)
    with pytest.raises(BundleError, match=r"^item_ids.npz: not a loadable .npy/.npz without pickle"):
        open_bundle(copy)


def test_id_blob_inconsistent_rehashed(copy):
    with np.load(copy / "item_ids.npz") as npz:
        blob, offsets = npz["blob"], npz["offsets"]
    np.savez(copy / "item_ids.npz", blob=blob[:-1], offsets=offsets)
    rehash(copy)
    with pytest.raises(BundleError, match=r"^item_ids.npz: offsets are not a monotone 0..len\(blob\) pointer"):
        open_bundle(copy)
    np.savez(copy / "item_ids.npz", blob=blob, offsets=offsets.astype(np.int32))
    rehash(copy)
    with pytest.raises(BundleError, match=r"^item_ids.npz: blob must be 1-D uint8 and offsets 1-D int64"):
        open_bundle(copy)


def test_manifest_ids_entry_checked(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    rehash(copy, ids={**manifest["ids"], "item": {"file": "../elsewhere.npz", "encoding": "utf8"}})
    with pytest.raises(BundleError, match=r"^manifest.json: ids.item.file '../elsewhere.npz' != 'item_ids.npz'"):
        open_bundle(copy)


def test_onnx_dim_differs_from_index(copy, data):
    wider = np.hstack([data["user_vectors"], np.zeros((U, 1), np.float32)])
    onnx.save_model(build_user_tower(wider), str(copy / "model.onnx"))
    rehash(copy)
    with pytest.raises(BundleError, match=r"^model.onnx: output shape \[.*, 17\] != \[batch, manifest dim 16\]"):
        open_bundle(copy)
    # Manifest agreeing with the ONNX model instead: now the index disagrees.
    index_spec = json.loads((copy / "manifest.json").read_text())["index"]
    rehash(copy, dim=D + 1, index={**index_spec, "index_dim": D + 1})
    with pytest.raises(BundleError, match=r"^items.faiss: index dim 16 != manifest dim 17"):
        open_bundle(copy)


def test_onnx_table_rows_differ(copy, data):
    onnx.save_model(build_user_tower(data["user_vectors"][:-1]), str(copy / "model.onnx"))
    rehash(copy)
    with pytest.raises(BundleError, match=r"^model.onnx: user table shape \[299, 16\] != \[num_users 300"):
        open_bundle(copy)


def test_onnx_external_data_refused(copy, data):
    model = build_user_tower(data["user_vectors"])
    onnx.save_model(
        model, str(copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    rehash(copy)
    with pytest.raises(BundleError, match=r"^model.onnx: tensor 'user_table' uses external data"):
        open_bundle(copy)


def test_seen_csr_inconsistent(copy):
    with np.load(copy / "seen.npz") as npz:
        indptr, indices = npz["indptr"], npz["indices"]
    np.savez(copy / "seen.npz", indptr=indptr[:-1], indices=indices)
    rehash(copy)
    with pytest.raises(BundleError, match=r"^seen.npz: indptr length 300 != num_users \+ 1"):
        open_bundle(copy)
    np.savez(copy / "seen.npz", indptr=indptr, indices=np.full_like(indices, I))
    rehash(copy)
    with pytest.raises(BundleError, match=r"^seen.npz: indices outside"):
        open_bundle(copy)


def test_index_size_mismatch(copy):
    rehash(copy, num_items=I + 1)
    with pytest.raises(BundleError, match=r"^items.faiss: ntotal 2000 != num_items 2001"):
        open_bundle(copy)


# ------------------------------------------------------------------------- recommender
@pytest.mark.parametrize("k", [1, 10, 100])
def test_exact_topk_equals_brute_force(flat, data, k):
    users = np.arange(U, dtype=np.int64)
    results = flat.recommend(users, k, exclude_seen=True)
    for user, (items, scores) in zip(users.tolist(), results):
        want_items, want_scores = brute_force(data, user, k)
        np.testing.assert_array_equal(items, want_items)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
        assert items.dtype == np.int64 and scores.dtype == np.float32


def test_mostly_seen_user_gets_only_unseen_items(flat, data):
    items, scores = flat.recommend(np.array([MOSTLY_SEEN_USER]), 10, exclude_seen=True)[0]
    want, _ = brute_force(data, MOSTLY_SEEN_USER, 10)
    assert items.size == 3
    np.testing.assert_array_equal(items, want)


def test_without_exclude_seen(flat, data):
    items, _ = flat.recommend(np.array([MOSTLY_SEEN_USER]), 10, exclude_seen=False)[0]
    want, _ = brute_force(data, MOSTLY_SEEN_USER, 10, exclude_seen=False)
    np.testing.assert_array_equal(items, want)


def test_user_index_range_checked_before_ort(flat):
    # ORT's Gather would wrap -1 to the last user; we must refuse instead.
    for bad in ([-1], [U], [0, U + 5]):
        with pytest.raises(IndexError, match="out of range"):
            flat.recommend(np.array(bad, dtype=np.int64), 5, exclude_seen=True)
    with pytest.raises(TypeError):
        flat.recommend(np.array([0.5]), 5, exclude_seen=True)
    with pytest.raises(ValueError):
        flat.recommend(np.array([0]), -1, exclude_seen=True)
    assert flat.recommend(np.array([], dtype=np.int64), 5, exclude_seen=True) == []
    items, scores = flat.recommend(np.array([3]), 0, exclude_seen=True)[0]
    assert items.size == 0 and scores.size == 0


def test_id_helpers(flat):
    np.testing.assert_array_equal(flat.user_indices(["user-3", "user-0"]), [3, 0])
    with pytest.raises(KeyError, match="nope"):
        flat.user_indices(["nope"])
    np.testing.assert_array_equal(flat.item_external_ids(np.array([5, 0])), ["item-5", "item-0"])


def test_popular(flat, data):
    counts = np.bincount(data["seen_indices"], minlength=I)
    items, scores = flat.popular(5)
    np.testing.assert_array_equal(scores, np.sort(counts)[::-1][:5])
    seen = flat.seen(7)
    items, _ = flat.popular(20, exclude=seen)
    assert items.size == 20 and not np.isin(items, seen).any()
    items, _ = flat.popular(10, exclude=flat.seen(MOSTLY_SEEN_USER))
    assert items.size == 3


def _check_approx(rec: Recommender, data: dict, k: int) -> float:
    """Answers are complete, unseen, -1 free, truly scored and sorted; returns mean recall@k."""
    users = np.arange(U, dtype=np.int64)
    hits = total = 0
    for user, (items, scores) in zip(users.tolist(), rec.recommend(users, k, exclude_seen=True)):
        want, _ = brute_force(data, user, k)
        seen = data["seen_indices"][data["seen_indptr"][user] : data["seen_indptr"][user + 1]]
        assert items.size == want.size, user
        assert (items >= 0).all() and np.unique(items).size == items.size
        assert not np.isin(items, seen).any()
        true = data["item_vectors"][items].astype(np.float64) @ data["user_vectors"][user].astype(np.float64)
        np.testing.assert_allclose(scores, true, rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(scores) <= 1e-6)
        hits += np.intersect1d(items, want).size
        total += want.size
    return hits / total


def test_hnsw_bundle_answers_are_complete(hnsw, data):
    manifest = hnsw.bundle.manifest["index"]
    assert manifest["query_transform"] == "ip2l2" and not manifest["exact"]
    assert manifest["recall_at_k"] >= 0.95 and "efSearch" in manifest["search_params"]
    assert _check_approx(hnsw, data, 10) >= 0.9
    items, _ = hnsw.recommend(np.array([MOSTLY_SEEN_USER]), 10, exclude_seen=True)[0]
    np.testing.assert_array_equal(items, brute_force(data, MOSTLY_SEEN_USER, 10)[0])


def test_short_ivf_lists_fall_back_to_exact(tmp_path, data):
    # nprobe=1 over 32 lists returns ~60 candidates: asking for more forces the exact fallback.
    manifest = write(tmp_path / "ivf", data, index_factory="IVF32,Flat", recall_floor=0.0)
    assert manifest["index"]["search_params"] == {"nprobe": 1}
    rec = Recommender(open_bundle(tmp_path / "ivf"))
    _check_approx(rec, data, 100)
    items, _ = rec.recommend(np.array([NOTHING_SEEN_USER]), 100, exclude_seen=True)[0]
    assert items.size == 100


# ------------------------------------------------------- dense path (exact Flat bundles)
# A catalogue larger than the recommender's norm-ordered prefix, so every branch of the
# dense top-k runs: prefix only, wider cutoffs (light and heavy row groups), sampled
# thresholds, the whole-row fallback, fewer unseen items than k, exact ties, a zero user.
BIG_I, BIG_U, BIG_D = 12_000, 48, 8
BIG_MOSTLY_SEEN, BIG_EXACTLY_K, BIG_PREFIX_SEEN, BIG_ZERO, BIG_NEGATIVE, BIG_ALL_SEEN = 0, 1, 2, 3, 4, 9
BIG_K = 10


def make_big_data(seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    items = (rng.standard_normal((BIG_I, BIG_D)) * rng.lognormal(0.0, 0.7, (BIG_I, 1))).astype(np.float32)
    items[100:110] = items[7]  # exact ties: the answer orders them by item index
    users = rng.standard_normal((BIG_U, BIG_D)).astype(np.float32)
    users[5:9] = items[7] * 3.0  # users whose best items are the tied ones
    users[BIG_ZERO] = 0.0  # every score 0: all tied
    users[BIG_NEGATIVE] = -items.mean(axis=0) * 0.01  # a small user vector, low k-th score
    norms = np.linalg.norm(items.astype(np.float64), axis=1)
    by_norm = np.argsort(-norms, kind="stable")
    seen = [rng.choice(BIG_I, int(n), replace=False) for n in rng.integers(0, 300, BIG_U)]
    seen[BIG_MOSTLY_SEEN] = np.setdiff1d(np.arange(BIG_I), [11, 4000, 9000])  # 3 unseen items
    seen[BIG_EXACTLY_K] = np.setdiff1d(np.arange(BIG_I), rng.choice(BIG_I, BIG_K, replace=False))
    seen[BIG_ALL_SEEN] = np.arange(BIG_I)  # nothing left to recommend: an empty answer
    seen[BIG_PREFIX_SEEN] = by_norm[:5000]  # the largest-norm items: the best of them are all seen
    users[BIG_PREFIX_SEEN] = items[by_norm[0]]
    seen[6] = np.concatenate([seen[6], seen[6][:5]])  # a repeated training item
    lens = np.array([s.size for s in seen])
    return {
        "user_vectors": users,
        "item_vectors": items,
        "user_ids": np.array([f"u{i}" for i in range(BIG_U)]),
        "item_ids": np.array([f"i{i}" for i in range(BIG_I)]),
        "seen_indptr": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        "seen_indices": np.concatenate(seen).astype(np.int64),
    }


@pytest.fixture(scope="module")
def big_data() -> dict:
    return make_big_data()


@pytest.fixture(scope="module")
def big_flat(tmp_path_factory, big_data):
    out = tmp_path_factory.mktemp("bigflat") / "bundle"
    write(out, big_data, index_factory="Flat")
    return open_bundle(out)


@pytest.mark.parametrize("user_table", [True, False], ids=["user-table", "ort-per-call"])
@pytest.mark.parametrize("k", [1, BIG_K, 100, 700])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_dense_batch_equals_brute_force(big_flat, big_data, monkeypatch, k, exclude_seen, user_table):
    if not user_table:
        monkeypatch.setattr(recommender_module, "USER_TABLE_MAX_BYTES", 0)
    rec = Recommender(big_flat)
    assert rec.dense and (rec._user_table is not None) == user_table
    assert BIG_I > dense_topk.PREFIX  # the norm-ordered pruning is exercised
    users = np.arange(BIG_U, dtype=np.int64)
    batch = rec.recommend(users, k, exclude_seen=exclude_seen)
    for user, (items, scores) in zip(users.tolist(), batch):
        want_items, want_scores = brute_force(big_data, user, k, exclude_seen)
        np.testing.assert_array_equal(items, want_items, err_msg=f"user {user}")
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
        assert items.dtype == np.int64 and scores.dtype == np.float32
        # One user alone gets the same items and bit-identical scores as inside a batch.
        alone_items, alone_scores = rec.recommend(np.array([user]), k, exclude_seen=exclude_seen)[0]
        np.testing.assert_array_equal(alone_items, items)
        np.testing.assert_array_equal(alone_scores, scores)
    if exclude_seen:  # never padded, never a seen item
        mostly = batch[BIG_MOSTLY_SEEN][0]
        assert mostly.size == min(k, 3) and set(mostly.tolist()) <= {11, 4000, 9000}
        assert batch[BIG_EXACTLY_K][0].size == min(k, BIG_K)
        assert batch[BIG_ALL_SEEN][0].size == 0 and batch[BIG_ALL_SEEN][1].size == 0
    # A batch in another order and split differently gives the same answers.
    shuffled = np.random.default_rng(0).permutation(users)
    for user, (items, _) in zip(shuffled.tolist(), rec.recommend(shuffled, k, exclude_seen=exclude_seen)):
        np.testing.assert_array_equal(items, batch[user][0])


def test_dense_ties_ordered_by_item_index(big_flat):
    rec = Recommender(big_flat)
    items, scores = rec.recommend(np.array([5]), 11, exclude_seen=False)[0]
    # Items 7 and 100..109 share one vector; user 5 is 3x that vector, so they are its top 11.
    assert items.tolist() == [7, *range(100, 110)]
    assert np.unique(scores).size == 1


def test_dense_path_only_for_flat(flat, hnsw):
    assert flat.dense and not hnsw.dense


def test_hnsw_answer_of_a_user_does_not_depend_on_its_batch(hnsw):
    """HNSW searches as deep as it fetches: a user answered in a batch beside users with long histories gets the
    same items as alone (the batch endpoint, the pyfunc and /recommend agree)."""
    seen = np.diff(hnsw.bundle.seen_indptr)
    users = np.argsort(seen)[:: max(1, len(seen) // 40)].astype(np.int64)  # short to long histories
    assert np.unique(seen[users]).size > 3
    together = hnsw.recommend(users, 10, exclude_seen=True)
    for user, (items, scores) in zip(users.tolist(), together):
        alone, alone_scores = hnsw.recommend(np.array([user]), 10, exclude_seen=True)[0]
        np.testing.assert_array_equal(items, alone)
        np.testing.assert_array_equal(scores, alone_scores)
