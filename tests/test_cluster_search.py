"""UserClusters, the refresh that ranks each user over its cluster's candidate items: exact at its ceiling, recall
rising with the candidates, deterministic, its parameters checked, and held to the recall floor inside a run."""

import numpy as np
import pytest
import torch

from compressor import api
from compressor.checkpoint import load_checkpoint
from compressor.cluster_search import UserClusterSearcher, check_params, sized_defaults
from compressor.config import ConfigError
from compressor.distill import load_teacher
from compressor.models import build_model
from compressor.objectives import build_objective
from compressor.retrieval import TopKSearcher, measure_recall, recall_at_k

from .conftest import SMALL_KD, TINY_TRAIN, run_cli, run_history


def _vectors(seed=0, users=2000, items=3000, dim=8):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((users, dim)).astype(np.float32),
            rng.standard_normal((items, dim)).astype(np.float32))


def test_with_every_item_a_candidate_it_is_the_exact_search():
    u, i = _vectors()
    exact_scores, exact_ids = TopKSearcher(i, "Flat").search(u, 30)
    scores, ids = UserClusterSearcher(i, u, {"clusters": 32, "candidates": 3000}).search(u, 30)
    assert (ids == exact_ids).all()  # (random vectors: no ties)
    np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_recall_rises_with_the_candidates_and_any_user_can_be_searched():
    u, i = _vectors()
    others, _ = _vectors(seed=1, users=300)  # users the clusters were not built from
    truth = TopKSearcher(i, "Flat").search(others, 30)[1]
    searcher = UserClusterSearcher(i, u, {"clusters": 32, "candidates": 100})
    recalls = []
    for candidates in (100, 300, 1000):
        searcher.set_params(candidates=candidates)
        recalls.append(recall_at_k(searcher.search(others, 30)[1], truth))
    assert recalls[0] < recalls[1] < recalls[2] and recalls[2] > 0.9, recalls
    # fewer candidates than k: k of them (the centroid's best k) are ranked all the same
    searcher.set_params(candidates=10)
    ids = searcher.search(others[:50], 30)[1]
    assert all(len(set(row)) == 30 for row in ids.tolist())
    searcher.set_params(candidates=30)
    assert (searcher.search(others[:50], 30)[1] == ids).all()


def test_the_same_vectors_and_seed_give_the_same_lists():
    u, i = _vectors()
    a = UserClusterSearcher(i, u, {"clusters": 16, "candidates": 200}).search(u, 20)
    b = UserClusterSearcher(i, u, {"clusters": 16, "candidates": 200}).search(u, 20)
    assert (a[1] == b[1]).all() and (a[0] == b[0]).all()



