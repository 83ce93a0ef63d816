"""Training objectives: what differs between `train` and each `distill --method`, behind one ``Objective`` protocol.

The trainer knows only the protocol. An objective is assembled from parts, not inherited:
  * the BPR base loss (``bpr_base_loss``), one sampled negative per positive: `train` and every method;
  * for distillation, a ``KDRetrieval`` (teacher top-K with its cache, student top-M with FAISS, teacher scores),
    one method's ``KDTerm`` (``kd_terms``) and a ``KDUsers`` (which users of a batch get the KD term).
``Scratch`` is BPR alone; ``Distillation`` is BPR + lambda_kd * a KD term. ``METHODS`` maps each `distill.method`
to its KD term, and is where the method names of the config schema and the CLI come from.
Losses themselves are pure functions in ``losses``; this module only gathers their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Dataset
from .distill import Teacher, TeacherError
from .errors import TrainingError
from .kd_retrieval import KDRetrieval
from .kd_terms import CETerm, KDTerm, RCEKDTerm, RRDTerm
from .losses import bpr_loss
from .run_dir import TOPK_CACHE_DIR

if TYPE_CHECKING:  # annotations only: config.py imports this module for its name lists
    from .config import Config


KD_USERS_MODES = ("every_batch", "once_per_epoch", "user_batches")  # distill.kd_users, see KDUsers


@dataclass(frozen=True)
class SetupContext:
    """What the trainer hands an objective once, before the first epoch."""

    data: Dataset  # the run's data (RRD reads the training positives)
    # Gather the batch's embedding rows with sparse gradients, so a row-sparse optimizer (train.optimizer
    # lazy_adam) sees which rows the batch touched; only for models whose tables are leaf parameters (MF).
    sparse_grads: bool = False


class Objective(Protocol):
    """The contract between the trainer and what it optimises.

    ``setup`` runs once per training session, after the run directory was accepted (so a refused command does no
    expensive work); ``on_epoch_start`` once per epoch; ``batch_loss`` for every BPR batch. Diagnostics are what
    ``on_epoch_start`` returns (per epoch: retrieval times, recall, overlaps ...) and the ``parts`` of
    ``batch_loss`` (detached scalars, averaged over the epoch's batches by the trainer); both go into
    metrics.jsonl. All state lives in the objective from its constructor on.
    """

    name: str  # the method recorded in checkpoints ("scratch", "rcekd", ...)

    def setup(self, ctx: SetupContext) -> None: ...

    def on_epoch_start(self, model, epoch: int, rng: np.random.Generator, gen: torch.Generator) -> dict:
        """``rng`` is the epoch's numpy generator (the trainer draws the negatives from it after this hook);
        ``gen`` the torch generator on the training device for the objective's own draws."""

    def batch_loss(self, model, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss to minimise, parts) for a batch of (user, positive, negative) triples [b] each."""

    def run_state(self) -> tuple[dict, dict[str, Tensor]]:
        """What the objective carries from one epoch to the next beyond the model and the random streams, as
        (JSON-able numbers, tensors): saved with the resume checkpoint, so a resumed run repeats the uninterrupted
        one. ({}, {}) when it carries nothing."""

    def load_run_state(self, meta: dict, tensors: dict[str, Tensor]) -> None:
        """Restore ``run_state`` (after ``setup``, before the next epoch)."""


def sample_negatives(train_users: np.ndarray, train_items: np.ndarray, num_items: int,
                     rng: np.random.Generator) -> np.ndarray:
    """BPR's one uniformly sampled negative per positive, never a training positive of that user (vectorised
    rejection sampling against the sorted (user, item) keys)."""
    keys = np.sort(train_users * num_items + train_items)
    neg = rng.integers(0, num_items, size=len(train_users))
    todo = np.arange(len(train_users))
    for _ in range(1000):
        cand = train_users[todo] * num_items + neg[todo]
        pos = np.searchsorted(keys, cand).clip(max=len(keys) - 1)
        bad = keys[pos] == cand
        if not bad.any():
            return neg
        todo = todo[bad]
        neg[todo] = rng.integers(0, num_items, size=len(todo))
    raise TrainingError("could not sample negatives: some user has interacted with (almost) every item")


def bpr_base_loss(model, users: Tensor, pos: Tensor, neg: Tensor, sparse_grads: bool = False):
    """The BPR loss of a batch, the user vectors of the model it was computed from (a function: user indices
    [b] -> [b, d]; the KD terms reuse it) and its item vectors [I, d]: -> (loss, user_vectors_of, items)."""
    leave_out = getattr(model, "bpr_user_vectors", None)
    if leave_out is not None:  # a user tower over the history: the batch's users only, the positive left out
        i = model.item_emb.weight
        uu = leave_out(users, pos)
        return bpr_loss((uu * _rows(i, pos)).sum(-1), (uu * _rows(i, neg)).sum(-1)), model.user_vectors, i
    u, i = model.vectors()
    if sparse_grads:
        uu = F.embedding(users, u, sparse=True)
        ip, ineg = F.embedding(pos, i, sparse=True), F.embedding(neg, i, sparse=True)
    else:
        uu, ip, ineg = _rows(u, users), _rows(i, pos), _rows(i, neg)
    loss = bpr_loss((uu * ip).sum(-1), (uu * ineg).sum(-1))
    if sparse_grads:  # the KD terms' user rows as row-sparse gradients too (their item rows: kd_terms.gather_items)
        return loss, (lambda rows: F.embedding(rows, u, sparse=True)), i
    return loss, (lambda rows: _rows(u, rows)), i


def _rows(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]`` for ids [b], whose gradient is summed in the same order every time: index_select's
    backward adds with index_add_, where indexing's (an accumulating index_put_) adds atomically in any order
    with more than one CPU thread. The same bits as indexing on one thread, and a little faster."""
    return table.index_select(0, ids)


