import json

import numpy as np
import pytest
import torch

from compressor import api, kd_retrieval, kd_terms, pair_products
from compressor.checkpoint import load_checkpoint
from compressor.config import ConfigError
from compressor.distill import ensemble, load_teacher, load_teachers, score_spread
from compressor.evaluation import evaluate
from compressor.pair_products import pair_dot
from compressor.losses import rcekd_loss_on_sets, rcekd_sets, rowwise_isin, teacher_pair_scores
from compressor.models import build_model
from compressor.retrieval import TopKSearcher
from compressor.objectives import METHOD_NAMES, SetupContext, bpr_base_loss, build_objective
from compressor.trainer import Trainer

from .conftest import SMALL_KD, TINY_TRAIN, run_cli, run_history


def test_rcekd_end_to_end_improves_over_first_epoch_and_logs_diagnostics(teacher, slice_data, tmp_path):
    out = tmp_path / "rcekd"
    run_cli("distill", "--teacher", teacher, "--out", out, "--config", "configs/citeulike/mf-rcekd.yaml",
            "--set", f"data.path={slice_data}", "--epochs", 6, "--set", "train.lr=0.005", *SMALL_KD, *TINY_TRAIN)
    hist = run_history(out)
    assert max(h["valid_ndcg@10"] for h in hist) > hist[0]["valid_ndcg@10"]
    for key in ("loss_base", "loss_kd", "kd_loss_s", "kd_loss_t", "kd_alpha", "diag_topk_overlap",
                "time_retrieval_s", "time_epoch_s"):
        assert key in hist[0], key
    assert 0 < hist[-1]["kd_alpha"] <= 1
    ck = load_checkpoint(out)
    assert ck.meta["teacher"]["fingerprint"] == load_checkpoint(teacher).fingerprint
    assert ck.meta["method"] == "rcekd" and ck.meta["model"]["dim"] == 8
    # the teacher's top-K was cached beside the run and is reused by the next run
    (cache,) = list((tmp_path / ".topk-cache").glob("topk-*.npy"))
    written = cache.stat().st_mtime_ns
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "again", "--config",
            "configs/citeulike/mf-rcekd.yaml", "--set", f"data.path={slice_data}", "--epochs", 1, *SMALL_KD,
            *TINY_TRAIN)
    assert list((tmp_path / ".topk-cache").glob("topk-*.npy")) == [cache]
    assert cache.stat().st_mtime_ns == written, "the cached teacher top-K was computed again"


@pytest.mark.parametrize("method,extra", [("ce", []), ("ce", ["--set", "distill.ce_target=teacher"]),
                                          ("rrd", []), ("scratch", []),
                                          ("rrd", ["--set", "distill.rrd.distinct_uninteresting=true",
                                                   "--set", "distill.exclude_seen=true"]),
                                          ("rcekd", ["--set", "distill.use_loss_s=false"]),
                                          ("rcekd", ["--set", "distill.constant_alpha=0.5"]),
                                          ("rcekd", ["--set", "distill.kd_users=once_per_epoch"]),
                                          ("rcekd", ["--set", "distill.kd_users=user_batches",
                                                     "--set", "distill.kd_batch_users=64"]),
                                          ("rcekd", ["--set", "distill.index=IVF8,Flat",
                                                     "--set", "distill.index_params={nprobe: 8}"])])
def test_every_method_runs_on_the_same_trainer(teacher, slice_data, tmp_path, method, extra):
    out = tmp_path / method
    run_cli("distill", "--teacher", teacher, "--method", method, "--out", out, "--set", f"data.path={slice_data}",
            "--epochs", 2, *SMALL_KD, *extra, *TINY_TRAIN)
    hist = run_history(out)
    assert len(hist) == 2 and load_checkpoint(out).meta["method"] == method
    if "IVF8,Flat" in extra:
        assert hist[0]["diag_retrieval_recall"] >= 0.95  # nprobe = nlist: the IVF search is exhaustive
        # the second epoch's refresh kept the first one's quantizer (its recall held)
        assert [h["diag_retrieval_reused_quantizer"] for h in hist] == [0.0, 1.0]
        assert hist[1]["diag_retrieval_recall"] >= 0.95


def _ivf_retrieval(teacher, slice_data, tmp_path, lists_of: int, nprobe: int):
    data = api.load_data(api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat"]))
    index = f"IVF{data.num_items // lists_of},Flat"
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8",
                                 "distill.method=rcekd", "distill.K=10", "distill.M=30", "distill.L=10",
                                 f"distill.index={index}", f"distill.index_params={{nprobe: {nprobe}}}"])
    retrieval = build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / "r").term.retrieval
    return data, index, retrieval


