"""benchmarks/quality.py: every job it would start is a valid run, and its tables compute what they claim.

The quality runs take hours; a lever with a misspelled key or a table with a wrong gap share would only show
after them, so both are checked here on the job list and on hand-written result files."""

import json
import sys

import pytest

from compressor import api
from compressor.config import ConfigError

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402


def _sets(args):
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_every_job_of_every_suite_and_lever_is_a_valid_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name data relative to the project root
    suites = [*quality.DATA_SUITES, "ablation", "hetero", "once", "user_batches"]
    jobs = quality.build_jobs(suites, [0, 1], tmp_path, "cpu", 1, None, levers=list(quality.LEVERS))
    names = [j["name"] for j in jobs]
    assert len(names) == len(set(names))
    by_name = {j["name"]: j for j in jobs}
    for ds in quality.DATA_SUITES.values():
        for s in (0, 1):
            for m in ("scratch", *quality.KD_METHODS, *(f"rcekd-{lv}" for lv in quality.LEVERS), "rcekd-ub"):
                assert ds.run(m, s) in by_name, ds.run(m, s)
            ub = api.make_config(None, _sets(by_name[ds.run("rcekd-ub", s)]["args"])).distill
            assert ub.kd_users == "user_batches" and ub.index == ("UserClusters" if ds.prefix == "gow" else "Flat")
            # the spec-form runs (RCE-KD, its ablations and levers) stay the spec's whatever the recipes' default
            ablations = ("wo_S", "wo_T", "const_alpha", "uniform_A") if ds.prefix == "cite" else ()
            for name in (ds.run("rcekd", s), *(ds.run("rcekd", s, lv) for lv in quality.LEVERS),
                         *(f"abl-{v}-s{s}" for v in ablations)):
                args = by_name[name]["args"]
                spec = api.make_config(args[args.index("--config") + 1], _sets(args)).distill
                assert spec.kd_users == "every_batch" and spec.index == "Flat", name
    for j in jobs:
        args = j["args"]
        cfg = api.make_config(args[args.index("--config") + 1], _sets(args))  # raises on an unknown key
        assert all(d in by_name for d in j["deps"])
        if "--teacher" in args:
            assert args[args.index("--teacher") + 1] == str(tmp_path / j["deps"][0])
        if "-rcekd-klm2-" in j["name"]:
            recipe = api.make_config(args[args.index("--config") + 1])
            d, r = cfg.distill, recipe.distill
            assert (d.K, d.L, d.M) == (2 * r.K, 2 * r.L, 2 * r.M)
    # a lever's run differs from the recipe's run of the same seed by the lever's overrides alone
    for ds in quality.DATA_SUITES.values():
        base, lever = by_name[ds.run("rcekd", 1)]["args"], by_name[ds.run("rcekd", 1, "tau2")]["args"]
        assert sorted(_sets(lever)) == sorted(["distill.tau=2.0", *_sets(base)]), ds.prefix
    # --lever-seeds: the levers on those seeds only, every method still on every seed
    names = {j["name"] for j in quality.build_jobs(["ml1m"], [0, 1], tmp_path, "cpu", 1, None, levers=["tau2"],
                                                   lever_seeds=[0])}
    assert {"ml1m-rcekd-tau2-s0", "ml1m-rcekd-s1", "ml1m-rrd-s1"} <= names and "ml1m-rcekd-tau2-s1" not in names


def test_a_lever_with_an_unknown_key_fails_before_any_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(quality.LEVERS, "typo", ["distill.tauu=2"])
    jobs = quality.build_jobs(["ml1m"], [0], tmp_path, "cpu", 1, None, levers=["typo"])
    j = next(j for j in jobs if j["name"] == "ml1m-rcekd-typo-s0")
    with pytest.raises(ConfigError, match="distill.tauu"):
        api.make_config(j["args"][j["args"].index("--config") + 1], _sets(j["args"]))


def _result(out, name, test_ndcg20, valid_ndcg10, best_epoch=10):
    (out / name).mkdir(parents=True)
    test = {"recall@10": test_ndcg20 / 2, "ndcg@10": test_ndcg20 * 0.8, "recall@20": test_ndcg20, "ndcg@20": test_ndcg20}
    (out / name / "result.json").write_text(json.dumps(
        {"best_epoch": best_epoch, "epochs_run": best_epoch + 30, "valid": {"ndcg@10": valid_ndcg10},
         "test": test, "wall_time_s": 1.0}))