class Scratch:
    """BPR with one sampled negative per positive: `compress train`, and `distill --method scratch`."""

    name = "scratch"

    def __init__(self):
        self.sparse_grads = False

    def setup(self, ctx: SetupContext) -> None:
        self.sparse_grads = ctx.sparse_grads

    def on_epoch_start(self, model, epoch, rng, gen) -> dict:
        return {}

    def run_state(self) -> tuple[dict, dict[str, Tensor]]:
        return {}, {}

    def load_run_state(self, meta: dict, tensors: dict[str, Tensor]) -> None:
        pass

    def batch_loss(self, model, users: Tensor, pos: Tensor, neg: Tensor):
        loss, _, _ = bpr_base_loss(model, users, pos, neg, self.sparse_grads)
        return loss, {"loss": loss.detach(), "loss_base": loss.detach()}


class KDUsers:
    """Which users get the KD term in each BPR batch:

    - ``every_batch`` (the spec's): each distinct user of every batch;
    - ``once_per_epoch``: each user only in the first batch of the epoch that holds it (a fraction of the KD work,
      docs/benchmarks.md section 2c);
    - ``user_batches``: each user once per epoch too, in KD batches of its own: the epoch's users (those with
      training interactions) shuffled into batches of ``batch_users``, the j-th added to the epoch's j-th BPR
      batch (all that are left to its last). ``once_per_epoch`` makes a KD call in every batch that holds a user
      new to the epoch, most of them with few users, and a call has a fixed cost on top of its users'; this makes
      a few large ones. They come first in the epoch, as most of ``once_per_epoch``'s users do, while the sets
      drawn at the epoch's start still describe the student: spread evenly over the epoch instead, a Gowalla
      student stopped early, behind on validation (docs/benchmarks.md 4m). Under torchrun each rank batches its
      own users (``batch_users`` per rank).
    """

    def __init__(self, mode: str, num_users: int, device: torch.device, batch_users: int = 2048):
        if mode not in KD_USERS_MODES:
            raise ValueError(f"kd_users {mode!r}; expected one of {', '.join(KD_USERS_MODES)}")
        if batch_users < 1:
            raise ValueError(f"kd_batch_users must be >= 1, got {batch_users}")
        self.mode, self.device, self.batch_users = mode, device, batch_users
        # once_per_epoch: which users have had their KD term this epoch (cleared at every epoch start)
        self._done = (torch.zeros(num_users, dtype=torch.bool, device=device)
                      if mode == "once_per_epoch" else None)
        # user_batches: the users that get KD (``setup``), the epoch's batches of them, how many were handed out,
        # and how many of the epoch's interactions the BPR batches have passed (to know its last batch)
        self._users: Tensor | None = None
        self._interactions = 0
        self._batches: list[Tensor] = []
        self._handed = self._passed = 0

    def setup(self, train_indptr: np.ndarray) -> None:
        """The training data (as CSR over this process's users): user_batches distils the users it holds, and
        hands the rest out at the batch that reaches its last interaction."""
        counts = np.diff(train_indptr)
        self._users = torch.as_tensor(np.flatnonzero(counts > 0), device=self.device)
        self._interactions = int(counts.sum())

    def start_epoch(self, gen: torch.Generator) -> None:
        """Before the epoch's first batch; user_batches draws its batches from ``gen``."""
        if self._done is not None:
            self._done.zero_()
        if self.mode == "user_batches":
            if self._users is None:
                raise RuntimeError("KDUsers.setup must run before the first epoch (user_batches reads the data)")
            order = torch.randperm(len(self._users), generator=gen, device=gen.device).to(self.device)
            self._batches = [b.sort().values for b in self._users[order].split(self.batch_users)]
            self._handed = self._passed = 0

    def select(self, users: Tensor) -> Tensor:
        """The batch's KD users (sorted, distinct); with once_per_epoch they are marked done."""
        if self.mode == "user_batches":
            # one KD batch per BPR batch from the epoch's first on; whatever is left at its last
            last = self._passed + len(users) >= self._interactions
            self._passed += len(users)
            due = len(self._batches) if last else min(self._handed + 1, len(self._batches))
            picked, self._handed = self._batches[self._handed:due], due
            if len(picked) == 1:
                return picked[0]
            return (torch.cat(picked).sort().values if picked
                    else torch.zeros(0, dtype=torch.long, device=self.device))
        bu = torch.unique(users)
        if self._done is not None:
            bu = bu[~self._done[bu]]
            self._done[bu] = True
        return bu


