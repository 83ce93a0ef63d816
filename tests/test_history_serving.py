"""History user towers (`model.kind: history`): the exported ONNX graph against `HistoryPool.encode`, the bundle
(manifest `user_tower`, histories in seen.npz in split order), `python -m serving` answering histories and user
ids of a history bundle (a real server per setting), ID-tower bundles old and new, and the MLflow pyfunc."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from export.bundle import topk_mismatch, write_bundle
from export.errors import ExportError
from export.history_tower import build_history_tower
from serving.bundle import open_bundle
from serving.bundle_format import UserTower, ort_session, read_user_tower
from serving.openapi import build_openapi
from serving.config import ServeConfig
from serving.recommender import Recommender

from .conftest import HISTORY_MAX_LEN, Server, brute_force_topk

torch = pytest.importorskip("torch")
from compressor.checkpoint import load_checkpoint  # noqa: E402  (after torch is known to be there)
from compressor.models import HistoryPool, padded_histories  # noqa: E402
from export.from_checkpoint import export_checkpoint, history_tower  # noqa: E402

K = 10
MAX_K, MAX_BATCH = 50, 8


# ------------------------------------------------------------------------------------------- helpers
def random_pool(num_users: int, num_items: int, dim: int, max_len: int, seed: int = 0) -> HistoryPool:
    """A history tower with random weights large enough that every part of the graph matters."""
    torch.manual_seed(seed)
    model = HistoryPool(num_users, num_items, dim, max_len=max_len, hidden=16, init_std=0.5)
    with torch.no_grad():
        for layer in (model.mlp_in, model.mlp_out):
            layer.bias.normal_()
    return model.eval()


def random_csr(num_users: int, num_items: int, longest: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, longest + 1, num_users)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return indptr, rng.integers(0, num_items, int(indptr[-1])).astype(np.int64)  # unsorted, may repeat


def encode(model: HistoryPool, history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.as_tensor(history), torch.as_tensor(lengths)).numpy()


def assert_error(resp, status: int, needle: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert needle.lower() in error.lower() and "\n" not in error, error


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hist(history_bundle):
    bundle = open_bundle(history_bundle)
    return SimpleNamespace(path=history_bundle, bundle=bundle, rec=Recommender(bundle, blas_threads=None),
                           items=bundle.item_ids.tolist(), users=bundle.user_ids.tolist())


def stored_history(hist, user: int) -> list[str]:
    """A training user's history as its external item ids: its last max_len training items, oldest first."""
    return [hist.items[i] for i in hist.bundle.seen(user)[-HISTORY_MAX_LEN:]]


@pytest.fixture(scope="module")
def old_id_bundle(tmp_path_factory) -> Path:
    """An ID-tower bundle whose manifest has no `user_tower` (as every bundle written before history towers)."""
    rng = np.random.default_rng(0)
    indptr, indices = random_csr(50, 300, 20)
    out = tmp_path_factory.mktemp("idbundle") / "bundle"
    write_bundle(out, user_vectors=rng.standard_normal((50, 8)).astype(np.float32),
                 item_vectors=rng.standard_normal((300, 8)).astype(np.float32),
                 user_ids=np.array([f"user-{i}" for i in range(50)]), item_ids=np.array([f"item-{i}" for i in range(300)]),
                 seen_indptr=indptr, seen_indices=indices, index_factory="Flat", lineage={}, metrics={},
                 package_version="0.0.test")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest.pop("user_tower") == {"kind": "id"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))  # the manifest is not among the hashed files
    return out


@pytest.fixture(scope="module")
def servers(history_bundle, old_id_bundle, tmp_path_factory):
    """`python -m serving` over the history bundle (no fallback / the popular fallback) and over the old ID bundle."""
    logs = tmp_path_factory.mktemp("servers")
    limits = ["--workers", 1, "--max-k", MAX_K, "--max-batch", MAX_BATCH]
    started = {
        "plain": Server(["-m", "serving", history_bundle, *limits], logs / "plain.log"),
        "fallback": Server(["-m", "serving", history_bundle, *limits, "--fallback", "popular"], logs / "fallback.log"),
        "id": Server(["-m", "serving", old_id_bundle, *limits], logs / "id.log"),
    }
    try:
        for server in started.values():
            server.wait("/readyz")
        yield started
    finally:
        for server in started.values():
            server.stop()


