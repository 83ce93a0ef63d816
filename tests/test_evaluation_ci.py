"""MRR@K / MAP@K against a slow reference, per-user metrics, the paired bootstrap, cold items, and
`compress evaluate --full / --compare / --gap` on tiny real runs."""

import json
import math

import numpy as np
import pytest
import torch

from compressor import api, bootstrap
from compressor.checkpoint import load_checkpoint, save_checkpoint
from compressor.config import from_dict
from compressor.evaluation import (METRICS, cold_items, evaluate, evaluate_split, per_user_metrics, report,
                                   restrict_targets)

from .conftest import assert_one_line_error, run_cli


def _csr(rows, n_users):
    indptr, indices = [0], []
    for u in range(n_users):
        indices += rows.get(u, [])
        indptr.append(len(indices))
    return np.array(indptr, dtype=np.int64), np.array(indices, dtype=np.int64)


def _random_case(seed=0, nu=83, ni=50, d=6):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(nu, d)).astype(np.float32)
    I = rng.normal(size=(ni, d)).astype(np.float32)
    train = {u: sorted(rng.choice(ni, size=rng.integers(0, 15), replace=False).tolist()) for u in range(nu)}
    test = {}
    for u in range(nu):
        if u % 9 == 0:
            continue  # users without targets are skipped
        rest = sorted(set(range(ni)) - set(train[u]))
        test[u] = sorted(rng.choice(rest, size=rng.integers(1, 25), replace=False).tolist())  # often > K targets
    return U, I, train, test


def _reference(U, I, train, test, ks):
    """The slow reference, from the definitions: per user {"mrr@K": ..., "map@K": ...}."""
    scores = U.astype(np.float64) @ I.T.astype(np.float64)
    out = {}
    for u in sorted(test):
        s = scores[u].copy()
        s[train.get(u, [])] = -np.inf
        ranked = list(np.argsort(-s, kind="stable"))
        targets = set(test[u])
        row = {}
        for k in ks:
            top = ranked[:k]
            first = next((r for r, i in enumerate(top, 1) if i in targets), None)
            row[f"mrr@{k}"] = 1.0 / first if first else 0.0
            hits, ap = 0, 0.0
            for r, i in enumerate(top, 1):
                if i in targets:
                    hits += 1
                    ap += hits / r
            row[f"map@{k}"] = ap / min(k, len(targets))
        out[u] = row
    return out


def _per_user(U, I, train, test, ks, block=16, metrics=METRICS):
    return per_user_metrics(torch.from_numpy(U), torch.from_numpy(I), *_csr(train, U.shape[0]),
                            *_csr(test, U.shape[0]), ks=ks, block=block, metrics=metrics)


def test_mrr_and_map_match_the_reference():
    U, I, train, test = _random_case()
    ks = (3, 5, 10)
    res = _per_user(U, I, train, test, ks)
    ref = _reference(U, I, train, test, ks)
    assert res.users.tolist() == sorted(test)
    for key in (f"{m}@{k}" for m in ("mrr", "map") for k in ks):
        want = np.array([ref[u][key] for u in sorted(test)])
        np.testing.assert_allclose(res.values[key], want, rtol=1e-12, atol=1e-14, err_msg=key)
    assert max(len(t) for t in test.values()) > max(ks)  # the normaliser min(K, |targets|) was exercised


def test_hand_computed_mrr_and_map():
    item_vecs = torch.tensor([[6.0], [5.0], [4.0], [3.0], [2.0], [1.0]])
    train, test = _csr({0: [0]}, 1), _csr({0: [2, 5]}, 1)  # ranking 1, 2, 3, 4, 5 -> hits at ranks 2 and 5
    res = evaluate(torch.tensor([[1.0]]), item_vecs, *train, *test, ks=(2, 5), metrics=METRICS)
    assert math.isclose(res["mrr@2"], 0.5) and math.isclose(res["mrr@5"], 0.5)
    assert math.isclose(res["map@2"], (1 / 2) / 2)
    assert math.isclose(res["map@5"], (1 / 2 + 2 / 5) / 2)


def test_per_user_arrays_average_to_evaluate():
    U, I, train, test = _random_case(1)
    args = (torch.from_numpy(U), torch.from_numpy(I), *_csr(train, U.shape[0]), *_csr(test, U.shape[0]))
    per = per_user_metrics(*args, ks=(5, 10), block=7)
    classic = evaluate(*args, ks=(5, 10), block=32)
    assert set(classic) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "users"}  # the old keys, unchanged
    full = evaluate(*args, ks=(5, 10), block=32, metrics=METRICS)
    assert classic["users"] == full["users"] == len(per.users)
    for key, v in per.values.items():
        assert abs(float(v.mean()) - full[key]) <= 1e-12, key
        if key in classic:
            assert abs(float(v.mean()) - classic[key]) <= 1e-12, key