def test_an_approximate_refresh_is_held_to_the_recall_floor(teacher, slice_data, tmp_path):
    """Below REUSE_RECALL_FLOOR the refresh doubles nprobe until the recall holds, and later refreshes start
    there; a kept quantizer whose recall fell is trained afresh first. (A fresh Gowalla student's IVF256 nprobe
    8 recall fell to 0.59 in 25 RCE-KD epochs, and the student lost validation NDCG.)"""
    data, index, retrieval = _ivf_retrieval(teacher, slice_data, tmp_path, lists_of=10, nprobe=1)
    torch.manual_seed(0)
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    ids, diag = retrieval.student_topm(model, 30)
    assert diag["retrieval_recall_first"] < 0.95 <= diag["retrieval_recall"]
    assert diag["retrieval_nprobe"] >= 2 and (ids >= 0).all()
    # the same vectors: the kept quantizer from the raised nprobe (not halved: the first try was below the floor)
    again = retrieval.student_topm(model, 30)[1]
    assert again["retrieval_reused_quantizer"] == 1.0 and again["retrieval_nprobe"] == diag["retrieval_nprobe"]
    assert again["retrieval_recall_first"] >= 0.95
    with torch.no_grad():  # vectors the kept quantizer was not trained on: it is retrained in the same refresh
        model.item_emb.weight.copy_(torch.randn_like(model.item_emb.weight) * 3 + 1)
    moved = retrieval.student_topm(model, 30)[1]
    assert moved["retrieval_recall_first"] < 0.95 and moved.get("retrieval_retrained") == 1.0
    assert moved["retrieval_recall"] >= 0.95


def test_a_resumed_run_with_an_approximate_refresh_repeats_the_uninterrupted_one(teacher, slice_data, tmp_path):
    """The refresh carries state between epochs (the kept IVF quantizer, the nprobe the recall floor raised): it is
    saved with the resume checkpoint, so 2 epochs + --resume to 5 ends on the same weights and the same refresh
    diagnostics as 5 epochs in one go (a resumed run used to retrain k-means and restart at the configured
    nprobe)."""
    ivf = ["--set", "distill.index=IVF24,Flat", "--set", "distill.index_params={nprobe: 1}"]
    args = ["--set", f"data.path={slice_data}", *SMALL_KD, *ivf, *TINY_TRAIN]
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "whole", "--epochs", 5, *args)
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "cut", "--epochs", 2, *args)
    state = load_checkpoint(tmp_path / "cut" / "last.safetensors", with_training_state=True)
    assert state.meta["objective_state"]["retrieval"]["trained"]["factory"] == "IVF24,Flat"
    assert state.run_state["retrieval.ivf_trained"].dtype == torch.uint8
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "cut", "--epochs", 5, "--resume", *args)
    whole, cut = run_history(tmp_path / "whole"), run_history(tmp_path / "cut")
    assert [h["diag_retrieval_nprobe"] for h in whole] != [1.0] * 5  # the floor raised nprobe: state to carry
    assert whole[2]["diag_retrieval_reused_quantizer"] == 1.0  # epoch 3 starts from epoch 2's quantizer
    keys = [k for k in whole[0] if k.startswith(("diag_", "valid_", "loss"))]
    assert [[h[k] for k in keys] for h in cut] == [[h[k] for k in keys] for h in whole]
    assert (load_checkpoint(tmp_path / "cut" / "last.safetensors").fingerprint
            == load_checkpoint(tmp_path / "whole" / "last.safetensors").fingerprint)


def test_the_exact_refresh_on_the_cpu_gives_indexflatip_answer_with_torch(teacher, slice_data, tmp_path,
                                                                           monkeypatch):
    """`distill.index: Flat` on the CPU ranks with torch (blocked matmul + introselect, 1.2-2x faster than
    IndexFlatIP at the recipes' sizes): the same top-M as IndexFlatIP, score for score, and FAISS is not asked."""
    data = api.load_data(api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat"]))
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8",
                                 "distill.method=rcekd", "distill.K=10", "distill.M=30", "distill.L=10"])
    retrieval = build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / "r").term.retrieval
    torch.manual_seed(0)
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    u, i = (w.detach().numpy() for w in model.vectors())
    want_scores, want_ids = TopKSearcher(i, "Flat").search(u, 30)

    def no_faiss(*args, **kwargs):
        raise AssertionError("the exact refresh built a FAISS index")

    monkeypatch.setattr(kd_retrieval, "TopKSearcher", no_faiss)
    ids, diag = retrieval.student_topm(model, 30)
    ids = ids.numpy()
    assert ids.shape == (data.num_users, 30) and set(diag) == {"time_retrieval_s"}
    got_scores = np.einsum("ud,ukd->uk", u, i[ids])
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)  # best first, the same values
    assert (ids == want_ids).mean() > 0.99  # the ids themselves, up to the order of (near-)exact ties
    assert all(len(set(row)) == 30 for row in ids)