def test_tables_gap_share_paired_differences_and_lever_validation(tmp_path):
    _result(tmp_path, "ml1m-mf200-teacher", 0.30, 0.20)
    for s, (scratch, ce, rrd, rcekd, lever_valid) in enumerate([(0.20, 0.24, 0.22, 0.26, 0.155),
                                                               (0.22, 0.23, 0.25, 0.28, 0.150)]):
        _result(tmp_path, f"ml1m-scratch-s{s}", scratch, 0.10)
        _result(tmp_path, f"ml1m-ce-s{s}", ce, 0.12)
        _result(tmp_path, f"ml1m-rrd-s{s}", rrd, 0.11)
        _result(tmp_path, f"ml1m-rcekd-s{s}", rcekd, 0.15)
        _result(tmp_path, f"ml1m-rcekd-tau2-s{s}", rcekd, lever_valid)
        _result(tmp_path, f"ml1m-rcekd-ub-s{s}", rcekd - 0.01 * s, 0.15 + 0.001 * s)
    summary = quality.summarise(tmp_path, [0, 1], n_resamples=0)
    rows = {r["run"]: r for r in summary["tables"]["ML-1M MF200 -> MF20"]}
    assert set(rows) == {"teacher MF200", "scratch", "ce", "rrd", "rcekd", "rcekd + tau2",
                         "rcekd, kd_users user_batches"}
    # scratch mean 0.21, teacher 0.30, RCE-KD mean 0.27: (0.27 - 0.21) / (0.30 - 0.21) = 67%
    assert rows["rcekd"]["gap_recovered"] == "67%"
    assert rows["scratch"]["gap_recovered"] == "0%"
    assert rows["rcekd"]["n"] == 2 and rows["rcekd"]["ndcg@20"] == [0.26, 0.28]
    assert rows["rcekd"]["mrr@20"] == []  # MRR@20 comes from the per-user post-step only
    paired = summary["paired"]
    assert paired["ml1m:rcekd_minus_ce"] == pytest.approx([0.02, 0.05])
    assert paired["ml1m:rcekd_minus_rrd"] == pytest.approx([0.04, 0.03])
    assert paired["ml1m:tau2_minus_rcekd"] == pytest.approx([0.005, 0.0])  # a lever is judged on validation
    assert paired["ml1m:user_batches_minus_spec"] == pytest.approx([0.0, -0.01])  # a cheap form against the spec's
    assert paired["ml1m:user_batches_minus_spec_valid"] == pytest.approx([0.0, 0.001])
    assert paired["ml1m:user_batches_minus_ce"] == pytest.approx([0.02, 0.04])
    md = (tmp_path / "summary.md").read_text()
    assert "rcekd + tau2 minus rcekd, valid ndcg@10" in md
    assert "rcekd ahead on 2/2 seeds" in md


def _per_user(per_user, name, level, users):
    import numpy as np

    per_user[name] = {"users": users, **{k: np.full(len(users), level) for k in quality.PER_USER_METRICS}}


def test_a_lever_is_bootstrapped_against_the_recipe_on_its_own_seeds(tmp_path, monkeypatch):
    """tau2 ran on seed 0 only, exclude_seen on seeds 0 and 1: each one's per-user CI table pairs it with the
    recipe on its own seeds, not with the recipe pooled over other seeds (whose seed-to-seed spread the users'
    resampling does not show)."""
    import numpy as np

    _result(tmp_path, "ml1m-mf200-teacher", 0.30, 0.20)
    per_user, users = {}, np.arange(50)
    _per_user(per_user, "ml1m-mf200-teacher", 0.30, users)
    for s in (0, 1):
        for m, level in (("scratch", 0.20), ("ce", 0.24), ("rrd", 0.22), ("rcekd", 0.26 + 0.04 * s),
                         ("rcekd-exclude_seen", 0.27 + 0.04 * s)):
            _result(tmp_path, f"ml1m-{m}-s{s}", level, 0.1)
            _per_user(per_user, f"ml1m-{m}-s{s}", level, users)
    _result(tmp_path, "ml1m-rcekd-tau2-s0", 0.27, 0.2)
    _per_user(per_user, "ml1m-rcekd-tau2-s0", 0.27, users)
    monkeypatch.setattr(quality, "per_user_test", lambda out, names, device="auto": per_user)
    boot = quality.summarise(tmp_path, [0, 1], n_resamples=50)["bootstrap"]
    main = boot["ML-1M MF200 -> MF20"]["runs"]
    assert set(main) == {"scratch", "ce", "rrd", "rcekd"}  # the levers have their own tables
    assert main["rcekd"]["metrics"]["ndcg@20"]["value"] == pytest.approx(0.28)  # seeds 0 and 1 pooled
    tau2 = boot["ML-1M MF200 -> MF20, rcekd + tau2 against the recipe on the same seeds"]["runs"]
    assert tau2["rcekd, seeds 0"]["metrics"]["ndcg@20"]["value"] == pytest.approx(0.26)
    assert tau2["rcekd + tau2"]["difference"]["rcekd, seeds 0"]["ndcg@20"]["value"] == pytest.approx(0.01)
    excl = boot["ML-1M MF200 -> MF20, rcekd + exclude_seen against the recipe on the same seeds"]["runs"]
    assert excl["rcekd + exclude_seen"]["difference"]["rcekd, seeds 0 1"]["ndcg@20"]["value"] == pytest.approx(0.01)


def test_the_ablation_compares_its_variants_on_the_seeds_all_of_them_finished(tmp_path, monkeypatch):
    import numpy as np

    _result(tmp_path, "cite-mf400-teacher", 0.02, 0.05)
    per_user, users = {}, np.arange(40)
    _per_user(per_user, "cite-mf400-teacher", 0.02, users)
    for s in (0, 1, 2):
        for name, level in ((f"cite-scratch-s{s}", 0.010), (f"cite-rcekd-s{s}", 0.015 + 0.001 * s),
                            (f"abl-uniform_A-s{s}", 0.014 + 0.001 * s)):
            _result(tmp_path, name, level, 0.04)
            _per_user(per_user, name, level, users)
    for s in (0, 1):  # const_alpha did not finish seed 2
        _result(tmp_path, f"abl-const_alpha-s{s}", 0.013, 0.04)
        _per_user(per_user, f"abl-const_alpha-s{s}", 0.013, users)
    monkeypatch.setattr(quality, "per_user_test", lambda out, names, device="auto": per_user)
    summary = quality.summarise(tmp_path, [0, 1, 2], n_resamples=50)
    (title,) = [t for t in summary["bootstrap"] if t.startswith("Ablation")]
    assert "seeds 0 1)" in title
    runs = summary["bootstrap"][title]["runs"]
    assert set(runs) == {"full", "uniform_A", "const_alpha"}  # the variants that never ran are left out
    assert runs["full"]["metrics"]["ndcg@20"]["value"] == pytest.approx(0.0155)  # seeds 0 and 1, not 2
    assert runs["uniform_A"]["difference"]["full"]["ndcg@20"]["value"] == pytest.approx(-0.001)
