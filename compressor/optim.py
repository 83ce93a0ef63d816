"""Optimisers: torch's Adam (the paper's recipe), and three row-sparse ones for MF tables: a "lazy" Adam, a
sparse AdamW and a sparse Adam whose untouched rows are caught up along their momentum.

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

Sparse AdamW (``sparse_adamw``): as fast as lazy Adam, without letting untouched rows stand still. Its formulation
is the one where every row moves on every step *except* by the Adam update itself:

- every row, every step: decoupled weight decay p <- (1 - lr*wd) p (AdamW; ``train.weight_decay`` is this wd, not
  an L2 term: the recipes' 1e-5 was tuned as Adam's L2 and a decoupled decay needs its own value), and the moments
  decay, m <- b1 m, v <- b2 v;
- the rows with a data gradient g in the step, after that: m += (1-b1) g, v += (1-b2) g^2,
  p -= lr * mhat / (sqrt(vhat) + eps), with mhat, vhat bias-corrected by the parameter's global step count t.

Why this one: the terms every row gets are products, so a row untouched for k steps is brought up to date in closed
form when it is next touched: m *= b1^k, v *= b2^k, p *= (1 - lr*wd)^k, exactly what k separate steps would have
done. Dense Adam's other two per-step effects on an untouched row cannot be deferred like that: the L2 term wd*p
passes through the moments and the square root, and so does the drift along the old momentum (its bias correction
and eps change every step). So decay is decoupled, and the momentum drift is the one thing an untouched row skips.
Compared with lazy Adam, a rarely sampled row shrinks and forgets its moments at dense Adam's pace (the suspected
cause of lazy Adam's quality loss); its next update is sized by how long ago its last gradient was.

Each parameter's state holds ``row_step`` (int64 [rows]): the step each row was last brought up to date to. It is
saved with the moments, so a resumed run continues bit for bit. The weights of rows not touched since are behind:
``catch_up()`` brings every row to the current step without taking one; call it before reading the weights
(evaluation, saving; the trainer does). A dense gradient (LightGCN's propagation, a KD term over whole tables)
touches every row: catch-up then AdamW's update over all of them. The closed form assumes lr, betas and wd stay
fixed between a row's catch-ups: call ``catch_up()`` before changing them.

Sparse Adam with momentum catch-up (``sparse_adam``): dense Adam's quality at lazy Adam's cost. The one effect of
dense Adam that lazy Adam and sparse AdamW drop is the biggest one: a gradient keeps moving its row on every later
step, along the decaying momentum, lr * mhat / (sqrt(vhat) + eps), and only about (1 - b1) of that movement happens
in the step that saw the gradient. Its formulation, one step t for each row:

- a touched row (data gradient g): exactly torch Adam's update, L2 weight decay included (g += wd * p): m <- b1 m +
  (1-b1) g, v <- b2 v + (1-b2) g^2, p <- p - lr/bc1(t) * m / (sqrt(v)/sqrt(bc2(t)) + eps);
- an untouched row: m <- b1 m, v <- b2 v, p <- p - lr * c(tau) * m / max(sqrt(v), eps), with c(tau) =
  sqrt(bc2(tau)) / bc1(tau) the bias correction of the row's last touched step tau.

Dense Adam does the same to an untouched row but with c(t) and eps added to the denominator, and it feeds the L2 term
wd * p through the moments. Those three are what make its steps impossible to defer; holding them fixed is all that
differs here (c(tau) tends to 1 within a few hundred steps; eps = 1e-8 against sqrt(v) ~ 1e-4..1e-2; the L2 term
of an untouched row at the recipes' wd 1e-5 is ~1e-3 of a gradient). Then a row untouched for k steps after its
state (m, v) is brought up to date in closed form: with r = b1 / sqrt(b2), step j multiplies m / sqrt(v) by r^j, so
the k steps move it by lr * c(tau) * (m / max(sqrt(v), eps)) * r (1 - r^k) / (1 - r), and m *= b1^k, v *= b2^k
(sqrt(v) shrinks by sqrt(b2) per step; the floor is read once, at the catch-up). Per-row
state: ``row_step`` (as sparse AdamW) and ``row_touch`` (tau); ``catch_up()`` as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .sparse_rows import summed_rows


def _adam_state(state: dict, p: torch.Tensor) -> dict:
    """A parameter's Adam state, created on its first step: step count (float tensor, as torch Adam keeps it) and
    the two moments."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