# ------------------------------------------------------------------------------------- export, parity
def test_onnx_graph_equals_torch_encode():
    """ORT on the exported graph == HistoryPool.encode: lengths 0, 1, max_len, random padding, any padded width."""
    max_len, num_items = 12, 300
    model = random_pool(40, num_items, 8, max_len)
    indptr, indices = random_csr(40, num_items, 30)
    model.set_graph(np.repeat(np.arange(40), np.diff(indptr)), indices)
    with torch.no_grad():
        vectors = model.vectors()[0].numpy()
    tower, users = history_tower(model, indptr, indices, vectors)
    np.testing.assert_allclose(users, vectors, atol=1e-5)  # encode of the CSR == the training path
    assert {0, 1, max_len} <= set(tower.probe_lengths.tolist())
    session = ort_session(build_history_tower(tower).SerializeToString())

    def ort(history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return session.run(["user_vector"], {"history": history.astype(np.int64), "lengths": lengths.astype(np.int64)})[0]

    rng = np.random.default_rng(3)
    lengths = rng.integers(0, max_len + 1, 200)
    lengths[:3] = [0, 1, max_len]
    history = rng.integers(0, num_items, (200, max_len))  # the padding holds random valid items: it must not count
    want = encode(model, history, lengths)
    np.testing.assert_allclose(ort(history, lengths), want, rtol=1e-5, atol=1e-5)
    short = lengths <= 5  # a narrower padded width gives the same vectors
    np.testing.assert_allclose(ort(history[short, :5], lengths[short]), want[short], rtol=1e-5, atol=1e-5)
    for row in (1, 2, 7):  # one request, unpadded
        n = int(lengths[row])
        np.testing.assert_allclose(ort(history[row : row + 1, :n], lengths[row : row + 1]), want[row : row + 1],
                                   rtol=1e-5, atol=1e-5)
    empty = ort(np.zeros((2, 0)), np.zeros(2))  # an empty history pools to zeros: the MLP of 0 plus nothing
    np.testing.assert_allclose(empty, want[[0, 0]], rtol=1e-5, atol=1e-5)
    # The padded histories of the checkpoint's own CSR (compressor's padding) through the graph == encode.
    padded, lens = padded_histories(indptr, indices, max_len)
    np.testing.assert_allclose(ort(padded, lens), users, rtol=1e-5, atol=1e-5)


def test_history_bundle_manifest_and_histories(hist, history_run, tmp_path):
    manifest = hist.bundle.manifest
    assert manifest["format_version"] == 2
    assert manifest["user_tower"] == {"kind": "history", "max_len": HISTORY_MAX_LEN, "inputs": ["history", "lengths"]}
    assert manifest["onnx"]["input"] == "history" and manifest["quantization"]["user_table"] == "fp32"
    assert manifest["parity_max_abs_diff"] <= 1e-5 and manifest["reference_topk_users"] > 0
    assert hist.bundle.user_tower == UserTower("history", HISTORY_MAX_LEN)
    # seen.npz holds each user's training items in the checkpoint's (split) order: it is the stored history.
    ckpt = load_checkpoint(history_run)
    np.testing.assert_array_equal(hist.bundle.seen_indptr, ckpt.train_indptr)
    np.testing.assert_array_equal(hist.bundle.seen_indices, ckpt.train_indices)
    assert np.diff(ckpt.train_indptr).max() > HISTORY_MAX_LEN  # the window matters
    # The served vector of every training user == torch's encode of its last max_len items.
    model = ckpt.build_model()
    want = encode(model, *padded_histories(ckpt.train_indptr, ckpt.train_indices, model.max_len))
    users = np.arange(hist.bundle.num_users, dtype=np.int64)
    np.testing.assert_allclose(hist.rec.user_vectors(users), want, rtol=1e-5, atol=1e-5)
    # Quantizing the history tower is refused, in one line, and leaves nothing behind.
    with pytest.raises(ExportError, match="fp32 only") as refused:
        export_checkpoint(history_run, tmp_path / "int8", quantize="int8")
    assert "\n" not in str(refused.value) and not (tmp_path / "int8").exists()


def test_history_answers_exact_and_batch_independent(hist):
    """Dense path: histories of every length (repeats allowed) get the brute-force top-k of the served vector."""
    if not hist.bundle.manifest["index"]["exact"]:
        pytest.skip("auto chose an approximate index for this catalogue")
    rng = np.random.default_rng(5)
    histories = [rng.integers(0, hist.bundle.num_items, n).astype(np.int64) for n in [1, 2, HISTORY_MAX_LEN, 7, 7, 13]]
    vecs = hist.rec.history_vectors(histories)
    items = hist.bundle.item_vectors
    together = hist.rec.recommend_histories(histories, K)
    for row, (h, (got, scores)) in enumerate(zip(histories, together)):
        want = brute_force_topk(vecs, items, row, K, h)
        assert topk_mismatch(vecs[row], items, got, want, h) is None
        alone_items, alone_scores = hist.rec.recommend_histories([h], K)[0]
        np.testing.assert_array_equal(alone_items, got)
        np.testing.assert_allclose(alone_scores, scores, rtol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        hist.rec.history_vectors([np.zeros(HISTORY_MAX_LEN + 1, dtype=np.int64)])
    with pytest.raises(IndexError):
        hist.rec.history_vectors([np.array([-1])])  # ORT's Gather would wrap it


def test_approximate_index_answers_histories(tmp_path):
    """HNSW: a history answer never holds a history item and is full; the stored history answers as the user id."""
    num_users, num_items, max_len = 60, 1500, 10
    model = random_pool(num_users, num_items, 8, max_len, seed=1)
    indptr, indices = random_csr(num_users, num_items, 25, seed=1)
    model.set_graph(np.repeat(np.arange(num_users), np.diff(indptr)), indices)
    with torch.no_grad():
        vectors = [v.detach() for v in model.vectors()]
    tower, users = history_tower(model, indptr, indices, vectors[0].numpy())
    args = dict(user_vectors=users, item_vectors=vectors[1].numpy(),
                user_ids=np.array([f"u{i}" for i in range(num_users)]),
                item_ids=np.array([f"i{i}" for i in range(num_items)]), seen_indptr=indptr, seen_indices=indices,
                index_factory="HNSW32", recall_floor=0.5, lineage={}, metrics={}, package_version="0.0.test")
    # A graph that does not reproduce the reference (here: a reference off by 1e-3) is refused, nothing kept.
    off = dataclasses.replace(tower, probe_vectors=tower.probe_vectors + np.float32(1e-3))
    with pytest.raises(ExportError, match="differs from the checkpoint's .* on random histories"):
        write_bundle(tmp_path / "off", **args, history_tower=off)
    assert not (tmp_path / "off").exists()
    write_bundle(tmp_path / "b", **args, history_tower=tower)
    rec = Recommender(open_bundle(tmp_path / "b"), blas_threads=None)
    assert not rec.dense and rec.tower.is_history
    np.testing.assert_array_equal(rec.bundle.seen_indices, indices)  # the writer keeps the (unsorted) order
    assert any(np.any(np.diff(r) < 0) for r in np.split(indices, indptr[1:-1]))
    stored = [indices[indptr[u] : indptr[u + 1]][-max_len:] for u in range(num_users)]
    by_user = rec.recommend(np.arange(num_users), K, exclude_seen=False)
    for (a, sa), (b, sb) in zip(by_user, rec.recommend_histories(stored, K, exclude_history=False)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(sa, sb, rtol=1e-6)
    for h, (got, _) in zip(stored, rec.recommend_histories(stored, K)):
        assert got.size == K and not np.isin(got, h).any()


@pytest.mark.parametrize("tower, needle", [
    ({"kind": "graph"}, "manifest.json: user_tower.kind 'graph' not in"),
    ({"kind": "history", "max_len": 0, "inputs": ["history", "lengths"]}, "user_tower.max_len must be a positive"),
    ({"kind": "history", "max_len": 5, "inputs": ["history"]}, "user_tower.inputs"),
    ({"kind": "history", "max_len": 5, "inputs": ["history", "lengths"]}, "model.onnx: expected int64 inputs"),
])
def test_loader_checks_the_user_tower(old_id_bundle, tmp_path, tower, needle):
    from serving.bundle import BundleError

    copy = tmp_path / "b"
    shutil.copytree(old_id_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "user_tower": tower}))
    with pytest.raises(BundleError, match=re.escape(needle)):
        open_bundle(copy)


def test_loader_refuses_a_history_graph_declared_as_id(hist, tmp_path):
    from serving.bundle import BundleError

    copy = tmp_path / "b"
    shutil.copytree(hist.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "user_tower": {"kind": "id"}}))
    with pytest.raises(BundleError, match="model.onnx: expected one int64 input 'history'"):
        open_bundle(copy)


