"""compressor.losses and compressor.kd_sets against slow references written straight from docs/rcekd.md.

References loop over users in Python, build sets with ``set`` and take softmaxes with
``math``; the code under test must agree with them on small random cases that include the
awkward ones (shared items between QS/QT/A, L = M, K = M, tied scores, QT inside QS).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor import losses
from compressor.kd_sets import (
    interesting_position_counts,
    interesting_position_weights,
    sample_interesting_positions,
    sample_rrd_sets,
)
from compressor.losses import (
    bpr_loss,
    build_teacher_side_set,
    ce_kd_loss,
    rcekd_loss,
    rrd_loss,
    subset_ce,
)

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def ref_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def ref_ce(t: dict[int, float], s: dict[int, float], J: set[int] | list[int], tau: float) -> float:
    """``-sum_{i in J} softmax(t[J]/tau)_i log softmax(s[J]/tau)_i``; t, s map item -> score."""
    J = sorted(set(J))
    if not J:
        return 0.0
    p = ref_softmax([t[i] / tau for i in J])
    q = ref_softmax([s[i] / tau for i in J])
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def dot(u: np.ndarray, v: np.ndarray) -> float:
    return float(sum(float(a) * float(b) for a, b in zip(u, v)))


def ref_rcekd(su, si, tu, ti, qt, qs, a, tau, beta, use_s=True, use_t=True, const=None):
    """Per-user python implementation of steps 5-7; returns (sum, per-user dict lists)."""
    total, ls_all, lt_all, al_all, ov_all = 0.0, [], [], [], []
    for u in range(len(su)):
        QT, QS, A = [int(x) for x in qt[u]], [int(x) for x in qs[u]], [int(x) for x in a[u]]
        items = set(QT) | set(QS) | set(A)
        t = {i: dot(tu[u], ti[i]) for i in items}
        s = {i: dot(su[u], si[i]) for i in items}
        B = set(A) | (set(QT) - set(A) - set(QS))
        ls = ref_ce(t, s, set(QS), tau)
        lt = ref_ce(t, s, B, tau)
        overlap = len(set(QT) & set(A)) / len(QT)
        alpha = math.exp(-beta * overlap) if const is None else const
        if use_s and use_t:
            kd = (1 - alpha) * ls + alpha * lt
        elif use_t:
            kd = lt
        else:
            kd = ls
        total += kd
        ls_all.append(ls)
        lt_all.append(lt)
        al_all.append(alpha)
        ov_all.append(overlap)
    return total, {"loss_s": ls_all, "loss_t": lt_all, "alpha": al_all, "overlap": ov_all}


def ref_counts(p_row: list[int], qt_row: list[int]) -> list[int]:
    qt_set = set(qt_row)
    return [min(50, sum(1 for x in p_row[j:] if x in qt_set)) for j in range(len(p_row))]


def ref_rrd(su, si, inter, unint) -> float:
    total = 0.0
    for u in range(len(su)):
        s_int = [dot(su[u], si[i]) for i in inter[u]]
        s_un = [dot(su[u], si[i]) for i in unint[u]]
        for k in range(len(s_int)):
            below = sum(math.exp(x) for x in s_int[k:]) + sum(math.exp(x) for x in s_un)
            total -= s_int[k] - math.log(below)
    return total


# --------------------------------------------------------------------------------------------
# case generation
# --------------------------------------------------------------------------------------------


def make_case(seed: int, b=4, n_items=40, d=3, dT=5, K=6, M=10, L=5, ties=False, qt_in_qs_user=True):
    """A realistic batch: QS/P from the student's ranking, QT from the teacher's, A sampled.

    Small catalogues make QS, QT and A overlap a lot; ``ties`` uses integer-valued vectors so
    scores tie; the last user can be given a teacher top-K lying inside the student top-K.
    """
    g = torch.Generator().manual_seed(seed)
    if ties:
        su = torch.randint(-2, 3, (b, d), generator=g).double()
        si = torch.randint(-2, 3, (n_items, d), generator=g).double()
        tu = torch.randint(-2, 3, (b, dT), generator=g).double()
        ti = torch.randint(-2, 3, (n_items, dT), generator=g).double()
    else:
        su, si = torch.randn(b, d, generator=g).double(), torch.randn(n_items, d, generator=g).double()
        tu, ti = torch.randn(b, dT, generator=g).double(), torch.randn(n_items, dT, generator=g).double()
    p = torch.topk(su @ si.T, M, dim=1).indices
    qs = p[:, :K]
    qt = torch.topk(tu @ ti.T, K, dim=1).indices
    if qt_in_qs_user:
        qt[-1] = qs[-1][torch.randperm(K, generator=g)]
    a = sample_interesting_positions(p, qt, L, T=1.0, generator=g)
    return su, si, tu, ti, qt, qs, a, p


CASES = [
    dict(),
    dict(L=10, M=10),  # L = M: A is all of P
    dict(K=10, M=10, L=4),  # K = M: QS is all of P
    dict(K=10, M=10, L=10),  # K = L = M
    dict(ties=True),
    dict(ties=True, n_items=12, K=6, M=12, L=8),
    dict(b=7, n_items=15, K=5, M=9, L=7),
]


# --------------------------------------------------------------------------------------------
# bpr / subset_ce
# --------------------------------------------------------------------------------------------


def test_bpr_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(9, generator=g).double(), torch.randn(9, generator=g).double()
    ref = sum(-math.log(1 / (1 + math.exp(-(p - n)))) for p, n in zip(pos.tolist(), neg.tolist()))
    assert bpr_loss(pos, neg).item() == pytest.approx(ref, rel=1e-10)
    assert bpr_loss(pos, neg).dim() == 0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 9),
    tau=st.sampled_from([0.5, 1.0, 10.0]),
    ties=st.booleans(),
)
def test_subset_ce_matches_reference(seed, n, tau, ties):
    rng = np.random.default_rng(seed)
    b = 3
    if ties:
        t, s = rng.integers(-2, 3, (b, n)).astype(float), rng.integers(-2, 3, (b, n)).astype(float)
    else:
        t, s = rng.normal(size=(b, n)) * 3, rng.normal(size=(b, n)) * 3
    mask = rng.random((b, n)) < 0.6
    out = subset_ce(torch.tensor(t), torch.tensor(s), torch.tensor(mask), tau)
    assert out.shape == (b,)
    for u in range(b):
        J = [i for i in range(n) if mask[u, i]]
        ref = ref_ce(dict(enumerate(t[u])), dict(enumerate(s[u])), J, tau)
        assert out[u].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_subset_ce_masked_entries_have_no_influence_and_finite_grads():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, 6, generator=g).double()
    s = torch.randn(4, 6, generator=g).double().requires_grad_()
    mask = torch.tensor(
        [[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool
    )
    out = subset_ce(t, s, mask, 1.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()
    assert out[1].item() == 0.0 and out[2].item() == pytest.approx(0.0, abs=1e-12)
    assert (s.grad[~mask] == 0).all()
    # Huge values at masked positions change nothing.
    t2, s2 = t.clone(), s.detach().clone()
    t2[~mask], s2[~mask] = 1e30, -1e30
    assert torch.allclose(subset_ce(t2, s2, mask, 1.0), out.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subset_ce_without_a_mask_is_the_all_true_mask_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(4)
    t = (torch.randn(64, 50, generator=g) * 4).to(dtype)
    weights = torch.randn(64, generator=g).to(dtype)
    values, grads = [], []
    for mask in (None, torch.ones(64, 50, dtype=torch.bool)):
        s = (torch.randn(64, 50, generator=torch.Generator().manual_seed(5)) * 4).to(dtype).requires_grad_()
        out = subset_ce(t, s, mask, 0.7)
        (out * weights).sum().backward()
        values.append(out.detach())
        grads.append(s.grad)
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])


def test_subset_ce_gradcheck():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 5, generator=g).double()
    s = torch.randn(3, 5, generator=g).double().requires_grad_()
    mask = torch.rand(3, 5, generator=g) < 0.5
    mask[0] = False
    assert torch.autograd.gradcheck(lambda x: subset_ce(t, x, mask, 0.7), (s,))


# --------------------------------------------------------------------------------------------
# B_u bookkeeping
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_items=st.integers(10, 30), K=st.integers(1, 8), L=st.integers(0, 8))
def test_teacher_side_set_is_B_u_with_each_item_once(seed, n_items, K, L):
    rng = np.random.default_rng(seed)
    b = 4
    qt = np.stack([rng.permutation(n_items)[:K] for _ in range(b)])
    qs = np.stack([rng.permutation(n_items)[:K] for _ in range(b)])
    a = np.stack([rng.permutation(n_items)[:L] for _ in range(b)])
    qs[0] = qt[0][::-1]  # teacher top-K entirely inside the student's
    if L >= 1 and qt[1, 0] not in a[1]:
        a[1, 0] = qt[1, 0]  # a sampled item that is also teacher-top
    items, mask = build_teacher_side_set(torch.tensor(qt), torch.tensor(a), torch.tensor(qs))
    assert items.shape == mask.shape == (b, L + K)
    for u in range(b):
        kept = items[u][mask[u]].tolist()
        assert len(kept) == len(set(kept)), "an item counted twice"
        A, QT, QS = set(a[u].tolist()), set(qt[u].tolist()), set(qs[u].tolist())
        assert set(kept) == A | (QT - A - QS)
    assert set(items[0][mask[0]].tolist()) == set(a[0].tolist())


# --------------------------------------------------------------------------------------------
# rcekd_loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rcekd_matches_reference(case, seed):
    su, si, tu, ti, qt, qs, a, _ = make_case(seed, **case)
    tau, beta = (1.0, 3.0) if seed % 2 == 0 else (10.0, 5.0)
    loss, parts = rcekd_loss(su, si, tu, ti, qt, qs, a, tau=tau, beta=beta)
    ref, ref_parts = ref_rcekd(su.numpy(), si.numpy(), tu.numpy(), ti.numpy(), qt, qs, a, tau, beta)
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    for key in ("loss_s", "loss_t", "alpha", "overlap"):
        assert not parts[key].requires_grad
        assert float(parts[key]) == pytest.approx(np.mean(ref_parts[key]), rel=1e-9, abs=1e-12)


def test_rcekd_adaptive_weight_values():
    """overlap = |QT ∩ A| / K and alpha = exp(-beta overlap), on hand-made sets."""
    n_items, d = 20, 3
    g = torch.Generator().manual_seed(3)
    su, si = torch.randn(3, d, generator=g).double(), torch.randn(n_items, d, generator=g).double()
    qt = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    qs = torch.tensor([[12, 13, 14, 15], [4, 5, 6, 7], [0, 1, 2, 3]])
    a = torch.tensor([[16, 17, 18], [4, 5, 19], [8, 9, 10]])  # overlaps 0, 2, 3 of K = 4
    beta = 3.0
    _, parts = rcekd_loss(su, si, su, si, qt, qs, a, tau=1.0, beta=beta)
    overlaps = [0.0, 0.5, 0.75]
    assert float(parts["overlap"]) == pytest.approx(np.mean(overlaps))
    assert float(parts["alpha"]) == pytest.approx(np.mean([math.exp(-beta * o) for o in overlaps]))
    # Per user: single-user batches expose each alpha.
    for u, o in enumerate(overlaps):
        _, p = rcekd_loss(su[u : u + 1], si, su[u : u + 1], si, qt[u : u + 1], qs[u : u + 1], a[u : u + 1],
                          tau=1.0, beta=beta)
        assert float(p["alpha"]) == pytest.approx(math.exp(-beta * o))
    # Teacher == student: every CE equals the entropy of the same distribution, loss is its
    # minimum; a perturbed student must do worse.
    same, _ = rcekd_loss(su, si, su, si, qt, qs, a, tau=1.0, beta=beta)
    worse, _ = rcekd_loss(su + 0.5, si, su, si, qt, qs, a, tau=1.0, beta=beta)
    assert worse.item() > same.item()


@pytest.mark.parametrize(
    "kwargs, ref_kwargs",
    [
        (dict(use_loss_s=False), dict(use_s=False)),
        (dict(use_loss_t=False), dict(use_t=False)),
        (dict(constant_alpha=0.3), dict(const=0.3)),
        (dict(constant_alpha=0.0), dict(const=0.0)),
    ],
)
def test_rcekd_ablations(kwargs, ref_kwargs):
    su, si, tu, ti, qt, qs, a, _ = make_case(5)
    loss, parts = rcekd_loss(su, si, tu, ti, qt, qs, a, tau=1.0, beta=3.0, **kwargs)
    ref, ref_parts = ref_rcekd(
        su.numpy(), si.numpy(), tu.numpy(), ti.numpy(), qt, qs, a, 1.0, 3.0, **ref_kwargs
    )
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert float(parts["alpha"]) == pytest.approx(np.mean(ref_parts["alpha"]))
    if "use_loss_s" in kwargs:
        assert loss.item() == pytest.approx(sum(ref_parts["loss_t"]), rel=1e-9)
    if "use_loss_t" in kwargs:
        assert loss.item() == pytest.approx(sum(ref_parts["loss_s"]), rel=1e-9)


def test_rcekd_rejects_dropping_both():
    su, si, tu, ti, qt, qs, a, _ = make_case(0)
    with pytest.raises(ValueError):
        rcekd_loss(su, si, tu, ti, qt, qs, a, tau=1.0, beta=1.0, use_loss_s=False, use_loss_t=False)


@pytest.mark.parametrize("case", [dict(), dict(ties=True), dict(L=10, M=10)])
def test_rcekd_gradients_finite_and_only_to_student(case):
    su, si, tu, ti, qt, qs, a, _ = make_case(7, **case)
    su.requires_grad_(), si.requires_grad_(), tu.requires_grad_(), ti.requires_grad_()
    loss, _ = rcekd_loss(su, si, tu, ti, qt, qs, a, tau=1.0, beta=3.0)
    loss.backward()
    assert torch.isfinite(su.grad).all() and torch.isfinite(si.grad).all()
    assert tu.grad is None and ti.grad is None  # teacher scores are constants
    # Items in none of QS, QT, A receive no gradient.
    touched = set(torch.cat([qt, qs, a], 1).flatten().tolist())
    untouched = [i for i in range(si.shape[0]) if i not in touched]
    assert (si.grad[untouched] == 0).all()


def test_rcekd_gradcheck():
    su, si, tu, ti, qt, qs, a, _ = make_case(11, b=3, n_items=15, K=4, M=8, L=4)
    su.requires_grad_(), si.requires_grad_()
    fn = lambda x, y: rcekd_loss(x, y, tu, ti, qt, qs, a, tau=0.8, beta=2.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (su, si))


def test_teacher_chunking_matches_unchunked(monkeypatch):
    su, si, tu, ti, qt, qs, a, _ = make_case(4, b=6)
    ref, _ = rcekd_loss(su, si, tu, ti, qt, qs, a, tau=1.0, beta=3.0)
    monkeypatch.setattr(losses, "_TEACHER_GATHER_ELEMS", 1)  # one user per chunk
    out, _ = rcekd_loss(su, si, tu, ti, qt, qs, a, tau=1.0, beta=3.0)
    assert out.item() == pytest.approx(ref.item(), rel=1e-12)


# --------------------------------------------------------------------------------------------
# CE-KD and RRD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tau", [1.0, 10.0])
def test_ce_kd_matches_reference(ties, tau):
    su, si, tu, ti, qt, qs, _, _ = make_case(8, ties=ties)
    for items in (qt, qs):
        out = ce_kd_loss(su, si, tu, ti, items, tau=tau)
        ref = 0.0
        for u in range(len(su)):
            J = items[u].tolist()
            t = {i: dot(tu[u].numpy(), ti[i].numpy()) for i in J}
            s = {i: dot(su[u].numpy(), si[i].numpy()) for i in J}
            ref += ref_ce(t, s, J, tau)
        assert out.item() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("L2", [0, 1, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_rrd_matches_loop_reference(L2, seed):
    g = torch.Generator().manual_seed(seed)
    b, n_items, d, L1 = 4, 30, 4, 6
    su = (torch.randn(b, d, generator=g) * 2).double().requires_grad_()
    si = (torch.randn(n_items, d, generator=g) * 2).double().requires_grad_()
    inter = torch.stack([torch.randperm(n_items, generator=g)[:L1] for _ in range(b)])
    unint = torch.randint(0, n_items, (b, L2), generator=g)
    out = rrd_loss(su, si, inter, unint)
    ref = ref_rrd(su.detach().numpy(), si.detach().numpy(), inter.tolist(), unint.tolist())
    assert out.item() == pytest.approx(ref, rel=1e-9)
    out.backward()
    assert torch.isfinite(su.grad).all() and torch.isfinite(si.grad).all()


def test_rrd_stable_for_large_scores():
    su = torch.full((1, 2), 30.0, dtype=torch.float32, requires_grad=True)
    si = torch.tensor([[10.0, 10.0], [9.0, 9.0], [-5.0, 0.0]], requires_grad=True)
    out = rrd_loss(su, si, torch.tensor([[0, 1]]), torch.tensor([[2]]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(su.grad).all()
    # Correct order with a big margin: loss near zero.
    assert out.item() == pytest.approx(0.0, abs=1e-3)


def test_rrd_gradcheck():
    g = torch.Generator().manual_seed(9)
    su = torch.randn(2, 3, generator=g, dtype=torch.double, requires_grad=True)
    si = torch.randn(12, 3, generator=g, dtype=torch.double, requires_grad=True)
    inter, unint = torch.tensor([[0, 3, 5], [2, 1, 0]]), torch.tensor([[7, 8], [9, 9]])
    assert torch.autograd.gradcheck(lambda x, y: rrd_loss(x, y, inter, unint), (su, si))


# --------------------------------------------------------------------------------------------
# step 4 sampling
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), M=st.integers(1, 90), T=st.sampled_from([0.5, 1.0, 10.0]))
def test_position_counts_and_weights_match_reference(seed, M, T):
    rng = np.random.default_rng(seed)
    n_items = M + 30
    p = np.stack([rng.permutation(n_items)[:M] for _ in range(3)])
    K = int(rng.integers(1, M + 1))
    qt = np.stack([rng.permutation(n_items)[:K] for _ in range(2)] + [p[2][rng.permutation(M)[:K]]])
    c = interesting_position_counts(torch.tensor(p), torch.tensor(qt))
    w = interesting_position_weights(torch.tensor(p), torch.tensor(qt), T)
    for u in range(3):
        ref = ref_counts(p[u].tolist(), qt[u].tolist())
        assert c[u].tolist() == ref
        np.testing.assert_allclose(w[u].numpy(), [math.exp((x + 1) / T) for x in ref], rtol=1e-12)


def test_position_counts_capped_at_50():
    p = torch.arange(80).unsqueeze(0)
    qt = torch.arange(70).unsqueeze(0)  # 70 teacher items all inside P
    c = interesting_position_counts(p, qt)[0]
    assert c[0].item() == 50 and c.max().item() == 50
    assert c[25].item() == 45 and c[69].item() == 1 and c[70].item() == 0
    w = interesting_position_weights(p, qt, 10.0)[0]
    assert w[0].item() == pytest.approx(math.exp(51 / 10))


@pytest.mark.parametrize("M, L", [(10, 4), (10, 10), (7, 1)])
def test_sampling_without_replacement_from_P(M, L):
    g = torch.Generator().manual_seed(0)
    n = 50
    p = torch.stack([torch.randperm(100, generator=g)[:M] for _ in range(n)])
    qt = torch.stack([torch.randperm(100, generator=g)[:5] for _ in range(n)])
    a = sample_interesting_positions(p, qt, L, T=1.0, generator=g, block=16)
    assert a.shape == (n, L) and a.dtype == torch.long
    for u in range(n):
        assert len(set(a[u].tolist())) == L
        assert set(a[u].tolist()) <= set(p[u].tolist())
        if L == M:
            assert sorted(a[u].tolist()) == sorted(p[u].tolist())
    with pytest.raises(ValueError):
        sample_interesting_positions(p, qt, M + 1, T=1.0, generator=g)


def test_sampling_is_seeded():
    p = torch.arange(20).repeat(6, 1)
    qt = torch.tensor([[3, 9, 15]]).repeat(6, 1)
    a1 = sample_interesting_positions(p, qt, 5, 1.0, torch.Generator().manual_seed(4))
    a2 = sample_interesting_positions(p, qt, 5, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(a1, a2)


def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson chi-square below a generous bound (df + 6 sqrt(2 df)) for a seeded test."""
    n = counts.sum()
    expected = probs * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(probs) - 1
    return stat < df + 6 * math.sqrt(2 * df)


