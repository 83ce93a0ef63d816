"""The per-epoch index sets the KD losses read: RCE-KD's sampled interesting items (step 4) and DE-RRD's
interesting / uninteresting sets.

Pure functions of tensors (plus the training positives as CSR arrays for RRD), run once per epoch outside
autograd; every random draw comes from the ``generator`` passed in, so an epoch's sets follow from its seed.
See ``shared/docs/rcekd.md``; step numbers refer to its algorithm section. Shapes as in ``losses``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .losses import rowwise_isin

__all__ = [
    "COUNT_CAP",
    "interesting_position_counts",
    "interesting_position_weights",
    "sample_interesting_positions",
    "sample_rrd_sets",
    "rrd_positive_keys",
]

# The spec caps c_u(j) at 50 so that exp((c+1)/T) stays bounded however long the lists are.
COUNT_CAP = 50

def _gumbel_topk(log_w: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Indices of ``n`` distinct columns per row, drawn without replacement ∝ exp(log_w).

    Gumbel-top-k gives exactly the distribution of successive draws without replacement
    (what ``torch.multinomial(replacement=False)`` does) but stays in log space, so a small
    temperature cannot underflow the weights to zero and make sampling fail.
    """
    u = torch.rand(log_w.shape, generator=generator, device=log_w.device, dtype=torch.float64)
    u = u.clamp_(min=torch.finfo(torch.float64).tiny, max=1.0 - 1e-16)
    keys = log_w.to(torch.float64) - torch.log(-torch.log(u))
    return torch.topk(keys, n, dim=1, sorted=False).indices


@torch.no_grad()
def interesting_position_counts(p: Tensor, qt: Tensor, hit: Tensor | None = None) -> Tensor:
    """Step 4's ``c_u(j)``: teacher top-K items at position j or deeper in P_u, capped at 50.

    p [n, M] long (student top-M, best first), qt [n, K] long -> [n, M] long. ``hit`` [n, M] bool: which of
    p's entries are in qt's row, when the caller knows it already.
    """
    hit = (rowwise_isin(p, qt) if hit is None else hit).to(torch.long)
    c = hit.flip(1).cumsum(1).flip(1)
    return c.clamp_(max=COUNT_CAP)


@torch.no_grad()
def interesting_position_weights(p: Tensor, qt: Tensor, T: float) -> Tensor:
    """Step 4's unnormalised weights ``exp((c_u(j) + 1) / T)``; [n, M] float64.

    May overflow to inf for T below about 0.08; the sampler works on log weights instead.
    """
    c = interesting_position_counts(p, qt)
    return torch.exp((c.to(torch.float64) + 1.0) / T)