# ------------------------------------------------------------------------------------- the real server
def test_history_request_excludes_history_and_counts_unknowns(servers, hist):
    http = servers["plain"].http
    user = int(np.argmax(np.diff(hist.bundle.seen_indptr)))
    history = stored_history(hist, user)[-8:]
    r = http.post("/recommend", json={"history": ["no-such-item", *history, "nor-this"], "k": K})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"items", "scores", "unknown_items"} and body["unknown_items"] == 2
    assert len(body["items"]) == K and not set(body["items"]) & set(history)
    assert body["scores"] == sorted(body["scores"], reverse=True)
    known = np.array([hist.items.index(i) for i in history], dtype=np.int64)
    items, scores = hist.rec.recommend_histories([known], K)[0]
    assert body["items"] == [hist.items[i] for i in items]
    np.testing.assert_allclose(body["scores"], scores, rtol=1e-6)
    kept = http.post("/recommend", json={"history": history, "k": K, "exclude_seen": False}).json()
    kept_items, _ = hist.rec.recommend_histories([known], K, exclude_history=False)[0]
    assert kept["unknown_items"] == 0 and kept["items"] == [hist.items[i] for i in kept_items]
    meta = http.get("/metadata").json()
    assert meta["user_tower"] == {"kind": "history", "max_len": HISTORY_MAX_LEN, "inputs": ["history", "lengths"]}