class Distillation:
    """BPR + ``lambda_kd`` x a method's KD term over the batch's KD users."""

    def __init__(self, term: KDTerm, kd_users: KDUsers, lambda_kd: float, retrieval: KDRetrieval):
        self.name = term.name
        self.term, self.kd_users, self.lambda_kd = term, kd_users, lambda_kd
        self.retrieval = retrieval  # the term's; set up here first, because its lists depend on the data
        self.sparse_grads = False

    def setup(self, ctx: SetupContext) -> None:
        self.sparse_grads = ctx.sparse_grads
        self.retrieval.setup(ctx.data)
        self.term.setup(ctx.data, sparse_grads=ctx.sparse_grads)
        self.kd_users.setup(ctx.data.train.indptr)

    def on_epoch_start(self, model, epoch, rng, gen) -> dict:
        diag = self.term.on_epoch_start(model, epoch, gen)
        self.kd_users.start_epoch(gen)  # after the term's draws, which are then the same in every kd_users mode
        return diag

    def run_state(self) -> tuple[dict, dict[str, Tensor]]:
        """The retrieval's (an approximate refresh's kept quantizer, raised nprobe or candidates, UserClusters' last
        lists); the term's epoch sets are rebuilt from the model at every epoch start, so they carry nothing."""
        meta, tensors = self.retrieval.state()
        return {"retrieval": meta}, {f"retrieval.{k}": v for k, v in tensors.items()}

    def load_run_state(self, meta: dict, tensors: dict[str, Tensor]) -> None:
        prefix = "retrieval."
        self.retrieval.load_state(meta.get("retrieval", {}),
                                  {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def batch_loss(self, model, users: Tensor, pos: Tensor, neg: Tensor):
        base, user_vectors_of, i = bpr_base_loss(model, users, pos, neg, self.sparse_grads)
        bu = self.kd_users.select(users)
        if len(bu):
            kd, parts = self.term.loss(user_vectors_of(bu), i, bu)
        else:  # no KD user in this batch (once_per_epoch: 148 of Gowalla's 352): the term adds exactly 0
            kd, parts = torch.zeros((), dtype=base.dtype, device=base.device), {}
        loss = base + self.lambda_kd * kd
        return loss, {"loss": loss.detach(), "loss_base": base.detach(), "loss_kd": kd.detach(), **parts}


# ----------------------------------------------------------------------------------------------- registry

# distill.method -> the factory of its KD term, (distill config section, retrieval) -> KDTerm; None: BPR alone
METHODS: dict[str, Callable[..., KDTerm] | None] = {
    "rcekd": RCEKDTerm.from_config,
    "ce": CETerm.from_config,
    "rrd": RRDTerm.from_config,
    "scratch": None,
}
METHOD_NAMES = tuple(METHODS)  # distill.method's choices, and the CLI's --method


def method_needs_teacher(method: str) -> bool:
    return METHODS[method] is not None


def build_objective(cfg: Config, teacher: Teacher | None, device: torch.device, out: Path) -> Objective:
    """The objective of ``cfg.distill.method``; a teacher's top-K is cached beside the run directory ``out``."""
    d = cfg.distill
    make_term = METHODS[d.method]
    if make_term is None:
        return Scratch()
    if teacher is None:
        raise TeacherError(f"--method {d.method} needs --teacher")
    retrieval = KDRetrieval(teacher, device, Path(out).resolve().parent / TOPK_CACHE_DIR, d.index, d.index_params,
                            exclude_seen=d.exclude_seen)
    return Distillation(make_term(d, retrieval), KDUsers(d.kd_users, retrieval.num_users, device, d.kd_batch_users),
                        d.lambda_kd, retrieval)
