"""User mistakes on the command line end in one `Error: ...` line and exit status 1, and change nothing."""

import pytest
import torch

from .conftest import TINY_TRAIN, assert_one_line_error, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "distill"])
def test_device_cuda_without_cuda_is_a_one_line_error(command, tmp_path, slice_data):
    out = tmp_path / "run"
    extra = ["--method", "scratch"] if command == "distill" else []
    p = run_cli(command, "--out", out, "--device", "cuda", "--epochs", 1, "--set", f"data.path={slice_data}",
                *extra, *TINY_TRAIN, check=False)
    assert_one_line_error(p, "--device cuda", "no CUDA device")
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("key", ["distill.tau", "distill.T"])
def test_zero_temperature_is_refused_before_training(key, tmp_path, slice_data):
    out = tmp_path / "run"
    p = run_cli("distill", "--method", "scratch", "--out", out, "--epochs", 1, "--set", f"data.path={slice_data}",
                "--set", f"{key}=0", *TINY_TRAIN, check=False)
    assert_one_line_error(p, key)
    assert not (out / "model.safetensors").exists()


def test_unknown_config_key_names_it(tmp_path):
    p = run_cli("train", "--out", tmp_path / "run", "--set", "train.lrr=0.1", check=False)
    assert_one_line_error(p, "train.lrr", "did you mean 'train.lr'")


def test_refused_command_leaves_no_empty_run_directory(tmp_path):
    out = tmp_path / "never"
    p = run_cli("train", "--out", out, "--resume", check=False)
    assert_one_line_error(p, "nothing to resume")
    assert not out.exists()


@pytest.mark.parametrize("k", ["0", "-3"])
def test_evaluate_rejects_non_positive_cutoffs(k, tmp_path):
    p = run_cli("evaluate", tmp_path, "--k", k, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--k" in p.stderr