_ROW_COUNTERS = ("row_step", "row_touch")  # per-row int64 step counters of the deferring optimizers
POWER_TABLE = 1 << 16  # exponents SparseAdam reads base ** j for from a table (512 KiB per base)


class _RowSparseAdam(torch.optim.Optimizer):
    """The step both row-sparse optimizers share: each parameter with a gradient, with its Adam state and its
    group, goes to the subclass's ``_update``."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(group, p, _adam_state(self.state[p], p))
        return loss

    def _update(self, group: dict, p: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def catch_up(self) -> None:
        """Bring every row (weights and moments) to the current step without taking one: the weights then equal
        those of a step-by-step run of the optimizer's formulation. Nothing to do for one that defers nothing."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "row_step" not in state:
                    continue
                t, row_step = int(state["step"]), state["row_step"]
                if bool((row_step == t).all()):
                    continue
                self._catch_up_rows(group, p, state, t - row_step)
                row_step.fill_(t)

    def _catch_up_rows(self, group: dict, p: torch.Tensor, state: dict, behind: torch.Tensor) -> None:
        """Apply ``behind`` [rows] untouched steps to every row of ``p`` (the deferring optimizers)."""

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every saved state tensor but "step" to its parameter's dtype: the row counters stay int64
        counters = {(pid, key): s[key] for pid, s in state_dict["state"].items() for key in _ROW_COUNTERS if key in s}
        super().load_state_dict(state_dict)
        params = dict(zip((pid for g in state_dict["param_groups"] for pid in g["params"]),
                          (p for g in self.param_groups for p in g["params"])))
        for (pid, key), c in counters.items():
            self.state[params[pid]][key] = c.to(device=params[pid].device, dtype=torch.int64, copy=True)


class LazyAdam(_RowSparseAdam):
    """Adam with L2 weight decay; sparse gradients update only their rows (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid LazyAdam settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _update(self, group: dict, p: torch.Tensor, state: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state["step"] += 1
        step = float(state["step"])
        bc1, bc2_sqrt = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if p.grad.is_sparse:
            rows, vals = summed_rows(p.grad)  # duplicate rows (a user twice in a batch) are summed, as dense would
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


class SparseAdamW(_RowSparseAdam):
    """AdamW whose untouched rows are brought up to date when next touched (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if (lr < 0 or eps < 0 or weight_decay < 0 or lr * weight_decay >= 1
                or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1)):
            raise ValueError(f"invalid SparseAdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @staticmethod
    def _decays(group: dict, k: torch.Tensor, like: torch.Tensor):
        """The per-row factors (b1^k, b2^k, (1 - lr*wd)^k) for k steps per row, shaped to broadcast over ``like``
        ([n, ...] rows); computed in float64, so a long gap costs no more rounding than a short one."""
        k = k.to(torch.float64).reshape(k.shape + (1,) * (like.dim() - 1) if like.dim() else ())
        (b1, b2), decay = group["betas"], 1.0 - group["lr"] * group["weight_decay"]
        return tuple(torch.pow(base, k).to(like.dtype) for base in (b1, b2, decay))

    def _update(self, group: dict, p: torch.Tensor, state: dict) -> None:
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        if "row_step" not in state:
            state["row_step"] = torch.zeros(p.shape[:1], dtype=torch.int64, device=p.device)
        state["step"] += 1
        t = int(state["step"])
        step_size, bc2_sqrt = lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)
        m, v, row_step = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
        if p.grad.is_sparse:
            rows, vals = summed_rows(p.grad)  # duplicate rows (a user twice in a batch) are summed, as dense would
            # rows are unique: index_select / index_copy_ (much faster on CPU than tensor[rows])
            fm, fv, fp = self._decays(group, t - row_step.index_select(0, rows), vals)
            m_rows = m.index_select(0, rows).mul_(fm).add_(vals, alpha=1 - b1)
            v_rows = v.index_select(0, rows).mul_(fv).addcmul_(vals, vals, value=1 - b2)
            denom = (v_rows.sqrt() / bc2_sqrt).add_(eps)
            m.index_copy_(0, rows, m_rows)
            v.index_copy_(0, rows, v_rows)
            p.index_copy_(0, rows, p.index_select(0, rows).mul_(fp).addcdiv_(m_rows, denom, value=-step_size))
            row_step.index_fill_(0, rows, t)
        else:  # every row touched: bring each up to date, then AdamW's step over all of them
            g = p.grad
            fm, fv, fp = self._decays(group, t - row_step, p)
            m.mul_(fm).add_(g, alpha=1 - b1)
            v.mul_(fv).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.mul_(fp).addcdiv_(m, denom, value=-step_size)
            row_step.fill_(t)

    def _catch_up_rows(self, group: dict, p: torch.Tensor, state: dict, behind: torch.Tensor) -> None:
        fm, fv, fp = self._decays(group, behind, p)  # 0 steps: factor 1, exact
        state["exp_avg"].mul_(fm)
        state["exp_avg_sq"].mul_(fv)
        p.mul_(fp)


