"""train.optimizer sparse_adam: torch Adam on touched rows, the momentum drift of untouched rows caught up in closed
form (compressor/optim.py). Checked against its formulation written out step by step, against torch Adam where
every row is touched, and against torch Adam on sparse batches (far closer than lazy Adam)."""

import torch
import torch.nn.functional as F

import pytest

from compressor import optim
from compressor.optim import LazyAdam, SparseAdam, SparseAdamW

from .test_optim import _dense_grad, _sparse_adamw_reference, _sparse_batches


def _sparse_adam_reference(start, steps, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Every row, every step: a touched row gets torch Adam's update (L2 included); an untouched one decays its
    moments and moves by lr * c(tau) * m / max(sqrt(v), eps), c(tau) the bias correction of its last touched
    step."""
    p = start.clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    touch = torch.zeros(len(p), dtype=torch.float64)
    for t, (g, touched) in enumerate(steps, start=1):
        hit = torch.zeros(len(p), dtype=torch.bool)
        hit[torch.arange(len(p)) if touched is None else touched] = True
        idle = ~hit
        m[idle] *= b1
        v[idle] *= b2
        held = torch.where(touch > 0, torch.sqrt(1 - b2 ** touch) / (1 - b1 ** touch), torch.zeros_like(touch))
        ratio = m / v.sqrt().clamp_min(eps)  # eps: a floor under sqrt(v) (0 where nothing was touched yet)
        p[idle] -= lr * held[idle, None].to(p.dtype) * ratio[idle]
        gt = g[hit] + wd * p[hit]
        m[hit] = b1 * m[hit] + (1 - b1) * gt
        v[hit] = b2 * v[hit] + (1 - b2) * gt * gt
        p[hit] -= lr * (m[hit] / (1 - b1 ** t)) / (torch.sqrt(v[hit] / (1 - b2 ** t)) + eps)
        touch[hit] = t
    return p, m, v


def _run(opt_cls, start, batches, weights, catch_up_at=(), **kw):
    table = torch.nn.Parameter(start.clone())
    opt = opt_cls([table], **kw)
    for t, (idx, w) in enumerate(zip(batches, weights), start=1):
        opt.zero_grad()
        (F.embedding(idx, table, sparse=opt_cls is not torch.optim.Adam) * w).sum().backward()
        opt.step()
        if t in catch_up_at:
            opt.catch_up()
    return table, opt


@pytest.mark.parametrize("power_table", [optim.POWER_TABLE, 4], ids=["table", "exponents-past-the-table"])
def test_sparse_adam_equals_its_step_by_step_reference_for_touched_and_skipped_rows(monkeypatch, power_table):
    # a 4-entry power table sends most gaps and last-touched steps past it, to torch.pow
    monkeypatch.setattr(optim, "POWER_TABLE", power_table)
    n_rows, dim, n_steps, lr, wd = 9, 3, 60, 0.05, 0.3
    torch.manual_seed(3)
    start = torch.randn(n_rows, dim, dtype=torch.float64)
    batches = _sparse_batches(n_rows, n_steps, seed=4)
    weights = [torch.randn(len(idx), dim, dtype=torch.float64) for idx in batches]
    table, opt = _run(SparseAdam, start, batches, weights, catch_up_at=(20, 33), lr=lr, weight_decay=wd)
    ref_steps = [(_dense_grad(idx, w, n_rows), idx.unique()) for idx, w in zip(batches, weights)]
    p, m, v = _sparse_adam_reference(start, ref_steps, lr, wd)
    state = opt.state[table]
    fresh = batches[-1].unique()  # touched by the last step: already up to date
    torch.testing.assert_close(table.detach()[fresh], p[fresh], rtol=1e-11, atol=1e-13)
    stale = state["row_step"] < n_steps
    assert stale.sum() >= 3 and not torch.allclose(table.detach()[stale], p[stale])  # behind until caught up
    opt.catch_up()
    assert torch.equal(state["row_step"], torch.full((n_rows,), n_steps))
    torch.testing.assert_close(table.detach(), p, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(state["exp_avg"], m, rtol=1e-11, atol=1e-15)
    torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-11, atol=1e-18)
    assert torch.equal(table.detach()[-1], start[-1]) and not m[-1].any()  # a never-touched row never moves
    # the row skipped over steps 10..40 kept drifting along its momentum while skipped
    skipped = _run(SparseAdam, start, batches[:40], weights[:40], (40,), lr=lr, weight_decay=wd)[0].detach()[n_rows - 3]
    at_10 = _run(SparseAdam, start, batches[:9], weights[:9], (9,), lr=lr, weight_decay=wd)[0].detach()[n_rows - 3]
    assert not torch.equal(skipped, at_10)
    # float32 tables (what training uses) stay within float rounding of the same reference
    table32, opt32 = _run(SparseAdam, start.float(), batches, [w.float() for w in weights], lr=lr, weight_decay=wd)
    opt32.catch_up()
    torch.testing.assert_close(table32.detach().double(), p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opt_cls", [SparseAdam, SparseAdamW])
def test_dense_gradients_touch_every_row_and_equal_torch_adam(opt_cls):
    """Every row touched each step: torch Adam (sparse_adam) or torch AdamW (sparse_adamw). Then sparse steps
    leave rows behind and a dense one (LightGCN's propagation, a KD term over whole tables) catches them up first."""
    reference = _sparse_adam_reference if opt_cls is SparseAdam else _sparse_adamw_reference
    dense = torch.optim.Adam if opt_cls is SparseAdam else torch.optim.AdamW
    torch.manual_seed(5)
    start = torch.randn(6, 4, dtype=torch.float64)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref, opt = dense([a], lr=0.02, weight_decay=0.1), opt_cls([b], lr=0.02, weight_decay=0.1)
    for _ in range(6):
        target = torch.randn(6, 4, dtype=torch.float64)
        for p, o in ((a, ref), (b, opt)):
            o.zero_grad()
            ((p - target) ** 3).sum().backward()
            o.step()
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    table = torch.nn.Parameter(start.clone())
    opt = opt_cls([table], lr=0.02, weight_decay=0.1)
    steps = []
    for t in range(1, 13):
        w = torch.randn(6, 4, dtype=torch.float64)
        opt.zero_grad()
        if t in (5, 9):
            (table * w).sum().backward()
            steps.append((w, None))
        else:
            idx = torch.tensor([t % 3, t % 3])
            (F.embedding(idx, table, sparse=True) * w[:2]).sum().backward()
            steps.append((_dense_grad(idx, w[:2], 6), idx.unique()))
        assert table.grad.is_sparse == (t not in (5, 9))
        opt.step()
        if t in (5, 9):
            assert torch.equal(opt.state[table]["row_step"], torch.full((6,), t))
    opt.catch_up()
    p, m, v = reference(start, steps, lr=0.02, wd=0.1)
    torch.testing.assert_close(table.detach(), p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[table]["exp_avg"], m, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(opt.state[table]["exp_avg_sq"], v, rtol=1e-12, atol=1e-18)


def test_sparse_adam_follows_dense_adam_on_sparse_batches_far_closer_than_lazy_adam():
    """What it is for: rows touched every few steps move as torch Adam moves them (its zero gradients included);
    lazy Adam, which freezes them, drifts away."""
    n_rows, dim, n_steps = 40, 8, 200
    torch.manual_seed(7)
    start = torch.randn(n_rows, dim, dtype=torch.float64) * 0.1
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, n_rows, (6,), generator=gen) for _ in range(n_steps)]
    weights = [torch.randn(6, dim, dtype=torch.float64, generator=gen) for _ in range(n_steps)]
    kw = {"lr": 0.01, "weight_decay": 0.0}
    dense = _run(torch.optim.Adam, start, batches, weights, **kw)[0].detach()
    sparse, opt = _run(SparseAdam, start, batches, weights, **kw)
    opt.catch_up()
    lazy = _run(LazyAdam, start, batches, weights, **kw)[0].detach()
    moved = (dense - start).norm()
    off_sparse, off_lazy = (sparse.detach() - dense).norm() / moved, (lazy - dense).norm() / moved
    assert off_sparse < 0.1 and off_sparse < off_lazy / 4, (float(off_sparse), float(off_lazy))


def test_sparse_adam_a_row_whose_v_underflowed_takes_no_huge_step():
    """float32: a gradient of 1e-22 leaves v = 0 but m = 1e-23; caught up later, the row must stay put."""
    table = torch.nn.Parameter(torch.zeros(2, 3))
    opt = SparseAdam([table], lr=1e-3)
    for t in range(4):
        opt.zero_grad()
        row = torch.tensor([0 if t == 0 else 1])
        (F.embedding(row, table, sparse=True) * (1e-22 if t == 0 else 1.0)).sum().backward()
        opt.step()
    opt.catch_up()
    assert table.detach()[0].abs().max() < 1e-6


def test_sparse_adam_refuses_betas_whose_drift_would_not_converge():
    with pytest.raises(ValueError, match="b1\\^2 < b2"):
        SparseAdam([torch.nn.Parameter(torch.zeros(2, 2))], betas=(0.99, 0.9))


def test_sparse_adam_powers_and_bias_hold_in_and_past_the_table(monkeypatch):
    monkeypatch.setattr(optim, "POWER_TABLE", 64)
    opt = SparseAdam([torch.nn.Parameter(torch.zeros(2, 2))])
    k = torch.tensor([0, 1, 5, 63, 64, 65, 1000, 70000])
    for base in (0.9, 0.999, 0.9 / 0.999 ** 0.5):
        got = opt._powers(base, k)
        table = torch.pow(base, torch.arange(64, dtype=torch.float64))  # what the table holds, built in one call
        assert torch.equal(got[:4], table[k[:4]]) and torch.equal(got[4:], torch.pow(base, k[4:].double()))
        # torch.pow of single rows may take its scalar path, an ulp away
        torch.testing.assert_close(got, torch.pow(base, k.double()), rtol=4e-16, atol=0)

    def direct(b1, b2, tau):
        tau = tau.double()
        return torch.where(tau > 0, torch.sqrt(1 - b2 ** tau) / (1 - b1 ** tau), torch.zeros_like(tau))

    # betas that do not saturate within 64 steps: rows past the table are computed
    torch.testing.assert_close(opt._held(0.9, 0.999, k), direct(0.9, 0.999, k), rtol=4e-16, atol=0)
    assert opt._held(0.9, 0.999, k)[0] == 0  # never touched
    monkeypatch.setattr(optim, "POWER_TABLE", 1 << 16)  # the shipped size: c(tau) is exactly 1.0 past it
    late = torch.tensor([1, 100, 65_535, 65_536, 3_000_000])
    assert torch.equal(SparseAdam([torch.nn.Parameter(torch.zeros(2, 2))])._held(0.9, 0.999, late)[2:],
                       torch.ones(3, dtype=torch.float64))
    assert torch.equal(direct(0.9, 0.999, late)[2:], torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("opt_cls", [SparseAdam, SparseAdamW, LazyAdam])
def test_row_sparse_steps_leave_the_gradient_alone_whichever_way_its_rows_are_summed(opt_cls):
    """With weight decay, on a gradient whose rows are summed through the bitmap (entries >= a quarter of the
    rows), through coalesce (few entries), or that arrives coalesced: the same weights, the gradient unchanged."""
    n_rows, dim = 40, 3
    gen = torch.Generator().manual_seed(7)
    ids = torch.tensor([3, 7, 3, 12, 39, 7, 3, 0, 21, 30, 12])  # 11 entries >= 40 / 4: the bitmap
    vals = torch.randn(len(ids), dim, generator=gen, dtype=torch.float64)
    start = torch.randn(n_rows, dim, generator=gen, dtype=torch.float64)
    grads = {"bitmap": torch.sparse_coo_tensor(ids[None], vals, (n_rows, dim)),
             "coalesced": torch.sparse_coo_tensor(ids[None], vals, (n_rows, dim)).coalesce()}
    wide = torch.sparse_coo_tensor(ids[None], vals, (4 * n_rows, dim))  # 11 < 160 / 4: coalesce's sort
    weights = {}
    for name, grad in {**grads, "sort": wide}.items():
        rows = 4 * n_rows if name == "sort" else n_rows
        table = torch.nn.Parameter(torch.cat([start, torch.zeros(rows - n_rows, dim, dtype=torch.float64)]))
        opt = opt_cls([table], lr=0.01, weight_decay=0.1)
        before = grad.coalesce().values().clone()
        for _ in range(3):
            table.grad = grad
            opt.step()
        assert torch.equal(grad.coalesce().values(), before)  # the L2 term was not added into the gradient
        weights[name] = table.detach()[:n_rows]
    torch.testing.assert_close(weights["bitmap"], weights["coalesced"], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(weights["sort"], weights["coalesced"], rtol=1e-14, atol=1e-15)