def test_sampling_first_draw_distribution_matches_weights():
    # One user's row repeated: positions 0..5 of P, teacher items at positions 1 and 4.
    n = 40_000
    p = torch.arange(6).repeat(n, 1)
    qt = torch.tensor([[1, 4]]).repeat(n, 1)
    T = 1.0
    w = interesting_position_weights(p[:1], qt[:1], T)[0].numpy()
    a = sample_interesting_positions(p, qt, 1, T, torch.Generator().manual_seed(0))
    counts = np.bincount(a[:, 0].numpy(), minlength=6)
    assert _chi2_ok(counts, w / w.sum())


def test_sampling_inclusion_matches_successive_draws():
    """With L = 2, inclusion probabilities equal those of draws without replacement ∝ w."""
    n = 40_000
    M = 5
    p = torch.arange(M).repeat(n, 1)
    qt = torch.tensor([[0, 3]]).repeat(n, 1)
    T = 0.7
    w = interesting_position_weights(p[:1], qt[:1], T)[0].numpy()
    W = w.sum()
    incl = np.zeros(M)
    for i, j in itertools.permutations(range(M), 2):
        pr = w[i] / W * w[j] / (W - w[i])
        incl[i] += pr
        incl[j] += pr
    a = sample_interesting_positions(p, qt, 2, T, torch.Generator().manual_seed(1))
    assert (a[:, 0] != a[:, 1]).all()
    freq = np.bincount(a.flatten().numpy(), minlength=M) / n
    sd = np.sqrt(incl * (1 - incl) / n)
    assert np.all(np.abs(freq - incl) < 5 * sd + 1e-4), (freq, incl)