def test_a_resumed_user_batches_run_repeats_the_uninterrupted_one(teacher, slice_data, tmp_path):
    """kd_users user_batches draws its KD batches from each epoch's generator: 2 epochs + --resume to 4 end on the
    weights and the history of 4 epochs in one go."""
    args = ["--set", f"data.path={slice_data}", *SMALL_KD, "--set", "distill.kd_users=user_batches",
            "--set", "distill.kd_batch_users=50", *TINY_TRAIN]
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "whole", "--epochs", 4, *args)
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "cut", "--epochs", 2, *args)
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "cut", "--epochs", 4, "--resume", *args)
    whole, cut = run_history(tmp_path / "whole"), run_history(tmp_path / "cut")
    keys = [k for k in whole[0] if k.startswith(("diag_", "valid_", "loss", "kd_"))]
    assert whole[0]["loss_kd"] > 0 and [[h[k] for k in keys] for h in cut] == [[h[k] for k in keys] for h in whole]
    assert (load_checkpoint(tmp_path / "cut" / "last.safetensors").fingerprint
            == load_checkpoint(tmp_path / "whole" / "last.safetensors").fingerprint)


def test_users_an_approximate_index_leaves_short_get_the_exact_top_m(teacher, slice_data, tmp_path, monkeypatch):
    """IVF with many small lists and nprobe 1 finds fewer than M items for many users (a young student's lists
    are uneven: Gowalla's cheap form crashed at epoch 7 on it): those users' lists come from the exact search,
    the others keep the IVF's. (The recall floor off, so that nprobe stays 1.)"""
    monkeypatch.setattr(kd_retrieval, "REUSE_RECALL_FLOOR", 0.0)
    # lists of ~30 items, one probed: some short of M = 30
    data, index, retrieval = _ivf_retrieval(teacher, slice_data, tmp_path, lists_of=30, nprobe=1)
    torch.manual_seed(0)
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    ids, diag = retrieval.student_topm(model, 30)
    u, i = (w.detach().numpy() for w in model.vectors())
    approx = TopKSearcher(i, index, params={"nprobe": 1}).search(u, 30)[1]
    exact = TopKSearcher(i, "Flat").search(u, 30)[1]
    short = (approx < 0).any(axis=1)
    assert 10 < short.sum() < len(short) - 10 and diag["retrieval_short_users"] == short.sum()
    assert (ids.numpy() >= 0).all()
    assert (ids.numpy()[short] == exact[short]).all()
    assert (ids.numpy()[~short] == approx[~short]).all()


def _npz(path, ck, **override):
    with torch.no_grad():
        u, i = ck.build_model().vectors()
    arrays = {"user_vectors": u.detach().numpy(), "item_vectors": i.detach().numpy(), "user_ids": ck.user_ids,
              "item_ids": ck.item_ids}
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_npz_teacher_from_another_system(teacher, slice_data, tmp_path):
    ck = load_checkpoint(teacher)
    perm = np.random.default_rng(0).permutation(len(ck.user_ids))  # rows in another order: aligned by id
    with_perm = _npz(tmp_path / "t.npz", ck)
    z = dict(np.load(with_perm))
    np.savez(tmp_path / "perm.npz", user_vectors=z["user_vectors"][perm], item_vectors=z["item_vectors"],
             user_ids=z["user_ids"][perm], item_ids=z["item_ids"])
    for src in (with_perm, tmp_path / "perm.npz"):
        run_cli("distill", "--teacher", src, "--out", tmp_path / src.stem, "--set", f"data.path={slice_data}",
                "--epochs", 1, *SMALL_KD, *TINY_TRAIN)
    a = np.load(next((tmp_path / ".topk-cache").glob("*.npy")))
    assert len(list((tmp_path / ".topk-cache").glob("*.npy"))) == 2  # two fingerprints
    b = [np.load(p) for p in (tmp_path / ".topk-cache").glob("*.npy")]
    assert (b[0] == b[1]).all() and (a == b[0]).all()  # same teacher, same top-K, whatever the row order


