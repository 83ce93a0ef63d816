import json
import math

import torch
import torch.nn.functional as F

from compressor.checkpoint import load_checkpoint
from compressor.optim import LazyAdam

from .conftest import TINY_TRAIN, run_cli


def _adam_reference(rows, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Adam with L2 decay written out for one row over the steps it was touched (global step numbers given)."""
    p = rows.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for step, g in grads:
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** step)) / (torch.sqrt(v / (1 - b2 ** step)) + eps)
    return p, m, v


def _twins(shape, seed, lr, wd):
    """The same random table twice: one under torch Adam, one under LazyAdam."""
    torch.manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(*shape))
    b = torch.nn.Parameter(a.detach().clone())
    return a, b, torch.optim.Adam([a], lr=lr, weight_decay=wd), LazyAdam([b], lr=lr, weight_decay=wd)


def test_dense_gradients_give_torch_adam():
    a, b, ref, lazy = _twins((7, 5), 0, lr=0.01, wd=0.1)
    for _ in range(6):
        target = torch.randn(7, 5)
        for p, opt in ((a, ref), (b, lazy)):
            opt.zero_grad()
            ((p - target) ** 3).sum().backward()
            opt.step()
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_sparse_gradients_update_only_touched_rows_and_sum_duplicates():
    torch.manual_seed(1)
    table = torch.nn.Parameter(torch.randn(10, 4))
    start = table.detach().clone()
    opt = LazyAdam([table], lr=0.05, weight_decay=0.01)
    batches = [torch.tensor([1, 3, 3, 7]), torch.tensor([3, 5]), torch.tensor([1, 1, 1])]
    weights = [torch.randn(len(b), 4) for b in batches]
    seen: dict[int, list] = {}
    for step, (idx, w) in enumerate(zip(batches, weights), start=1):
        opt.zero_grad()
        (F.embedding(idx, table, sparse=True) * w).sum().backward()
        assert table.grad.is_sparse
        opt.step()
        for r in idx.unique().tolist():
            seen.setdefault(r, []).append((step, w[idx == r].sum(0)))  # duplicates of a row add up
    state = opt.state[table]
    for r in range(10):
        if r not in seen:
            assert torch.equal(table[r], start[r]), f"untouched row {r} moved"
            assert not state["exp_avg"][r].any() and not state["exp_avg_sq"][r].any()
            continue
        p, m, v = _adam_reference(start[r], seen[r], lr=0.05, wd=0.01)
        torch.testing.assert_close(table[r].detach(), p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["exp_avg"][r], m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state["exp_avg_sq"][r], v, rtol=1e-5, atol=1e-9)
    assert float(state["step"]) == 3


def test_sparse_path_equals_torch_adam_when_every_row_is_touched():
    dense, sparse, ref, lazy = _twins((6, 3), 2, lr=0.02, wd=0.001)
    for _ in range(5):
        idx = torch.randperm(6)
        w = torch.randn(6, 3)
        ref.zero_grad()
        lazy.zero_grad()
        (dense[idx] * w).sum().backward()
        (F.embedding(idx, sparse, sparse=True) * w).sum().backward()
        ref.step()
        lazy.step()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_lazy_adam_trains_mf_and_resumes_only_with_the_same_optimizer(tmp_path, slice_data):
    out = tmp_path / "lazy"
    args = ["--set", f"data.path={slice_data}", "--set", "model.dim=16", "--set", "train.optimizer=lazy_adam",
            "--set", "train.lr=0.01", "--set", "train.patience=100", *TINY_TRAIN]
    run_cli("train", "--out", out, "--epochs", 4, *args)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["valid_ndcg@10"] > history[0]["valid_ndcg@10"]
    ckpt = load_checkpoint(out / "last.safetensors", with_training_state=True)
    assert ckpt.meta["config"]["train"]["optimizer"] == "lazy_adam"
    assert math.isfinite(history[-1]["loss"])
    # resuming with the other optimizer would load Adam moments into a different update rule: refused
    p = run_cli("train", "--out", out, "--resume", "--epochs", 6, *[a.replace("lazy_adam", "adam") for a in args],
                check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "train.optimizer lazy_adam" in p.stderr
    run_cli("train", "--out", out, "--resume", "--epochs", 6, *args)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6


def test_lazy_adam_with_a_distillation_objective_mixes_sparse_and_dense_gradients(tmp_path, slice_data):
    teacher = tmp_path / "t"
    common = ["--set", f"data.path={slice_data}", *TINY_TRAIN]
    run_cli("train", "--out", teacher, "--epochs", 2, "--set", "model.dim=32", *common)
    out = tmp_path / "s"
    run_cli("distill", "--teacher", teacher, "--out", out, "--epochs", 2, "--set", "model.dim=8",
            "--set", "train.optimizer=lazy_adam", "--set", "distill.K=10", "--set", "distill.M=20",
            "--set", "distill.L=10", *common)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(h["loss_kd"]) for h in history)
