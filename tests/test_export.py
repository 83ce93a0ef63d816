"""export.bundle.write_bundle (atomic, verified bundle writer) and export.from_checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.bundle import ExportError, topk_mismatch, write_bundle
from export import index_auto
from serving.bundle import open_bundle
from serving.bundle_format import decode_ids
from serving.recommender import Recommender

faiss.omp_set_num_threads(1)  # 2 shared cores: keep tests single-threaded

ROOT = Path(__file__).resolve().parents[1]
U, I, D = 250, 1500, 12
FILES = ["item_ids.npz", "items.faiss", "manifest.json", "model.onnx", "seen.npz", "user_ids.npz"]


def make_data(seed: int = 0, users: int = U, items: int = I, dim: int = D) -> dict:
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 30, users)
    lens[0] = items - 2  # a user who has seen nearly the whole catalogue
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return {
        "user_vectors": rng.standard_normal((users, dim)).astype(np.float32),
        "item_vectors": (rng.standard_normal((items, dim)) * rng.lognormal(0, 0.5, (items, 1))).astype(np.float32),
        "user_ids": np.array([f"u{i}" for i in range(users)]),
        "item_ids": np.array([f"i{i}" for i in range(items)]),
        "seen_indptr": indptr,
        "seen_indices": np.concatenate([rng.choice(items, n, replace=False) for n in lens]).astype(np.int64),
    }


def write(out: Path, data: dict, **kw) -> dict:
    kw.setdefault("lineage", {"checkpoint_fingerprint": "abc123", "mlflow_run_id": None})
    kw.setdefault("metrics", {"recall@20": 0.12})
    kw.setdefault("package_version", "0.0.test")
    return write_bundle(out, **data, **kw)


def numpy_topk(data: dict, users: np.ndarray, k: int) -> np.ndarray:
    """Brute-force reference: scores in float64, seen items removed."""
    out = []
    for u in users.tolist():
        scores = data["item_vectors"].astype(np.float64) @ data["user_vectors"][u].astype(np.float64)
        scores[data["seen_indices"][data["seen_indptr"][u] : data["seen_indptr"][u + 1]]] = -np.inf
        out.append(np.argsort(-scores, kind="stable")[:k])
    return np.stack(out)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def data() -> dict:
    return make_data()


def test_round_trip_flat(tmp_path, data):
    users = np.arange(1, 60, dtype=np.int64)
    manifest = write(tmp_path / "b", data, index_factory="auto", reference_topk=(users, numpy_topk(data, users, 20)))
    out = tmp_path / "b"
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert leftovers(tmp_path) == []
    assert manifest["format_version"] == 2 and manifest["metric"] == "inner_product"
    assert manifest["ids"] == {"user": {"file": "user_ids.npz", "encoding": "utf8"},
                               "item": {"file": "item_ids.npz", "encoding": "utf8"}}
    assert manifest["quantization"]["user_table"] == "fp32" and manifest["quantization"]["check"] is None
    assert (manifest["dim"], manifest["num_users"], manifest["num_items"]) == (D, U, I)
    idx = manifest["index"]
    assert idx["factory"] == "Flat" and idx["exact"] and idx["query_transform"] == "none" and idx["codec"] == "fp32"
    assert idx["recall_at_k"] == 1.0 and idx["k"] == 100
    assert idx["auto"]["chosen"] == "Flat" and idx["auto"]["candidates"][0]["note"] == "chosen"
    assert manifest["onnx"] == {"opset": 17, "ir_version": 8, "input": "user_index", "output": "user_vector"}
    assert manifest["parity_max_abs_diff"] <= 1e-5
    assert manifest["reference_topk_users"] == users.size
    assert manifest["lineage"]["checkpoint_fingerprint"] == "abc123"
    assert manifest["metrics"] == {"recall@20": 0.12}
    assert set(manifest["versions"]) >= {"package", "numpy", "onnx", "onnxruntime", "faiss"}
    assert manifest["created_at"].endswith("+00:00")
    for name, entry in manifest["files"].items():
        blob = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    assert json.loads((out / "manifest.json").read_text()) == manifest

    # The ONNX file alone: full checker, embedded table, dynamic batch, exact parity.
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Gather"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    got = session.run(["user_vector"], {"user_index": np.arange(U, dtype=np.int64)})[0]
    np.testing.assert_array_equal(got, data["user_vectors"])

    # Ids and seen CSR load without pickle.
    np.testing.assert_array_equal(decode_ids((out / "user_ids.npz").read_bytes(), "utf8"), data["user_ids"])
    with np.load(out / "seen.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["indptr"], data["seen_indptr"])
        assert npz["indices"].dtype == np.int32


def test_served_topk_equals_numpy(tmp_path, data):
    write(tmp_path / "b", data, index_factory="Flat")
    rec = Recommender(open_bundle(tmp_path / "b"))
    users = np.arange(U, dtype=np.int64)
    want = numpy_topk(data, users, 25)
    for u, (items, _) in zip(users.tolist(), rec.recommend(users, 25, exclude_seen=True)):
        n_unseen = I - (data["seen_indptr"][u + 1] - data["seen_indptr"][u])
        np.testing.assert_array_equal(items, want[u][: min(25, n_unseen)])
    assert rec.recommend(np.array([0]), 25, exclude_seen=True)[0][0].size == 2


def test_wrong_reference_refused_and_nothing_left(tmp_path, data):
    users = np.arange(1, 30, dtype=np.int64)
    ref = numpy_topk(data, users, 10)
    ref[3, [0, 1]] = ref[3, [1, 0]]  # swap the top two of one user
    with pytest.raises(ExportError, match=r"top-k of user 4 \(u4\) differs from the checkpoint's reference"):
        write(tmp_path / "b", data, reference_topk=(users, ref))
    assert not (tmp_path / "b").exists()
    assert leftovers(tmp_path) == []


def test_topk_mismatch_tolerates_ties():
    items = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [0.5, 0.0], [0.1, 0.0]], dtype=np.float32)
    q = np.array([1.0, 0.0], dtype=np.float32)
    assert topk_mismatch(q, items, np.array([1, 0, 3]), np.array([0, 1, 2])) is None  # tie at the cut
    assert topk_mismatch(q, items, np.array([1, 0, 2, 3]), np.array([0, 1, 3, 2])) is None
    assert "position 2" in topk_mismatch(q, items, np.array([0, 1, 4]), np.array([0, 1, 2]))
    assert "seen" in topk_mismatch(q, items, np.array([0, 1]), np.array([0, 1]), seen=np.array([1]))
    assert "items" in topk_mismatch(q, items, np.array([0]), np.array([0, 1]))


def test_auto_candidates():
    assert index_auto.candidate_factories(57_000, "fp32") == ["Flat", "IVF1024,Flat", "HNSW32"]
    assert index_auto.candidate_factories(1_500, "int8") == ["SQ8", "IVF32,SQ8", "HNSW32_SQ8"]
    assert index_auto.candidate_factories(50, "fp16") == ["SQfp16", "HNSW32_SQfp16"]  # too few items for IVF


def test_approximate_index_records_recall(tmp_path, data):
    users = np.arange(5, dtype=np.int64)
    manifest = write(tmp_path / "b", data, index_factory="HNSW32", reference_topk=(users, numpy_topk(data, users, 10)))
    idx = manifest["index"]
    assert not idx["exact"] and idx["query_transform"] == "ip2l2" and idx["metric_faiss"] == "l2"
    assert 0.95 <= idx["recall_at_k"] <= 1.0 and idx["recall_sample_users"] == U
    assert idx["search_params"]["efSearch"] >= 100 and idx["max_norm"] > 0
    assert manifest["reference_topk_users"] == 0  # only exact indexes are compared to the reference
    index = faiss.read_index(str(tmp_path / "b" / "items.faiss"))
    assert index.d == D + 1 and index.metric_type == faiss.METRIC_L2


def test_recall_floor_refusal_and_force(tmp_path, data):
    # 8-bit (2x4-bit) PQ codes cannot reach 0.95 recall@100 whatever nprobe is.
    with pytest.raises(ExportError, match=r"recall@100 = 0\.\d+ < recall_floor 0.95 .*force=True"):
        write(tmp_path / "b", data, index_factory="IVF16,PQ2x4")
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []
    manifest = write(tmp_path / "b", data, index_factory="IVF16,PQ2x4", force=True)
    assert manifest["index"]["recall_at_k"] < 0.95
    assert manifest["index"]["search_params"] == {"nprobe": 16}
    assert manifest["index"]["index_dim"] == D + 2  # 12 + ip2l2 coordinate + 1 zero column for PQ2x4
    rec = Recommender(open_bundle(tmp_path / "b"))
    items, _ = rec.recommend(np.array([3]), 10, exclude_seen=True)[0]
    assert items.size == 10


def test_bad_factory_and_tiny_catalogue(tmp_path, data):
    with pytest.raises(ExportError, match="rejected by faiss"):
        write(tmp_path / "b", data, index_factory="NoSuchIndex12")
    with pytest.raises(ExportError, match="4096 lists but only 1500 items"):
        write(tmp_path / "b", data, index_factory="IVF4096,Flat")
    assert leftovers(tmp_path) == []


def test_overwrite_rules(tmp_path, data):
    out = tmp_path / "b"
    out.mkdir()  # an existing empty directory is fine
    first = write(out, data, index_factory="Flat")
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        write(out, data, index_factory="Flat")
    other = make_data(seed=1)
    second = write(out, other, index_factory="Flat", overwrite=True)
    assert second["files"]["model.onnx"] != first["files"]["model.onnx"]
    assert sorted(p.name for p in out.iterdir()) == FILES and leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        write(tmp_path / "file", data)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(item_vectors=d["item_vectors"][:, :5]), "user dim 12 != item dim 5"),
        (lambda d: d.update(user_ids=np.array(["same"] * U)), "user_ids: external ids are not unique"),
        (lambda d: d.update(item_ids=d["item_ids"][:-1]), "item_ids: length 1499 != num_items 1500"),
        (lambda d: d.update(seen_indptr=d["seen_indptr"][:-1]), r"seen_indptr/seen_indices: indptr length 250 != num_users \+ 1"),
        (lambda d: d.update(seen_indices=d["seen_indices"] + I), r"seen_indices: indices outside \[0, num_items=1500\)"),
        (lambda d: d.update(user_vectors=np.full((U, D), np.nan, np.float32)), "NaN"),
    ],
)
def test_invalid_inputs(tmp_path, data, change, message):
    bad = dict(data)
    change(bad)
    with pytest.raises(ExportError, match=message):
        write(tmp_path / "b", bad)


def test_export_bundle_module_does_not_import_torch():
    # export.bundle may use compressor.retrieval (numpy + faiss), never torch or mlflow.
    code = "import sys, export.bundle; assert not {'torch', 'mlflow'} & {m.split('.')[0] for m in sys.modules}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------- real checkpoints
@pytest.mark.parametrize("kind", ["mf", "lightgcn"])
def test_export_checkpoint(tmp_path, kind):
    torch = pytest.importorskip("torch")
    checkpoint = pytest.importorskip("compressor.checkpoint")
    models = pytest.importorskip("compressor.models")
    from export.from_checkpoint import export_checkpoint

    torch.manual_seed(0)
    d = make_data(seed=2, users=120, items=400, dim=8)
    model = models.build_model(kind, num_users=120, num_items=400, dim=8, init_std=0.5)
    if kind == "lightgcn":
        model.set_graph(np.repeat(np.arange(120), np.diff(d["seen_indptr"])), d["seen_indices"])
    meta = {"metrics": {"valid": {"ndcg@20": 0.1}, "test": {"ndcg@20": 0.2}}, "mlflow_run_id": "run-42", "config": {}}
    path = tmp_path / "model.safetensors"
    saved = checkpoint.save_checkpoint(
        path, model=model, meta=meta, user_ids=d["user_ids"], item_ids=d["item_ids"],
        train_indptr=d["seen_indptr"], train_indices=d["seen_indices"],
    )
    manifest = export_checkpoint(path, tmp_path / "bundle", k_max=50, lineage_extra={"mlflow_model_version": "3"})
    assert manifest["lineage"]["checkpoint_fingerprint"] == saved["fingerprint"]
    assert manifest["lineage"]["mlflow_run_id"] == "run-42"
    assert manifest["lineage"]["mlflow_model_version"] == "3"
    assert manifest["lineage"]["model_kind"] == kind
    assert manifest["metrics"] == {"ndcg@20": 0.2}
    assert manifest["index"]["exact"] and manifest["parity_max_abs_diff"] <= 1e-5
    assert manifest["reference_topk_users"] == 119  # all but user 0, who has < 50 unseen items

    # Serving answers what the checkpoint's model scores, for every user.
    with torch.no_grad():
        u, i = (t.detach() for t in checkpoint.load_checkpoint(path).build_model().vectors())
    want = numpy_topk({**d, "user_vectors": u.numpy(), "item_vectors": i.numpy()}, np.arange(120), 10)
    rec = Recommender(open_bundle(tmp_path / "bundle"))
    for user, (items, _) in enumerate(rec.recommend(np.arange(120, dtype=np.int64), 10, exclude_seen=True)):
        assert topk_mismatch(u[user].numpy(), i.numpy(), items, want[user][: items.size]) is None


def test_auto_keeps_the_smallest_that_serves_as_well(tmp_path, data, monkeypatch):
    # A candidate smaller than the exact scan (2 x 4-bit PQ codes): chosen only when its recall reaches the floor
    # and it is no slower than the exact scan. Latencies are fixed here so the rule, not the machine, decides.
    monkeypatch.setattr(index_auto, "candidate_factories", lambda n, q: ["Flat", "IVF16,PQ2x4", "HNSW32"])
    fixed = {"fast": [50.0, 40.0, 30.0], "slow": [50.0, 60.0, 30.0]}

    def run(name, speed, floor):
        monkeypatch.setattr(index_auto, "single_user_p50_us", lambda recs, users: fixed[speed])
        return write(tmp_path / name, data, index_factory="auto", recall_floor=floor)["index"]

    idx = run("a", "fast", 0.0)
    assert idx["factory"] == "IVF16,PQ2x4" and not idx["exact"] and idx["auto"]["chosen"] == "IVF16,PQ2x4"
    rows = {row["factory"]: row for row in idx["auto"]["candidates"]}
    assert rows["IVF16,PQ2x4"]["bytes"] < rows["Flat"]["bytes"]
    # HNSW32 over the exact scan's own float codes cannot be smaller: measured out without being built
    assert not rows["HNSW32"]["eligible"] and rows["HNSW32"]["note"].startswith("not built: at least")
    assert (tmp_path / "a" / "items.faiss").stat().st_size == rows["IVF16,PQ2x4"]["bytes"]
    idx = run("b", "slow", 0.0)
    assert idx["factory"] == "Flat" and idx["exact"]
    assert "p50 60.0 us > the exact scan's 50.0 us" in rows_of(idx)["IVF16,PQ2x4"]["note"]
    idx = run("c", "fast", 0.95)
    assert idx["factory"] == "Flat" and "< recall_floor 0.95" in rows_of(idx)["IVF16,PQ2x4"]["note"]
    assert idx["auto_note"].startswith("Flat: ")


def rows_of(idx: dict) -> dict:
    return {row["factory"]: row for row in idx["auto"]["candidates"]}


def test_export_checkpoint_quantized(tmp_path):
    torch = pytest.importorskip("torch")
    checkpoint = pytest.importorskip("compressor.checkpoint")
    models = pytest.importorskip("compressor.models")
    from export.from_checkpoint import export_checkpoint

    torch.manual_seed(0)
    d = make_data(seed=2, users=120, items=400, dim=8)
    model = models.build_model("mf", num_users=120, num_items=400, dim=8, init_std=0.5)
    path = tmp_path / "model.safetensors"
    checkpoint.save_checkpoint(path, model=model, meta={"metrics": {}, "config": {}}, user_ids=d["user_ids"],
                               item_ids=d["item_ids"], train_indptr=d["seen_indptr"], train_indices=d["seen_indices"])
    manifest = export_checkpoint(path, tmp_path / "bundle", k_max=20, quantize="fp16")
    q = manifest["quantization"]
    assert q["user_table"] == "fp16" and q["passed"] and q["check"]["reference"] == "caller's reference top-k"
    assert q["check"]["users"] == manifest["reference_topk_users"] == 119  # user 0 has < 20 unseen items
    assert manifest["index"]["factory"] == "SQfp16"
