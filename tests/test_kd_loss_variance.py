"""benchmarks/kd_loss_variance.py: the spread it reports comes from the draw of A and from nothing else."""

import json
import sys

import numpy as np
import pytest

from compressor import api

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import kd_loss_variance  # noqa: E402


@pytest.fixture(scope="module")
def npz_teacher(tmp_path_factory, slice_data):
    """A random 16-dim two-tower teacher on the slice's ids (the statistics need no trained one)."""
    data = api.load_data(api.make_config(None, [f"data.path={slice_data}", "data.format=users_dat"]))
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("var") / "teacher.npz"
    np.savez(path, user_vectors=rng.normal(size=(data.num_users, 16)).astype(np.float32),
             item_vectors=rng.normal(size=(data.num_items, 16)).astype(np.float32),
             user_ids=data.user_ids, item_ids=data.item_ids)
    return path


def _run(tmp_path, slice_data, teacher, L, M, out_name="v.json"):
    out = tmp_path / out_name
    kd_loss_variance.main(["--out", str(out), "--config", str(ROOT / "configs/citeulike/mf-rcekd.yaml"),
                           "--kd-set", f"data.path={slice_data}", "--kd-set", "data.format=users_dat",
                           "--kd-set", "model.dim=8", "--kd-set", "distill.K=10", "--kd-set", f"distill.M={M}",
                           "--kd-set", f"distill.L={L}", "--teacher", f"random={teacher}", "--student", "fresh",
                           "--draws", "4"])
    return out, json.loads(out.read_text())["rows"]


def test_no_spread_when_every_position_of_p_is_drawn_and_some_when_a_sample_is(npz_teacher, slice_data, tmp_path):
    # L == M: A is all of P whatever the generator, so every draw gives the same loss and gradient bit for bit
    _, (fixed,) = _run(tmp_path, slice_data, npz_teacher, L=30, M=30, out_name="fixed.json")
    assert fixed["loss_std"] == 0.0 and fixed["loss_t_std"] == 0.0
    assert fixed["grad_noise_over_signal"] == 0.0 and fixed["block_loss_cv_mean"] == 0.0
    # L < M: A is a sample, and loss_T (which reads A) moves with it
    _, (sampled,) = _run(tmp_path, slice_data, npz_teacher, L=10, M=30, out_name="sampled.json")
    assert sampled["loss_t_std"] > 0.0 and sampled["grad_noise_over_signal"] > 0.0
    assert 0.0 < sampled["grad_cosine_to_mean"] < 1.0
    assert 0.0 <= sampled["student_topk_in_teacher_topk"] <= 1.0


def test_a_rerun_keeps_the_rows_it_has_and_refuses_another_setting(npz_teacher, slice_data, tmp_path, monkeypatch):
    out, rows = _run(tmp_path, slice_data, npz_teacher, L=10, M=30)

    def must_not_draw(*args):
        raise AssertionError("a kept row was measured again")

    monkeypatch.setattr(kd_loss_variance, "draw_statistics", must_not_draw)
    _, again = _run(tmp_path, slice_data, npz_teacher, L=10, M=30)
    assert again == rows
    before = out.read_bytes()
    with pytest.raises(SystemExit):  # another L: its rows would sit under this file's setting
        _run(tmp_path, slice_data, npz_teacher, L=20, M=30)
    assert out.read_bytes() == before


def test_an_approximate_refresh_is_refused(npz_teacher, slice_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        kd_loss_variance.main(["--out", str(tmp_path / "v.json"), "--kd-set", f"data.path={slice_data}",
                               "--kd-set", "data.format=users_dat", "--kd-set", "distill.index=IVF8,Flat",
                               "--teacher", f"random={npz_teacher}", "--student", "fresh"])
    assert "must be exact (Flat)" in capsys.readouterr().err
    assert not (tmp_path / "v.json").exists()
