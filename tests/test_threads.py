"""Thread pools are set on purpose in every process the tool starts: torch's and FAISS's thread counts (all the
cores this process may use, or its share of them beside other ranks) and OpenMP's wait policy (PASSIVE: waiting
threads sleep instead of spinning on a neighbour's cores). Each run records them in its checkpoints."""

import os
import subprocess
import sys

from compressor.checkpoint import read_meta
from compressor.device import available_cores

from .conftest import ROOT, TINY_TRAIN, run_cli


def _train(out, slice_data, *extra, env=None):
    run_cli("train", "--out", out, "--set", f"data.path={slice_data}", "--set", "model.dim=8", "--epochs", 1,
            *TINY_TRAIN, *extra, env=env)
    return read_meta(out)["threads"]


def test_training_uses_every_core_it_may_with_sleeping_waits(slice_data, tmp_path):
    threads = _train(tmp_path / "all", slice_data, "--set", "train.threads=0")
    assert threads["omp_wait_policy"] == "PASSIVE"
    assert threads["torch"] == threads["faiss"] == available_cores() == threads["cores_available"]
    assert _train(tmp_path / "one", slice_data)["torch"] == 1  # TINY_TRAIN asks for train.threads 1


def test_a_wait_policy_the_user_set_is_kept(slice_data, tmp_path):
    assert _train(tmp_path / "active", slice_data, env={"OMP_WAIT_POLICY": "ACTIVE"})["omp_wait_policy"] == "ACTIVE"


def test_ranks_on_one_machine_share_its_cores(slice_data, tmp_path):
    threads = _train(tmp_path / "ranks", slice_data, "--set", "train.threads=0", "--nproc", 2)
    assert threads["torch"] == max(1, available_cores() // 2) and threads["omp_wait_policy"] == "PASSIVE"


def test_the_library_sets_the_policy_before_torch_starts_its_pools():
    code = ("import os; os.environ.pop('OMP_WAIT_POLICY', None); import compressor.api, torch; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip() == "PASSIVE"