def test_user_id_equals_its_stored_history(servers, hist):
    http = servers["plain"].http
    lens = np.diff(hist.bundle.seen_indptr)
    rng = np.random.default_rng(0)
    short_users = rng.choice(np.flatnonzero(lens <= HISTORY_MAX_LEN), 4, replace=False).tolist()
    long_users = rng.choice(np.flatnonzero(lens > HISTORY_MAX_LEN), 4, replace=False).tolist()
    for user in short_users + long_users:
        for exclude in ([True, False] if user in short_users else [False]):  # a long user's seen > its history
            by_id = http.post("/recommend", json={"user_id": hist.users[user], "k": K, "exclude_seen": exclude}).json()
            by_history = http.post("/recommend", json={"history": stored_history(hist, user), "k": K,
                                                       "exclude_seen": exclude}).json()
            assert by_id["items"] == by_history["items"], (user, exclude)
            np.testing.assert_allclose(by_id["scores"], by_history["scores"], rtol=1e-6)
    # The batch's mixed requests answer what the single requests answer, in order.
    user = short_users[0]
    requests = [{"user_id": hist.users[user]}, {"history": stored_history(hist, user)}, {"user_id": "nobody"},
                {"history": ["nope"]}, {"history": ["nope", *stored_history(hist, long_users[0])[-5:]]}]
    r = http.post("/recommend/batch", json={"requests": requests, "k": K})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0] == http.post("/recommend", json={**requests[0], "k": K}).json()
    assert results[1] == http.post("/recommend", json={**requests[1], "k": K}).json()
    assert results[0]["items"] == results[1]["items"]
    assert results[2] == {"user_id": "nobody", "error": "unknown user id", "status": 404}
    assert results[3]["status"] == 422 and results[3]["unknown_items"] == 1 and "no known item" in results[3]["error"]
    assert results[4]["unknown_items"] == 1 and len(results[4]["items"]) == K
    assert http.post("/recommend/batch", json={"user_ids": [hist.users[user]], "k": K}).json()["results"][0] == results[0]


