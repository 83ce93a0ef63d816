"""The history tower (model.kind history), the cold-user hold-out and its baselines, and KD with the training items
excluded from the top lists."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from compressor import api
from compressor.checkpoint import load_checkpoint
from compressor.config import from_dict
from compressor.cold import ease_weights, evaluate_baselines, history_model_vectors, item_knn_vectors
from compressor.data import Dataset, Split, cold_user_mask, hold_out_cold_users
from compressor.kd_retrieval import masked_topk
from compressor.models import HistoryPool, padded_histories, window_pairs
from export.from_checkpoint import export_checkpoint
from serving.bundle import open_bundle

from .conftest import ROOT, TINY_TRAIN, assert_one_line_error, cli_command, run_cli

HISTORY = ["--set", "model.kind=history", "--set", "model.dim=8", "--set", "model.max_len=6",
           "--set", "model.hidden=16"]


def _model(num_users=5, num_items=12, max_len=4, seed=0):
    torch.manual_seed(seed)
    m = HistoryPool(num_users, num_items, dim=6, max_len=max_len, hidden=7, init_std=0.3)
    with torch.no_grad():  # non-zero biases, so the MLP path is really checked
        m.mlp_in.bias.normal_()
        m.mlp_out.bias.normal_()
    return m.double()


# user 0: 6 items (2 older than max_len 4), user 1: 1 item, user 2: none, user 3: 4 items, user 4: 2 items
USERS = np.array([0, 0, 0, 0, 0, 0, 1, 3, 3, 3, 3, 4, 4])
ITEMS = np.array([5, 1, 9, 2, 7, 3, 4, 0, 11, 6, 8, 10, 2])


def _reference(m: HistoryPool, history: list[int]) -> torch.Tensor:
    """The spec of the tower, written plainly: mean of the history rows, plus the residual MLP of it."""
    e = m.history_emb.weight
    mean = e[history].mean(0) if history else torch.zeros(e.shape[1], dtype=e.dtype)
    return mean + m.mlp_out(torch.relu(m.mlp_in(mean)))


def test_window_keeps_each_users_most_recent_items_in_order():
    u, i = window_pairs(USERS, ITEMS, 5, 4)
    assert i[u == 0].tolist() == [9, 2, 7, 3] and i[u == 1].tolist() == [4] and i[u == 3].tolist() == [0, 11, 6, 8]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(USERS, minlength=5))])
    hist, lengths = padded_histories(indptr, ITEMS, 4)
    assert lengths.tolist() == [4, 1, 0, 4, 2] and hist[0].tolist() == [9, 2, 7, 3] and hist[4].tolist() == [10, 2, 0, 0]


def test_vectors_and_encode_follow_the_spec():
    m = _model()
    m.set_graph(USERS, ITEMS)
    with torch.no_grad():
        u, items = m.vectors()
        indptr = np.concatenate([[0], np.cumsum(np.bincount(USERS, minlength=5))])
        hist, lengths = padded_histories(indptr, ITEMS, 4)
        enc = m.encode(torch.as_tensor(hist), torch.as_tensor(lengths))
        for user in range(5):
            window = ITEMS[USERS == user][-4:].tolist()
            ref = _reference(m, window)
            torch.testing.assert_close(u[user], ref, rtol=0, atol=1e-12)
            torch.testing.assert_close(enc[user], ref, rtol=0, atol=1e-12)
    assert items is m.item_emb.weight


def test_the_predicted_item_is_never_part_of_its_own_history():
    m = _model()
    m.set_graph(USERS, ITEMS)
    pairs = list(zip(USERS.tolist(), ITEMS.tolist()))
    users = torch.tensor([p[0] for p in pairs])
    pos = torch.tensor([p[1] for p in pairs])
    with torch.no_grad():
        got = m.bpr_user_vectors(users, pos)
        for row, (user, item) in enumerate(pairs):
            window = ITEMS[USERS == user][-4:].tolist()
            # in the window: left out; older than the window: the window as it is (it does not hold the item)
            expected = _reference(m, [x for x in window if x != item])
            torch.testing.assert_close(got[row], expected, rtol=0, atol=1e-12)
    # the gradient reaches the history rows but never the left-out positive's history row through this pair
    m.zero_grad()
    m.bpr_user_vectors(torch.tensor([1]), torch.tensor([4])).sum().backward()
    assert float(m.history_emb.weight.grad.abs().sum()) == 0.0  # user 1's only item was left out


def test_checkpoint_rebuilds_the_history_tower_alone(tmp_path, slice_data):
    out = tmp_path / "h"
    run_cli("train", "--out", out, "--set", f"data.path={slice_data}", "--epochs", 2, *HISTORY, *TINY_TRAIN)
    ck = load_checkpoint(out)
    assert ck.meta["model"] == {"kind": "history", "num_users": 400, "num_items": ck.meta["model"]["num_items"],
                                "dim": 8, "max_len": 6, "hidden": 16, "init_std": 0.01}
    m = ck.build_model()
    with torch.no_grad():
        u, _ = m.vectors()
        hist, lengths = padded_histories(ck.train_indptr, ck.train_indices, 6)
        torch.testing.assert_close(m.encode(torch.as_tensor(hist), torch.as_tensor(lengths)), u, rtol=0, atol=1e-6)
    res = json.loads(run_cli("evaluate", out, "--json").stdout)
    assert res["ndcg@20"] == pytest.approx(json.loads((out / "result.json").read_text())["test"]["ndcg@20"])


def _toy_data(share=0.0) -> Dataset:
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(60):
        chosen = rng.choice(30, size=rng.integers(3, 12), replace=False)
        users += [u] * len(chosen)
        items += chosen.tolist()
    users, items = np.array(users), np.array(items)
    n = len(users)
    part = rng.integers(0, 3, n)  # 0 train, 1 valid, 2 test
    split = lambda k: Split(users[part == k], items[part == k], 60)  # noqa: E731
    data = Dataset(np.array([f"u{u}" for u in range(60)]), np.array([f"i{i}" for i in range(30)]),
                   split(0), split(1), split(2), "toy")
    return hold_out_cold_users(data, share)


def test_cold_users_leave_training_entirely_and_keep_their_history_in_order():
    full, held = _toy_data(0.0), _toy_data(0.3)
    cold = held.cold
    assert cold is not None and 5 < len(cold.users) < 35
    assert not np.isin(held.train.users, cold.users).any()
    assert not np.isin(held.valid.users, cold.users).any() and not np.isin(held.test.users, cold.users).any()
    for row, user in enumerate(cold.users):
        a, b = cold.history.indptr[row:row + 2]
        assert cold.history.items[a:b].tolist() == full.train.items[full.train.users == user].tolist()
        a, b = cold.test.indptr[row:row + 2]
        assert cold.test.items[a:b].tolist() == full.test.items[full.test.users == user].tolist()
    assert len(held.train) + len(cold.history) == len(full.train)
    assert held.fingerprint() != full.fingerprint() and held.fingerprint() == _toy_data(0.3).fingerprint()
    # chosen by id: a larger share holds out a superset
    assert (cold_user_mask(full.user_ids, 0.3) <= cold_user_mask(full.user_ids, 0.6)).all()


def test_baselines_match_their_definitions():
    data = _toy_data(0.3)
    cold = data.cold
    x = np.zeros((60, 30))
    x[data.train.users, data.train.items] = 1
    h = np.zeros((len(cold.users), 30))
    h[cold.history.users, cold.history.items] = 1
    cos = (x.T @ x) / np.sqrt(np.outer(x.sum(0), x.sum(0)).clip(min=1))
    u, i = item_knn_vectors(data, cold)
    np.testing.assert_allclose((u @ i.T).numpy(), h @ cos, rtol=1e-5, atol=1e-6)
    b = ease_weights(data, 10.0)
    # EASE's closed form solves min |X - XB|^2 + lambda |B|^2 with diag(B) = 0: its gradient vanishes off the diagonal
    grad = -(x.T @ (x - x @ b)) + 10.0 * b
    off = ~np.eye(30, dtype=bool)
    assert np.abs(grad[off]).max() < 1e-3 and np.abs(np.diag(b)).max() == 0
    res = evaluate_baselines(data, "test", ks=(5,))
    assert set(res) == {"popular", "item_knn", "ease"} and res["ease"]["lambda"] in (100.0, 300.0, 1000.0, 3000.0)
    assert res["popular"]["users"] == int((np.diff(cold.test.indptr) > 0).sum())


def test_masked_topk_never_returns_an_excluded_item():
    rng = np.random.default_rng(1)
    u, i = torch.randn(50, 4), torch.randn(40, 4)
    users = np.repeat(np.arange(50), 7)
    items = np.concatenate([rng.choice(40, 7, replace=False) for _ in range(50)])
    indptr = np.arange(0, 351, 7)
    top = masked_topk(u, i, 10, indptr, items).numpy()
    for user in range(50):
        seen = set(items[users == user].tolist())
        assert not seen & set(top[user].tolist())
        scores = (u[user] @ i.T).numpy()
        scores[list(seen)] = -np.inf
        assert top[user].tolist() == np.argsort(-scores, kind="stable")[:10].tolist()


def test_history_student_distills_with_rcekd_and_serves_cold_users(tmp_path, slice_data):
    data_set = ["--set", f"data.path={slice_data}", "--set", "data.cold_users=0.25"]
    teacher = tmp_path / "teacher"
    run_cli("train", "--out", teacher, "--set", "model.dim=32", "--epochs", 3, *data_set, *TINY_TRAIN)
    kd = ["--set", "distill.K=10", "--set", "distill.M=30", "--set", "distill.L=10"]
    refused = run_cli("distill", "--teacher", teacher, "--out", tmp_path / "no", "--epochs", 1, *data_set,
                      *HISTORY, *kd, *TINY_TRAIN, check=False)
    assert_one_line_error(refused, "distill.exclude_seen")
    assert not (tmp_path / "no").exists()
    out = tmp_path / "student"
    run_cli("distill", "--teacher", teacher, "--out", out, "--epochs", 2, *data_set, *HISTORY, *kd,
            "--set", "distill.exclude_seen=true", *TINY_TRAIN)
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and hist[0]["loss_kd"] > 0
    ck = load_checkpoint(out)
    data = api.load_data(from_dict(ck.meta["config"]))
    assert data.cold is not None and len(data.cold.users) > 50
    u, i = history_model_vectors(ck.build_model(), data.cold)
    assert u.shape == (len(data.cold.users), 8) and torch.isfinite(u).all()
    # the bundle leaves the held-out users out: serving answers them as unknown users (fallback or 404)
    export_checkpoint(out, tmp_path / "bundle", index_factory="Flat")
    bundle = open_bundle(tmp_path / "bundle")
    assert len(bundle.user_ids) == data.num_users - len(data.cold.users)
    assert not set(bundle.user_ids.tolist()) & set(data.user_ids[data.cold.users].tolist())
    assert bundle.manifest["lineage"]["held_out_users"] == len(data.cold.users)
    # a teacher that trained on the held-out users' interactions is refused: it would leak them to the student
    leaky = tmp_path / "leaky-teacher"
    run_cli("train", "--out", leaky, "--set", f"data.path={slice_data}", "--set", "model.dim=16", "--epochs", 1,
            *TINY_TRAIN)
    refused = run_cli("distill", "--teacher", leaky, "--out", tmp_path / "leak", "--epochs", 1, *data_set, *HISTORY,
                      *kd, "--set", "distill.exclude_seen=true", *TINY_TRAIN, check=False)
    assert_one_line_error(refused, "hold out the same users")
    assert not (tmp_path / "leak" / "model.safetensors").exists()


def test_sigkill_then_resume_of_a_history_rcekd_student_matches_the_uninterrupted_run(tmp_path, slice_data):
    data_set = ["--set", f"data.path={slice_data}", "--set", "data.cold_users=0.25"]
    teacher = tmp_path / "teacher"
    run_cli("train", "--out", teacher, "--set", "model.dim=16", "--epochs", 2, *data_set, *TINY_TRAIN)
    epochs = 8
    args = ["distill", "--teacher", teacher, "--epochs", epochs, *data_set, *HISTORY, "--set", "distill.K=10",
            "--set", "distill.M=30", "--set", "distill.L=10", "--set", "distill.exclude_seen=true",
            "--set", "train.patience=100", *TINY_TRAIN]
    run_cli(*args, "--out", tmp_path / "full")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(*args, "--out", killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(log.read_text().splitlines()) < epochs
    run_cli(*args, "--out", killed, "--resume")
    a, b = load_checkpoint(tmp_path / "full" / "last.safetensors"), load_checkpoint(killed / "last.safetensors")
    assert a.meta["epoch"] == b.meta["epoch"] == epochs
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