def test_sampling_small_temperature_does_not_fail():
    g = torch.Generator().manual_seed(0)
    p = torch.stack([torch.randperm(300, generator=g)[:200] for _ in range(8)])
    qt = p[:, :50].clone()
    a = sample_interesting_positions(p, qt, 150, T=0.01, generator=g)
    assert a.shape == (8, 150)
    # c = 50 - j on the first 50 positions and 0 after: with T tiny those 50 always win.
    for u in range(8):
        assert len(set(a[u].tolist())) == 150
        assert set(p[u, :50].tolist()) <= set(a[u].tolist())


# --------------------------------------------------------------------------------------------
# RRD sampling
# --------------------------------------------------------------------------------------------


def _csr(pos_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(pos_lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in pos_lists])
    return indptr, np.array([i for x in pos_lists for i in x], dtype=np.int64)


def test_rrd_sets_respect_constraints():
    g = torch.Generator().manual_seed(0)
    n_users, n_items, M, L1, L2 = 30, 60, 20, 8, 25
    topm = torch.stack([torch.randperm(n_items, generator=g)[:M] for _ in range(n_users)])
    rng = np.random.default_rng(0)
    pos = [
        sorted(rng.choice(n_items, size=int(rng.integers(0, 15)), replace=False).tolist())
        for _ in range(n_users)
    ]
    indptr, indices = _csr(pos)
    inter, unint = sample_rrd_sets(topm, n_items, indptr, indices, L1, L2, T=10.0, generator=g, block=7)
    assert inter.shape == (n_users, L1) and unint.shape == (n_users, L2)
    for u in range(n_users):
        row = topm[u].tolist()
        ranks = [row.index(i) for i in inter[u].tolist()]
        assert len(set(ranks)) == L1 and ranks == sorted(ranks), "interesting not in teacher order"
        forbidden = set(row) | set(pos[u])
        assert not (set(unint[u].tolist()) & forbidden)
        assert all(0 <= i < n_items for i in unint[u].tolist())


