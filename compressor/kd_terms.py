"""The KD term of each distillation method: which item sets it reads each epoch, and which loss of ``losses`` it
adds to BPR.

A term gets its sets from a ``KDRetrieval`` (teacher top-K, student top-M, teacher scores) and the samplers of
``kd_sets``, and its loss from ``losses``; ``objectives.Distillation`` adds it to the BPR loss for the batch's KD
users. Every state a term keeps is created in its constructor: the run-long sets are filled by ``setup``, the
epoch's by ``on_epoch_start``.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Dataset
from .kd_retrieval import KDRetrieval
from .kd_sets import rrd_positive_keys, sample_interesting_positions, sample_rrd_sets
from .sparse_rows import distinct_rows
from .losses import (RCEKDSets, ce_kd_loss, pair_scores, rcekd_loss_from_scores, rowwise_isin, rowwise_positions,
                     rrd_loss)

CE_TARGETS = ("student", "teacher")  # distill.ce_target: whose top-K the vanilla CE baseline reads
SETS_BLOCK = 65536  # users per block when the epoch's RCE-KD set masks are computed


class KDTerm(Protocol):
    """One method's KD term (see the module docstring)."""

    name: str

    def setup(self, data: Dataset, sparse_grads: bool = False) -> None:
        """Once before the first epoch: the sets that stay fixed for the whole run (the teacher's top-K ...).
        ``sparse_grads``: the loss gathers the student's item rows it reads as row-sparse gradients (for a
        row-sparse optimizer: a batch then touches only those rows, see ``gather_items``)."""

    def on_epoch_start(self, model, epoch: int, gen: torch.Generator) -> dict:
        """The epoch's sets (student top-M, sampled items, their teacher scores); returns diagnostics. Every
        random draw comes from ``gen``."""

    def loss(self, user_vecs: Tensor, item_vecs: Tensor, users: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The KD loss summed over ``users`` [b] (whose student vectors are ``user_vecs`` [b, d]; ``item_vecs``
        [n_items, d] are all the student's items), and extra parts to log (detached scalars)."""


class RCEKDTerm:
    """RCE-KD (rcekd.md steps 1-7): CE over the student's closed top-K plus CE over sampled + teacher-top items.

    The epoch's state is kept compact (it is most of a large run's memory: docs/benchmarks.md section 4): the
    scored lists ``lists`` [U, W] int32 with their teacher scores [U, W], and the columns of A in them; QS is
    their first K columns. With M <= K + L the lists are P itself (QS and A are columns of P, so P's M columns
    are scored instead of QS's K and A's L); otherwise [QS | A]. A batch's [QS | A | QT] sets and their teacher
    scores are assembled from these rows (``batch_sets``), not stored for every user.
    """

    name = "rcekd"

    def __init__(self, retrieval: KDRetrieval, *, K: int, M: int, L: int, T: float, tau: float, beta: float,
                 use_loss_s: bool = True, use_loss_t: bool = True, constant_alpha: float | None = None,
                 tau_anneal_epochs: int = 0):
        self.retrieval = retrieval
        self.K, self.M, self.L, self.T = K, M, L, T
        self.base_tau, self.tau_anneal_epochs = tau, tau_anneal_epochs  # the epoch's tau: ``weighting["tau"]``
        self.weighting = {"tau": tau, "beta": beta, "use_loss_s": use_loss_s, "use_loss_t": use_loss_t,
                          "constant_alpha": constant_alpha}
        self.qt: Tensor | None = None  # teacher top-K [U, K] int32 (step 1), fixed for the run
        self.t_scores_qt: Tensor | None = None  # its teacher scores [U, K]
        self.lists: Tensor | None = None  # the epoch's scored lists [U, W] int32: P, or [QS | A]
        self.scores: Tensor | None = None  # their teacher scores [U, W]
        self.a_cols: Tensor | None = None  # the columns of A (step 4) in ``lists`` [U, L] int16/int32
        self.mask_t: Tensor | None = None  # the epoch's B_u inside [A | QT] [U, L + K] bool (losses.RCEKDSets)
        self.overlap_count: Tensor | None = None  # the epoch's |QT ∩ A| [U]
        self.sparse_grads = False  # gather the item rows the loss reads as row-sparse gradients (setup)

    @classmethod
    def from_config(cls, d, retrieval: KDRetrieval) -> RCEKDTerm:
        """From the ``distill`` section of a Config."""
        return cls(retrieval, K=d.K, M=d.M, L=d.L, T=d.T, tau=d.tau, beta=d.beta, use_loss_s=d.use_loss_s,
                   use_loss_t=d.use_loss_t, constant_alpha=d.constant_alpha, tau_anneal_epochs=d.tau_anneal_epochs)

    def setup(self, data: Dataset, sparse_grads: bool = False) -> None:
        self.sparse_grads = sparse_grads
        qt = self.retrieval.teacher_topk(self.K)  # step 1, once
        # QT never changes: its teacher scores are computed once, here.
        self.t_scores_qt = self.retrieval.teacher_scores(qt)
        self.qt = compact_ids(qt)

    def on_epoch_start(self, model, epoch: int, gen: torch.Generator) -> dict:
        self.weighting["tau"] = annealed_tau(self.base_tau, self.tau_anneal_epochs, epoch)
        p, diag = self.retrieval.student_topm(model, self.M)  # step 2
        diag["kd_tau"] = self.weighting["tau"]
        t0 = time.perf_counter()
        n_users, m = p.shape
        # Every set test of the epoch follows from where each QT item sits in P (QS is P's first K columns, A is
        # P's sampled columns): one row-wise lookup per user block instead of a set test per pair of lists.
        qt_in_p = torch.empty(self.qt.shape, dtype=torch.int16 if m < 2 ** 15 else torch.int32, device=p.device)
        hit = torch.empty((n_users, m), dtype=torch.bool, device=p.device)  # P's entries in QT (step 4's c_u(j))
        for s, e in _blocks(n_users):
            qt_in_p[s:e] = rowwise_positions(self.qt[s:e].long(), p[s:e])  # -1 = not in P
            hit[s:e] = _marks(qt_in_p[s:e], m)
        a_pos = sample_interesting_positions(p, self.qt, self.L, self.T, generator=gen, with_positions=True,
                                             hit=hit)[1]  # step 4
        # closure gap: how much of the teacher's top-K the student's own top-K (step 3) already holds
        diag["topk_overlap"] = float(hit[:, : self.K].float().mean())
        del hit
        previous = None if self.lists is None else (self.lists, self.scores)
        self.a_cols = self.mask_t = self.overlap_count = None  # last epoch's go before this one's are built
        # steps 5-6's B_u mask inside [A | QT] and |QT ∩ A| (what losses.rcekd_sets computes, from the positions)
        self.mask_t = torch.ones((n_users, self.L + self.K), dtype=torch.bool, device=p.device)
        self.overlap_count = torch.empty(n_users, dtype=torch.long, device=p.device)
        for s, e in _blocks(n_users):
            pos = qt_in_p[s:e].long()
            qt_in_a = _marks(a_pos[s:e], m).gather(1, pos.clamp(min=0)) & (pos >= 0)
            qt_in_qs = (pos >= 0) & (pos < self.K)
            self.mask_t[s:e, self.L:] = ~(qt_in_a | qt_in_qs)
            self.overlap_count[s:e] = qt_in_a.sum(dim=1)
        del qt_in_p
        if self.M <= self.K + self.L:
            lists, a_cols = p, a_pos
        else:
            lists = torch.cat([p[:, : self.K], p.gather(1, a_pos)], dim=1)
            a_cols = torch.arange(self.K, self.K + self.L, device=p.device).expand(p.shape[0], -1)
        # each pair's score is the same bits whether reused from last epoch or computed afresh
        scores = self.retrieval.teacher_scores(lists, previous=previous)
        self.lists, self.scores, previous = compact_ids(lists), scores, None
        self.a_cols = a_cols.to(torch.int16 if lists.shape[1] < 2 ** 15 else torch.int32).contiguous()
        diag["time_kd_sampling_s"] = time.perf_counter() - t0
        return diag

    def batch_sets(self, users: Tensor) -> tuple[RCEKDSets, Tensor]:
        """The [QS | A | QT] sets of ``users`` [b] and their teacher scores [b, K + L + K], from the epoch's state."""
        return self._batch(users)[:2]

    def _batch(self, users: Tensor) -> tuple[RCEKDSets, Tensor, Tensor, Tensor]:
        """``batch_sets``, and the items the student scores [b, W + K] = [lists | QT] with the columns [b, K + L + K]
        of [QS | A | QT] in them (QS and A are columns of the scored lists: each of their items is scored once)."""
        def rows(t: Tensor) -> Tensor:  # t[users]: index_select is several times faster on CPU
            return t.index_select(0, users)

        lists, qt, a_cols = rows(self.lists).long(), rows(self.qt).long(), rows(self.a_cols).long()
        w = lists.shape[1]
        cols = torch.cat([torch.arange(self.K, device=users.device).expand(len(users), -1), a_cols,
                          torch.arange(w, w + self.K, device=users.device).expand(len(users), -1)], dim=1)
        scored = torch.cat([lists, qt], dim=1)
        scores = torch.cat([rows(self.scores), rows(self.t_scores_qt)], dim=1)
        sets = RCEKDSets(scored.gather(1, cols), rows(self.mask_t), rows(self.overlap_count), self.K, self.K)
        return sets, scores.gather(1, cols), scored, cols

    def loss(self, user_vecs: Tensor, item_vecs: Tensor, users: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        sets, t_scores, scored, cols = self._batch(users)
        item_vecs, local = gather_items(item_vecs, scored, self.sparse_grads)
        s_all = pair_scores(user_vecs, item_vecs, local).gather(1, cols)
        kd, parts = rcekd_loss_from_scores(s_all, t_scores, sets, **self.weighting)
        return kd, {"kd_loss_s": parts["loss_s"], "kd_loss_t": parts["loss_t"], "kd_alpha": parts["alpha"],
                    "kd_overlap": parts["overlap"]}


def annealed_tau(tau: float, anneal_epochs: int, epoch: int) -> float:
    """The softmax temperature of ``epoch`` (1-based): ``tau`` throughout when ``anneal_epochs`` is 0 (the spec's),
    else moved linearly from ``tau`` at epoch 1 to 1 at epoch ``anneal_epochs + 1`` and 1 after: a softer target
    early, the spec's tau-1 target for the rest of the run. A function of the epoch alone, so a resumed run uses
    the same temperatures."""
    if anneal_epochs <= 0:
        return tau
    done = min(max(epoch - 1, 0) / anneal_epochs, 1.0)
    return tau + (1.0 - tau) * done


def _blocks(n: int):
    """(start, end) of the user blocks the epoch's set state is built in (bounds its transient memory)."""
    return ((s, min(s + SETS_BLOCK, n)) for s in range(0, n, SETS_BLOCK))


def _marks(columns: Tensor, width: int) -> Tensor:
    """bool [n, width], True at each row's ``columns`` [n, c] (-1 = none)."""
    out = torch.zeros((columns.shape[0], width + 1), dtype=torch.bool, device=columns.device)
    columns = columns.long()
    out.scatter_(1, torch.where(columns >= 0, columns, width), True)
    return out[:, :width]


def gather_items(item_vecs: Tensor, items: Tensor, sparse: bool) -> tuple[Tensor, Tensor]:
    """(table, indices into it) for a loss that reads rows ``items`` [b, k] of ``item_vecs`` [n_items, d]: the
    table itself, or with ``sparse`` only the distinct rows, gathered with a row-sparse gradient, and ``items``
    renumbered into them. The loss's value is the same; a row-sparse optimizer then updates the rows the KD
    term read instead of every row of the table (a dense gradient touches every row)."""
    if not sparse:
        return item_vecs, items
    rows, local = distinct_rows(items, item_vecs.shape[0])
    return F.embedding(rows, item_vecs, sparse=True), local


def compact_ids(ids: Tensor) -> Tensor:
    """Item ids [U, k] stored as int32 (half of int64's memory for the per-user lists a run keeps); a batch's rows
    are read back as int64."""
    if ids.numel() and int(ids.max()) >= 2 ** 31:
        return ids
    return ids.to(torch.int32)


class CETerm:
    """Vanilla CE-KD over the teacher's top-K (fixed for the run) or the student's own top-K (refreshed every
    epoch), with the teacher's scores as the target distribution."""

    name = "ce"

    def __init__(self, retrieval: KDRetrieval, *, K: int, tau: float, target: str = "student",
                 tau_anneal_epochs: int = 0):
        if target not in CE_TARGETS:
            raise ValueError(f"CE target {target!r}; expected one of {', '.join(CE_TARGETS)}")
        self.retrieval, self.K, self.tau, self.target = retrieval, K, tau, target
        self.base_tau, self.tau_anneal_epochs = tau, tau_anneal_epochs
        self.qt: Tensor | None = None  # teacher top-K [U, K], fixed for the run
        self.items: Tensor | None = None  # the item lists the CE runs over [U, K]
        self.t_scores: Tensor | None = None  # their teacher scores [U, K]
        self.sparse_grads = False

    @classmethod
    def from_config(cls, d, retrieval: KDRetrieval) -> CETerm:
        return cls(retrieval, K=d.K, tau=d.tau, target=d.ce_target, tau_anneal_epochs=d.tau_anneal_epochs)

    def setup(self, data: Dataset, sparse_grads: bool = False) -> None:
        self.sparse_grads = sparse_grads
        self.qt = self.retrieval.teacher_topk(self.K)
        if self.target == "teacher":  # the lists never move: scored once for the run
            self.items = self.qt
            self.t_scores = self.retrieval.teacher_scores(self.items)

    def on_epoch_start(self, model, epoch: int, gen: torch.Generator) -> dict:
        self.tau = annealed_tau(self.base_tau, self.tau_anneal_epochs, epoch)
        if self.target == "teacher":
            return {"kd_tau": self.tau}
        previous = None if self.items is None else (self.items, self.t_scores)  # last epoch's, to reuse
        self.items, diag = self.retrieval.student_topm(model, self.K)
        self.t_scores = self.retrieval.teacher_scores(self.items, previous=previous)
        diag["topk_overlap"] = float(rowwise_isin(self.items, self.qt).float().mean())
        diag["kd_tau"] = self.tau
        return diag

    def loss(self, user_vecs: Tensor, item_vecs: Tensor, users: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        item_vecs, local = gather_items(item_vecs, self.items[users], self.sparse_grads)
        kd = ce_kd_loss(user_vecs, item_vecs, None, None, local, tau=self.tau, teacher_scores=self.t_scores[users])
        return kd, {}


class RRDTerm:
    """Relaxed ranking distillation (DE-RRD's RRD): keep the teacher's order of sampled top items, above
    uniformly sampled items outside the teacher's top-M and the user's positives."""

    name = "rrd"

    def __init__(self, retrieval: KDRetrieval, *, top_m: int, interesting: int, uninteresting: int,
                 temperature: float, distinct_uninteresting: bool = False):
        self.retrieval = retrieval
        self.top_m, self.n_interesting, self.n_uninteresting = top_m, interesting, uninteresting
        self.temperature, self.distinct_uninteresting = temperature, distinct_uninteresting
        self.topm: Tensor | None = None  # teacher top-M [U, M], fixed for the run
        self.sparse_grads = False
        self.train_indptr: np.ndarray | None = None  # the training positives as CSR (never sampled as uninteresting)
        self.train_indices: np.ndarray | None = None
        self.n_items = 0
        self.positive_keys: Tensor | None = None  # their sorted user * n_items + item keys
        self.interesting: Tensor | None = None  # the epoch's sets [U, L1] (teacher order) and [U, L2]
        self.uninteresting: Tensor | None = None

    @classmethod
    def from_config(cls, d, retrieval: KDRetrieval) -> RRDTerm:
        r = d.rrd
        return cls(retrieval, top_m=r.top_m, interesting=r.interesting, uninteresting=r.uninteresting,
                   temperature=r.temperature, distinct_uninteresting=r.distinct_uninteresting)

    def setup(self, data: Dataset, sparse_grads: bool = False) -> None:
        self.sparse_grads = sparse_grads
        self.topm = self.retrieval.teacher_topk(self.top_m)
        self.train_indptr = data.train.indptr
        self.train_indices = data.train.items
        self.n_items = data.num_items
        self.positive_keys = rrd_positive_keys(self.topm, self.n_items, self.train_indptr, self.train_indices,
                                               self.n_uninteresting, self.distinct_uninteresting)

    def on_epoch_start(self, model, epoch: int, gen: torch.Generator) -> dict:
        t0 = time.perf_counter()
        self.interesting, self.uninteresting = sample_rrd_sets(
            self.topm, self.n_items, self.train_indptr, self.train_indices, self.n_interesting,
            self.n_uninteresting, self.temperature, generator=gen, positive_keys=self.positive_keys,
            distinct_uninteresting=self.distinct_uninteresting)
        return {"time_kd_sampling_s": time.perf_counter() - t0}

    def loss(self, user_vecs: Tensor, item_vecs: Tensor, users: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        interesting, uninteresting = self.interesting[users], self.uninteresting[users]
        item_vecs, local = gather_items(item_vecs, torch.cat([interesting, uninteresting], dim=1), self.sparse_grads)
        n = interesting.shape[1]
        return rrd_loss(user_vecs, item_vecs, local[:, :n], local[:, n:]), {}