def test_teacher_data_mismatch_is_a_clear_error_before_training(teacher, slice_data, tmp_path):
    ck = load_checkpoint(teacher)
    cases = {
        "fewer.npz": dict(user_ids=ck.user_ids[:-1]),
        "unknown.npz": dict(user_ids=np.array([f"x{i}" for i in range(len(ck.user_ids))])),
    }
    for name, override in cases.items():
        src = _npz(tmp_path / name, ck, **override)
        if name == "fewer.npz":
            z = dict(np.load(src))
            np.savez(src, **(z | {"user_vectors": z["user_vectors"][:-1]}))
        p = run_cli("distill", "--teacher", src, "--out", tmp_path / f"run-{name}", "--set", f"data.path={slice_data}",
                    "--epochs", 1, *SMALL_KD, *TINY_TRAIN, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert str(src) in p.stderr
        assert not (tmp_path / f"run-{name}" / "metrics.jsonl").exists()
    shapes = _npz(tmp_path / "shapes.npz", ck, item_vectors=np.zeros((len(ck.item_ids), 3), np.float32))
    p = run_cli("distill", "--teacher", shapes, "--out", tmp_path / "s", "--set", f"data.path={slice_data}",
                *SMALL_KD, *TINY_TRAIN, check=False)
    assert p.returncode == 1 and "same dimension" in p.stderr
    p = run_cli("distill", "--out", tmp_path / "nt", "--set", f"data.path={slice_data}", *TINY_TRAIN, check=False)
    assert p.returncode == 1 and "needs --teacher" in p.stderr


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory, slice_data):
    """Another teacher on the same data, on another scale (dim 32, init std 0.5, more lr)."""
    out = tmp_path_factory.mktemp("kd2") / "teacher2"
    run_cli("train", "--out", out, "--set", f"data.path={slice_data}", "--set", "model.dim=32", "--set",
            "model.init_std=0.5", "--epochs", 4, "--set", "train.lr=0.02", *TINY_TRAIN)
    return out


def test_ensemble_teacher_scores_are_the_weighted_sum_of_its_members(teacher, second_teacher, slice_data):
    data = api.load_data(api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat"]))
    a, b = load_teacher(teacher, data), load_teacher(second_teacher, data)
    rng = np.random.default_rng(1)
    u, i = rng.integers(0, data.num_users, 500), rng.integers(0, data.num_items, 500)

    def scores(t):
        return np.einsum("nd,nd->n", t.user_vectors[u].astype(np.float64), t.item_vectors[i].astype(np.float64))

    e = load_teachers([teacher, second_teacher], data, [0.25, 2.0])
    np.testing.assert_allclose(scores(e), 0.25 * scores(a) + 2.0 * scores(b), rtol=1e-5, atol=1e-6)
    assert e.user_vectors.shape[1] == e.item_vectors.shape[1] == a.user_vectors.shape[1] + b.user_vectors.shape[1]
    # default weights: each member brought to the first one's spread, then averaged
    sa, sb = score_spread(a), score_spread(b)
    assert sb > 2 * sa  # the case the rescaling is for: members on very different scales
    d = load_teachers([teacher, second_teacher], data)
    w = [m["weight"] for m in d.info["members"]]
    assert w[1] / w[0] == pytest.approx(sa / sb)  # both on the first one's spread, averaged ...
    np.testing.assert_allclose(scores(d), w[0] * scores(a) + w[1] * scores(b), rtol=1e-5, atol=1e-6)
    assert score_spread(d) == pytest.approx(sa, rel=1e-4)  # ... and the average scaled back to that spread
    assert [m["weight"] for m in ensemble([a, a], data).info["members"]] == pytest.approx([0.5, 0.5])  # equals
    # its metrics are the ensemble's own full-ranking evaluation; its fingerprint names members and weights
    ev = evaluate(torch.from_numpy(d.user_vectors), torch.from_numpy(d.item_vectors), data.train.indptr,
                  data.train.items, data.test.indptr, data.test.items)
    assert d.info["metrics"]["test"]["ndcg@20"] == pytest.approx(ev["ndcg@20"])
    assert len({d.fingerprint, e.fingerprint, a.fingerprint, b.fingerprint}) == 4
    assert load_teachers(teacher, data).fingerprint == a.fingerprint  # one teacher: itself, unchanged


def test_distill_from_two_teachers_records_both(teacher, second_teacher, slice_data, tmp_path):
    out = tmp_path / "two"
    run_cli("distill", "--teacher", teacher, "--teacher", second_teacher, "--out", out, "--set",
            f"data.path={slice_data}", "--epochs", 2, *SMALL_KD, *TINY_TRAIN)
    meta = load_checkpoint(out).meta["teacher"]
    assert meta["kind"] == "ensemble" and meta["source"] == f"{teacher} + {second_teacher}"
    assert [m["fingerprint"] for m in meta["members"]] == [load_checkpoint(teacher).fingerprint,
                                                           load_checkpoint(second_teacher).fingerprint]
    assert "ndcg@20" in meta["metrics"]["test"]
    # a weight count that does not match the teachers: one line, nothing written
    p = run_cli("distill", "--teacher", teacher, "--teacher", second_teacher, "--out", tmp_path / "bad", "--set",
                f"data.path={slice_data}", "--set", "distill.teacher_weights=[1.0]", "--epochs", 1, *SMALL_KD,
                *TINY_TRAIN, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "distill.teacher_weights has 1 weight(s) for 2 teacher(s)" in p.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    for bad in ("[0, 0]", "[1, -1]", "[a, 1]"):  # weights that are no ensemble: refused by the config itself
        with pytest.raises(ConfigError, match="'distill.teacher_weights' must be non-negative numbers, not all 0"):
            api.make_config(None, [f"distill.teacher_weights={bad}"])


def test_tau_annealed_to_one_by_epoch(teacher, slice_data, tmp_path):
    assert [kd_terms.annealed_tau(3.0, 4, e) for e in (1, 2, 3, 5, 9)] == [3.0, 2.5, 2.0, 1.0, 1.0]
    assert [kd_terms.annealed_tau(0.5, 2, e) for e in (1, 2, 3)] == [0.5, 0.75, 1.0]  # from below too
    assert kd_terms.annealed_tau(2.0, 0, 50) == 2.0  # the spec's: tau throughout
    out = tmp_path / "anneal"
    run_cli("distill", "--teacher", teacher, "--out", out, "--set", f"data.path={slice_data}", "--set",
            "distill.tau=2.0", "--set", "distill.tau_anneal_epochs=2", "--epochs", 4, *SMALL_KD, *TINY_TRAIN)
    assert [h["diag_kd_tau"] for h in run_history(out)] == [2.0, 1.5, 1.0, 1.0]
    # the loss of an epoch uses that epoch's tau: the term's weighting follows the epoch
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8", "distill.K=10",
                                 "distill.M=30", "distill.L=10", "distill.tau=2.0", "distill.tau_anneal_epochs=2"])
    data = api.load_data(cfg)
    obj = build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / "run")
    obj.setup(SetupContext(data))
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    for epoch, tau in ((2, 1.5), (1, 2.0)):
        obj.on_epoch_start(model, epoch, np.random.default_rng(0), torch.Generator().manual_seed(0))
        assert obj.term.weighting["tau"] == tau


