"""Training under torchrun: users are sharded over ranks, the item table is replicated.

A user's embedding row, interactions, negatives, teacher top-K, student top-M, KD sets and evaluation touch that
user alone, so rank r owns a contiguous block of users (cut so that every rank holds about the same number of
training interactions) and trains on a ``Dataset.user_block`` of it: the trainer, objectives and retrieval run
unchanged on the block. What crosses ranks:

* every optimizer step, the gradient of each replicated table (the item table) is summed over ranks. Every loss in
  this code base is a *sum* over the batch, so the summed gradient is exactly one process's gradient of the same
  global batch; Adam is elementwise, so the user rows of a rank need nothing from the others. The sum goes dense
  (all_reduce of [I, d]) or row-sparse (all_gather of the touched rows), whichever moves fewer bytes this step;
  on CUDA always dense (NCCL is fast, and a sparse sum with ``index_add_`` on CUDA is not deterministic, which
  would let the replicas drift apart);
* evaluation sums per-rank metric totals and user counts;
* rank 0 gathers the user rows (and their Adam moments) to write checkpoints in the one-process format, so
  export, serving and MLflow see no difference.

Only rank 0 writes the run directory, logs progress and talks to MLflow. Everything a rank decides (early
stopping, which path a gradient takes) comes from values that are identical on every rank, so ranks never disagree
on the next collective. ``Distributed.single()`` is the one-process case: every method is a no-op there.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import USER_TABLE
from .device import resolve_device
from .errors import CompressError

# How long a collective may wait for a silent rank before the job fails (a rank on another node that vanished);
# a rank that dies on this node is noticed by torchrun's agent within a second and the job torn down.
DEFAULT_TIMEOUT_S = 600
TIMEOUT_ENV = "COMPRESS_DIST_TIMEOUT_S"


class DistributedError(CompressError, RuntimeError):
    """The ranks of a torchrun job cannot go on together (a rank refused its input, a mismatched world size)."""


def launch_rank() -> int:
    """This process's global rank as torchrun announced it (0 outside torchrun); readable before any setup."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) as torchrun announced them, checked; (0, 1, 1) outside torchrun."""
    try:
        rank, world = launch_rank(), launched_world_size()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_WORLD_SIZE must be integers ({e})") from None
    if world < 1 or not 0 <= rank < world or local_world < 1:
        raise DistributedError(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_WORLD_SIZE {local_world} inconsistent")
    return rank, world, local_world


def user_blocks(train_indptr: np.ndarray, world_size: int) -> list[tuple[int, int]]:
    """Contiguous user blocks [lo, hi), one per rank, cut so that each holds about the same number of training
    interactions (every rank runs the same number of optimizer steps, so balanced blocks mean no rank waits)."""
    num_users = len(train_indptr) - 1
    if world_size > num_users:
        raise DistributedError(f"{world_size} ranks for {num_users} users: every rank needs at least one user")
    total = int(train_indptr[-1])
    cuts = [0]
    for r in range(1, world_size):
        c = int(np.searchsorted(train_indptr, total * r / world_size, side="left"))
        cuts.append(min(max(c, cuts[-1] + 1), num_users - (world_size - r)))
    cuts.append(num_users)
    return [(cuts[r], cuts[r + 1]) for r in range(world_size)]


@dataclass
class Distributed:
    """This process's place in the job: rank, world size, its user block and the byte count of what it sent."""

    rank: int = 0
    world_size: int = 1
    row_sums: bool = True  # dense gradients may be summed as gathered touched rows when that moves fewer bytes
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    lo: int = 0  # this rank's users [lo, hi) (set by ``assign``)
    hi: int = 0
    blocks: list = field(default_factory=list)  # every rank's [lo, hi), in rank order
    bytes_sent: int = 0  # gradient bytes this rank put on the wire (dense: all_reduce payload; sparse: gathered)
    steps_sparse: int = 0  # gradient sums that went as gathered rows (the rest went dense)

    @classmethod
    def single(cls, device: torch.device | None = None) -> Distributed:
        return cls(device=device or torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def assign(self, train_indptr: np.ndarray) -> tuple[int, int]:
        """Fix every rank's user block from the training CSR (the same on every rank); -> this rank's [lo, hi)."""
        self.blocks = user_blocks(train_indptr, self.world_size) if self.active else [(0, len(train_indptr) - 1)]
        self.lo, self.hi = self.blocks[self.rank]
        return self.lo, self.hi

    # ------------------------------------------------------------------------------------------- agreement
    def agree(self, error: BaseException | None) -> None:
        """A point every rank passes together: if any rank brought a user error, every rank raises it (named by
        the first rank that had one), so no rank waits alone in a later collective."""
        if not self.active:
            if error is not None:
                raise error
            return
        messages: list = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else " ".join(str(error).split()))
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if not failed:
            return
        if error is not None and all(m == failed[0][1] for _, m in failed) and len(failed) == self.world_size:
            exc = error  # the same refusal everywhere (the run directory, the config): as it is
        else:
            r, m = failed[0]
            exc = DistributedError(f"rank {r}: {m}")
        exc.every_rank_raised = True  # the CLI prints it on rank 0 only
        dist.barrier()  # every rank is here and alive: leave together (``close``), or gloo may abort one of them
        raise exc

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ------------------------------------------------------------------------------------------- gradients
    def sum_replicated_grads(self, params, sparse: bool = False) -> None:
        """Sum the gradients of the replicated parameters over ranks (after backward, before the step);
        ``sparse``: the job hands row-sparse gradients to its optimizer (every rank then sums sparse)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:  # unused this step on this rank: take part in the sum with zeros
                p.grad = (torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                                                  torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device),
                                                  p.shape) if sparse else torch.zeros_like(p))
            if p.grad.is_sparse:
                p.grad = self._sum_sparse(p.grad.coalesce())
            else:
                self._sum_dense_or_rows(p.grad)

    def _sum_dense_or_rows(self, grad: torch.Tensor) -> None:
        n_rows, width = grad.shape[0], grad[0].numel() if grad.dim() > 1 else 1
        on_cpu = self.device.type == "cpu" and self.row_sums
        rows = torch.nonzero(grad.reshape(n_rows, -1).any(dim=1)).squeeze(1) if on_cpu else None
        counts = self._row_counts(rows.numel()) if rows is not None else None
        if counts is None or sum(counts) * (8 + width * grad.element_size()) >= grad.numel() * grad.element_size():
            dist.all_reduce(grad)
            self.bytes_sent += grad.numel() * grad.element_size()
            return
        values = grad.reshape(n_rows, -1)[rows]
        idx, vals = self._gather_rows(rows, values, counts)
        grad.zero_()
        grad.reshape(n_rows, -1).index_add_(0, idx, vals)  # CPU: sequential, so every rank sums in the same order
        self.bytes_sent += rows.numel() * (8 + width * grad.element_size())
        self.steps_sparse += 1

    def _row_counts(self, n: int) -> list[int]:
        """Every rank's number of gradient rows this step (what the gathered rows are padded to)."""
        dev = self._comm_device
        counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=dev))
        return [int(c) for c in counts]

    def _gather_rows(self, rows: torch.Tensor, values: torch.Tensor, counts: list[int]):
        """All ranks' (row ids, row values), concatenated in rank order (padded to the largest count on the wire)."""
        width, top, dev = values.shape[1], max(counts), self._comm_device  # NCCL gathers CUDA tensors only
        pad_rows = torch.zeros(top, dtype=torch.int64, device=dev)
        pad_rows[: rows.numel()] = rows
        pad_vals = torch.zeros((top, width), dtype=values.dtype, device=dev)
        pad_vals[: rows.numel()] = values
        all_rows = [torch.empty_like(pad_rows) for _ in range(self.world_size)]
        all_vals = [torch.empty_like(pad_vals) for _ in range(self.world_size)]
        dist.all_gather(all_rows, pad_rows)
        dist.all_gather(all_vals, pad_vals)
        idx = torch.cat([r[:c] for r, c in zip(all_rows, counts)])
        vals = torch.cat([v[:c] for v, c in zip(all_vals, counts)])
        return idx, vals

    def _sum_sparse(self, grad: torch.Tensor) -> torch.Tensor:
        """A row-sparse gradient (train.optimizer lazy_adam): the union of every rank's rows, summed."""
        rows, vals = grad.indices()[0].to(torch.int64), grad.values()
        dev, row_shape = vals.device, tuple(grad.shape[1:])
        width = int(np.prod(row_shape)) if row_shape else 1
        counts = self._row_counts(rows.numel())
        idx, allv = self._gather_rows(rows, vals.reshape(rows.numel(), width), counts)  # a rank may have none
        self.bytes_sent += rows.numel() * (8 + width * vals.element_size())
        self.steps_sparse += 1
        return torch.sparse_coo_tensor(idx.unsqueeze(0).to(dev), allv.reshape(-1, *row_shape).to(dev),
                                       grad.shape).coalesce()

    # ------------------------------------------------------------------------------------------- metrics
    def sum_floats(self, values: list[float]) -> list[float]:
        """Elementwise sums over ranks (float64; the same result on every rank)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def combine_parts(self, parts: dict[str, float]) -> dict[str, float]:
        """An epoch's per-rank loss parts -> the job's: ``loss*`` keys (sums over a step's batch) add up over
        ranks, the other parts (means: alpha, overlap) are averaged over the ranks that have them."""
        if not self.active:
            return parts
        every: list = [None] * self.world_size
        dist.all_gather_object(every, parts)
        out: dict[str, float] = {}
        for key in dict.fromkeys(k for p in every for k in p):  # rank 0's order first
            vals = [p[key] for p in every if key in p]
            out[key] = sum(vals) if key.startswith("loss") else sum(vals) / len(vals)
        return out

    def gather_floats(self, value: float) -> list[float]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if not self.active:
            return [value]
        every: list = [None] * self.world_size
        dist.all_gather_object(every, float(value))
        return every

    def gather_run_states(self, meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        """Every rank's objective run state (``Objective.run_state``: each rank's refresh holds its own) as one
        pair on rank 0, for its resume checkpoint (({}, {}) on the others): ({"ranks": [rank r's meta, ...]},
        rank r's tensors as "rank<r>.<name>"); ``own_run_state`` reads a rank's back. One process: the pair as is."""
        if not self.active:
            return meta, tensors
        every: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object((meta, {k: v.detach().cpu() for k, v in tensors.items()}), every, dst=0)
        if every is None:  # (the other ranks write nothing)
            return {}, {}
        return ({"ranks": [m for m, _ in every]},
                {f"rank{r}.{k}": v for r, (_, rank_tensors) in enumerate(every) for k, v in rank_tensors.items()})

    def own_run_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        """This rank's pair out of a resume checkpoint's (what ``gather_run_states`` returned when it was saved);
        ({}, {}) when it holds none for a job of this size (one written by one process and resumed under torchrun,
        or the other way round, or by another world size: --reshard; the refresh then starts afresh)."""
        ranks = meta.get("ranks")
        if not self.active:
            return ({}, {}) if ranks is not None else (meta, tensors)
        if not isinstance(ranks, list) or len(ranks) != self.world_size:
            return {}, {}
        prefix = f"rank{self.rank}."
        return ranks[self.rank] or {}, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------------------------------- user rows
    def gather_user_rows(self, local: torch.Tensor) -> torch.Tensor | None:
        """The full [num_users, ...] tensor on rank 0 from every rank's block of rows (None on the others)."""
        if not self.active:
            return local
        blocks = [hi - lo for lo, hi in self.blocks]
        top = max(blocks)
        pad = torch.zeros((top, *local.shape[1:]), dtype=local.dtype, device=self._comm_device)
        pad[: local.shape[0]] = local.to(self._comm_device)
        parts = [torch.empty_like(pad) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(pad, parts, dst=0)
        if not self.is_main:
            return None
        return torch.cat([p[:n] for p, n in zip(parts, blocks)]).cpu()

    def gather_whole_model(self, model, whole, optimizer, user_optim_id: int):
        """(``whole`` holding every user's rows, the optimizer's state dict with the user table's moments of every
        user, or None) on rank 0; (None, None) on the others, which only send their rows. ``whole``: an empty
        (meta-device) model of the full size; ``user_optim_id``: the user table's index in ``optimizer``."""
        table_param = model.user_emb.weight
        table = self.gather_user_rows(table_param.detach())
        osd = optimizer.state_dict() if optimizer is not None else None
        if osd is not None:
            pid = user_optim_id
            osd["state"][pid] = dict(osd["state"].get(pid, {}))  # state_dict() shares the live per-param dicts
            for key, val in list(osd["state"][pid].items()):
                if torch.is_tensor(val) and val.dim() > 0 and val.shape[0] == table_param.shape[0]:
                    osd["state"][pid][key] = self.gather_user_rows(val)
        if not self.is_main:
            return None, None
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        state[USER_TABLE] = table
        whole.load_state_dict(state, assign=True)
        return whole, osd

    def close(self) -> None:
        """Leave the job (after its last collective: the trainer ends with a barrier)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_choice: str = "auto") -> Distributed:
    """The device and, under torchrun, the process group: chosen once per process. Outside torchrun (no
    WORLD_SIZE > 1 in the environment) this is the one-process case. Under torchrun with CUDA each rank takes
    ``cuda:LOCAL_RANK`` and NCCL; on CPU gloo."""
    device = resolve_device(device_choice)
    rank, world, local_world = launch_env()
    if world <= 1:
        return Distributed.single(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: LOCAL_RANK {local_rank} but only "
                                   f"{torch.cuda.device_count()} CUDA device(s) on this node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = _dt.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_world_size=local_world, device=device)
