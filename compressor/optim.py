"""Optimisers: torch's Adam (the paper's recipe) and a row-sparse "lazy" Adam for wide MF tables.

Why lazy Adam: a BPR batch of 2,048 interactions touches at most 6,144 embedding rows, but dense Adam reads and
writes every row of every table on every step (parameters, two moments, the gradient). For a wide MF teacher on a
large catalogue that is most of an epoch's time. Lazy Adam updates only the rows that have a gradient in this
batch, so the cost follows the batch, not the catalogue (speed-ups in docs/benchmarks.md section 3).

Semantics (the same as TensorFlow's LazyAdam): a touched row gets exactly torch Adam's update, L2 weight decay
included; an untouched row keeps its value *and* its moments (dense Adam would decay its moments and keep moving
it along its momentum). The bias correction uses the parameter's global step count. When a gradient arrives
dense (an objective that reads whole tables, LightGCN's propagation) the update is torch Adam's, bit for bit in
formula, over every row.

Not free in quality: rarely sampled rows stand still instead of decaying, and a teacher trained with it scored
lower than with torch Adam (docs/benchmarks.md section 3), so the recipes keep torch Adam and this is an opt-in
for teachers that dense Adam cannot train in the time at hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


class LazyAdam(torch.optim.Optimizer):
    """Adam with L2 weight decay; sparse gradients update only their rows (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LazyAdam settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                bc1, bc2_sqrt = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.grad.is_sparse:
                    g = p.grad.coalesce()  # duplicate rows (a user twice in a batch) are summed, as dense would
                    rows, vals = g.indices()[0], g.values()
                    if wd:
                        vals = vals + wd * p[rows]
                    m_rows = m[rows].mul_(b1).add_(vals, alpha=1 - b1)
                    v_rows = v[rows].mul_(b2).addcmul_(vals, vals, value=1 - b2)
                    m[rows], v[rows] = m_rows, v_rows
                    denom = (v_rows.sqrt() / bc2_sqrt).add_(eps)
                    p.index_add_(0, rows, m_rows / denom, alpha=-lr / bc1)
                else:
                    g = p.grad if not wd else p.grad.add(p, alpha=wd)
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v.sqrt() / bc2_sqrt).add_(eps)
                    p.addcdiv_(m, denom, value=-lr / bc1)
        return loss


@dataclass(frozen=True)
class OptimizerSpec:
    make: Callable[..., torch.optim.Optimizer]  # (params, lr=, weight_decay=) -> optimizer
    row_sparse: bool  # updates only the rows a sparse gradient names: objectives should hand it sparse gradients


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adam": OptimizerSpec(torch.optim.Adam, row_sparse=False),
    "lazy_adam": OptimizerSpec(LazyAdam, row_sparse=True),
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)  # train.optimizer's choices


def _spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    return OPTIMIZERS[name]


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return _spec(name).make(params, lr=lr, weight_decay=weight_decay)


def wants_sparse_gradients(name: str) -> bool:
    """Whether optimizer ``name`` should get row-sparse gradients where a model can produce them."""
    return _spec(name).row_sparse