@pytest.mark.parametrize("M", [30, 20])  # M > K + L: [QS | A] scored; M <= K + L: P scored once, QS and A gathered
def test_rcekd_teacher_scores_of_the_epoch_sets_are_exact(teacher, slice_data, tmp_path, M, monkeypatch):
    """The epoch's teacher scores (QT part cached at setup, the moving part scored per epoch, reusing last epoch's
    scores of pairs still listed) equal the teacher's inner products over every column of the [QS | A | QT] sets,
    bit for bit with a fresh scoring of the same pairs."""
    monkeypatch.setattr(kd_terms, "SETS_BLOCK", 7)  # the epoch's set state is built in several user blocks
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8",
                                 "distill.method=rcekd", "distill.K=10", f"distill.M={M}", "distill.L=10"])
    data = api.load_data(cfg)
    t = load_teacher(teacher, data)
    obj = build_objective(cfg, t, torch.device("cpu"), tmp_path / "run")
    obj.setup(SetupContext(data))
    term = obj.term
    torch.manual_seed(0)
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    t_user, t_item = torch.from_numpy(t.user_vectors), torch.from_numpy(t.item_vectors)
    for epoch in (1, 2, 3):
        obj.on_epoch_start(model, epoch, np.random.default_rng(epoch), torch.Generator().manual_seed(epoch))
        users = torch.arange(data.num_users)
        sets, t_scores = term.batch_sets(users)
        want = teacher_pair_scores(t_user, t_item, sets.items)
        assert t_scores.shape == sets.items.shape == (data.num_users, 10 + 10 + 10)
        torch.testing.assert_close(t_scores, want)
        assert torch.equal(t_scores, term.retrieval.teacher_scores(sets.items))  # same bits, no reuse
        assert torch.equal(sets.items[:, -10:], term.qt.long())
        p = term.retrieval.student_topm(model, M)[0]  # QS is the student's top-K, A distinct columns of its top-M
        assert torch.equal(sets.items[:, :10], p[:, :10])
        a = sets.items[:, 10:20]
        assert rowwise_isin(a, p).all() and all(len(set(r.tolist())) == 10 for r in a)
        qs_a_qt = (sets.items[:, :10], sets.items[:, 10:20], sets.items[:, 20:])
        want_sets = rcekd_sets(qs_a_qt[2], qs_a_qt[0], qs_a_qt[1])  # the masks from set tests, not positions
        assert torch.equal(sets.mask_t, want_sets.mask_t) and torch.equal(sets.overlap_count, want_sets.overlap_count)
        assert sets.overlap_count.any() and not sets.mask_t.all()
        rows = torch.tensor([3, 0, 3])  # a batch's rows are the same rows
        assert torch.equal(term.batch_sets(rows)[0].items, sets.items[rows])
        # the term scores [lists | QT] once and reads QS and A from it: the loss over the [QS | A | QT] sets, and
        # its gradients, as scoring every column of them
        grads = []
        for loss_of in (lambda uv, iv: term.loss(uv, iv, users)[0],
                        lambda uv, iv: rcekd_loss_on_sets(uv, iv, sets, t_scores, **term.weighting)[0]):
            uv, iv = (w.detach().clone().double().requires_grad_() for w in model.vectors())
            loss_of(uv, iv).backward()
            grads.append((loss_of(uv, iv).detach(), uv.grad, iv.grad))
        for got, ref in zip(*grads):
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        with torch.no_grad():  # the student moves, so the next epoch's lists differ from this one's
            model.user_emb.weight.add_(torch.randn_like(model.user_emb.weight) * 0.05)


