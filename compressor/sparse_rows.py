"""Row-sparse bookkeeping shared by the KD terms and the row-sparse optimizers: which rows of a table a set of ids
names, and a row-sparse gradient's rows with their summed values.

Both are a sort in torch (``unique``, ``coalesce``). Where the ids are at least a quarter as many as the table's
rows (a KD batch names ~400k item ids of a 200k-item catalogue, and its gradient holds ~20-55k distinct item rows
plus the BPR batch's 4,096) a bitmap over the table does the same without the sort; for a few ids of a huge table
(a batch's users of 1M) the sort is cheaper. Timings: docs/benchmarks.md sections 4f and 4h.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bitmap_pays(n_ids: int, n_rows: int) -> bool:
    return n_ids * 4 >= n_rows


def distinct_rows(ids: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """``torch.unique(ids, return_inverse=True)`` for integer ids in [0, n_rows), as int64: the sorted distinct ids
    and each entry's position among them, the same tensors."""
    ids = ids.long()  # (a no-op for int64; index_fill_ takes int64 indices only)
    flat = ids.reshape(-1)
    if not _bitmap_pays(flat.numel(), n_rows):
        return torch.unique(ids, return_inverse=True)
    seen = torch.zeros(n_rows, dtype=torch.bool, device=ids.device)
    seen.index_fill_(0, flat, True)
    rows = seen.nonzero().squeeze(1)
    position = torch.empty(n_rows, dtype=torch.long, device=ids.device)
    position.index_copy_(0, rows, torch.arange(len(rows), device=ids.device))
    return rows, position.index_select(0, flat).view(ids.shape)


def summed_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, values) of a row-sparse COO gradient [n_rows, ...]: its distinct rows, sorted, and each one's
    entries summed, as ``grad.coalesce()`` gives them (a row named twice, a user twice in a batch, gets the sum a
    dense gradient would hold). By the bitmap (on the CPU), a row's entries are summed in the order they appear, the
    same bits on every call and at any thread count; coalesce may add a row named 3+ times in another order. The values
    of a gradient that is already coalesced are its own (not a copy)."""
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    ids, vals = grad._indices()[0], grad._values()
    if grad.is_cuda or not _bitmap_pays(ids.numel(), grad.shape[0]):  # (CUDA's index_add_ adds atomically)
        g = grad.coalesce()
        return g.indices()[0], g.values()
    rows, position = distinct_rows(ids, grad.shape[0])
    summed = torch.zeros((len(rows),) + tuple(vals.shape[1:]), dtype=vals.dtype, device=vals.device)
    return rows, summed.index_add_(0, position, vals)
