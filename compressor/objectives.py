"""Training objectives: what differs between `train`, and each `distill --method`.

An objective has three hooks the trainer calls: ``setup(trainer)`` once, ``on_epoch_start(model, epoch, rng, gen)``
at the start of each epoch (returns diagnostics), and ``batch_loss(model, users, pos, neg) -> (loss, parts)``.
Losses themselves are pure functions in ``losses.py``; this module only gathers their inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import bpr_loss


class Scratch:
    """BPR with one sampled negative per positive: the base loss of every method (and `compress train`)."""

    name = "scratch"
    # Set by the trainer for train.optimizer lazy_adam on MF: gather the BPR rows with sparse gradients, so the
    # optimizer sees which rows the batch touched (MF's tables are leaf parameters; LightGCN's are not).
    sparse_grads = False

    def setup(self, trainer) -> None:
        pass

    def on_epoch_start(self, model, epoch, rng, gen) -> dict:
        return {}

    def base_loss(self, model, users, pos, neg):
        u, i = model.vectors()
        if self.sparse_grads:
            uu = F.embedding(users, u, sparse=True)
            ip, ineg = F.embedding(pos, i, sparse=True), F.embedding(neg, i, sparse=True)
        else:
            uu, ip, ineg = u[users], i[pos], i[neg]
        loss = bpr_loss((uu * ip).sum(-1), (uu * ineg).sum(-1))
        return loss, u, i

    def batch_loss(self, model, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
        loss, _, _ = self.base_loss(model, users, pos, neg)
        return loss, {"loss": loss.detach(), "loss_base": loss.detach()}