def test_cold_items_and_warm_targets():
    # items 3 and 4 have no training interaction
    train = _csr({0: [0, 1], 1: [2]}, 3)
    test = _csr({0: [3, 2], 1: [4], 2: [1, 4]}, 3)
    cold = cold_items(train[1], 5)
    assert cold.tolist() == [False, False, False, True, True]
    indptr, indices = restrict_targets(*test, ~cold)
    assert indptr.tolist() == [0, 1, 1, 2] and indices.tolist() == [2, 1]
    rng = np.random.default_rng(0)
    U, I = torch.from_numpy(rng.normal(size=(3, 4))), torch.from_numpy(rng.normal(size=(5, 4)))
    ev = evaluate_split(U, I, *train, *test, ks=(2,))
    assert ev.interactions == 5 and ev.cold_interactions == 3 and math.isclose(ev.cold_share, 0.6)
    assert ev.all.users.tolist() == [0, 1, 2] and ev.warm.users.tolist() == [0, 2]  # user 1 had only a cold target


# ------------------------------------------------------------------------------------------------ bootstrap
def test_intervals_hold_the_point_estimate_and_are_deterministic():
    rng = np.random.default_rng(3)
    a = rng.random(500) ** 3
    b = np.clip(a + rng.normal(0, 0.05, 500), 0, 1)
    res = bootstrap.paired_bootstrap({"a": a, "b": b, "a-b": a - b}, n_resamples=1000, seed=7)
    for key, e in res.items():
        assert e["lo"] <= e["value"] <= e["hi"], key
        assert e["lo"] < e["hi"]
    assert res["a"]["value"] == pytest.approx(a.mean(), abs=1e-15)
    alone = bootstrap.paired_bootstrap({"a": a}, n_resamples=1000, seed=7)["a"]
    assert alone == pytest.approx(res["a"], rel=1e-12)  # the same resamples: paired across calls
    assert bootstrap.paired_bootstrap({"a": a}, n_resamples=1000, seed=8)["a"] != pytest.approx(res["a"], rel=1e-6)
    # the chunking of the index matrix bounds memory; same seed, same chunking -> the same resamples
    small = bootstrap.resampled_means(np.stack([a, b]), 300, seed=1, max_cells=1000)
    assert small.shape == (300, 2)
    np.testing.assert_array_equal(small, bootstrap.resampled_means(np.stack([a, b]), 300, seed=1, max_cells=1000))
    assert np.all(small.min(0) >= 0) and np.all(small.max(0) <= 1)


