"""train.lr_decay: the lr multiplied after every lr_decay_patience validations without a better metric. A deferring
optimizer (sparse_adam) is caught up before the lr changes, so its closed form stays exact; a resumed run keeps
the decayed lr (it is saved with the optimizer state) and ends bit-equal to the uninterrupted run."""

import json

import torch
import torch.nn.functional as F

from compressor.checkpoint import load_checkpoint
from compressor.optim import SparseAdam
from compressor.run_dir import MODEL_FILE, RESUME_FILE

from .conftest import TINY_TRAIN, assert_one_line_error, run_cli
from .test_optim import _dense_grad, _sparse_batches
from .test_sparse_adam import _sparse_adam_reference


def _run_with_lr_change(start, batches, weights, change_at, lr, new_lr, catch_up):
    table = torch.nn.Parameter(start.clone())
    opt = SparseAdam([table], lr=lr, weight_decay=0.2)
    for t, (idx, w) in enumerate(zip(batches, weights), start=1):
        opt.zero_grad()
        (F.embedding(idx, table, sparse=True) * w).sum().backward()
        opt.step()
        if t == change_at:
            if catch_up:
                opt.catch_up()
            for group in opt.param_groups:
                group["lr"] = new_lr
    opt.catch_up()
    return table.detach()


def test_sparse_adam_caught_up_before_an_lr_change_equals_the_step_by_step_reference():
    n_rows, dim, n_steps, change_at = 9, 3, 50, 25
    torch.manual_seed(5)
    start = torch.randn(n_rows, dim, dtype=torch.float64)
    batches = _sparse_batches(n_rows, n_steps, seed=6)
    weights = [torch.randn(len(idx), dim, dtype=torch.float64) for idx in batches]
    steps = [(_dense_grad(idx, w, n_rows), idx.unique()) for idx, w in zip(batches, weights)]
    # the reference written out here is the module's while the lr stays put
    torch.testing.assert_close(_reference_with_lr_change(start, steps, n_steps, 0.05, 0.01),
                               _sparse_adam_reference(start, steps, lr=0.05, wd=0.2)[0], rtol=1e-12, atol=1e-14)
    got = _run_with_lr_change(start, batches, weights, change_at, 0.05, 0.01, catch_up=True)
    want = _reference_with_lr_change(start, steps, change_at, 0.05, 0.01)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    # without the catch-up the rows skipped over the change move under the wrong lr
    late = _run_with_lr_change(start, batches, weights, change_at, 0.05, 0.01, catch_up=False)
    assert not torch.allclose(late, want, rtol=1e-6, atol=1e-8)


def _reference_with_lr_change(start, steps, change_at, lr, new_lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.2):
    """``_sparse_adam_reference`` with the lr switched after step ``change_at`` (the same formulation written out:
    every row, every step)."""
    p = start.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    touch = torch.zeros(len(p), dtype=torch.float64)
    for t, (g, touched) in enumerate(steps, start=1):
        step_lr = lr if t <= change_at else new_lr
        hit = torch.zeros(len(p), dtype=torch.bool)
        hit[touched] = True
        idle = ~hit
        m[idle] *= b1
        v[idle] *= b2
        held = torch.where(touch > 0, torch.sqrt(1 - b2 ** touch) / (1 - b1 ** touch), torch.zeros_like(touch))
        p[idle] -= step_lr * held[idle, None] * (m / v.sqrt().clamp_min(eps))[idle]
        gt = g[hit] + wd * p[hit]
        m[hit] = b1 * m[hit] + (1 - b1) * gt
        v[hit] = b2 * v[hit] + (1 - b2) * gt * gt
        p[hit] -= step_lr * (m[hit] / (1 - b1 ** t)) / (torch.sqrt(v[hit] / (1 - b2 ** t)) + eps)
        touch[hit] = t
    return p


def _expected_lrs(history, lr, decay, every, patience):
    """The rule written out from the logged validation metrics: each row logs the lr its epoch trained with."""
    best, bad, out = -float("inf"), 0, []
    for row in history:
        out.append(lr)
        value = row["valid_ndcg@10"]
        if value > best:
            best, bad = value, 0
        else:
            bad += 1
            if bad < patience and bad % every == 0:
                lr *= decay
    return out


def test_lr_decays_on_plateau_and_a_resumed_run_ends_bit_equal(tmp_path, slice_data):
    epochs = 14
    args = ["--set", f"data.path={slice_data}", "--set", "model.dim=16", "--set", "train.optimizer=sparse_adam",
            "--set", "train.lr=0.05", "--set", "train.lr_decay=0.5", "--set", "train.lr_decay_patience=2",
            "--set", "train.patience=100", *TINY_TRAIN]
    run_cli("train", "--out", tmp_path / "full", "--epochs", epochs, *args)
    history = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in history]
    assert lrs == _expected_lrs(history, 0.05, 0.5, 2, 100)
    assert min(lrs) < 0.05 / 2, lrs  # the plateau was reached at least twice in this run
    # the cut falls after a decay and after the best epoch so far: the resumed run must take the decayed lr from
    # the checkpoint and continue from the last epoch's weights, not the best epoch's
    assert lrs[6] < 0.05 and max(range(6), key=lambda e: history[e]["valid_ndcg@10"]) < 5
    part = tmp_path / "part"
    run_cli("train", "--out", part, "--epochs", 6, *args)
    run_cli("train", "--out", part, "--epochs", epochs, "--resume", *args)
    assert [json.loads(x)["lr"] for x in (part / "metrics.jsonl").read_text().splitlines()] == lrs
    for name in (MODEL_FILE, RESUME_FILE):
        a = load_checkpoint(tmp_path / "full" / name, with_training_state=True)
        b = load_checkpoint(part / name, with_training_state=True)
        assert a.meta["fingerprint"] == b.meta["fingerprint"], name
    assert a.meta["optim_param_groups"][0]["lr"] <= lrs[-1]


def test_lr_decay_above_one_is_refused_with_one_line(tmp_path, slice_data):
    p = run_cli("train", "--out", tmp_path / "r", "--set", f"data.path={slice_data}", "--set", "train.lr_decay=2",
                *TINY_TRAIN, check=False)
    assert_one_line_error(p, "train.lr_decay", "(0, 1]")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