def test_rrd_interesting_distribution():
    n, M, T = 40_000, 8, 3.0
    topm = torch.arange(M).repeat(n, 1) + 100
    indptr, indices = _csr([[] for _ in range(n)])
    inter, _ = sample_rrd_sets(topm, 200, indptr, indices, 1, 0, T, torch.Generator().manual_seed(2))
    counts = np.bincount(inter[:, 0].numpy() - 100, minlength=M)
    probs = np.exp(-np.arange(1, M + 1) / T)
    assert _chi2_ok(counts, probs / probs.sum())


def test_rrd_uninteresting_uniform_over_allowed():
    n_items, M = 12, 4
    topm = torch.tensor([[0, 1, 2, 3]])
    indptr, indices = _csr([[5, 7]])
    g = torch.Generator().manual_seed(3)
    _, unint = sample_rrd_sets(topm, n_items, indptr, indices, 2, 30_000, 1.0, g)
    allowed = [4, 6, 8, 9, 10, 11]
    counts = np.bincount(unint[0].numpy(), minlength=n_items)
    assert counts[[0, 1, 2, 3, 5, 7]].sum() == 0
    assert _chi2_ok(counts[allowed], np.full(len(allowed), 1 / len(allowed)))


def test_rrd_distinct_uninteresting_are_distinct_allowed_and_uniform():
    n_items, M, L2 = 40, 6, 10
    topm = torch.arange(M).repeat(3000, 1)  # items 0-5 are every user's top-M
    indptr, indices = _csr([[10, 11]] * 3000)
    g = torch.Generator().manual_seed(4)
    _, unint = sample_rrd_sets(topm, n_items, indptr, indices, 2, L2, 1.0, g, distinct_uninteresting=True)
    allowed = [i for i in range(n_items) if i >= M and i not in (10, 11)]
    for row in unint.tolist():
        assert len(set(row)) == L2 and set(row) <= set(allowed)
    counts = np.bincount(unint.flatten().numpy(), minlength=n_items)
    assert _chi2_ok(counts[allowed], np.full(len(allowed), 1 / len(allowed)))
    # a user with fewer allowed items than L2 cannot get L2 distinct ones: refused, not an endless loop
    with pytest.raises(ValueError, match="needs 10"):
        sample_rrd_sets(topm[:1], 14, *_csr([[10, 11]]), 2, L2, 1.0, g, distinct_uninteresting=True)