def test_difference_of_a_model_with_itself_is_zero():
    a = np.random.default_rng(0).random(200)
    res = bootstrap.summary({"ndcg@20": a}, other={"ndcg@20": a.copy()}, n_resamples=1000, seed=0)
    assert res["difference"]["ndcg@20"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    assert res["metrics"]["ndcg@20"] == res["other"]["ndcg@20"]


def test_gap_share_with_a_known_answer():
    rng = np.random.default_rng(1)
    scratch = rng.random(300) * 0.5
    teacher = scratch + 0.2 + rng.random(300) * 0.1
    student = scratch + 0.25 * (teacher - scratch)  # recovers a quarter of every user's gap
    e = bootstrap.gap_share(student, scratch, teacher, n_resamples=1000, seed=0)
    assert e["value"] == pytest.approx(0.25) and e["lo"] == pytest.approx(0.25) and e["hi"] == pytest.approx(0.25)
    # with noise the interval widens around the truth, and summary() agrees with gap_share()
    noisy = student + rng.normal(0, 0.05, 300)
    e = bootstrap.gap_share(noisy, scratch, teacher, n_resamples=1000, seed=0)
    assert e["lo"] < 0.25 < e["hi"] and e["hi"] - e["lo"] < 0.2
    s = bootstrap.summary({"m": noisy}, gap=({"m": scratch}, {"m": teacher}), n_resamples=1000, seed=0)
    assert s["gap_share"]["m"]["value"] == pytest.approx(e["value"], abs=1e-12)
    assert s["teacher"]["m"]["value"] == pytest.approx(teacher.mean())


def test_gap_near_zero_is_undefined_not_an_error():
    rng = np.random.default_rng(2)
    scratch = rng.random(100)
    e = bootstrap.gap_share(scratch + 0.1, scratch, scratch.copy(), n_resamples=1000, seed=0)
    assert e == {"value": None, "lo": None, "hi": None}
    # a gap whose own interval holds 0: the share is a number, its interval is undefined
    teacher = scratch + rng.normal(0, 0.1, 100)
    teacher += 1e-3 - (teacher - scratch).mean()
    e = bootstrap.gap_share(scratch + 0.01, scratch, teacher, n_resamples=1000, seed=0)
    assert e["value"] == pytest.approx(10) and e["lo"] is None and e["hi"] is None
    # no resamples: point estimates only; no users: nothing defined
    assert bootstrap.gap_share(scratch + 0.1, scratch, scratch + 0.2, n_resamples=0)["lo"] is None
    empty = np.zeros(0)
    assert bootstrap.gap_share(empty, empty, empty)["value"] is None
    assert bootstrap.summary({"m": empty}, gap=({"m": empty}, {"m": empty}))["gap_share"]["m"]["value"] is None


def test_report_refuses_models_on_other_users():
    U, I, train, test = _random_case(4)
    args = (torch.from_numpy(U), torch.from_numpy(I), *_csr(train, U.shape[0]))
    a = evaluate_split(*args, *_csr(test, U.shape[0]), ks=(5,))
    fewer = {u: t for u, t in test.items() if u > 10}
    b = evaluate_split(*args, *_csr(fewer, U.shape[0]), ks=(5,))
    with pytest.raises(ValueError, match="other users"):
        report(a, other=b)
    res = report(a, other=a, scratch=a, teacher=a, n_resamples=200)
    assert res["gap"]["share"]["ndcg@5"]["value"] is None  # teacher == scratch
    assert set(res["metrics"]) == {f"{m}@5" for m in METRICS}


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, slice_data):
    """Three tiny runs trained on the same slice (in this process: seeds 0 and 1, and a wider 'teacher')."""
    root = tmp_path_factory.mktemp("eval-ci")
    runs = {}
    for name, seed, dim in (("a", 0, 16), ("b", 1, 16), ("t", 2, 32)):
        runs[name] = root / name
        api.train(None, runs[name], progress=False, overrides={
            "data.path": str(slice_data), "data.format": "users_dat", "model.dim": dim, "train.epochs": 2,
            "train.seed": seed, "train.threads": 1, "train.batch_size": 512})
    return runs


def test_cli_compare_and_gap_json(tiny_runs):
    a, b, t = tiny_runs["a"], tiny_runs["b"], tiny_runs["t"]
    p = run_cli("evaluate", a, "--compare", b, "--gap", b, t, "--json", "--bootstrap", 300, "--seed", 3)
    res = json.loads(p.stdout)
    assert res["bootstrap"] == {"resamples": 300, "seed": 3, "level": 0.95}
    plain = api.evaluate(a)
    for key in ("recall@10", "ndcg@20"):
        e = res["metrics"][key]
        assert e["value"] == pytest.approx(plain[key], abs=1e-12) and e["lo"] <= e["value"] <= e["hi"]
    assert set(res["metrics"]) == {f"{m}@{k}" for k in (10, 20) for m in METRICS}
    assert res["users"] == plain["users"]
    diff = res["compare"]["difference"]["ndcg@20"]
    other = api.evaluate(b)["ndcg@20"]
    assert diff["value"] == pytest.approx(plain["ndcg@20"] - other, abs=1e-12)
    assert 0 <= res["cold_items"]["share"] <= 1 and res["warm"]["users"] <= res["users"]
    share = res["gap"]["share"]["ndcg@20"]
    assert set(share) == {"value", "lo", "hi"}
    # a model with itself: a zero difference, and the text form prints value [lo, hi]
    p = run_cli("evaluate", a, "--compare", a, "--bootstrap", 200)
    assert "Traceback" not in p.stderr and "+0.00000 [+0.00000, +0.00000]" in p.stdout
    # without the new options the JSON is what it always was
    assert set(json.loads(run_cli("evaluate", a, "--json").stdout)) == {"recall@10", "ndcg@10", "recall@20",
                                                                         "ndcg@20"}