def test_bad_history_requests(servers, hist):
    http = servers["plain"].http
    item, user = hist.items[0], hist.users[0]
    cases = [
        ("/recommend", {"history": ["nope", "nor"]}, "no known item in history (2 item id(s), 2 unknown"),
        ("/recommend", {"history": []}, "no known item in history (0 item id(s)"),
        ("/recommend", {"history": [item] * (HISTORY_MAX_LEN + 1)}, f"more than this bundle's max_len {HISTORY_MAX_LEN}"),
        ("/recommend", {"history": item}, "history must be an array of item id strings"),
        ("/recommend", {"history": {"a": 1}}, "history must be an array"),
        ("/recommend", {"history": [item, 5]}, "history[1] must be a string (an item id), got integer 5"),
        ("/recommend", {"history": [item, None]}, "history[1] must be a string"),
        ("/recommend", {"user_id": user, "history": [item]}, "send either 'user_id' or 'history', not both"),
        ("/recommend", {"k": 5}, "missing required field 'user_id' or 'history'"),
        ("/recommend", {"history": [item], "k": MAX_K + 1}, "k must be between"),
        ("/recommend/batch", {"requests": [{"history": [item]}, {"history": 3}]}, "requests[1].history must be an array"),
        ("/recommend/batch", {"requests": [{"user_id": user, "history": []}]}, "requests[0]: send either"),
        ("/recommend/batch", {"requests": [{}]}, "requests[0]: missing required field 'user_id' or 'history'"),
        ("/recommend/batch", {"requests": [user]}, "requests[0] must be a JSON object"),
        ("/recommend/batch", {"requests": [{"items": [item]}]}, "requests[0]: unknown field(s) 'items'"),
        ("/recommend/batch", {"requests": [{"user_id": 7}]}, "requests[0].user_id must be a string"),
        ("/recommend/batch", {"requests": [{"history": [item] * (HISTORY_MAX_LEN + 1)}]}, "requests[0].history has"),
        ("/recommend/batch", {"requests": []}, "requests is empty"),
        ("/recommend/batch", {"requests": [{"history": [item]}] * (MAX_BATCH + 1)}, "more than max_batch"),
        ("/recommend/batch", {"requests": {"history": [item]}}, "requests must be an array"),
        ("/recommend/batch", {"user_ids": [user], "requests": [{"user_id": user}]}, "not both"),
    ]
    for path, body, needle in cases:
        assert_error(http.post(path, json=body), 422, needle)


def test_popular_fallback_for_histories_without_known_items(servers, hist):
    http = servers["fallback"].http
    popular = http.post("/recommend", json={"user_id": "nobody", "k": K}).json()
    assert popular["fallback"] == "popular"
    for history in (["nope", "nor"], []):
        r = http.post("/recommend", json={"history": history, "k": K})
        assert r.status_code == 200, r.text
        assert r.json() == {"items": popular["items"], "scores": popular["scores"], "unknown_items": len(history),
                            "fallback": "popular"}
    results = http.post("/recommend/batch", json={"requests": [{"history": ["nope"]}, {"history": hist.items[:3]}],
                                                  "k": K}).json()["results"]
    assert results[0]["fallback"] == "popular" and results[0]["unknown_items"] == 1
    assert "fallback" not in results[1] and not set(results[1]["items"]) & set(hist.items[:3])
    # Still refused, fallback or not: what is malformed, too long, or for an ID tower.
    assert_error(http.post("/recommend", json={"history": [hist.items[0]] * (HISTORY_MAX_LEN + 1)}), 422, "max_len")


def test_id_bundle_refuses_histories_and_old_manifest_reads_as_id(servers, old_id_bundle):
    http = servers["id"].http
    tower = "this bundle's user tower is looked up by user id"
    assert_error(http.post("/recommend", json={"history": ["item-1"]}), 422, tower)
    assert_error(http.post("/recommend", json={"history": 5}), 422, tower)
    assert_error(http.post("/recommend/batch", json={"requests": [{"user_id": "user-1"}, {"history": ["item-1"]}]}),
                 422, f"requests[1].history: {tower}")
    single = http.post("/recommend", json={"user_id": "user-1", "k": K})
    assert single.status_code == 200 and set(single.json()) == {"user_id", "items", "scores"}
    batch = http.post("/recommend/batch", json={"requests": [{"user_id": "user-1"}, {"user_id": "x"}], "k": K})
    assert batch.json()["results"][0] == single.json() and batch.json()["results"][1]["status"] == 404
    assert http.get("/metadata").json()["user_tower"] == {"kind": "id"}
    # An old manifest (no user_tower) is an ID tower; the format version is unchanged.
    manifest = json.loads((old_id_bundle / "manifest.json").read_text())
    assert "user_tower" not in manifest and manifest["format_version"] == 2
    assert read_user_tower(manifest) == UserTower() and open_bundle(old_id_bundle).user_tower.kind == "id"


