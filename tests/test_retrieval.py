"""compressor.retrieval: exact search equals brute force, approximate recall, caching, blocks."""

from __future__ import annotations

import logging
import os

import faiss
import numpy as np
import pytest
import torch

from compressor import retrieval
from compressor.retrieval import (
    TopKSearcher,
    TrainedQuantizer,
    blocked_torch_topk,
    measure_recall,
    set_thread_count,
    topk_cached,
)

set_thread_count(1)


def _brute_force(users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    full = users.astype(np.float64) @ items.astype(np.float64).T
    ids = np.argsort(-full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, ids, 1), ids


def _check_against_brute_force(users, items, scores, ids, k, atol=1e-4):
    """Same top-k up to ties: equal sorted score lists, and every id carries its true score."""
    ref_scores, _ = _brute_force(users, items, k)
    assert scores.shape == ids.shape == (len(users), k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(scores, ref_scores, atol=atol)
    true = np.einsum("nkd,nd->nk", items[ids].astype(np.float64), users.astype(np.float64))
    np.testing.assert_allclose(scores, true, atol=atol)
    assert all(len(set(row)) == k for row in ids.tolist())
    assert np.all(np.diff(scores, axis=1) <= atol), "not sorted best first"


def _skewed(n_items=4000, n_users=400, d=16, seed=0):
    """MF-like vectors: clustered directions, item norms spread over a lognormal(0, 1)
    (the largest norms are ~30x the median, as in trained MF item tables)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(32, d))
    items = centers[rng.integers(0, 32, n_items)] + 0.5 * rng.normal(size=(n_items, d))
    items *= rng.lognormal(0.0, 1.0, size=(n_items, 1))
    users = centers[rng.integers(0, 32, n_users)] + 0.5 * rng.normal(size=(n_users, d))
    return users.astype(np.float32), items.astype(np.float32)


@pytest.mark.parametrize("factory", ["Flat", "FlatIP"])
def test_exact_search_equals_brute_force(factory):
    rng = np.random.default_rng(1)
    users = rng.normal(size=(37, 8)).astype(np.float32)
    items = rng.normal(size=(200, 8)).astype(np.float32)
    s = TopKSearcher(items, factory)
    assert s.is_exact and s.transform == "none" and s.factory == factory
    scores, ids = s.search(users, 10)
    _check_against_brute_force(users, items, scores, ids, 10)
    _, ref_ids = _brute_force(users, items, 10)
    assert np.array_equal(ids, ref_ids)  # continuous random data: no ties


def test_exact_search_with_ties():
    """Integer vectors make many equal scores: compare score lists, not id lists."""
    rng = np.random.default_rng(2)
    users = rng.integers(-1, 2, size=(25, 4)).astype(np.float32)
    items = rng.integers(-1, 2, size=(60, 4)).astype(np.float32)
    scores, ids = TopKSearcher(items).search(users, 15)
    _check_against_brute_force(users, items, scores, ids, 15, atol=0)


@pytest.mark.parametrize("block", [1, 8, 36, 37, 4096])
def test_block_boundaries(block):
    rng = np.random.default_rng(3)
    users = rng.normal(size=(37, 6)).astype(np.float32)
    items = rng.normal(size=(90, 6)).astype(np.float32)
    s = TopKSearcher(items)
    ref = s.search(users, 7, block=4096)
    out = s.search(users, 7, block=block)
    assert np.array_equal(out[1], ref[1]) and np.array_equal(out[0], ref[0])
    t_scores, t_ids = blocked_torch_topk(users, items, 7, block=block)
    np.testing.assert_allclose(t_scores, ref[0], atol=1e-5)
    assert np.array_equal(t_ids, ref[1])


def test_k_equals_n_items_and_bad_k():
    rng = np.random.default_rng(4)
    users = rng.normal(size=(5, 3)).astype(np.float32)
    items = rng.normal(size=(9, 3)).astype(np.float32)
    scores, ids = TopKSearcher(items).search(users, 9)
    _check_against_brute_force(users, items, scores, ids, 9)
    with pytest.raises(ValueError):
        TopKSearcher(items).search(users, 10)
    with pytest.raises(ValueError):
        TopKSearcher(items).search(users[:, :2], 3)


@pytest.mark.parametrize(
    "factory, params",
    [("IVF64,Flat", {"nprobe": 16}), ("HNSW32", {"efSearch": 128})],
)
def test_approximate_recall_on_skewed_norms(factory, params):
    users, items = _skewed()
    s = TopKSearcher(items, factory, params=params, seed=0)
    assert not s.is_exact and s.transform == "ip2l2" and s.factory == factory
    recall = measure_recall(s, users, items, k=20, sample_users=300, seed=0)
    logging.getLogger(__name__).info("%s %s recall@20 = %.4f", factory, params, recall)
    assert recall >= 0.95, recall
    # Returned scores are the true inner products, sorted best first.
    scores, ids = s.search(users[:50], 20, block=16)
    true = np.einsum("nkd,nd->nk", items[ids], users[:50])
    np.testing.assert_allclose(scores, true, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_ip2l2_beats_raw_inner_product_ivf_on_skewed_norms():
    """The reason for the transform: raw-IP IVF at the same nprobe loses recall."""
    users, items = _skewed()
    ours = TopKSearcher(items, "IVF64,Flat", params={"nprobe": 8})
    raw = faiss.index_factory(items.shape[1], "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    raw.train(items)
    raw.add(items)
    faiss.extract_index_ivf(raw).nprobe = 8
    _, exact = TopKSearcher(items).search(users, 20)
    _, raw_ids = raw.search(users, 20)
    _, our_ids = ours.search(users, 20)
    rec = lambda got: np.mean([len(np.intersect1d(g, e)) / 20 for g, e in zip(got, exact)])  # noqa: E731
    assert rec(our_ids) > rec(raw_ids) + 0.05, (rec(our_ids), rec(raw_ids))


def test_measure_recall_exact_is_one():
    users, items = _skewed(n_items=300, n_users=50)
    assert measure_recall(TopKSearcher(items), users, items, k=10, sample_users=1000) == 1.0


def test_use_gpu_without_gpu_warns_and_works(caplog):
    users, items = _skewed(n_items=200, n_users=10)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("FAISS has a GPU here; the fallback path is not reachable")
    with caplog.at_level(logging.WARNING, logger="compressor.retrieval"):
        s = TopKSearcher(items, use_gpu=True)
    assert not s.on_gpu
    assert any("GPU" in r.getMessage() for r in caplog.records)
    scores, ids = s.search(users, 5)
    _check_against_brute_force(users, items, scores, ids, 5)


def test_topk_cached_computes_once_then_reuses(tmp_path, monkeypatch):
    users, items = _skewed(n_items=300, n_users=41)
    cache = tmp_path / "cache"
    ids1 = topk_cached(cache, "teacher-abc", users, items, 12)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    mtime = os.stat(files[0]).st_mtime_ns
    _, ref = TopKSearcher(items).search(users, 12)
    assert np.array_equal(ids1, ref) and ids1.dtype == np.int64

    # Second call must not search at all.
    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite cache")

    monkeypatch.setattr(retrieval, "TopKSearcher", boom)
    ids2 = topk_cached(cache, "teacher-abc", users, items, 12)
    assert np.array_equal(ids1, ids2)
    assert os.stat(files[0]).st_mtime_ns == mtime
    monkeypatch.undo()

    # A different k or fingerprint is a different cache entry.
    ids3 = topk_cached(cache, "teacher-abc", users, items, 5)
    topk_cached(cache, "teacher-xyz", users, items, 5)
    assert ids3.shape == (41, 5) and len(list(cache.glob("*.npy"))) == 3


def test_topk_cached_recomputes_on_shape_mismatch(tmp_path):
    users, items = _skewed(n_items=100, n_users=20)
    topk_cached(tmp_path, "fp", users, items, 4)
    ids = topk_cached(tmp_path, "fp", users[:10], items, 4)
    assert ids.shape == (10, 4)
    _, ref = TopKSearcher(items).search(users[:10], 4)
    assert np.array_equal(ids, ref)
    (cached,) = tmp_path.glob("*.npy")
    assert np.load(cached).shape == (10, 4)  # the stale entry was replaced


def test_set_thread_count():
    set_thread_count(2)
    assert faiss.omp_get_max_threads() == 2
    set_thread_count(1)
    assert faiss.omp_get_max_threads() == 1


@pytest.mark.parametrize("block", [None, 7])
def test_exact_topk_on_device_equals_faiss_flat(block):
    """The CUDA fallback (torch matmul + topk, used when FAISS has no GPU) gives IndexFlatIP's answer; it runs on
    any device, so CPU tensors check it here."""
    import torch

    users, items = _skewed(n_items=3000, n_users=150, d=12, seed=3)
    scores, ids = retrieval.exact_topk_on_device(torch.from_numpy(users), torch.from_numpy(items), 40, block=block)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (150, 40)
    ref_scores, ref = TopKSearcher(items, "Flat").search(users, 40)
    assert np.array_equal(ids.numpy(), ref)
    # every block's scores survive the next block (on the CPU the blocks share one buffer)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)


def test_exact_topk_on_device_refuses_k_beyond_the_catalogue():
    import torch

    with pytest.raises(ValueError, match=r"k must be in 1\.\.5 \(the number of items\), got 6"):
        retrieval.exact_topk_on_device(torch.zeros(3, 2), torch.zeros(5, 2), 6)


def test_faiss_has_gpu_matches_this_build():
    assert retrieval.faiss_has_gpu() == (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0)


def test_ivf_quantizer_reused_across_refreshes():
    """The per-epoch refresh keeps a trained IVF quantizer (no k-means) and still searches the new vectors."""
    users, items = _skewed(seed=4)
    first = TopKSearcher(items, "IVF64,Flat", params={"nprobe": 16})
    assert not first.reused_training
    rng = np.random.default_rng(5)
    moved = (items * (1 + 0.05 * rng.normal(size=items.shape))).astype(np.float32)  # the student moved a little
    second = TopKSearcher(moved, "IVF64,Flat", params={"nprobe": 16}, trained_like=first.trained)
    assert second.reused_training
    ivf1, ivf2 = faiss.extract_index_ivf(first.index), faiss.extract_index_ivf(second.index)
    c1 = faiss.rev_swig_ptr(faiss.downcast_index(ivf1.quantizer).get_xb(), ivf1.nlist * ivf1.d)
    c2 = faiss.rev_swig_ptr(faiss.downcast_index(ivf2.quantizer).get_xb(), ivf2.nlist * ivf2.d)
    assert np.array_equal(np.array(c1), np.array(c2))  # the same centroids: not retrained
    assert ivf2.ntotal == len(moved)
    scores, ids = second.search(users, 20)
    true = np.einsum("nkd,nd->nk", moved[ids].astype(np.float64), users.astype(np.float64))
    np.testing.assert_allclose(scores, true, atol=1e-3)  # scores of the new vectors, not the old ones
    assert measure_recall(second, users, moved, 20) >= 0.95
    # Another factory (or HNSW, which has nothing trained to keep) builds from scratch.
    assert not TopKSearcher(moved, "IVF32,Flat", trained_like=first.trained).reused_training
    third = TopKSearcher(items, "IVF64,Flat", params={"nprobe": 16}, trained_like=second.release())
    assert third.reused_training and second.index is None  # a released searcher keeps only its trained part
    assert TopKSearcher(items, "HNSW16").trained is None and TopKSearcher(items, "Flat").trained is None
    # what a resume file carries: the same quantizer back from its bytes; a structure of another dimension refused
    kept = TrainedQuantizer.from_bytes("IVF64,Flat", items.shape[1], first.trained.to_bytes())
    assert np.array_equal(kept.to_bytes(), first.trained.to_bytes())
    from_kept = TopKSearcher(moved, "IVF64,Flat", params={"nprobe": 16}, trained_like=kept)
    assert from_kept.reused_training
    from_first = TopKSearcher(moved, "IVF64,Flat", params={"nprobe": 16}, trained_like=first.trained)
    np.testing.assert_array_equal(from_kept.search(users, 20)[1], from_first.search(users, 20)[1])
    with pytest.raises(ValueError, match="expected an empty one of dim"):
        TrainedQuantizer.from_bytes("IVF64,Flat", items.shape[1] + 1, first.trained.to_bytes())
    with pytest.raises(ValueError, match="not the IVF one"):
        TrainedQuantizer.from_bytes("IVF64,Flat", items.shape[1], faiss.serialize_index(faiss.IndexFlatL2(17)))


def test_listed_inner_products_are_each_pairs_dot_whatever_the_blocks():
    from compressor.pair_products import listed_inner_products

    rng = np.random.default_rng(3)
    items = rng.standard_normal((300, 7)).astype(np.float32)
    queries = rng.standard_normal((41, 7)).astype(np.float32)
    ids = rng.integers(0, 300, (41, 12))
    ids[0, :4] = 5  # repeats in a row
    want = np.einsum("bkd,bd->bk", items[ids].astype(np.float64), queries.astype(np.float64))
    whole = listed_inner_products(queries, items, ids)
    assert whole.dtype == np.float32 and whole.shape == ids.shape
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(listed_inner_products(queries, items, ids, block=12 * 5), whole)  # 5 per block
    assert listed_inner_products(queries[:0], items, ids[:0]).shape == (0, 12)


@pytest.mark.parametrize("n, c, k, dtype", [(37, 4000, 100, torch.float32), (5, 4003, 100, torch.float32),
                                            (64, 2600, 20, torch.float32), (8, 500, 100, torch.float32),
                                            (3, 41_000, 20, torch.float32), (9, 700, 30, torch.float64),
                                            (4, 50, 50, torch.float32), (3, 60, 20, torch.bfloat16),
                                            (4, 30_000, 0, torch.float32)])
def test_topk_rows_is_torchs_topk(n, c, k, dtype):
    """Through block maxima where rows are long (c >= 25 k; a ragged last block; ties), by introselect on shorter
    ones, else (k = c, k = 0, a dtype numpy lacks) torch.topk itself: the same values, columns that hold them, no
    column twice."""
    gen = torch.Generator().manual_seed(c)
    scores = torch.randn(n, c, generator=gen).to(dtype)
    scores[0] = torch.randint(0, 5, (c,), generator=gen).to(dtype)  # a row of ties
    scores[-1, c - 3:] = 50.0  # the best of the last row in the ragged tail
    for s in (scores, scores.t().contiguous().t()):  # contiguous and column-major
        values, cols = retrieval.topk_rows(s, k)
        want = torch.topk(s, k, dim=1)
        assert torch.equal(values, want.values)
        assert torch.equal(s.gather(1, cols), values)
        assert values.shape == (n, k) and all(len(set(row.tolist())) == k for row in cols)


def test_topk_rows_split_over_threads_is_the_one_thread_answer():
    """A large input's rows are selected on torch's thread count in parts: the same values and columns as on one
    thread, whatever the split (each row's answer depends on that row alone)."""
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(1101, 1000, generator=gen)  # 1.1M scores: split at 2+ threads; an odd row count
    before = torch.get_num_threads()
    _drop_pools()
    try:
        torch.set_num_threads(1)
        one = retrieval.topk_rows(scores, 100)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            many = retrieval.topk_rows(scores, 100)
            assert torch.equal(many[0], one[0]) and torch.equal(many[1], one[1])
    finally:
        torch.set_num_threads(before)
    assert set(retrieval._POOLS) == {2, 3}  # the split ran (one pool per thread count), and not on one thread
    assert torch.equal(one[0], torch.topk(scores, 100, dim=1).values)
    # a pool that takes no more work (as after the interpreter began to shut down): the same answer on this thread
    retrieval._POOLS[2].shutdown()
    try:
        torch.set_num_threads(2)
        late = retrieval.topk_rows(scores, 100)
    finally:
        torch.set_num_threads(before)
        _drop_pools()
    assert torch.equal(late[0], one[0]) and torch.equal(late[1], one[1])


def _drop_pools():
    for pool in retrieval._POOLS.values():
        pool.shutdown()
    retrieval._POOLS.clear()


@pytest.mark.parametrize("c, k", [(300, 10), (3000, 10)])  # introselect alone; through block maxima
def test_topk_rows_ranks_nan_first_as_torch_does(c, k):
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(4, c, generator=gen)
    scores[1, [7, 70]] = float("nan")
    values, cols = retrieval.topk_rows(scores, k)
    want = torch.topk(scores, k, dim=1)
    assert torch.allclose(values, want.values, equal_nan=True)
    assert set(cols[1, :2].tolist()) == {7, 70} and torch.isnan(values[1, :2]).all()
