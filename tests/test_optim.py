import json
import math
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compressor.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from compressor.models import build_model
from compressor.optim import LazyAdam, SparseAdam, SparseAdamW
from compressor.run_dir import MODEL_FILE, RESUME_FILE

from .conftest import ROOT, TINY_TRAIN, cli_command, run_cli


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


@pytest.mark.parametrize("optimizer", ["lazy_adam", "sparse_adamw", "sparse_adam"])
def test_row_sparse_optimizers_with_a_distillation_objective_mix_sparse_and_dense_gradients(tmp_path, slice_data,
                                                                                          optimizer):
    teacher = tmp_path / "t"
    common = ["--set", f"data.path={slice_data}", *TINY_TRAIN]
    run_cli("train", "--out", teacher, "--epochs", 2, "--set", "model.dim=32", *common)
    out = tmp_path / "s"
    run_cli("distill", "--teacher", teacher, "--out", out, "--epochs", 2, "--set", "model.dim=8",
            "--set", f"train.optimizer={optimizer}", "--set", "distill.K=10", "--set", "distill.M=20",
            "--set", "distill.L=10", *common)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(h["loss_kd"]) for h in history)


# ----------------------------------------------------------------------------------------------- sparse AdamW
def _sparse_adamw_reference(start, steps, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """The formulation of compressor/optim.py written out step by step over every row: each step every row's
    weights and moments decay, then the touched rows (``None``: all) get the gradient terms and Adam's update."""
    p = start.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, (g, touched) in enumerate(steps, start=1):
        touched = torch.arange(len(p)) if touched is None else touched
        p, m, v = p * (1 - lr * wd), b1 * m, b2 * v
        m[touched] += (1 - b1) * g[touched]
        v[touched] += (1 - b2) * g[touched] ** 2
        p[touched] -= lr * (m[touched] / (1 - b1 ** t)) / (torch.sqrt(v[touched] / (1 - b2 ** t)) + eps)
    return p, m, v


def _sparse_batches(n_rows, n_steps, seed):
    """Random row lists with duplicates; row n-1 never drawn, row n-2 only at steps 1 and n_steps - 5, row n-3
    skipped over steps 10..40."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for t in range(1, n_steps + 1):
        idx = torch.randint(0, n_rows - 3, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen)
        idx = torch.cat([idx, idx[:2]])  # duplicates: their gradients add up
        if not 10 <= t <= 40:
            idx = torch.cat([idx, torch.tensor([n_rows - 3])])
        if t in (1, n_steps - 5):
            idx = torch.cat([idx, torch.tensor([n_rows - 2, n_rows - 2])])
        batches.append(idx)
    return batches


def _dense_grad(idx, w, n_rows):
    return torch.zeros(n_rows, w.shape[1], dtype=w.dtype).index_add_(0, idx, w)


def test_sparse_adamw_equals_a_step_by_step_reference_for_touched_and_skipped_rows():
    n_rows, dim, n_steps, lr, wd = 9, 3, 50, 0.05, 0.3
    torch.manual_seed(3)
    start = torch.randn(n_rows, dim, dtype=torch.float64)
    table = torch.nn.Parameter(start.clone())
    opt = SparseAdamW([table], lr=lr, weight_decay=wd)
    batches = _sparse_batches(n_rows, n_steps, seed=4)
    weights = [torch.randn(len(idx), dim, dtype=torch.float64) for idx in batches]
    ref_steps = []
    for t, (idx, w) in enumerate(zip(batches, weights), start=1):
        opt.zero_grad()
        (F.embedding(idx, table, sparse=True) * w).sum().backward()
        assert table.grad.is_sparse
        opt.step()
        ref_steps.append((_dense_grad(idx, w, n_rows), idx.unique()))
        if t in (20, 33):  # the trainer catches up before every evaluation and save, mid-run
            opt.catch_up()
    state = opt.state[table]
    last_touched = torch.tensor([max((t for t, (_, rows) in enumerate(ref_steps, 1) if r in rows), default=0)
                                 for r in range(n_rows)])
    assert torch.equal(state["row_step"], torch.maximum(last_touched, torch.tensor(33)))
    p, m, v = _sparse_adamw_reference(start, ref_steps, lr, wd)
    fresh = batches[-1].unique()  # touched by the last step: already up to date
    torch.testing.assert_close(table.detach()[fresh], p[fresh], rtol=1e-12, atol=1e-14)
    stale = last_touched < n_steps
    assert stale.sum() >= 3 and not torch.allclose(table.detach()[stale], p[stale])  # behind until caught up
    opt.catch_up()
    assert torch.equal(state["row_step"], torch.full((n_rows,), n_steps))
    torch.testing.assert_close(table.detach(), p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["exp_avg"], m, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-12, atol=1e-18)
    assert not torch.equal(p[-1], start[-1]) and not m[-1].any()  # a never-touched row decays, moments stay 0
    # float32 tables (what training uses) stay within float rounding of the same reference
    table32 = torch.nn.Parameter(start.float())
    opt32 = SparseAdamW([table32], lr=lr, weight_decay=wd)
    for idx, w in zip(batches, weights):
        opt32.zero_grad()
        (F.embedding(idx, table32, sparse=True) * w.float()).sum().backward()
        opt32.step()
    opt32.catch_up()
    torch.testing.assert_close(table32.detach().double(), p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_cls", [SparseAdamW, SparseAdam])
def test_deferring_optimizer_state_survives_a_checkpoint_bit_for_bit(tmp_path, opt_cls):
    """Rows behind by different counts, saved without catching up, continue exactly as the live optimizer."""
    model = build_model("mf", num_users=7, num_items=5, dim=3)
    opt = opt_cls(model.parameters(), lr=0.01, weight_decay=0.05)
    gen = torch.Generator().manual_seed(6)

    def steps(m, o, n):
        for _ in range(n):
            u, i = torch.randint(0, 7, (3,), generator=gen), torch.randint(0, 5, (3,), generator=gen)
            o.zero_grad()
            (F.embedding(u, m.user_emb.weight, sparse=True) * F.embedding(i, m.item_emb.weight, sparse=True)
             ).sum().backward()
            o.step()

    steps(model, opt, 9)
    ids = np.array([str(k) for k in range(7)]), np.array([str(k) for k in range(5)])
    save_checkpoint(tmp_path / "r.safetensors", model=model, meta={}, user_ids=ids[0], item_ids=ids[1],
                    train_indptr=np.zeros(8, dtype=np.int64), train_indices=np.zeros(0, dtype=np.int64),
                    optimizer=opt)
    ckpt = load_checkpoint(tmp_path / "r.safetensors", with_training_state=True)
    again = ckpt.build_model().train()
    opt2 = opt_cls(again.parameters(), lr=0.01, weight_decay=0.05)
    restore_optimizer(opt2, ckpt)
    for key in ("row_step", "row_touch") if opt_cls is SparseAdam else ("row_step",):
        counters = opt2.state[again.user_emb.weight][key]
        assert counters.dtype == torch.int64 and len(counters.unique()) > 1
    gen_state = gen.get_state()
    steps(model, opt, 5)
    gen.set_state(gen_state)
    steps(again, opt2, 5)
    opt.catch_up()
    opt2.catch_up()
    for k, val in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], val), k


def _assert_caught_up(ckpt):
    """The trainer brought every row up to date before saving: each row's counter is its table's step."""
    for pid in (0, 1):
        row_step = ckpt.optim_state[f"optim.{pid}.row_step"]
        assert row_step.dtype == torch.int64 and (row_step == int(ckpt.optim_state[f"optim.{pid}.step"])).all()


@pytest.mark.parametrize("optimizer", ["sparse_adamw", "sparse_adam"])
def test_deferring_optimizer_resumed_mf_run_ends_bit_equal_to_the_uninterrupted_one(tmp_path, slice_data, optimizer):
    epochs = 8  # saves at even epochs and validations every third: a save catches rows up without an evaluation
    args = ["--set", f"data.path={slice_data}", "--set", "model.dim=16", "--set", f"train.optimizer={optimizer}",
            "--set", "train.lr=0.01", "--set", "train.weight_decay=0.01", "--set", "train.patience=100",
            "--set", "train.eval_every=3", "--set", "train.checkpoint_every=2", "--epochs", epochs, *TINY_TRAIN]
    run_cli("train", "--out", tmp_path / "full", *args)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_command("train", "--out", killed, *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(log.read_text().splitlines())
    assert 3 <= done < epochs, f"kill landed after {done} epochs"
    saved = load_checkpoint(killed / RESUME_FILE, with_training_state=True)  # epoch 2 or 4: saved, not evaluated
    _assert_caught_up(saved)
    run_cli("train", "--out", killed, "--resume", *args)
    for name in (MODEL_FILE, RESUME_FILE):
        a = load_checkpoint(tmp_path / "full" / name, with_training_state=True)
        b = load_checkpoint(killed / name, with_training_state=True)
        assert a.meta["fingerprint"] == b.meta["fingerprint"], name
        assert a.meta["epoch"] == b.meta["epoch"]
    assert a.optim_state.keys() == b.optim_state.keys()
    for k in a.optim_state:
        assert torch.equal(a.optim_state[k], b.optim_state[k]), k
    _assert_caught_up(a)
    history = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == epochs and history[-1]["valid_ndcg@10"] > history[2]["valid_ndcg@10"]
    result = json.loads((killed / "result.json").read_text())
    assert result["fingerprint"] == json.loads((tmp_path / "full" / "result.json").read_text())["fingerprint"]