def test_openapi_documents_history_requests(servers):
    from openapi_spec_validator import validate

    doc = servers["plain"].http.get("/openapi.json").json()
    validate(doc)
    schemas = doc["components"]["schemas"]
    assert schemas["RecommendRequest"]["oneOf"] == [{"required": ["user_id"]}, {"required": ["history"]}]
    assert schemas["RecommendRequest"]["properties"]["history"]["items"] == {"type": "string"}
    assert schemas["BatchRequest"]["properties"]["requests"]["items"] == {"$ref": "#/components/schemas/BatchEntry"}
    assert schemas["HistoryRecommendation"]["required"] == ["items", "scores", "unknown_items"]
    assert doc == json.loads(json.dumps(build_openapi(ServeConfig(bundle_path="/x", max_k=MAX_K, max_batch=MAX_BATCH),
                                                      auth=False)))


# -------------------------------------------------------------------------------------------- pyfunc
def test_pyfunc_takes_histories(hist, old_id_bundle):
    from mlflow.exceptions import MlflowException

    from compress_app.tracking.bundle_pyfunc import BundleRecommender

    model = BundleRecommender()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(hist.path)}))
    short = int(np.flatnonzero(np.diff(hist.bundle.seen_indptr) <= HISTORY_MAX_LEN)[0])  # its history is its seen
    h1, h2 = stored_history(hist, short), ["nope", *stored_history(hist, 4)[-5:]]
    out = model.predict(None, pd.DataFrame({"history": [h1, h2]}), {"k": K})
    assert list(out.columns) == ["user_id", "items", "scores", "unknown_items"]
    assert out["unknown_items"].tolist() == [0, 1] and out["user_id"].isna().all()
    known = [np.array([hist.items.index(i) for i in h if i != "nope"]) for h in (h1, h2)]
    for row, (items, scores) in enumerate(hist.rec.recommend_histories(known, K)):
        assert out["items"][row] == [hist.items[i] for i in items]
        np.testing.assert_allclose(out["scores"][row], scores, rtol=1e-6)
    mixed = model.predict(None, pd.DataFrame({"user_id": [hist.users[short], None], "history": [None, h1]}), {"k": K})
    assert mixed["items"][0] == mixed["items"][1] == out["items"][0]
    assert mixed["user_id"].tolist()[0] == hist.users[short] and mixed["unknown_items"].tolist()[1] == 0
    one = model.predict(None, {"history": h1}, {"k": K})
    assert one["items"][0] == out["items"][0]
    plain = model.predict(None, pd.DataFrame({"user_id": [hist.users[short]]}), {"k": K})
    assert list(plain.columns) == ["user_id", "items", "scores"] and plain["items"][0] == mixed["items"][0]
    for bad, needle in [(pd.DataFrame({"history": [["nope"]]}), "no item id the model knows"),
                        (pd.DataFrame({"history": [h1 * 3]}), f"max_len {HISTORY_MAX_LEN}"),
                        (pd.DataFrame({"history": ["abc"]}), "must be a list of item ids"),
                        (pd.DataFrame({"user_id": [hist.users[0]], "history": [h1]}), "exactly one"),
                        (pd.DataFrame({"history": [h1], "k": [3]}), "unexpected column")]:
        with pytest.raises(MlflowException, match=needle):
            model.predict(None, bad, {"k": K})
    id_model = BundleRecommender()
    id_model.load_context(SimpleNamespace(artifacts={"bundle": str(old_id_bundle)}))
    with pytest.raises(MlflowException, match="looked up by user id"):
        id_model.predict(None, pd.DataFrame({"history": [["item-1"]]}), {"k": K})
    assert id_model.predict(None, ["user-1"], {"k": K})["items"][0]
