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
from torch import Tensor

from .data import Dataset
from .kd_retrieval import KDRetrieval
from .kd_sets import rrd_positive_keys, sample_interesting_positions, sample_rrd_sets
from .losses import RCEKDSets, ce_kd_loss, rcekd_loss_on_sets, rcekd_sets, rowwise_isin, rrd_loss

CE_TARGETS = ("student", "teacher")  # distill.ce_target: whose top-K the vanilla CE baseline reads


class KDTerm(Protocol):
    """One method's KD term (see the module docstring)."""

    name: str

    def setup(self, data: Dataset) -> None:
        """Once before the first epoch: the sets that stay fixed for the whole run (the teacher's top-K ...)."""

    def on_epoch_start(self, model, epoch: int, gen: torch.Generator) -> dict:
        """The epoch's sets (student top-M, sampled items, their teacher scores); returns diagnostics. Every
        random draw comes from ``gen``."""

    def loss(self, user_vecs: Tensor, item_vecs: Tensor, users: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The KD loss summed over ``users`` [b] (whose student vectors are ``user_vecs`` [b, d]; ``item_vecs``
        [n_items, d] are all the student's items), and extra parts to log (detached scalars)."""


class RCEKDTerm:
    """RCE-KD (rcekd.md steps 1-7): CE over the student's closed top-K plus CE over sampled + teacher-top items."""

    name = "rcekd"

    def __init__(self, retrieval: KDRetrieval, *, K: int, M: int, L: int, T: float, tau: float, beta: float,
                 use_loss_s: bool = True, use_loss_t: bool = True, constant_alpha: float | None = None):
        self.retrieval = retrieval
        self.K, self.M, self.L, self.T = K, M, L, T
        self.weighting = {"tau": tau, "beta": beta, "use_loss_s": use_loss_s, "use_loss_t": use_loss_t,
                          "constant_alpha": constant_alpha}
        self.qt: Tensor | None = None  # teacher top-K [U, K] (step 1), fixed for the run
        self.t_scores_qt: Tensor | None = None  # its teacher scores [U, K]
        self.qs: Tensor | None = None  # the epoch's student top-K [U, K] (step 3)
        self.a: Tensor | None = None  # the epoch's sampled interesting items [U, L] (step 4)
        self.sets: RCEKDSets | None = None  # the epoch's [QS | A | QT] sets
        self.t_scores: Tensor | None = None  # their teacher scores [U, K + L + K]

    @classmethod
    def from_config(cls, d, retrieval: KDRetrieval) -> RCEKDTerm:
        """From the ``distill`` section of a Config."""
        return cls(retrieval, K=d.K, M=d.M, L=d.L, T=d.T, tau=d.tau, beta=d.beta, use_loss_s=d.use_loss_s,
                   use_loss_t=d.use_loss_t, constant_alpha=d.constant_alpha)

    def setup(self, data: Dataset) -> None:
        self.qt = self.retrieval.teacher_topk(self.K)  # step 1, once
        # The sets' layout is [QS | A | QT] and QT never changes: its teacher scores are computed once, here.
        self.t_scores_qt = self.retrieval.teacher_scores(self.qt)

    def on_epoch_start(self, model, epoch: int, gen: torch.Generator) -> dict:
        p, diag = self.retrieval.student_topm(model, self.M)  # step 2
        t0 = time.perf_counter()
        self.qs = p[:, : self.K].contiguous()  # step 3
        self.a = sample_interesting_positions(p, self.qt, self.L, self.T, generator=gen)  # step 4
        # The sets are fixed for the epoch, so score them with the (wide, frozen) teacher once here instead of
        # gathering teacher vectors in every batch: [U, K+L] floats instead of batches x [b, K+L+K, dT].
        self.sets = rcekd_sets(self.qt, self.qs, self.a)
        moving = self.sets.items.shape[1] - self.qt.shape[1]  # the [QS | A] columns
        self.t_scores = torch.cat([self.retrieval.teacher_scores(self.sets.items[:, :moving]), self.t_scores_qt],
                                  dim=1)
        diag["time_kd_sampling_s"] = time.perf_counter() - t0
        # closure gap: how much of the teacher's top-K the student's own top-K already holds
        diag["topk_overlap"] = float(rowwise_isin(self.qs, self.qt).float().mean())
        return diag

    def loss(self, user_vecs: Tensor, item_vecs: Tensor, users: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        kd, parts = rcekd_loss_on_sets(user_vecs, item_vecs, self.sets.rows(users), self.t_scores[users],
                                       **self.weighting)
        return kd, {"kd_loss_s": parts["loss_s"], "kd_loss_t": parts["loss_t"], "kd_alpha": parts["alpha"],
                    "kd_overlap": parts["overlap"]}


class CETerm:
    """Vanilla CE-KD over the teacher's top-K (fixed for the run) or the student's own top-K (refreshed every
    epoch), with the teacher's scores as the target distribution."""

    name = "ce"

    def __init__(self, retrieval: KDRetrieval, *, K: int, tau: float, target: str = "student"):
        if target not in CE_TARGETS:
            raise ValueError(f"CE target {target!r}; expected one of {', '.join(CE_TARGETS)}")
        self.retrieval, self.K, self.tau, self.target = retrieval, K, tau, target
        self.qt: Tensor | None = None  # teacher top-K [U, K], fixed for the run
        self.items: Tensor | None = None  # the item lists the CE runs over [U, K]
        self.t_scores: Tensor | None = None  # their teacher scores [U, K]

    @classmethod
    def from_config(cls, d, retrieval: KDRetrieval) -> CETerm:
        return cls(retrieval, K=d.K, tau=d.tau, target=d.ce_target)

    def setup(self, data: Dataset) -> None:
        self.qt = self.retrieval.teacher_topk(self.K)
        if self.target == "teacher":  # the lists never move: scored once for the run
            self.items = self.qt
            self.t_scores = self.retrieval.teacher_scores(self.items)

    def on_epoch_start(self, model, epoch: int, gen: torch.Generator) -> dict:
        if self.target == "teacher":
            return {}
        self.items, diag = self.retrieval.student_topm(model, self.K)
        self.t_scores = self.retrieval.teacher_scores(self.items)
        diag["topk_overlap"] = float(rowwise_isin(self.items, self.qt).float().mean())
        return diag

    def loss(self, user_vecs: Tensor, item_vecs: Tensor, users: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        kd = ce_kd_loss(user_vecs, item_vecs, None, None, self.items[users], tau=self.tau,
                        teacher_scores=self.t_scores[users])
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

    def setup(self, data: Dataset) -> None:
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
        return rrd_loss(user_vecs, item_vecs, self.interesting[users], self.uninteresting[users]), {}