def test_rrd_sets_reject_impossible_user():
    topm = torch.tensor([[0, 1, 2]])
    indptr, indices = _csr([[3]])
    with pytest.raises(ValueError):
        sample_rrd_sets(topm, 4, indptr, indices, 1, 1, 1.0, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------
# the whole step 2-7 pipeline on float32, as the trainer will run it
# --------------------------------------------------------------------------------------------


def test_pipeline_float32_matches_reference():
    g = torch.Generator().manual_seed(21)
    b, n_items, d, dT, K, M, L = 5, 80, 8, 16, 10, 30, 12
    su, si = torch.randn(b, d, generator=g), torch.randn(n_items, d, generator=g)
    tu, ti = torch.randn(b, dT, generator=g), torch.randn(n_items, dT, generator=g)
    p = torch.topk(su @ si.T, M, dim=1).indices
    qs, qt = p[:, :K], torch.topk(tu @ ti.T, K, dim=1).indices
    a = sample_interesting_positions(p, qt, L, 10.0, g)
    loss, parts = rcekd_loss(su, si, tu, ti, qt, qs, a, tau=1.0, beta=3.0)
    assert loss.dtype == torch.float32
    ref, _ = ref_rcekd(su.double().numpy(), si.double().numpy(), tu.double().numpy(), ti.double().numpy(),
                       qt, qs, a, 1.0, 3.0)
    assert loss.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("map_bytes", [1 << 25, 2 * 64 * 60, 16])  # one block, several blocks, the sort path
def test_rowwise_positions_finds_each_id_in_its_row(monkeypatch, map_bytes):
    import compressor.losses as losses_mod

    monkeypatch.setattr(losses_mod, "POSITION_MAP_BYTES", map_bytes)
    gen = torch.Generator().manual_seed(1)
    y = torch.stack([torch.randperm(60, generator=gen)[:9] for _ in range(300)])  # distinct per row
    x = torch.randint(0, 60, (300, 14), generator=gen)
    pos = losses_mod.rowwise_positions(x, y)
    member = (x.unsqueeze(2) == y.unsqueeze(1)).any(dim=2)
    assert torch.equal(pos >= 0, member) and member.any() and not member.all()
    assert torch.equal(y.gather(1, pos.clamp(min=0))[member], x[member])
    assert torch.equal(losses_mod.rowwise_positions(x - 5, y - 5), pos)  # negative ids: the sort path
    dup = torch.cat([y, y[:, :3]], dim=1)  # an id twice in a row: either position names it
    assert torch.equal(dup.gather(1, losses_mod.rowwise_positions(x, dup).clamp(min=0))[member], x[member])
    assert (losses_mod.rowwise_positions(x, y[:, :0]) == -1).all()


@pytest.mark.parametrize("bits", [1 << 24, 64 * 50, 10])  # one block; blocks of 64 rows; too small: sort fallback
def test_rowwise_isin_equals_broadcast_membership(monkeypatch, bits):
    import compressor.losses as losses_mod

    monkeypatch.setattr(losses_mod, "ISIN_BITMAP_BITS", bits)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (300, 12), generator=gen)
    y = torch.randint(0, 50, (300, 7), generator=gen)  # duplicates within a row included
    want = (x.unsqueeze(2) == y.unsqueeze(1)).any(dim=2)
    assert torch.equal(losses_mod.rowwise_isin(x, y), want) and want.any() and not want.all()
    assert torch.equal(losses_mod.rowwise_isin(x - 3, y - 3), want)  # negative ids: the sort path
    assert not losses_mod.rowwise_isin(x, y[:, :0]).any()