def test_cli_compare_with_other_ids_is_a_one_line_error(tiny_runs, tmp_path):
    ckpt = load_checkpoint(tiny_runs["b"])
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format_version", "model", "fingerprint")}
    other = tmp_path / "other-ids.safetensors"
    save_checkpoint(other, model=ckpt.build_model(), meta=meta, user_ids=ckpt.user_ids[::-1].copy(),
                    item_ids=ckpt.item_ids, train_indptr=ckpt.train_indptr, train_indices=ckpt.train_indices)
    p = run_cli("evaluate", tiny_runs["a"], "--compare", other, "--json", check=False)
    assert_one_line_error(p, str(other), "ids differ")
    p = run_cli("evaluate", tiny_runs["a"], "--gap", tiny_runs["b"], other, check=False)
    assert_one_line_error(p, "ids differ")


def _slow_quantile(xs, q):
    """numpy's default (linear) quantile, written out: position q * (n - 1) of the sorted values, interpolated."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def test_cli_bootstrap_against_a_slow_reference(tmp_path):
    """`compress evaluate --compare --gap --bootstrap N` against the definitions written out in plain loops: per-user
    NDCG@20 by sorting every item's score, then N resamples of the users (the same draws: seed, users with
    replacement), each model's mean, the difference and the gap share, and percentile intervals. The data is made
    so that a short training already ranks well (users buy within one of 6 item clusters), so the three models
    differ clearly and the gap share has an interval."""
    rng = np.random.default_rng(0)
    lines = []
    for u in range(300):
        cluster = np.arange(30) + 30 * (u % 6)
        items = rng.choice(cluster, size=15, replace=False)
        lines.append(f"{len(items)} " + " ".join(map(str, items)))
    data_file = tmp_path / "users.dat"
    data_file.write_text("\n".join(lines) + "\n")
    runs = {}
    for name, epochs, lr in (("b", 1, 1e-4), ("a", 4, 0.01), ("t", 30, 0.02)):  # scratch, student, teacher
        runs[name] = tmp_path / name
        api.train(None, runs[name], progress=False, overrides={
            "data.path": str(data_file), "data.format": "users_dat", "model.dim": 16, "train.epochs": epochs,
            "train.lr": lr, "train.seed": 0, "train.threads": 1, "train.batch_size": 256})
    a, b, t = runs["a"], runs["b"], runs["t"]
    n_resamples, seed = 150, 4
    res = json.loads(run_cli("evaluate", a, "--compare", b, "--gap", b, t, "--json", "--k", 20,
                             "--bootstrap", n_resamples, "--seed", seed).stdout)
    ckpt = load_checkpoint(a)
    data = api.load_data(from_dict(ckpt.meta["config"]))
    assert (data.user_ids == ckpt.user_ids).all() and (data.item_ids == ckpt.item_ids).all()
    train = {u: data.train.items[data.train.indptr[u]:data.train.indptr[u + 1]].tolist() for u in range(data.num_users)}
    test = {u: data.test.items[data.test.indptr[u]:data.test.indptr[u + 1]].tolist() for u in range(data.num_users)}
    users = [u for u in range(data.num_users) if test[u]]

    def ndcg20(run):
        with torch.no_grad():
            U, I = (x.double().numpy() for x in load_checkpoint(run).build_model().vectors())
        out = []
        for u in users:
            s = U[u] @ I.T
            s[train[u]] = -np.inf
            top = np.argsort(-s, kind="stable")[:20]
            dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(top) if i in set(test[u]))
            out.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(20, len(test[u])))))
        return out

    per = {name: ndcg20(run) for name, run in (("a", a), ("b", b), ("t", t))}
    n = len(users)
    assert res["users"] == n
    draws = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # one chunk at this size
    means = {name: [sum(v[j] for j in row) / n for row in draws] for name, v in per.items()}
    diffs = [x - y for x, y in zip(means["a"], means["b"])]
    expect = {"metrics": means["a"], "difference": diffs}
    got = {"metrics": res["metrics"]["ndcg@20"], "difference": res["compare"]["difference"]["ndcg@20"]}
    gap_den = [tt - s for s, tt in zip(means["b"], means["t"])]
    assert _slow_quantile(gap_den, 0.025) > 0  # the case the test is for: a gap share with an interval
    expect["gap"] = [(x - s) / (tt - s) for x, s, tt in zip(means["a"], means["b"], means["t"])]
    got["gap"] = res["gap"]["share"]["ndcg@20"]
    for key, samples in expect.items():
        assert got[key]["lo"] == pytest.approx(_slow_quantile(samples, 0.025), abs=1e-9), key
        assert got[key]["hi"] == pytest.approx(_slow_quantile(samples, 0.975), abs=1e-9), key
    assert res["metrics"]["ndcg@20"]["value"] == pytest.approx(sum(per["a"]) / n, abs=1e-9)