def test_teacher_scores_reuse_the_scores_of_pairs_listed_before(teacher, slice_data, tmp_path):
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "distill.method=ce"])
    data = api.load_data(cfg)
    retrieval = build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / "r").term.retrieval
    gen = torch.Generator().manual_seed(1)
    items = torch.stack([torch.randperm(data.num_items, generator=gen)[:12] for _ in range(data.num_users)])
    fresh = retrieval.teacher_scores(items)
    old_items = torch.cat([items[:, 4:].flip(1), torch.randint(0, data.num_items, (data.num_users, 3))], dim=1)
    marked = torch.full(old_items.shape, 42.0)  # a reused score is recognisable
    got = retrieval.teacher_scores(items, previous=(old_items, marked))
    listed = (items[:, :, None] == old_items[:, None, :]).any(dim=2)
    assert listed[:, 4:].all() and (got[listed] == 42.0).all()
    assert torch.equal(got[~listed], fresh[~listed])


def test_pair_dot_scores_each_pair_from_its_own_rows_only(monkeypatch):
    """The CPU path (one sampled product over a sparse pattern) equals the row-wise reference, and a pair's score
    is the same bits whatever is scored beside it, in any chunking and at 1 or 2 threads: reused teacher scores
    equal fresh ones, also where a user has more pairs than there are items. Out-of-range ids and unsorted users
    are refused; a bf16 teacher takes the gathering path."""
    gen = torch.Generator().manual_seed(0)
    tu, ti = torch.randn(40, 33, generator=gen), torch.randn(25, 33, generator=gen)
    users = torch.sort(torch.randint(0, 40, (3000,), generator=gen)).values
    items = torch.randint(0, 25, (3000,), generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        got = pair_dot(tu, ti, users, items)
        torch.set_num_threads(2)
        assert torch.equal(pair_dot(tu, ti, users, items), got)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, (tu[users] * ti[items]).sum(1))
    assert torch.equal(pair_dot(tu, ti, users.int(), items.int()), got)  # int32 ids, as the epoch state keeps them
    some = torch.sort(torch.randperm(3000, generator=gen)[:300]).values
    assert torch.equal(pair_dot(tu, ti, users[some], items[some]), got[some])
    monkeypatch.setattr(pair_products, "PAIR_DOT_ELEMS", 33 * 7)  # chunks of 7 pairs, rows split across chunks
    assert torch.equal(pair_dot(tu, ti, users, items), got)
    with pytest.raises(IndexError, match=r"\[0, 25\)"):
        pair_dot(tu, ti, users[:3], torch.tensor([0, 25, 1]))
    with pytest.raises(ValueError, match="ascending"):
        pair_dot(tu, ti, users.flip(0), items)
    assert int(torch.unique_consecutive(users, return_counts=True)[1].max()) > 25  # users with more pairs than items
    half = pair_dot(tu.bfloat16(), ti.bfloat16(), users[:50], items[:50])
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), got[:50], rtol=0.05, atol=0.2)
    assert pair_dot(tu, ti, users[:0], items[:0]).shape == (0,)