def test_a_users_previous_list_is_ranked_with_its_candidates_each_item_once():
    u, i = _vectors()
    exact_scores, exact_ids = TopKSearcher(i, "Flat").search(u, 30)
    searcher = UserClusterSearcher(i, u, {"clusters": 32, "candidates": 40})
    cold_scores, cold_ids = searcher.search(u, 30)
    assert recall_at_k(cold_ids, exact_ids) < 0.9
    # the true lists as the previous ones: what the centroids miss is there, so the search is exact
    scores, ids = searcher.search(u, 30, previous=exact_ids)
    assert (ids == exact_ids).all()
    np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
    # lists that share items with the candidates (the cold lists, shifted): no item twice, and never a worse list
    # than the candidates alone (each user's k-th score at least the cold one's)
    shifted = np.roll(cold_ids, 7, axis=1)
    scores, ids = searcher.search(u, 30, previous=shifted)
    assert all(len(set(row)) == 30 for row in ids.tolist())
    assert (scores[:, -1] >= cold_scores[:, -1] - 1e-6).all() and (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_allclose(scores, np.take_along_axis(u @ i.T, ids, axis=1), rtol=0, atol=1e-5)
    # int32 lists (a refresh keeps them so), shorter than k, or empty: the same answers as their int64 / none
    short = exact_ids[:, :5].astype(np.int32)
    assert (searcher.search(u, 30, previous=short)[1] == searcher.search(u, 30, previous=exact_ids[:, :5])[1]).all()
    assert recall_at_k(searcher.search(u, 30, previous=short)[1], exact_ids) > recall_at_k(cold_ids, exact_ids)
    assert (searcher.search(u, 30, previous=exact_ids[:, :0])[1] == cold_ids).all()
    for bad, needle in ((exact_ids[:10], "previous must be"), (exact_ids.astype(np.float32), "integer item ids"),
                        (exact_ids + 3000, "outside 0..2999"), (np.full_like(exact_ids, -1), "outside 0..2999")):
        with pytest.raises(ValueError, match=needle):
            searcher.search(u, 30, previous=bad)

@pytest.mark.parametrize("params,needle", [({"nprobe": 8}, "not nprobe"), ({"clusters": 0}, "clusters must be"),
                                           ({"candidates": True}, "candidates must be"),
                                           ({"candidates": 1.5}, "candidates must be")])
def test_bad_parameters_are_named(params, needle):
    with pytest.raises(ValueError, match=needle):
        check_params(params)
    with pytest.raises(ConfigError) as e:
        api.make_config(None, ["distill.index=UserClusters", f"distill.index_params={params}".replace("'", "")])
    assert "distill.index_params" in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)


def _retrieval(teacher, slice_data, tmp_path, index: str, params: str):
    """The KD retrieval of a small RCE-KD run (M 30) with this refresh index."""
    overrides = [f"data.path={slice_data}", "data.format=users_dat", "model.dim=8", "distill.method=rcekd",
                 "distill.K=10", "distill.M=30", "distill.L=10", f"distill.index={index}",
                 f"distill.index_params={params}"]
    data = api.load_data(api.make_config(None, overrides[:2]))
    cfg = api.make_config(None, overrides)
    return data, build_objective(cfg, load_teacher(teacher, data), torch.device("cpu"), tmp_path / "r").term.retrieval


def test_the_refresh_raises_the_candidates_to_the_recall_floor(teacher, slice_data, tmp_path):
    data, retrieval = _retrieval(teacher, slice_data, tmp_path, "UserClusters", "{clusters: 16, candidates: 30}")
    torch.manual_seed(0)
    model = build_model("mf", num_users=data.num_users, num_items=data.num_items, dim=8, init_std=0.1)
    ids, diag = retrieval.student_topm(model, 30)
    assert diag["retrieval_recall_first"] < 0.95 <= diag["retrieval_recall"]
    assert diag["retrieval_candidates"] > 30 and (ids >= 0).all()
    # the recall the refresh read off the lists it found (and one exact search of its sample) is what searching
    # the sample again and FAISS's exact search give (to a few of its 400 x 30 entries: a matmul's last bits
    # may depend on how many rows it multiplies; misread rows would be far off)
    u, i = (t.detach().numpy() for t in model.vectors())
    final = UserClusterSearcher(i, u, params={"clusters": 16, "candidates": int(diag["retrieval_candidates"])})
    assert diag["retrieval_recall"] == pytest.approx(measure_recall(final, u, i, 30, sample_users=500), abs=3e-4)
    # the next refresh starts from the raised candidates, and ranks each user's last list with them: on the same
    # model that list is the answer found, so the refresh finds the same lists again
    again_ids, again = retrieval.student_topm(model, 30)
    assert again["retrieval_candidates"] == diag["retrieval_candidates"] and again["retrieval_recall_first"] >= 0.95
    assert again["retrieval_recall"] >= diag["retrieval_recall"] and (again_ids == ids).all()
    meta, tensors = retrieval.state()
    assert meta["raised"] == {"candidates": int(diag["retrieval_candidates"])}
    assert (tensors["previous_topm"].long() == ids).all() and tensors["previous_topm"].dtype == torch.int32