@torch.no_grad()
def sample_interesting_positions(
    p: Tensor,
    qt: Tensor,
    L: int,
    T: float,
    generator: torch.Generator | None = None,
    block: int = 8192,
    with_positions: bool = False,
    hit: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Step 4: sample ``A_u``, L distinct positions of P_u with probability ∝ w_u(j).

    p [n_users, M] long (student top-M, best first), qt [n_users, K] long ->
    a [n_users, L] long item ids, listed in the student's order; with ``with_positions`` also their columns of p
    [n_users, L] (so values known for P's columns can be gathered for A). Requires L <= M. ``hit``: as for
    ``interesting_position_counts``.
    """
    n, m = p.shape
    if L > m:
        raise ValueError(f"cannot sample L={L} distinct positions from M={m}")
    out = torch.empty((n, L), dtype=p.dtype, device=p.device)
    positions = torch.empty((n, L), dtype=torch.long, device=p.device)
    for start in range(0, n, block):
        pb, qb = p[start : start + block], qt[start : start + block]
        c = interesting_position_counts(pb, qb, None if hit is None else hit[start : start + block])
        # Log weights (c+1)/T; the row max is irrelevant to Gumbel-top-k (shift invariant).
        log_w = (c.to(torch.float64) + 1.0) / T
        pos = _gumbel_topk(log_w, L, generator)
        pos, _ = torch.sort(pos, dim=1)
        positions[start : start + block] = pos
        out[start : start + block] = pb.gather(1, pos)
    return (out, positions) if with_positions else out


@torch.no_grad()
def sample_rrd_sets(
    teacher_topm: Tensor,
    n_items: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    L1: int,
    L2: int,
    T: float,
    generator: torch.Generator | None = None,
    block: int = 8192,
    max_rounds: int = 100,
    positive_keys: Tensor | None = None,
    distinct_uninteresting: bool = False,
) -> tuple[Tensor, Tensor]:
    """DE-RRD's per-epoch sets for every user.

    teacher_topm [n_users, M] long (teacher's top-M, best first), n_items, train positives as
    CSR (indptr [n_users + 1], indices [nnz]) -> (interesting [n_users, L1] long in teacher
    order, uninteresting [n_users, L2] long).
    Interesting: L1 distinct positions ∝ exp(-rank / T) (rank 1-based), sorted by rank.
    Uninteresting: L2 independent uniform draws (with replacement, as in DE-RRD; without it,
    as the authors' public code draws them, with ``distinct_uninteresting``) from the items
    outside the teacher's top-M and the user's positives, by vectorised rejection.
    """
    n, m = teacher_topm.shape
    if L1 > m:
        raise ValueError(f"cannot sample L1={L1} distinct positions from M={m}")
    if len(indptr) != n + 1:
        raise ValueError(f"indptr has {len(indptr)} entries, expected n_users + 1 = {n + 1}")
    device = teacher_topm.device
    # Fixed for a whole run (the teacher's top-M and the positives do not move): callers that sample every epoch
    # build them once with ``rrd_positive_keys`` and pass them in.
    pos_keys = positive_keys if positive_keys is not None else rrd_positive_keys(
        teacher_topm, n_items, indptr, indices, L2, distinct_uninteresting)

    ranks = torch.arange(1, m + 1, dtype=torch.float64, device=device)
    log_w = (-ranks / T).expand(n, m)
    interesting = torch.empty((n, L1), dtype=torch.long, device=device)
    uninteresting = torch.empty((n, L2), dtype=torch.long, device=device)
    for start in range(0, n, block):
        tb = teacher_topm[start : start + block].to(torch.long)
        nb = tb.shape[0]
        pos = _gumbel_topk(log_w[:nb], L1, generator)
        pos, _ = torch.sort(pos, dim=1)  # teacher order
        interesting[start : start + nb] = tb.gather(1, pos)
        if L2 > 0:
            user_ids = torch.arange(start, start + nb, device=device)
            uninteresting[start : start + nb] = _sample_outside(
                tb, user_ids, n_items, pos_keys, L2, generator, max_rounds, distinct_uninteresting
            )
    return interesting, uninteresting


def rrd_positive_keys(teacher_topm: Tensor, n_items: int, indptr: np.ndarray, indices: np.ndarray,
                      L2: int, distinct: bool = False) -> Tensor:
    """Sorted keys ``user * n_items + item`` of every training positive (on the top-M's device), for
    ``sample_rrd_sets``; refuses a user with no item left to sample as uninteresting (with ``distinct``: fewer
    than L2 such items)."""
    n, m = teacher_topm.shape
    if len(indptr) != n + 1:
        raise ValueError(f"indptr has {len(indptr)} entries, expected n_users + 1 = {n + 1}")
    indptr_np = np.asarray(indptr, dtype=np.int64)
    indices_np = np.asarray(indices, dtype=np.int64)
    # Users with no allowed item would make rejection sampling loop forever.
    if L2 > 0:
        n_pos_outside = _count_positives_outside(teacher_topm.cpu(), indptr_np, indices_np)
        allowed = n_items - m - n_pos_outside
        need = L2 if distinct else 1
        if (allowed < need).any():
            bad = int(np.flatnonzero(allowed < need)[0])
            raise ValueError(f"user {bad} has {int(allowed[bad])} item(s) outside its teacher top-M and positives, "
                             f"needs {need}")
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr_np))
    return torch.from_numpy(np.sort(rows * n_items + indices_np)).to(teacher_topm.device)


def _count_positives_outside(topm: Tensor, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Per user, how many training positives are not in its teacher top-M."""
    n = topm.shape[0]
    counts = np.diff(indptr)
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    topm_np = topm.numpy().astype(np.int64)
    n_items_bound = int(max(topm_np.max(initial=0), indices.max(initial=0))) + 1
    topm_keys = np.sort((np.arange(n, dtype=np.int64)[:, None] * n_items_bound + topm_np).ravel())
    pos_keys = rows * n_items_bound + indices
    inside = np.isin(pos_keys, topm_keys)
    return np.bincount(rows[~inside], minlength=n)


def _sample_outside(
    topm: Tensor,
    user_ids: Tensor,
    n_items: int,
    pos_keys: Tensor,
    n_draw: int,
    generator: torch.Generator | None,
    max_rounds: int,
    distinct: bool = False,
) -> Tensor:
    """Uniform items per row outside ``topm[row]`` and the row's positives, by rejection; ``distinct``: no item
    twice in a row (draws without replacement)."""
    nb, m = topm.shape
    out = torch.full((nb, n_draw), -1, dtype=torch.long, device=topm.device)
    filled = torch.zeros(nb, dtype=torch.long, device=topm.device)
    # Oversample by the worst-case rejection rate among rows, so one round usually suffices.
    oversample = max(2, int(math.ceil(2.0 * n_items / max(n_items - m, 1))))
    todo = torch.arange(nb, device=topm.device)
    for _ in range(max_rounds):
        if todo.numel() == 0:
            return out
        need = n_draw * oversample
        cand = torch.randint(
            0, n_items, (todo.numel(), need), generator=generator, device=topm.device
        )
        bad = rowwise_isin(cand, topm[todo])
        if pos_keys.numel() > 0:
            keys = user_ids[todo].unsqueeze(1) * n_items + cand
            idx = torch.searchsorted(pos_keys, keys).clamp_(max=pos_keys.numel() - 1)
            bad |= pos_keys[idx] == keys
        if distinct:  # reject what the row already holds, and every repeat of a candidate within the draw
            bad |= rowwise_isin(cand, out[todo])
            ordered, where = torch.sort(cand, dim=1)
            repeat = torch.zeros_like(bad)
            repeat.scatter_(1, where[:, 1:], ordered[:, 1:] == ordered[:, :-1])
            bad |= repeat
        ok = ~bad
        # Place accepted candidates after what each row already holds, in draw order.
        slot = filled[todo].unsqueeze(1) + ok.cumsum(1) - 1
        take = ok & (slot < n_draw)
        r = todo.unsqueeze(1).expand_as(cand)[take]
        out[r, slot[take]] = cand[take]
        filled[todo] += take.sum(1)
        todo = todo[filled[todo] < n_draw]
    raise RuntimeError(f"rejection sampling did not finish in {max_rounds} rounds")