class SparseAdam(_RowSparseAdam):
    """Adam whose untouched rows keep moving along their momentum, caught up in closed form when next touched (see
    the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        # b1^2 < b2 keeps r = b1 / sqrt(b2) < 1: an untouched row's drift then converges, however long the gap
        if (lr < 0 or eps <= 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 < betas[1] < 1)
                or betas[0] ** 2 >= betas[1]):
            raise ValueError(f"invalid SparseAdam settings: lr={lr}, betas={betas} (needs b1^2 < b2), eps={eps} "
                             f"(> 0), weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._power_tables: dict[tuple, torch.Tensor] = {}  # ((what, betas), device) -> [POWER_TABLE] float64

    def _table(self, key: tuple, build: Callable[[torch.Tensor], torch.Tensor], device) -> torch.Tensor:
        """A cached float64 table of ``build(j)`` for j = 0 .. POWER_TABLE - 1 (the exponents as float64)."""
        table = self._power_tables.get((key, device))
        if table is None:
            table = build(torch.arange(POWER_TABLE, dtype=torch.float64, device=device))
            self._power_tables[(key, device)] = table
        return table

    def _powers(self, base: float, k: torch.Tensor) -> torch.Tensor:
        """``base ** k`` in float64 for int64 gaps ``k`` >= 0, read from a table of ``torch.pow(base, j)`` built
        once instead of computed for every row of every step (torch.pow itself can differ by an ulp between its
        vectorised and scalar paths, so a value may differ by one from a per-row pow); gaps past the table, rare
        (a row untouched for 65,536 steps), computed."""
        out = self._table(("pow", base), lambda j: torch.pow(base, j), k.device).index_select(
            0, k.clamp(max=POWER_TABLE - 1))
        if k.numel() and int(k.max()) >= POWER_TABLE:
            far = k >= POWER_TABLE
            out[far] = torch.pow(base, k[far].to(torch.float64))
        return out

    def _held(self, b1: float, b2: float, touch: torch.Tensor) -> torch.Tensor:
        """c(tau) = sqrt(1 - b2^tau) / (1 - b1^tau) of each row's last touched step (0 for a row never touched),
        from a table. ``touch`` is a step number, past the table once a run has taken 65,536 steps; by then c
        is exactly 1.0 in float64 for the usual betas (b2^tau < 2^-60), and the table's last entry says so;
        otherwise those rows are computed."""
        def held(j: torch.Tensor) -> torch.Tensor:
            return torch.where(j > 0, torch.sqrt(1 - torch.pow(b2, j)) / (1 - torch.pow(b1, j)), 0.0)

        table = self._table(("held", b1, b2), held, touch.device)
        out = table.index_select(0, touch.clamp(max=POWER_TABLE - 1))
        if (touch.numel() and int(touch.max()) >= POWER_TABLE
                and not (b2 ** (POWER_TABLE - 1) < 2.0 ** -60 and float(table[-1]) == 1.0)):
            far = touch >= POWER_TABLE
            out[far] = held(touch[far].to(torch.float64))
        return out

    def _drift(self, group: dict, k: torch.Tensor, touch: torch.Tensor, p_rows: torch.Tensor, m_rows: torch.Tensor,
               v_rows: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Move ``p_rows`` in place by k untouched steps (per row, k >= 0) of rows last touched at step ``touch``;
        returns the moments' decay factors (b1^k, b2^k), shaped to broadcast over the rows, for the caller to
        fold into its own pass over them (None: no row is behind). ``buffer``: scratch space like ``p_rows``."""
        if not bool(k.any()):
            return None
        (b1, b2), lr = group["betas"], group["lr"]
        shape = k.shape + (1,) * (p_rows.dim() - 1)
        r = b1 / math.sqrt(b2)
        geometric = k.to(torch.float64) if r == 1 else r * (1 - self._powers(r, k)) / (1 - r)  # sum r^j, j = 1..k
        held = self._held(b1, b2, touch)
        coef = (lr * held * geometric).to(p_rows.dtype).reshape(shape)
        # m / max(sqrt(v), eps): eps is a floor under sqrt(v), not a term of it (so the steps stay a geometric
        # series); it keeps a row whose v underflowed to 0 before its m did from taking a huge step
        torch.sqrt(v_rows, out=buffer).clamp_min_(group["eps"])
        torch.div(m_rows, buffer, out=buffer)
        p_rows.sub_(buffer.mul_(coef))
        return (self._powers(b1, k).to(m_rows.dtype).reshape(shape),
                self._powers(b2, k).to(v_rows.dtype).reshape(shape))

    def _update(self, group: dict, p: torch.Tensor, state: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for key in _ROW_COUNTERS:
            if key not in state:
                state[key] = torch.zeros(p.shape[:1], dtype=torch.int64, device=p.device)
        state["step"] += 1
        t = int(state["step"])
        step_size, bc2_sqrt = lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)
        m, v, row_step, row_touch = state["exp_avg"], state["exp_avg_sq"], state["row_step"], state["row_touch"]
        if p.grad.is_sparse:
            rows, vals = summed_rows(p.grad)  # duplicate rows (a user twice in a batch) are summed, as dense would
            # rows are unique: index_select / index_copy_ (much faster on CPU than tensor[rows])
            p_rows, m_rows, v_rows = (x.index_select(0, rows) for x in (p, m, v))
            behind, touch = (t - 1) - row_step.index_select(0, rows), row_touch.index_select(0, rows)
        else:  # every row touched: bring each up to step t - 1, then Adam's step over all of them
            rows, vals, p_rows, m_rows, v_rows = None, p.grad, p, m, v
            behind, touch = (t - 1) - row_step, row_touch
        buffer = torch.empty_like(p_rows)
        decay = self._drift(group, behind, touch, p_rows, m_rows, v_rows, buffer)
        if wd:  # L2, as torch Adam: in place on the coalesced values when they are a copy, never on p.grad
            own = rows is not None and not p.grad.is_coalesced()  # else vals are the gradient's own
            vals = vals.add_(p_rows, alpha=wd) if own else vals.add(p_rows, alpha=wd)
        # the k untouched steps' decay and this step's in one pass over each moment
        m_rows.mul_(b1 if decay is None else decay[0] * b1).add_(vals, alpha=1 - b1)
        v_rows.mul_(b2 if decay is None else decay[1] * b2).addcmul_(vals, vals, value=1 - b2)
        torch.sqrt(v_rows, out=buffer).div_(bc2_sqrt).add_(eps)
        p_rows.addcdiv_(m_rows, buffer, value=-step_size)
        if rows is None:
            row_step.fill_(t)
            row_touch.fill_(t)
        else:
            for full, part in ((p, p_rows), (m, m_rows), (v, v_rows)):
                full.index_copy_(0, rows, part)  # unique rows
            row_step.index_fill_(0, rows, t)
            row_touch.index_fill_(0, rows, t)

    def _catch_up_rows(self, group: dict, p: torch.Tensor, state: dict, behind: torch.Tensor) -> None:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        decay = self._drift(group, behind, state["row_touch"], p, m, v, torch.empty_like(p))
        if decay is not None:
            m.mul_(decay[0])
            v.mul_(decay[1])


@dataclass(frozen=True)
class OptimizerSpec:
    make: Callable[..., torch.optim.Optimizer]  # (params, lr=, weight_decay=) -> optimizer
    row_sparse: bool  # updates only the rows a sparse gradient names: objectives should hand it sparse gradients


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adam": OptimizerSpec(torch.optim.Adam, row_sparse=False),
    "lazy_adam": OptimizerSpec(LazyAdam, row_sparse=True),
    "sparse_adamw": OptimizerSpec(SparseAdamW, row_sparse=True),
    "sparse_adam": OptimizerSpec(SparseAdam, row_sparse=True),
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