@pytest.mark.parametrize("method", ["rcekd", "ce", "rrd"])
def test_once_per_epoch_distills_each_user_exactly_once_per_epoch(teacher, slice_data, tmp_path, method):
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8",
                                 f"distill.method={method}", "distill.K=10", "distill.M=30", "distill.L=10",
                                 "distill.rrd.top_m=40", "distill.rrd.interesting=10",
                                 "distill.rrd.uninteresting=20", "distill.kd_users=once_per_epoch"])
    data = api.load_data(cfg)
    obj = build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / "run")
    obj.setup(SetupContext(data))  # RRD reads the training positives from the run's data
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    users = torch.as_tensor(data.train.users)
    items = torch.as_tensor(data.train.items)
    for epoch in (1, 2):
        obj.on_epoch_start(model, epoch, np.random.default_rng(epoch), torch.Generator().manual_seed(epoch))
        order = torch.randperm(len(users), generator=torch.Generator().manual_seed(epoch))
        distilled = []
        for b in range(0, len(order), 512):
            sl = order[b:b + 512]
            distilled.append(obj.kd_users.select(users[sl]))
            loss, parts = obj.batch_loss(model, users[sl], items[sl], items[sl])
            assert torch.isfinite(loss), (epoch, b)
        every = torch.cat(distilled)
        # each training user exactly once per epoch, in the first batch that holds it; the next epoch starts over
        assert sorted(every.tolist()) == sorted(torch.unique(users).tolist())
        first = {}
        for b in range(0, len(order), 512):
            for u in users[order[b:b + 512]].tolist():
                first.setdefault(u, b)
        assert [first[u] for u in distilled[0].tolist()] == [0] * len(distilled[0])
    # the last batches have few or no users left: a batch without KD users is the BPR loss alone, its KD parts
    # absent (not NaN)
    loss, parts = obj.batch_loss(model, users[:4], items[:4], items[:4])
    assert torch.equal(loss, bpr_base_loss(model, users[:4], items[:4], items[:4])[0])
    assert parts["loss_kd"] == 0 and not any(k.startswith("kd_") for k in parts)


@pytest.mark.parametrize("batch_users,bpr_batch", [(100, 512), (7, 2048)])
def test_user_batches_distill_each_user_once_per_epoch_in_batches_of_their_own(teacher, slice_data, tmp_path,
                                                                             batch_users, bpr_batch):
    """kd_users user_batches: every user with training interactions exactly once per epoch, in shuffled batches of
    at most kd_batch_users, one per BPR batch from the epoch's first (the rest at its last when there are more KD
    batches than BPR batches), another shuffle each epoch, and the term's own draws as in the other modes."""
    def objective(mode):
        cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8",
                                     "distill.K=10", "distill.M=30", "distill.L=10", f"distill.kd_users={mode}",
                                     *([f"distill.kd_batch_users={batch_users}"] if mode == "user_batches" else [])])
        data = api.load_data(cfg)
        obj = build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / mode)
        obj.setup(SetupContext(data))
        return obj, data

    obj, data = objective("user_batches")
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    users, items = torch.as_tensor(data.train.users), torch.as_tensor(data.train.items)
    trained = sorted(torch.unique(users).tolist())
    n_kd = -(-len(trained) // batch_users)
    orders = []
    for epoch in (1, 2):
        obj.on_epoch_start(model, epoch, np.random.default_rng(epoch), torch.Generator().manual_seed(epoch))
        picked = []
        for b in range(0, len(users), bpr_batch):
            sl = slice(b, b + bpr_batch)
            picked.append(obj.kd_users.select(users[sl]))
        assert sorted(torch.cat(picked).tolist()) == trained  # each once
        assert all(torch.equal(p, p.sort().values) for p in picked)
        with_kd = [i for i, p in enumerate(picked) if len(p)]
        if n_kd < len(picked):  # one KD batch in each of the epoch's first n_kd BPR batches
            assert with_kd == list(range(n_kd)) and max(len(p) for p in picked) <= batch_users
        else:  # more KD batches than BPR batches: one in each, the rest in the last
            assert with_kd == list(range(len(picked)))
            assert all(len(p) <= batch_users for p in picked[:-1]) and len(picked[-1]) > batch_users
        orders.append(torch.cat(picked))
    assert not torch.equal(orders[0], orders[1])
    # the shuffle comes from the epoch's generator alone: the same seed, the same batches
    again, _ = objective("user_batches")
    again.on_epoch_start(model, 1, np.random.default_rng(1), torch.Generator().manual_seed(1))
    torch.manual_seed(12345)  # (the global stream moved: it must not matter)
    assert torch.equal(torch.cat([again.kd_users.select(users[b:b + bpr_batch])
                                  for b in range(0, len(users), bpr_batch)]), orders[0])
    # a batch's loss with its KD users is finite; the term drew its sets as once_per_epoch's does
    obj.on_epoch_start(model, 3, np.random.default_rng(3), torch.Generator().manual_seed(3))
    loss, parts = obj.batch_loss(model, users[:bpr_batch], items[:bpr_batch], items[:bpr_batch])
    assert torch.isfinite(loss) and parts["loss_kd"] > 0
    once, _ = objective("once_per_epoch")
    once.on_epoch_start(model, 3, np.random.default_rng(3), torch.Generator().manual_seed(3))
    assert torch.equal(once.term.a_cols, obj.term.a_cols) and torch.equal(once.term.lists, obj.term.lists)


def _attributes(obj) -> dict:
    """Attribute names of an objective and of the parts it is assembled from."""
    parts = {"objective": obj, "term": getattr(obj, "term", None), "kd_users": getattr(obj, "kd_users", None)}
    parts["retrieval"] = getattr(parts["term"], "retrieval", None)
    return {k: sorted(vars(v)) for k, v in parts.items() if v is not None}


@pytest.mark.parametrize("method,extra", [(m, []) for m in METHOD_NAMES] + [("ce", ["distill.ce_target=teacher"]),
                                                                            ("rcekd", ["train.optimizer=lazy_adam"]),
                                                                            ("rcekd", ["distill.kd_users=user_batches"])])
def test_objectives_create_all_their_state_in_the_constructor(teacher, slice_data, tmp_path, method, extra):
    """No hook adds an attribute, and the trainer sets none on the objective (it hands the sparse-gradient choice
    to setup); every registered method runs its hooks."""
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8",
                                 f"distill.method={method}", "distill.K=10", "distill.M=30", "distill.L=10",
                                 "distill.rrd.top_m=40", "distill.rrd.interesting=10",
                                 "distill.rrd.uninteresting=20", "train.epochs=1", "train.threads=1", *extra])
    data = api.load_data(cfg)
    obj = build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / "run")
    assert obj.name == method
    before = _attributes(obj)
    trainer = Trainer(cfg, data, obj, tmp_path / "run", torch.device("cpu"), progress=False)
    assert _attributes(obj) == before
    assert trainer.sparse_grads == ("train.optimizer=lazy_adam" in extra)
    trainer.fit()
    assert _attributes(obj) == before
    assert obj.sparse_grads == trainer.sparse_grads
    assert load_checkpoint(tmp_path / "run").meta["method"] == method


