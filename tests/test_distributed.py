"""Training under torchrun: real ranks (2 gloo processes on loopback), users sharded, the item table replicated.

Why a 2-rank run is not bit-equal to a 1-rank run with the same seed: rank r draws its negatives and KD samples
from (seed, epoch, r) and walks its own users' interactions in its own order, so a step's global batch holds other
interactions than the one process's step does. The gradient of a given batch is the same (losses are sums; the
item gradient is summed over ranks), the trajectory is not. A 2-rank run is bit-equal to another 2-rank run, which
is what resume promises.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.checkpoint import read_meta
from compressor.distributed import Distributed, DistributedError, user_blocks

from .conftest import ROOT, TINY_TRAIN, assert_one_line_error, cli_command, run_cli, write_slice

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
SMALL_KD = ["--set", "distill.K=10", "--set", "distill.L=5", "--set", "distill.M=20"]


def data_args(slice_data):
    return ["--set", f"data.path={slice_data}", *TINY_TRAIN]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, slice_data):
    out = tmp_path_factory.mktemp("dist") / "teacher"
    run_cli("train", "--out", out, *data_args(slice_data), "--set", "model.dim=32", "--epochs", 4)
    return out


def test_user_blocks_are_contiguous_balanced_and_cover_every_user():
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.6, size=1000).clip(max=500)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    for world in (1, 2, 3, 8):
        blocks = user_blocks(indptr, world)
        assert blocks[0][0] == 0 and blocks[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])) and all(lo < hi for lo, hi in blocks)
        load = [indptr[hi] - indptr[lo] for lo, hi in blocks]
        # each rank within the largest single user of its fair share
        assert max(load) - indptr[-1] / world <= counts.max()
    with pytest.raises(DistributedError, match="3 ranks for 2 users"):
        user_blocks(np.array([0, 1, 2]), 3)


def test_sharded_top_k_and_top_m_equal_one_process_and_replicas_stay_equal(teacher, slice_data, tmp_path):
    student = tmp_path / "student"
    run_cli("distill", "--method", "scratch", "--out", student, *data_args(slice_data), "--set", "model.dim=8",
            "--epochs", 1)
    worker = [str(ROOT / "tests" / "dist_worker.py")]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, launcher in ((one, [sys.executable]), (two, TORCHRUN)):
        out.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        subprocess.run([*launcher, *worker, str(out), str(teacher), str(student), str(slice_data), "30", "40"],
                       check=True, timeout=300, env=env, capture_output=True)
    for name in ("qt", "pm"):
        whole = np.load(one / f"{name}-0.npy")
        sharded = np.concatenate([np.load(two / f"{name}-{r}.npy") for r in (0, 1)])
        assert sharded.shape == whole.shape
        assert (sharded == whole).all(), f"{name}: sharded lists differ from one process's"
    # the summed gradient is one process's gradient of the same global batch, whichever way it was summed, also
    # for a rank whose part of the batch is empty
    for r in (0, 1):
        grads = json.loads((two / f"grad-{r}.json").read_text())
        for case, diff in grads.items():
            assert diff["item"] <= 1e-6 * diff["scale"] and diff["user"] <= 1e-6 * diff["scale"], (r, case, diff)
        assert grads["empty_rank"]["local_rows"] == (200 if r == 0 else 0)
    # the item table is replicated: after real training steps both ranks hold the same bits
    assert (np.load(two / "items-0.npy") == np.load(two / "items-1.npy")).all()
    info = json.loads((two / "train.json").read_text())
    (lo0, hi0), (lo1, hi1) = info["blocks"]
    assert lo0 == 0 and hi0 == lo1 and hi1 == len(whole)
    assert all(row["dist_grad_mb_per_step"] > 0 and len(row["dist_peak_rss_mb"]) == 2 for row in info["history"])
    # the gathered checkpoint holds every user, in the one-process format
    meta = read_meta(two / "run")
    assert meta["world_size"] == 2 and meta["model"]["num_users"] == len(whole)


def test_two_rank_distill_reaches_the_one_rank_validation_ndcg(tmp_path):
    """Tolerance: 15% of the one-rank best validation NDCG@10. Measured on this slice (1,500 CiteULike-t users,
    RCE-KD MF64 -> MF16, 15 epochs), seeds 0-2: one rank 0.0189 / 0.0203 / 0.0191, two ranks 0.0195 / 0.0202 /
    0.0182 (paired differences +3%, -0.5%, -5%); an untrained student scores ~0.003."""
    data = write_slice(tmp_path / "users.dat", n_users=1500)
    run_cli("train", "--out", tmp_path / "teacher", *data_args(data), "--set", "model.dim=64", "--epochs", 15)
    args = ["--teacher", tmp_path / "teacher", *data_args(data), "--set", "model.dim=16", "--epochs", 15,
            "--set", "train.lr=0.005", "--seed", 0, "--set", "distill.K=20", "--set", "distill.L=10",
            "--set", "distill.M=40"]
    run_cli("distill", "--out", tmp_path / "one", *args)
    p = run_cli("distill", "--out", tmp_path / "two", "--nproc", 2, *args)
    printed = json.loads(p.stdout)  # one JSON result for the whole job, from rank 0
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert printed["test"] == {k: round(v, 6) for k, v in two["test"].items() if k != "users"}
    assert one["valid"]["ndcg@10"] > 0.012 and two["valid"]["ndcg@10"] > 0.012  # both learned
    assert abs(two["valid"]["ndcg@10"] - one["valid"]["ndcg@10"]) <= 0.15 * one["valid"]["ndcg@10"]
    # rank 0's checkpoint is a normal one: evaluate reads it and finds the job's own test numbers
    ev = json.loads(run_cli("evaluate", tmp_path / "two", "--json").stdout)
    assert ev["ndcg@20"] == pytest.approx(two["test"]["ndcg@20"], rel=1e-9)
    assert len(list((tmp_path / "two").glob("*.safetensors"))) == 2  # only rank 0 wrote


def _rank_pid(out: Path, rank: int, timeout: float = 60) -> int:
    """The pid of the training process of ``rank`` whose command line names ``out``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(out).encode() in cmd and f"RANK={rank}".encode() in env and b"compress_app" in cmd:
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process for {out}")


