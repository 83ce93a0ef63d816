import math

import numpy as np
import pytest
import torch

from compressor.evaluation import evaluate, topk_excluding
from compressor.retrieval import scores_buffer


def _csr(rows, n_users):
    indptr = [0]
    indices = []
    for u in range(n_users):
        items = rows.get(u, [])
        indices += items
        indptr.append(len(indices))
    return np.array(indptr, dtype=np.int64), np.array(indices, dtype=np.int64)


def test_hand_computed_example():
    # one user, 6 items; scores rank items 0 > 1 > 2 > 3 > 4 > 5; item 0 is a training item (excluded)
    item_vecs = torch.tensor([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    user_vecs = torch.tensor([[1.0]])
    train = _csr({0: [0]}, 1)
    test = _csr({0: [2, 5]}, 1)  # ranking after exclusion: 1, 2, 3, 4, 5 -> hits at ranks 2 and 5
    res = evaluate(user_vecs, item_vecs, *train, *test, ks=(2, 5))
    assert math.isclose(res["recall@2"], 0.5)
    assert math.isclose(res["recall@5"], 1.0)
    idcg2 = 1 + 1 / math.log2(3)
    assert math.isclose(res["ndcg@2"], (1 / math.log2(3)) / idcg2)
    assert math.isclose(res["ndcg@5"], (1 / math.log2(3) + 1 / math.log2(6)) / idcg2)


def _dense_reference(U, I, train, test, ks):
    scores = U @ I.T
    out = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
    for u in range(U.shape[0]):
        t = set(test.get(u, []))
        if not t:
            continue
        s = scores[u].copy()
        s[train.get(u, [])] = -np.inf
        ranked = np.argsort(-s, kind="stable")
        for k in ks:
            top = ranked[:k]
            hits = [1.0 if i in t else 0.0 for i in top]
            out[f"recall@{k}"].append(sum(hits) / len(t))
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(t))))
            out[f"ndcg@{k}"].append(dcg / idcg)
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_matches_dense_brute_force_with_blocks():
    rng = np.random.default_rng(0)
    nu, ni, d = 97, 60, 8
    U = rng.normal(size=(nu, d)).astype(np.float32)
    I = rng.normal(size=(ni, d)).astype(np.float32)
    train = {u: sorted(rng.choice(ni, size=rng.integers(1, 20), replace=False).tolist()) for u in range(nu)}
    test = {}
    for u in range(nu):
        if u % 7 == 0:
            continue  # users without test items are skipped
        rest = sorted(set(range(ni)) - set(train[u]))
        test[u] = sorted(rng.choice(rest, size=rng.integers(1, 6), replace=False).tolist())
    ref = _dense_reference(U, I, train, test, (5, 10))
    res = evaluate(torch.from_numpy(U), torch.from_numpy(I), *_csr(train, nu), *_csr(test, nu), ks=(5, 10), block=16)
    for k, v in ref.items():
        assert math.isclose(res[k], v, rel_tol=1e-9, abs_tol=1e-12), k
    assert res["users"] == len(test)


def test_long_rows_and_a_reused_score_block_match_the_reference():
    # 400 items against k = 10 takes topk_rows' block-maxima path; 7-user blocks reuse one score buffer, so a
    # block's masked (-inf) entries must not leak into the next block's users
    rng = np.random.default_rng(1)
    nu, ni, d = 50, 400, 6
    U = rng.normal(size=(nu, d)).astype(np.float32)
    I = rng.normal(size=(ni, d)).astype(np.float32)
    train = {u: sorted(rng.choice(ni, size=rng.integers(1, 120), replace=False).tolist()) for u in range(nu)}
    test = {u: sorted(rng.choice(sorted(set(range(ni)) - set(train[u])), size=3, replace=False).tolist())
            for u in range(nu)}
    ref = _dense_reference(U, I, train, test, (5, 10))
    for block in (7, 1024):
        res = evaluate(torch.from_numpy(U), torch.from_numpy(I), *_csr(train, nu), *_csr(test, nu), ks=(5, 10),
                       block=block)
        for k, v in ref.items():
            assert math.isclose(res[k], v, rel_tol=1e-9, abs_tol=1e-12), (block, k)
    users = np.arange(nu)
    buffer = scores_buffer(torch.from_numpy(U), torch.from_numpy(I), nu)
    fresh = topk_excluding(torch.from_numpy(U), torch.from_numpy(I), users, 10, *_csr(train, nu))
    where = buffer.data_ptr()
    reused = topk_excluding(torch.from_numpy(U), torch.from_numpy(I), users, 10, *_csr(train, nu), out=buffer)
    assert torch.equal(fresh, reused)
    # the scores were computed in the buffer itself (not in memory the product allocated instead)
    assert buffer.data_ptr() == where
    unseen = sorted(set(range(ni)) - set(train[1]))[:5]
    assert torch.isinf(buffer[0, train[0]]).all()
    assert torch.allclose(buffer[1, unseen], torch.from_numpy(U[1] @ I[unseen].T))
    with pytest.raises(ValueError, match="cannot hold the scores of 50 users"):
        topk_excluding(torch.from_numpy(U), torch.from_numpy(I), users, 10, *_csr(train, nu), out=buffer[:49])