@pytest.mark.parametrize("method", ["rcekd", "ce", "rrd"])
def test_kd_terms_hand_a_row_sparse_optimizer_sparse_gradients_of_the_same_loss(teacher, slice_data, tmp_path, method):
    """With train.optimizer sparse_adam the KD term gathers the rows it reads as row-sparse gradients: the same loss
    and the same gradient as the dense gather, so the optimizer updates the rows the batch read, not every row."""
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8",
                                 f"distill.method={method}", "distill.K=10", "distill.M=30", "distill.L=10",
                                 "distill.rrd.top_m=40", "distill.rrd.interesting=10",
                                 "distill.rrd.uninteresting=20"])
    data = api.load_data(cfg)
    t = load_teacher(teacher, data)
    torch.manual_seed(0)
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    users, pos = torch.as_tensor(data.train.users[:64]), torch.as_tensor(data.train.items[:64])
    neg = torch.randint(0, data.num_items, (64,), generator=torch.Generator().manual_seed(1))
    out = {}
    for sparse in (False, True):
        obj = build_objective(cfg, t, torch.device("cpu"), tmp_path / f"run-{sparse}")
        obj.setup(SetupContext(data, sparse_grads=sparse))
        obj.on_epoch_start(model, 1, np.random.default_rng(1), torch.Generator().manual_seed(1))
        model.zero_grad(set_to_none=True)
        loss, parts = obj.batch_loss(model, users, pos, neg)
        loss.backward()
        grads = [p.grad for p in (model.user_emb.weight, model.item_emb.weight)]
        assert all(g.is_sparse == sparse for g in grads)
        out[sparse] = loss.detach(), [g.to_dense() if sparse else g for g in grads], grads
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for g_sparse, g_dense in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-6)
    item_rows = out[True][2][1].coalesce().indices()[0]
    assert 0 < len(item_rows) < data.num_items  # only the rows the batch read


def test_bpr_gradients_are_the_same_bits_every_time_on_two_threads(slice_data):
    """The BPR loss's row gathers sum their gradients in a fixed order, so that a run on 2 threads repeats (and
    resumes) bit for bit; indexing (an accumulating index_put_ backward) did not."""
    cfg = api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat"])
    data = api.load_data(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            torch.manual_seed(0)
            model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=16, init_std=0.1)
            g = torch.Generator().manual_seed(1)
            users = (torch.rand(4096, generator=g) ** 2 * data.num_users).long()  # heavy users many times over
            pos = (torch.rand(4096, generator=g) ** 3 * data.num_items).long()
            neg = torch.randint(0, data.num_items, (4096,), generator=g)
            loss, user_vectors_of, _ = bpr_base_loss(model, users, pos, neg)
            (loss + user_vectors_of(users[:512]).square().sum()).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(all(torch.equal(a, b) for a, b in zip(g, grads[0])) for g in grads)
    finally:
        torch.set_num_threads(before)