def test_pair_scores_csr_path_matches_gather_and_bmm_with_gradients():
    """The CPU path (a CSR pattern: sampled product forward, CSR products with the pattern and its transpose
    backward) gives the gather + bmm scores and gradients, with duplicate and unsorted ids in a row; an id outside
    the table is an error."""
    from compressor.losses import pair_scores

    gen = torch.Generator().manual_seed(3)
    user = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    items = torch.randn(30, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.randint(0, 30, (9, 17), generator=gen)  # 17 of 30: duplicates in most rows
    assert any(len(set(r.tolist())) < 17 for r in idx)
    weights = torch.randn(9, 17, dtype=torch.float64, generator=gen)
    got = pair_scores(user, items, idx)
    (got * weights).sum().backward()
    g_user, g_items = user.grad.clone(), items.grad.clone()
    user.grad = items.grad = None
    want = torch.bmm(items[idx], user.unsqueeze(-1)).squeeze(-1)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_user, user.grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_items, items.grad, rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(lambda u, t: pair_scores(u, t, idx), (user, items))
    with pytest.raises(IndexError, match=r"\[0, 30\)"):
        pair_scores(user, items, idx + 30)
    long_rows = torch.randint(0, 30, (9, 40), generator=gen)  # more entries than items: the gather path
    torch.testing.assert_close(pair_scores(user, items, long_rows),
                               torch.bmm(items[long_rows], user.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("threads", [1, 2])
def test_pair_scores_gradients_are_the_same_bits_every_time(threads):
    """float32 item gradients, summed over duplicate ids, come out the same every time at any thread count (what
    bit-exact resume needs); the output may be changed in place; bfloat16 takes the gather path."""
    from compressor.losses import pair_scores

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grads = []
        for _ in range(6):
            gen = torch.Generator().manual_seed(0)
            user = torch.randn(2048, 8, generator=gen).requires_grad_()
            items = torch.randn(300, 8, generator=gen).requires_grad_()
            idx = (torch.rand(2048, 100, generator=gen) ** 3 * 300).long()  # popular ids many times over
            (pair_scores(user, items, idx) * torch.randn(2048, 100, generator=gen)).sum().backward()
            grads.append((user.grad, items.grad))
        assert all(torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1]) for g in grads)
    finally:
        torch.set_num_threads(before)
    s = pair_scores(user, items, idx)
    s.mul_(2)  # a copy, not a view of the sparse result
    half = pair_scores(user.detach().bfloat16(), items.detach().bfloat16(), idx)
    assert half.dtype == torch.bfloat16 and half.shape == idx.shape


@pytest.mark.parametrize("n_items", [300, 65_536, 70_000])  # a 16-bit radix order of the entries, its edge, int32
def test_pair_scores_item_gradient_is_the_same_bits_with_one_or_two_threads(n_items):
    """The item gradient (the transposed pattern times the users): the same bits with 1, 2 and 4 threads, and the
    float64 scatter's values (the last item's row included)."""
    from compressor.losses import pair_scores

    def item_grad(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(1)
            user = torch.randn(512, 8, generator=gen)
            items = torch.randn(n_items, 8, generator=gen).requires_grad_()
            idx = (torch.rand(512, 60, generator=gen) ** 3 * n_items).long()
            idx[0, :5] = n_items - 1
            weights = torch.randn(512, 60, generator=gen)
            (pair_scores(user, items, idx) * weights).sum().backward()
            return items.grad, user, idx, weights
        finally:
            torch.set_num_threads(before)

    one, user, idx, weights = item_grad(1)
    assert torch.equal(one, item_grad(2)[0]) and torch.equal(one, item_grad(4)[0])
    want = torch.zeros(n_items, 8, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (weights.double().unsqueeze(-1) * user.double().unsqueeze(1)).reshape(-1, 8))
    torch.testing.assert_close(one.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags", [{}, {"use_loss_s": False}, {"use_loss_t": False}, {"constant_alpha": 0.3}])
def test_rcekd_loss_from_scores_equals_autograd_through_subset_ce(flags):
    """The written-out gradient of steps 5-7 against autograd through ``subset_ce`` (the formulation it replaced):
    the same loss, parts and gradient in float64, with an empty B_u row, tau != 1 and every ablation."""
    from compressor.losses import RCEKDSets, rcekd_loss_from_scores

    gen = torch.Generator().manual_seed(5)
    b, k, n_l = 7, 6, 4
    s = torch.randn(b, k + n_l + k, dtype=torch.float64, generator=gen) * 3
    t = torch.randn(b, k + n_l + k, dtype=torch.float64, generator=gen) * 3
    mask = torch.rand(b, n_l + k, generator=gen) > 0.4
    mask[2] = False  # an empty J: loss_T 0, no gradient
    sets = RCEKDSets(torch.zeros(b, k + n_l + k, dtype=torch.long), mask, torch.randint(0, k, (b,), generator=gen),
                     k, k)
    tau, beta = 0.7, 2.0
    s1 = s.clone().requires_grad_()
    got, parts = rcekd_loss_from_scores(s1, t, sets, tau=tau, beta=beta, **flags)
    (2.5 * got).backward()

    s2 = s.clone().requires_grad_()
    loss_s = subset_ce(t[:, :k], s2[:, :k], None, tau)
    loss_t = subset_ce(t[:, k:], s2[:, k:], mask, tau)
    overlap = sets.overlap_count.double() / k
    alpha = (torch.full_like(overlap, flags["constant_alpha"]) if "constant_alpha" in flags
             else torch.exp(-beta * overlap))
    want = (loss_t if not flags.get("use_loss_s", True) else loss_s if not flags.get("use_loss_t", True)
            else (1 - alpha) * loss_s + alpha * loss_t).sum()
    (2.5 * want).backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(s1.grad[2, k:] == 0) and torch.isfinite(s1.grad).all()
    torch.testing.assert_close(parts["loss_s"], loss_s.mean())
    torch.testing.assert_close(parts["loss_t"], loss_t.mean())
    torch.autograd.gradcheck(lambda x: rcekd_loss_from_scores(x, t, sets, tau=tau, beta=beta, **flags)[0],
                             (s.clone().requires_grad_(),))
