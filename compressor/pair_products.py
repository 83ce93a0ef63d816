"""Dot products of users with their own lists of items: the one home of that computation.

Three callers need it: the KD losses (the student's scores of a batch's [QS | A | QT] items, with gradients), the
teacher's per-epoch scoring of the student's new (user, item) pairs, and the true inner products an approximate
search re-ranks its ids by. None of them may form a users x items matrix, and on CPU all of them run as one
sampled dense-dense product over a sparse [users, items] pattern of the pairs (torch's CSR kernels: one dot per
listed pair, reading the two rows in place), which is 2-8x faster than gathering [b, k, d] item blocks
(docs/benchmarks.md sections 4c-4f). Each score depends only on its own two rows, whatever is scored beside it and
however many threads run: a reused score equals a fresh one, and a run resumes bit for bit.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

PAIR_DOT_ELEMS = 1 << 22  # floats per gathered side of a pair_dot chunk (16 MiB at float32)
U16_SORT_ROWS = 1 << 16  # tables up to this many rows: a batch's entries ordered by row with a 16-bit radix sort


def csr_matrix(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR tensor from its parts, unchecked (callers check their ids)."""
    # torch warns once per process that sparse CSR is "beta"; the three kernels used here are long-standing.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _sampled_dots(crow: Tensor, col: Tensor, user_rows: Tensor, item_table: Tensor) -> Tensor:
    """The values [nnz] of a CSR pattern (``crow`` over ``user_rows``, item ids ``col`` int64) sampled from
    user_rows @ item_table.T: one dot per entry. The kernel does not check ids (an id outside the table would read
    outside it), so they are checked here."""
    n = item_table.shape[0]
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n):
        raise IndexError(f"item ids must lie in [0, {n}); got {int(col.min())}..{int(col.max())}")
    pattern = csr_matrix(crow, col, torch.zeros(col.numel(), dtype=user_rows.dtype), (user_rows.shape[0], n))
    return torch.sparse.sampled_addmm(pattern, user_rows, item_table.T, beta=0.0).values()


def pair_scores(user: Tensor, item_table: Tensor, idx: Tensor) -> Tensor:
    """Dot products of each user with its own list of items.

    user [b, d], item_table [n_items, d], idx [b, k] long -> [b, k].
    Reads only the k listed item vectors per user; never forms a users x items matrix. On CPU the lists are a
    sparse [b, n_items] pattern (``_CSRPairScores``); elsewhere the listed vectors are gathered for a batched
    product.
    """
    # (torch's sampled product refuses a row with more entries than the table has rows, possible only with
    # duplicates, and on CPU takes float32 and float64 only)
    if (user.device.type == "cpu" and idx.numel() and idx.shape[1] <= item_table.shape[0]
            and user.dtype in (torch.float32, torch.float64) and user.layout == item_table.layout == torch.strided):
        return _CSRPairScores.apply(user, item_table, idx)
    vecs = item_table[idx]  # [b, k, d]
    return torch.bmm(vecs, user.unsqueeze(-1)).squeeze(-1)


class _CSRPairScores(torch.autograd.Function):
    """``pair_scores`` with the lists as a CSR pattern: forward a sampled dense-dense product (one dot per
    listed pair), backward a CSR x dense product for the users and one with the transposed pattern for the items.
    On CPU this is 2x faster than gather + bmm (whose [b, k, d] copy and tiny per-user products dominate an
    RCE-KD batch: docs/benchmarks.md section 4c).

    The lists may hold duplicate and unsorted ids, which torch's CSR format does not promise to support: its CPU
    kernels used here treat every entry on its own (one dot per entry; a CSR x dense product summing its
    entries), and tests/test_losses.py checks exactly that against gather + bmm, so a torch that changed it
    would fail there. The item gradient's sums come out in the same order every time, with any number of
    threads (``_listed_rows_gradient``): a run resumes bit for bit."""

    @staticmethod
    def forward(ctx, user: Tensor, item_table: Tensor, idx: Tensor) -> Tensor:
        b, k = idx.shape
        crow = torch.arange(0, b * k + 1, k, dtype=torch.int64)
        col = idx.reshape(-1).to(torch.int64)
        # a copy, not a view of the sparse result, so that a caller may change it in place (the backward's
        # patterns reuse crow and col, whose ids were checked here)
        scores = _sampled_dots(crow, col, user, item_table).view(b, k).clone()
        ctx.save_for_backward(user, item_table, crow, col)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        user, item_table, crow, col = ctx.saved_tensors
        grad_user = grad_items = None
        if ctx.needs_input_grad[0]:
            g = csr_matrix(crow, col, grad.reshape(-1).contiguous(), (user.shape[0], item_table.shape[0]))
            grad_user = g @ item_table
        if ctx.needs_input_grad[1]:
            grad_items = _listed_rows_gradient(grad, user, col, item_table.shape[0])
        return grad_user, grad_items, None


