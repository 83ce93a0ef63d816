"""compressor/sparse_rows.py: a set of ids' distinct rows and a row-sparse gradient's summed rows, each by a
bitmap over the table where the ids are many and by torch's sort where they are few."""

import pytest
import torch

from compressor.sparse_rows import distinct_rows, summed_rows


@pytest.mark.parametrize("n_rows", [1_500, 10_000])  # the bitmap (ids >= a quarter of the rows) and the sort
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_distinct_rows_equals_unique_with_inverse(n_rows, dtype):
    ids = torch.randint(0, n_rows, (37, 13), generator=torch.Generator().manual_seed(n_rows)).to(dtype)
    ids[0, :3] = n_rows - 1  # the last row and repeats
    rows, local = distinct_rows(ids, n_rows)
    want_rows, want_local = torch.unique(ids.long(), return_inverse=True)
    assert len(rows) < n_rows  # rows missing from the batch: the positions are renumbered
    assert torch.equal(rows, want_rows) and torch.equal(local, want_local)
    assert torch.equal(rows[local], ids.long())


@pytest.mark.parametrize("n_rows", [300, 100_000])  # the bitmap and coalesce
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_summed_rows_equals_coalesce(n_rows, dtype):
    gen = torch.Generator().manual_seed(n_rows)
    ids = torch.cat([torch.randint(0, n_rows, (400,), generator=gen), torch.tensor([n_rows - 1] * 3 + [0])])
    values = torch.randn(len(ids), 4, generator=gen, dtype=dtype)
    grad = torch.sparse_coo_tensor(ids[None], values, (n_rows, 4))
    rows, summed = summed_rows(grad)
    want = grad.coalesce()
    assert torch.equal(rows, want.indices()[0]) and len(rows) < len(ids)  # sorted, repeats summed
    # the same sums; a row named 3+ times may be summed in another order than coalesce's, so not the same bits
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(summed, want.values(), rtol=tol, atol=tol)
    before = torch.get_num_threads()
    try:  # the same bits on every call, whatever the thread count
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            assert torch.equal(summed_rows(grad)[1], summed)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(torch.zeros(n_rows, 4, dtype=dtype).index_put_((rows,), summed), grad.to_dense())
    # a coalesced gradient is read as it is
    rows_c, summed_c = summed_rows(want)
    assert torch.equal(rows_c, want.indices()[0]) and summed_c.data_ptr() == want.values().data_ptr()
