"""Distillation losses (RCE-KD, CE-KD, RRD) and the BPR base loss.

Everything here is a pure function of tensors: no model, dataset, config or device choice.
Tensors stay on whatever device they arrive on. See ``shared/docs/rcekd.md`` for the method;
step numbers in docstrings refer to its algorithm section. The per-epoch samplers that build
the sets these losses read live in ``kd_sets``.

Shape conventions: ``b`` users in the batch, ``n_items`` items in the catalogue, ``d``/``dT``
student/teacher embedding sizes, ``K`` top-list size, ``L`` sampled interesting items,
``M`` depth of the student's ranking read each epoch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .pair_products import pair_scores  # noqa: F401  (re-exported: part of this module's API)

__all__ = [
    "bpr_loss",
    "subset_ce",
    "build_teacher_side_set",
    "rcekd_loss",
    "ce_kd_loss",
    "rrd_loss",
    "pair_scores",
    "rowwise_isin",
    "rowwise_positions",
    "rcekd_items",
    "rcekd_sets",
    "rcekd_loss_on_sets",
    "rcekd_loss_from_scores",
    "RCEKDSets",
    "teacher_pair_scores",
]

# Teacher vectors can be wide (2000-dim LightGCN): gather them in user chunks so that the
# [chunk, k, dT] intermediate stays around this many elements (16 MiB of float32) instead of
# growing with the batch.
_TEACHER_GATHER_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _teacher_scores(user: Tensor, item_table: Tensor, idx: Tensor) -> Tensor:
    """``pair_scores`` for a frozen teacher, chunked over users to bound memory."""
    b, k = idx.shape
    dim = max(item_table.shape[1], 1)
    chunk = max(1, _TEACHER_GATHER_ELEMS // max(k * dim, 1))
    if chunk >= b:
        return pair_scores(user, item_table, idx)
    return torch.cat(
        [pair_scores(user[i : i + chunk], item_table, idx[i : i + chunk]) for i in range(0, b, chunk)]
    )


ISIN_BITMAP_BITS = 1 << 24  # bitmap cells (bytes) of one block of rowwise_isin: 16 MiB


def rowwise_isin(x: Tensor, y: Tensor) -> Tensor:
    """``out[r, i] = x[r, i] in set(y[r])``.  x [b, k], y [b, m] -> bool [b, k].

    For non-negative ids (item ids): a bitmap over a block of rows, set at y's entries and read at x's, O(b (k +
    m)); 4-5x faster on CPU than sort + searchsorted (O(b (k + m) log m), the fallback for negative ids or a
    catalogue too large for a block of rows), and neither costs the O(b k m) of broadcasting.
    """
    if y.numel() == 0 or x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    n = int(torch.maximum(x.max(), y.max())) + 1
    rows_per_block = ISIN_BITMAP_BITS // max(n, 1)
    if int(torch.minimum(x.min(), y.min())) < 0 or rows_per_block < 64:
        y_sorted, _ = torch.sort(y, dim=1)
        pos = torch.searchsorted(y_sorted, x.contiguous()).clamp_(max=y.shape[1] - 1)
        return y_sorted.gather(1, pos) == x
    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    bitmap = torch.zeros(min(rows_per_block, x.shape[0]) * n, dtype=torch.bool, device=x.device)
    for s in range(0, x.shape[0], rows_per_block):
        xb, yb = x[s:s + rows_per_block], y[s:s + rows_per_block]
        offset = (torch.arange(xb.shape[0], device=x.device) * n).unsqueeze(1)
        flat_y = (yb + offset).reshape(-1)
        bitmap.index_fill_(0, flat_y, True)
        out[s:s + rows_per_block] = bitmap.index_select(0, (xb + offset).reshape(-1)).view(xb.shape)
        bitmap.index_fill_(0, flat_y, False)  # cleared where set: the next block starts from zeros
    return out


POSITION_MAP_BYTES = 1 << 25  # one block's id -> position map of rowwise_positions: 32 MiB


def rowwise_positions(x: Tensor, y: Tensor) -> Tensor:
    """``out[r, i]`` = a position j with ``y[r, j] == x[r, i]``, or -1 where ``x[r, i]`` is not in ``y[r]``.
    x [b, k], y [b, m] -> long [b, k]. (Where a row of y holds an id twice, either position may be given.)

    Non-negative ids: a map over a block of rows from id to position, filled at y's entries and read at x's (as
    ``rowwise_isin``'s bitmap); otherwise sort + searchsorted.
    """
    if y.numel() == 0 or x.numel() == 0:
        return torch.full(x.shape, -1, dtype=torch.long, device=x.device)
    n = int(torch.maximum(x.max(), y.max())) + 1
    dtype = torch.int16 if y.shape[1] < 2 ** 15 else torch.int32
    rows_per_block = POSITION_MAP_BYTES // (max(n, 1) * (2 if dtype == torch.int16 else 4))
    if int(torch.minimum(x.min(), y.min())) < 0 or rows_per_block < 64:
        y_sorted, order = torch.sort(y, dim=1)
        pos = torch.searchsorted(y_sorted, x.contiguous()).clamp_(max=y.shape[1] - 1)
        return torch.where(y_sorted.gather(1, pos) == x, order.gather(1, pos), -1)
    out = torch.empty(x.shape, dtype=torch.long, device=x.device)
    block_rows = min(rows_per_block, x.shape[0])
    cells = torch.full((block_rows * n,), -1, dtype=dtype, device=x.device)
    # scatter_ from a tensor is 2-3x index_put_'s and index_fill_'s speed on CPU for these 1-D writes
    columns = torch.arange(y.shape[1], dtype=dtype, device=x.device).repeat(block_rows)
    unset = torch.full_like(columns, -1)
    for s in range(0, x.shape[0], rows_per_block):
        xb, yb = x[s:s + rows_per_block], y[s:s + rows_per_block]
        offset = (torch.arange(xb.shape[0], device=x.device) * n).unsqueeze(1)
        flat_y = (yb + offset).reshape(-1)
        cells.scatter_(0, flat_y, columns[: flat_y.numel()])
        out[s:s + rows_per_block] = cells.index_select(0, (xb + offset).reshape(-1)).view(xb.shape)
        cells.scatter_(0, flat_y, unset[: flat_y.numel()])  # cleared where set: the next block starts from -1
    return out


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    """BPR loss, summed over the batch (the spec's L_base).

    pos_scores [b], neg_scores [b] -> scalar ``-sum log sigmoid(pos - neg)``.
    """
    return -F.logsigmoid(pos_scores - neg_scores).sum()


def subset_ce(teacher_scores: Tensor, student_scores: Tensor, mask: Tensor | None, tau: float) -> Tensor:
    """Per-user cross-entropy over a masked subset J, both softmaxes renormalised over J.

    teacher_scores [b, n], student_scores [b, n], mask [b, n] bool (True = in J; None = every column) -> [b]:
    ``-sum_{i in J} softmax(t[J]/tau)_i * log softmax(s[J]/tau)_i``.
    Masked-out entries contribute neither value nor gradient; a user with an empty J gets 0.
    """
    if teacher_scores.shape != student_scores.shape or (mask is not None and mask.shape != student_scores.shape):
        raise ValueError(
            f"shape mismatch: teacher {tuple(teacher_scores.shape)}, "
            f"student {tuple(student_scores.shape)}, mask {None if mask is None else tuple(mask.shape)}"
        )
    if mask is None:  # the same values as an all-True mask, in a third of the operations (a KD batch runs dozens)
        s, t = student_scores / tau, teacher_scores / tau
        return -(torch.softmax(t, dim=1) * (s - torch.logsumexp(s, dim=1, keepdim=True))).sum(dim=1)
    mask = mask.to(torch.bool)
    nonempty = mask.any(dim=1)
    # Treat an empty row as full while computing (so no logsumexp over only -inf, whose
    # backward is NaN), then zero its loss below.
    safe_mask = mask | ~nonempty.unsqueeze(1)
    neg_inf = torch.tensor(float("-inf"), dtype=student_scores.dtype, device=student_scores.device)

    s = student_scores / tau
    t = teacher_scores / tau
    # -inf only enters logsumexp/softmax, whose backward gives exact zeros there; the log-prob
    # itself is taken with `where` so 0 * (-inf) never appears in the forward or the backward.
    lse = torch.logsumexp(torch.where(safe_mask, s, neg_inf), dim=1, keepdim=True)
    log_q = torch.where(safe_mask, s - lse, torch.zeros_like(s))
    p = torch.softmax(torch.where(safe_mask, t, neg_inf.to(t.dtype)), dim=1)
    loss = -(p * log_q).sum(dim=1)
    return torch.where(nonempty, loss, torch.zeros_like(loss))


def build_teacher_side_set(qt: Tensor, a: Tensor, qs: Tensor) -> tuple[Tensor, Tensor]:
    """Step 6's set ``B_u = A_u ∪ (QT_u \\ A_u \\ QS_u)`` as a padded list plus a mask.

    qt [b, K] long (distinct per row), a [b, L] long (distinct per row), qs [b, K] long ->
    (items [b, L + K] long, mask [b, L + K] bool). ``items = [A_u, QT_u]``; the QT part is
    masked off where the item is already in A_u or QS_u, so every item of B_u counts once.
    """
    keep_qt = ~(rowwise_isin(qt, a) | rowwise_isin(qt, qs))
    items = torch.cat([a, qt], dim=1)
    mask = torch.cat([torch.ones_like(a, dtype=torch.bool), keep_qt], dim=1)
    return items, mask


def _rcekd_items_and_mask(qt: Tensor, qs: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    b_items, b_mask = build_teacher_side_set(qt, a, qs)
    return torch.cat([qs, b_items], dim=1), b_mask


def rcekd_items(qt: Tensor, qs: Tensor, a: Tensor) -> Tensor:
    """The item layout ``[QS | A | QT]`` [b, K + L + K] whose teacher scores ``rcekd_loss`` reads."""
    return _rcekd_items_and_mask(qt, qs, a)[0]


@torch.no_grad()
def teacher_pair_scores(user: Tensor, item_table: Tensor, idx: Tensor) -> Tensor:
    """Frozen-teacher scores of per-user item lists: user [b, dT], item_table [n, dT], idx [b, k] -> [b, k]."""
    return _teacher_scores(user, item_table, idx)


def rcekd_loss(
    student_user: Tensor,
    student_items: Tensor,
    teacher_user: Tensor,
    teacher_items: Tensor,
    qt: Tensor,
    qs: Tensor,
    a: Tensor,
    *,
    teacher_scores: Tensor | None = None,
    **weighting,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RCE-KD loss (steps 5-7), summed over the batch's users.

    student_user [b, d], student_items [n_items, d], teacher_user [b, dT],
    teacher_items [n_items, dT], qt [b, K] (teacher top-K), qs [b, K] (student top-K),
    a [b, L] (sampled interesting items) -> (scalar ``sum_u loss_KD(u)``, parts).

    ``loss_KD = (1 - alpha) loss_S + alpha loss_T`` with ``alpha = exp(-beta |QT ∩ A| / K)``.
    weighting: the keywords of ``rcekd_loss_on_sets`` (``tau``, ``beta`` and the ablation switches), which
    this builds the sets for and calls; parts as there.

    ``teacher_scores`` [b, K + L + K]: the teacher's scores of ``rcekd_items(qt, qs, a)``, when
    the caller has them already (the sets are fixed for an epoch, so a trainer can score them once
    per epoch instead of gathering wide teacher vectors every batch); then ``teacher_user`` and
    ``teacher_items`` are not read and may be None.
    """
    sets = rcekd_sets(qt, qs, a)
    if teacher_scores is None:
        teacher_scores = _teacher_scores(teacher_user.detach(), teacher_items.detach(), sets.items)
    return rcekd_loss_on_sets(student_user, student_items, sets, teacher_scores, **weighting)


class RCEKDSets(NamedTuple):
    """Steps 5-7's index sets for a group of users, derived from (QT, QS, A) alone.

    items [b, K + L + K] = [QS | A | QT]; mask_t [b, L + K] marks B_u inside [A | QT] (each item once);
    overlap_count [b] = |QT ∩ A| (long); k = |QT_u|; n_qs = K (where loss_S's part of ``items`` ends).
    The sets are fixed for an epoch, so a trainer builds them once per epoch for all users and
    indexes rows per batch.
    """

    items: Tensor
    mask_t: Tensor
    overlap_count: Tensor
    k: int
    n_qs: int

    def rows(self, idx: Tensor) -> "RCEKDSets":
        return RCEKDSets(self.items[idx], self.mask_t[idx], self.overlap_count[idx], self.k, self.n_qs)


@torch.no_grad()
def rcekd_sets(qt: Tensor, qs: Tensor, a: Tensor) -> RCEKDSets:
    """qt [b, K], qs [b, K], a [b, L] -> RCEKDSets (see there)."""
    items, mask_t = _rcekd_items_and_mask(qt, qs, a)
    return RCEKDSets(items, mask_t, rowwise_isin(qt, a).sum(dim=1), qt.shape[1], qs.shape[1])


def rcekd_loss_on_sets(
    student_user: Tensor,
    student_items: Tensor,
    sets: RCEKDSets,
    teacher_scores: Tensor,
    **weighting,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``rcekd_loss`` over prebuilt sets: student_user [b, d], student_items [n_items, d],
    sets (b rows), teacher_scores [b, K + L + K] of ``sets.items`` -> (scalar ``sum_u loss_KD(u)``, parts).
    weighting: the keywords of ``rcekd_loss_from_scores``."""
    return rcekd_loss_from_scores(pair_scores(student_user, student_items, sets.items), teacher_scores, sets,
                                  **weighting)


def rcekd_loss_from_scores(
    student_scores: Tensor,
    teacher_scores: Tensor,
    sets: RCEKDSets,
    *,
    tau: float,
    beta: float,
    use_loss_s: bool = True,
    use_loss_t: bool = True,
    constant_alpha: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Steps 5-7 from the student's and the teacher's scores [b, K + L + K] of ``sets.items`` (b rows) ->
    (scalar ``sum_u loss_KD(u)``, parts).

    tau: softmax temperature (> 0); beta: strength of ``alpha = exp(-beta |QT ∩ A| / K)``.
    Ablations: ``use_loss_s=False`` -> loss_T only ("w/o S"); ``use_loss_t=False`` -> loss_S
    only ("w/o T"); ``constant_alpha`` replaces the adaptive alpha ("w/ const").
    parts: detached 0-dim batch means of "loss_s", "loss_t", "alpha", "overlap".
    """
    if not (use_loss_s or use_loss_t):
        raise ValueError("at least one of use_loss_s / use_loss_t must be True")
    n_qs = sets.n_qs
    s_all = student_scores
    for name, t in (("student_scores", s_all), ("teacher_scores", teacher_scores)):
        if t.shape != sets.items.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must be {tuple(sets.items.shape)}")
    t_all = teacher_scores.detach().to(s_all.dtype)

    overlap = sets.overlap_count.to(s_all.dtype) / sets.k
    if constant_alpha is not None:
        alpha = torch.full_like(overlap, float(constant_alpha))
    else:
        alpha = torch.exp(-beta * overlap)
    one, none = torch.ones_like(alpha), torch.zeros_like(alpha)
    if use_loss_s and use_loss_t:
        w_s, w_t = 1.0 - alpha, alpha
    elif use_loss_t:  # one term alone, unweighted
        w_s, w_t = none, one
    else:
        w_s, w_t = one, none
    total, loss_s, loss_t = _RCEKDCrossEntropies.apply(s_all, t_all, sets.mask_t.to(torch.bool), w_s.detach(),
                                                       w_t.detach(), float(tau), n_qs)
    parts = {
        "loss_s": loss_s.detach().mean(),
        "loss_t": loss_t.detach().mean(),
        "alpha": alpha.detach().mean(),
        "overlap": overlap.detach().mean(),
    }
    return total, parts


class _RCEKDCrossEntropies(torch.autograd.Function):
    """Steps 5-7's two cross-entropies (``subset_ce`` over all of QS, and over B_u inside [A | QT]) and their
    per-user weighted sum, in one pass with the gradient written out: for w CE(softmax(t_J / tau), softmax(s_J /
    tau)) it is w / tau (softmax(s_J / tau) - softmax(t_J / tau)) on J (the teacher's distribution sums to 1), 0
    off J and for an empty J. The same values as ``subset_ce`` up to the order of float sums (tested); forward +
    backward on [1,880, 250] scores 8.7-8.8 ms against 13.5-18 ms for autograd through its where / logsumexp /
    softmax chain (a throwaway timing, docs/benchmarks.md section 4f).
    s, t [b, K + L + K]; mask_t [b, L + K] bool; w_s, w_t [b] -> (sum_u w_s loss_S + w_t loss_T, loss_S [b],
    loss_T [b]); only the first has a gradient, and only for s."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, mask_t: Tensor, w_s: Tensor, w_t: Tensor, tau: float, n_qs: int):
        s_qs, s_t = s[:, :n_qs] / tau, s[:, n_qs:] / tau
        p_qs = torch.softmax(t[:, :n_qs] / tau, dim=1)
        lse_qs = torch.logsumexp(s_qs, dim=1)
        loss_s = lse_qs - (p_qs * s_qs).sum(dim=1)
        nonempty = mask_t.any(dim=1)
        neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        # an empty J: its row is all -inf here, so its softmax is NaN and its logsumexp -inf; both are replaced
        lse_t = torch.where(nonempty, torch.logsumexp(torch.where(mask_t, s_t, neg_inf), dim=1), zero)
        p_t = torch.where(mask_t, torch.softmax(torch.where(mask_t, t[:, n_qs:] / tau, neg_inf), dim=1), zero)
        loss_t = torch.where(nonempty, lse_t - (p_t * torch.where(mask_t, s_t, zero)).sum(dim=1), zero)
        ctx.save_for_backward(s_qs, lse_qs, p_qs, s_t, lse_t, p_t, mask_t, w_s, w_t)
        ctx.tau = tau
        ctx.mark_non_differentiable(loss_s, loss_t)
        return (w_s * loss_s + w_t * loss_t).sum(), loss_s, loss_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor, _grad_loss_s, _grad_loss_t):
        s_qs, lse_qs, p_qs, s_t, lse_t, p_t, mask_t, w_s, w_t = ctx.saved_tensors
        scale = grad_total / ctx.tau
        n_qs = s_qs.shape[1]
        grad = torch.empty((s_qs.shape[0], n_qs + s_t.shape[1]), dtype=s_qs.dtype, device=s_qs.device)
        torch.sub(torch.exp(s_qs - lse_qs.unsqueeze(1)), p_qs, out=grad[:, :n_qs]).mul_((w_s * scale).unsqueeze(1))
        # off J the exponent may overflow; ``where`` keeps those entries out (0), and an empty J has p_t = 0 too
        q_t = torch.where(mask_t, torch.exp(s_t - lse_t.unsqueeze(1)), torch.zeros((), dtype=s_t.dtype,
                                                                                   device=s_t.device))
        torch.sub(q_t, p_t, out=grad[:, n_qs:]).mul_((w_t * scale).unsqueeze(1))
        return grad, None, None, None, None, None, None


def ce_kd_loss(
    student_user: Tensor,
    student_items: Tensor,
    teacher_user: Tensor,
    teacher_items: Tensor,
    items: Tensor,
    *,
    tau: float,
    teacher_scores: Tensor | None = None,
) -> Tensor:
    """Vanilla CE-KD over a given item set, summed over users.

    student_user [b, d], student_items [n_items, d], teacher_user [b, dT],
    teacher_items [n_items, dT], items [b, K] long -> scalar.
    Pass QT for the teacher-guided variant, QS for the student-guided one.
    """
    s = pair_scores(student_user, student_items, items)
    if teacher_scores is None:
        t = _teacher_scores(teacher_user.detach(), teacher_items.detach(), items).to(s.dtype)
    else:  # [b, K] precomputed teacher scores of ``items``
        t = teacher_scores.detach().to(s.dtype)
    return subset_ce(t, s, None, tau).sum()


def rrd_loss(
    student_user: Tensor,
    student_items: Tensor,
    interesting: Tensor,
    uninteresting: Tensor,
) -> Tensor:
    """DE-RRD relaxed ranking loss (Plackett-Luce), summed over users.

    student_user [b, d], student_items [n_items, d], interesting [b, L1] long in teacher order
    (best first), uninteresting [b, L2] long -> scalar
    ``-sum_u sum_k [ s_k - log( sum_{j>=k} exp(s_j) + sum_{v in uninteresting} exp(s_v) ) ]``.
    """
    s_int = pair_scores(student_user, student_items, interesting)  # [b, L1]
    # log sum_{j >= k} exp(s_j): reversed cumulative logsumexp, stable for large scores.
    tail = torch.logcumsumexp(s_int.flip(1), dim=1).flip(1)
    if uninteresting.shape[1] > 0:
        s_un = pair_scores(student_user, student_items, uninteresting)
        denom = torch.logaddexp(tail, torch.logsumexp(s_un, dim=1, keepdim=True))
    else:
        denom = tail
    return -(s_int - denom).sum()