def test_a_resumed_run_with_user_clusters_repeats_the_uninterrupted_one(teacher, slice_data, tmp_path):
    clusters = ["--set", "distill.index=UserClusters", "--set", "distill.index_params={clusters: 8, candidates: 30}"]
    args = ["--set", f"data.path={slice_data}", *SMALL_KD, *clusters, *TINY_TRAIN]
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "whole", "--epochs", 4, *args)
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "cut", "--epochs", 2, *args)
    run_cli("distill", "--teacher", teacher, "--out", tmp_path / "cut", "--epochs", 4, "--resume", *args)
    whole, cut = run_history(tmp_path / "whole"), run_history(tmp_path / "cut")
    assert all(h["diag_retrieval_recall"] >= 0.95 for h in whole)
    assert whole[0]["diag_retrieval_candidates"] > 30  # the floor raised them: state the resume carries
    keys = [k for k in whole[0] if k.startswith(("diag_", "valid_", "loss"))]
    assert [[h[k] for k in keys] for h in cut] == [[h[k] for k in keys] for h in whole]
    assert (load_checkpoint(tmp_path / "cut" / "last.safetensors").fingerprint
            == load_checkpoint(tmp_path / "whole" / "last.safetensors").fingerprint)


def test_a_resume_state_is_read_only_by_the_index_that_saved_it(teacher, slice_data, tmp_path):
    """A resume with another distill.index starts its refresh afresh (a UserClusters run's raised candidates are
    no FAISS parameter); the state of runs saved before UserClusters (key held_nprobe, no index) still loads."""
    _, clusters = _retrieval(teacher, slice_data, tmp_path / "c", "UserClusters", "{candidates: 30}")
    _, ivf = _retrieval(teacher, slice_data, tmp_path / "i", "IVF10,Flat", "{nprobe: 1}")
    from_clusters = {"index": "UserClusters", "raised": {"candidates": 120}, "held": 120}
    old_ivf = {"raised": {"nprobe": 4}, "held_nprobe": 4}
    ivf.load_state(from_clusters, {})
    assert ivf.state()[0] == {"index": "IVF10,Flat", "raised": {}, "held": None}
    ivf.load_state(old_ivf, {})
    assert ivf.state()[0] == {"index": "IVF10,Flat", "raised": {"nprobe": 4}, "held": 4}
    clusters.load_state(old_ivf, {})
    assert clusters.state()[0] == {"index": "UserClusters", "raised": {}, "held": None}
    clusters.load_state(from_clusters, {})
    assert clusters.state()[0] == from_clusters
    # UserClusters' last lists travel with its state, and only to a UserClusters refresh
    lists = {"previous_topm": torch.arange(12, dtype=torch.int32).view(4, 3)}
    clusters.load_state(from_clusters, lists)
    assert (clusters.state()[1]["previous_topm"] == lists["previous_topm"]).all()
    ivf.load_state(from_clusters, lists)
    assert "previous_topm" not in ivf.state()[1]


def test_unset_params_are_sized_to_the_data():
    # the two measured points (docs/benchmarks.md 4g, 4i), and a catalogue smaller than 1,000 items: every item
    assert sized_defaults(1_000_000, 200_000) == {"clusters": 2048, "candidates": 4000}
    assert sized_defaults(29_858, 40_979) == {"clusters": 256, "candidates": 1000}
    assert sized_defaults(300, 120) == {"clusters": 32, "candidates": 120}
    assert check_params({"candidates": 50}, sizes=(29_858, 40_979)) == {"clusters": 256, "candidates": 50}
    u, i = _vectors(seed=5, users=300, items=120)
    assert UserClusterSearcher(i, u).params == {"clusters": 32, "candidates": 120}
    assert UserClusterSearcher(i, u, {"clusters": 4}).params == {"clusters": 4, "candidates": 120}