def _listed_rows_gradient(grad: Tensor, user: Tensor, col: Tensor, n_rows: int) -> Tensor:
    """[n_rows, d]: row j sums grad[e] * user[e // k] over the entries e listing j (grad [b, k], col [b k]).

    The transposed pattern, [rows, users] in CSR, times the users; the entries are put in row order by a stable
    sort, a 16-bit radix sort where the table has <= 65,536 rows (a KD batch's distinct items). torch hands the
    product to MKL, which does not document its summation order; what the tests check is the property resume
    needs: the same bits every time and with 1 to 4 threads. About 2x faster than the scatter it replaces (an
    [entries, d] product, then an accumulating index_put_): the backward of 1,880 x 200 entries took 14-16 ms
    against 25-35 ms (a throwaway timing, docs/benchmarks.md section 4f)."""
    b, k = grad.shape
    if n_rows <= U16_SORT_ROWS:  # (numpy: torch has no unsigned 16-bit sort)
        order = torch.from_numpy(np.argsort(col.numpy().astype(np.uint16), kind="stable").astype(np.int64))
    else:
        order = torch.sort(col.to(torch.int32), stable=True).indices
    crow = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(col, minlength=n_rows), 0, out=crow[1:])
    transposed = csr_matrix(crow, order // k, grad.reshape(-1).index_select(0, order), (n_rows, b))
    return transposed @ user


@torch.no_grad()
def pair_dot(user_table: torch.Tensor, item_table: torch.Tensor, users: torch.Tensor,
             items: torch.Tensor) -> torch.Tensor:
    """Scores [n] of (user, item) pairs [n], ``users`` ascending (as ``nonzero`` gives them), in chunks.

    On CPU the pairs are a sparse [users, items] pattern and one sampled dense-dense product computes one dot per
    pair, reading the two rows in place: 2.5x faster than gathering both sides (a 300-dim teacher, 1M pairs).
    Elsewhere the rows are gathered and their products summed. Either way each score depends only on its own
    two rows (the reduction runs along one pair), whatever else is scored with it.
    """
    out = torch.empty(users.shape, dtype=user_table.dtype, device=user_table.device)
    if not users.numel():
        return out
    n_items = item_table.shape[0]
    csr = (user_table.device.type == "cpu" and user_table.dtype in (torch.float32, torch.float64)
           and item_table.dtype == user_table.dtype)
    if csr:
        if bool((users[1:] < users[:-1]).any()):
            raise ValueError("pair_dot: users must be in ascending order")
    chunk = max(1, PAIR_DOT_ELEMS // max(user_table.shape[1], 1))
    for s in range(0, users.shape[0], chunk):
        u, i = users[s:s + chunk], items[s:s + chunk]
        if csr:
            rows, counts = _pattern_rows(u, n_items)
            crow = torch.zeros(len(rows) + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=crow[1:])
            out[s:s + chunk] = _sampled_dots(crow, i.to(torch.int64), user_table.index_select(0, rows), item_table)
        else:
            out[s:s + chunk] = (user_table.index_select(0, u) * item_table.index_select(0, i)).sum(dim=1)
    return out


def _pattern_rows(users: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``pair_dot``'s pattern for ascending ``users``: (user of each row, pairs in it). A user's run of
    pairs is one row, split into rows of at most ``n_items`` pairs (the sampled product refuses longer rows,
    possible only with repeated pairs), so every pair is computed the same way."""
    rows, counts = torch.unique_consecutive(users, return_counts=True)
    if int(counts.max()) <= n_items:
        return rows, counts
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    piece = (torch.arange(len(users)) - first) // n_items  # which n_items-long piece of its run a pair is in
    _, counts = torch.unique_consecutive(users * (int(piece.max()) + 1) + piece, return_counts=True)
    return users[torch.cumsum(counts, 0) - counts], counts


def listed_inner_products(queries: np.ndarray, items: np.ndarray, ids: np.ndarray, block: int = 1 << 24
                          ) -> np.ndarray:
    """numpy float32 [n, k]: each query's inner product with each of its own items ``ids`` [n, k] (valid ids),
    ``pair_scores`` over blocks of at most ``block`` pairs (bounding the pattern's index arrays); 8x faster than
    gathering [n, k, dim] item blocks for an einsum (a throwaway timing on random vectors: 0.06 s against 0.48 s
    for 50,000 x 100 pairs of dim 20)."""
    n, k = ids.shape
    out = np.empty((n, k), dtype=np.float32)
    if n == 0 or k == 0:
        return out
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    table = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32))
    rows = max(1, block // k)
    with torch.no_grad():
        for r in range(0, n, rows):
            idx = torch.from_numpy(np.ascontiguousarray(ids[r : r + rows], dtype=np.int64))
            out[r : r + len(idx)] = pair_scores(q[r : r + len(idx)], table, idx).numpy()
    return out