def test_a_killed_rank_stops_the_job_and_resume_ends_where_an_uninterrupted_run_ends(slice_data, tmp_path):
    args = [*data_args(slice_data), "--set", "model.dim=16", "--epochs", 6, "--set", "train.checkpoint_every=1",
            "--set", "train.batch_size=64", "--nproc", 2]
    run_cli("train", "--out", tmp_path / "whole", *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_command("train", "--out", out, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    rank1 = _rank_pid(out, 1)  # found before training starts, so the kill follows the first checkpoint at once
    deadline = time.monotonic() + 120
    while not (out / "last.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # no hang: the agent stops rank 0 (seconds, not the gloo timeout)
    assert proc.returncode == 1
    error_lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert len(error_lines) == 1 and "rank 1" in error_lines[0] and "SIGKILL" in error_lines[0]
    assert "Traceback" not in err
    done = read_meta(out / "last.safetensors")["epoch"]
    assert done < 6
    run_cli("train", "--out", out, *args, "--resume")
    for name in ("model.safetensors", "last.safetensors"):
        assert read_meta(out / name)["fingerprint"] == read_meta(tmp_path / "whole" / name)["fingerprint"]
    assert (out / "metrics.jsonl").read_text().count("\n") == 6


def _snapshot(d: Path) -> dict:
    """Every file of a run directory but its log (which records the refused command, as in one process)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != "train.log"}


def test_resume_with_another_world_size_is_refused_unless_resharded(slice_data, tmp_path):
    out = tmp_path / "run"
    args = [*data_args(slice_data), "--set", "model.dim=8", "--epochs", 2]
    run_cli("train", "--out", out, *args, "--nproc", 2)
    before = _snapshot(out)
    p = run_cli("train", "--out", out, *args[:-2], "--epochs", 3, "--resume", check=False)
    assert_one_line_error(p, "2 rank(s)", "this job has 1", "--reshard")
    assert _snapshot(out) == before
    run_cli("train", "--out", out, *args[:-2], "--epochs", 3, "--resume", "--reshard")
    assert read_meta(out / "last.safetensors")["epoch"] == 3
    assert read_meta(out / "last.safetensors")["world_size"] == 1


def test_refusals_under_torchrun_are_one_line_and_write_nothing(teacher, slice_data, tmp_path):
    args = [*data_args(slice_data), "--set", "model.dim=8", "--epochs", 1, "--nproc", 2]
    p = run_cli("train", "--out", tmp_path / "gcn", *args, "--set", "model.kind=lightgcn", check=False)
    assert_one_line_error(p, "lightgcn", "torchrun")
    assert not (tmp_path / "gcn").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = run_cli("train", "--out", tmp_path / "port", *args, "--master-port", busy.getsockname()[1],
                    check=False)
    assert_one_line_error(p, "--master-port", "choose another port")
    assert not (tmp_path / "port").exists()
    # a run directory that already holds a run: every rank refuses, the job says so once
    before = _snapshot(teacher)
    p = run_cli("distill", "--teacher", teacher, "--out", teacher, *args, *SMALL_KD, check=False)
    assert_one_line_error(p, "already holds a run", "--resume")
    assert _snapshot(teacher) == before


def test_row_sparse_optimizer_trains_under_torchrun(slice_data, tmp_path):
    """lazy_adam's sparse gradients take the gathered-rows path; the job writes a normal checkpoint."""
    out = tmp_path / "lazy"
    run_cli("train", "--out", out, *data_args(slice_data), "--set", "model.dim=8", "--epochs", 2, "--nproc", 2,
            "--set", "train.optimizer=lazy_adam")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dist_sparse_steps"] > 0 and r["dist_grad_mb_per_step"] > 0 for r in rows)
    assert json.loads(run_cli("evaluate", out, "--json").stdout)["ndcg@20"] >= 0


def test_each_rank_resumes_its_own_approximate_refresh_state(teacher, slice_data, tmp_path):
    """Each rank's refresh keeps its own IVF quantizer and raised nprobe (the recall floor is checked on its own
    users): the resume checkpoint holds every rank's, and each rank reads its own back, so 3 epochs + --resume to
    4 end on the uninterrupted job's weights and refresh diagnostics; epoch 4 starts from epoch 3's kept
    quantizer, which the ranks used to train afresh on resume."""
    ivf = ["--set", "distill.index=IVF24,Flat", "--set", "distill.index_params={nprobe: 1}"]
    args = ["--teacher", teacher, *data_args(slice_data), *SMALL_KD, *ivf, "--set", "model.dim=8", "--nproc", 2]
    run_cli("distill", "--out", tmp_path / "whole", *args, "--epochs", 4)
    run_cli("distill", "--out", tmp_path / "cut", *args, "--epochs", 3)
    state = read_meta(tmp_path / "cut" / "last.safetensors")["objective_state"]
    assert len(state["ranks"]) == 2 and all(r["retrieval"]["trained"] for r in state["ranks"])
    assert all(r["retrieval"]["raised"]["nprobe"] > 1 for r in state["ranks"])  # the floor raised it: to carry
    run_cli("distill", "--out", tmp_path / "cut", *args, "--epochs", 4, "--resume")
    whole, cut = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                  for d in ("whole", "cut"))
    assert whole[3]["diag_retrieval_reused_quantizer"] == 1.0  # epoch 4 starts from epoch 3's quantizer
    keys = [k for k in whole[0] if k.startswith(("diag_", "valid_", "loss"))]
    assert [[h[k] for k in keys] for h in cut] == [[h[k] for k in keys] for h in whole]
    for name in ("model.safetensors", "last.safetensors"):
        assert read_meta(tmp_path / "cut" / name)["fingerprint"] == read_meta(tmp_path / "whole" / name)["fingerprint"]


def test_a_rank_reads_its_own_run_state_and_none_from_another_job_size():
    """``own_run_state`` picks this rank's meta and "rank<r>." tensors out of the gathered pair; a checkpoint of
    another job size (or of one process) gives nothing, so the refresh starts afresh."""
    saved = ({"ranks": [{"retrieval": {"held_nprobe": 4}}, {"retrieval": {"held_nprobe": 8}}]},
             {"rank0.retrieval.ivf_trained": torch.zeros(3), "rank1.retrieval.ivf_trained": torch.ones(2)})
    meta, tensors = Distributed(rank=1, world_size=2).own_run_state(*saved)
    assert meta == {"retrieval": {"held_nprobe": 8}} and list(tensors) == ["retrieval.ivf_trained"]
    assert tensors["retrieval.ivf_trained"].tolist() == [1.0, 1.0]
    assert Distributed(rank=0, world_size=3).own_run_state(*saved) == ({}, {})
    assert Distributed(rank=0, world_size=2).own_run_state({"retrieval": {}}, {}) == ({}, {})
    one = Distributed.single()  # one process: its own checkpoint's pair as is, a torchrun job's none (--reshard)
    assert one.own_run_state({"retrieval": {"held_nprobe": 2}}, {}) == ({"retrieval": {"held_nprobe": 2}}, {})
    assert one.own_run_state(*saved) == ({}, {})
