"""`compress recommend`: the batch job, run as the real CLI (and under real torchrun) on small random MF checkpoints.

One job from a checkpoint (exported to DIR/_bundle) is the reference; it is compared with a real `python -m serving`
server on that bundle, with a brute-force oracle, with a run killed by SIGKILL and resumed, and with a 2-rank
torchrun run. Other models and other settings into its directory are refused and change nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from compress_app.recommend import MANIFEST, SLOW_ENV, SUCCESS, part_name

from .conftest import ROOT, Server, assert_one_line_error, brute_force_topk, cli_command, run_cli

U, I, D, K = 600, 900, 8, 10
SHARD_USERS = 128  # 5 shards
MOSTLY_SEEN, NOTHING_SEEN = 0, 1  # 3 unseen items (3 rows, not K) / no history


def write_checkpoint(path: Path, seed: int) -> dict:
    """A random MF model saved as a real checkpoint; returns its vectors and seen lists."""
    import torch

    from compressor.checkpoint import save_checkpoint
    from compressor.models import build_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("mf", num_users=U, num_items=I, dim=D, init_std=0.5)
    lens = rng.integers(0, 40, U)
    lens[MOSTLY_SEEN], lens[NOTHING_SEEN] = I - 3, 0
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indices = np.concatenate([rng.choice(I, n, replace=False) for n in lens]).astype(np.int64)
    save_checkpoint(path, model=model, meta={"metrics": {}, "config": {}},
                    user_ids=np.array([f"u{i}" for i in range(U)]), item_ids=np.array([f"item-{i}" for i in range(I)]),
                    train_indptr=indptr, train_indices=indices)
    with torch.no_grad():
        users, items = (t.detach().numpy().copy() for t in model.vectors())
    return {"path": path, "users": users, "items": items, "indptr": indptr, "indices": indices}


def summary_of(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def read_table(out: Path) -> pa.Table:
    """DIR as one Parquet data set (its _manifest.json, _bundle/ and _SUCCESS are skipped by the reader)."""
    table = pq.read_table(out)
    assert table.num_rows == sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    return table.replace_schema_metadata(None)


def snapshot(root: Path) -> dict:
    """Every file under root with its inode, size and mtime: what 'nothing changed' means."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def recommend(*args, **kw):
    return run_cli("recommend", *args, "--quiet", **kw)


def start(*args, cwd=ROOT, env=None) -> subprocess.Popen:
    return subprocess.Popen(cli_command("recommend", *args, "--quiet"), cwd=cwd, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    return {name: write_checkpoint(root / f"{name}.safetensors", seed) for seed, name in enumerate("ab")}


@pytest.fixture(scope="module")
def job(tmp_path_factory, models) -> dict:
    """The reference job: checkpoint a -> DIR/_bundle -> recommendations, with the default exclude_seen."""
    out = tmp_path_factory.mktemp("job") / "recs"
    summary = summary_of(recommend(models["a"]["path"], "--out", out, "--k", K, "--shard-users", SHARD_USERS))
    return {"out": out, "bundle": out / "_bundle", "summary": summary, "table": read_table(out)}


def test_every_user_once_with_k_ranks_and_the_oracle_answer(job, models):
    out, table, m = job["out"], job["table"], models["a"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True and (out / SUCCESS).exists()
    assert (manifest["k"], manifest["exclude_seen"], manifest["shard_users"]) == (K, True, SHARD_USERS)
    assert manifest["num_users"] == U and manifest["num_shards"] == 5 == job["summary"]["shards"]
    assert job["summary"]["users"] == U and job["summary"]["skipped_shards"] == 0
    assert job["summary"]["rows"] == table.num_rows == manifest["rows"]
    assert table.schema.names == ["user_id", "rank", "item_id", "score"]
    assert [str(t) for t in table.schema.types] == ["string", "int32", "string", "float"]

    # Each shard holds its contiguous block of users, in the bundle's user order, with the planned row count.
    for s, entry in enumerate(manifest["shards"]):
        part = pq.read_table(out / part_name(s))
        assert part.num_rows == entry["rows"]
        users = list(dict.fromkeys(part["user_id"].to_pylist()))
        assert users == [f"u{i}" for i in range(entry["first_user"], entry["first_user"] + entry["users"])]

    user_ids = np.array(table["user_id"].to_pylist())
    ranks = table["rank"].to_numpy()
    items = np.array([int(x.rsplit("-", 1)[1]) for x in table["item_id"].to_pylist()])
    scores = table["score"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    assert list(user_ids[starts]) == [f"u{i}" for i in range(U)]  # every user exactly once, in order
    for u, (lo, hi) in enumerate(zip(starts, np.r_[starts[1:], user_ids.size])):
        seen = m["indices"][m["indptr"][u] : m["indptr"][u + 1]]
        assert list(ranks[lo:hi]) == list(range(1, min(K, I - seen.size) + 1))
        assert not np.isin(items[lo:hi], seen).any()
        if u % 7 == 0 or u in (MOSTLY_SEEN, NOTHING_SEEN):
            want = brute_force_topk(m["users"], m["items"], u, K, seen)
            assert list(items[lo:hi]) == list(want)
            np.testing.assert_allclose(scores[lo:hi], m["items"][want] @ m["users"][u], rtol=1e-5, atol=1e-6)
    assert ranks[starts[MOSTLY_SEEN + 1] - 1] == 3 and table.num_rows == (U - 1) * K + 3


def test_answers_equal_the_servers(job, tmp_path):
    table = job["table"]
    by_user: dict[str, tuple[list[str], list[float]]] = {}
    for uid, item, score in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), table["score"].to_pylist()):
        got = by_user.setdefault(uid, ([], []))
        got[0].append(item)
        got[1].append(score)
    server = Server(["-m", "serving", job["bundle"], "--workers", 1], tmp_path / "server.log")
    try:
        server.wait("/readyz")
        sample = [f"u{i}" for i in (MOSTLY_SEEN, NOTHING_SEEN, *range(2, U, 37))]
        for uid in sample:
            resp = server.http.post("/recommend", json={"user_id": uid, "k": K, "exclude_seen": True})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["items"] == by_user[uid][0], uid
            np.testing.assert_allclose(body["scores"], by_user[uid][1], rtol=1e-6)
        batch = [f"u{i}" for i in range(100, 164)]
        resp = server.http.post("/recommend/batch", json={"user_ids": batch, "k": K, "exclude_seen": True})
        for uid, result in zip(batch, resp.json()["results"]):
            assert result["items"] == by_user[uid][0], uid
            np.testing.assert_allclose(result["scores"], by_user[uid][1], rtol=1e-6)
    finally:
        server.stop()


def test_killed_run_resumes_without_touching_finished_shards(job, tmp_path):
    out = tmp_path / "recs"
    args = ["recommend", job["bundle"], "--out", out, "--k", K, "--shard-users", SHARD_USERS, "--quiet"]
    # The testing hook sleeps after each shard: the kill lands after part 0 and before part 1, every time.
    proc = subprocess.Popen(cli_command(*args), cwd=ROOT, env=dict(os.environ, **{SLOW_ENV: "60"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / part_name(0)).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard within 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is False and not (out / SUCCESS).exists()
    assert sorted(p.name for p in out.glob("part-*")) == [part_name(0)]
    before = (out / part_name(0)).stat()
    half = out / f".{part_name(1)}.x1y2z3.tmp"  # what a kill during a shard's write leaves
    half.write_bytes(b"PAR1 half a shard")

    summary = summary_of(run_cli(*args))
    assert summary["skipped_shards"] == 1 and summary["shards"] == 5 and summary["rows"] == job["table"].num_rows
    after = (out / part_name(0)).stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert not half.exists() and not list(out.glob(".*.tmp"))
    assert json.loads((out / MANIFEST).read_text())["complete"] is True
    assert read_table(out).equals(job["table"])  # no user lost or doubled, same answers

    again = summary_of(run_cli(*args))  # a finished job: everything skipped, nothing rewritten
    assert again["skipped_shards"] == 5
    assert (out / part_name(0)).stat().st_mtime_ns == before.st_mtime_ns


def test_another_model_or_setting_is_refused_and_changes_nothing(job, models, tmp_path):
    out = job["out"]
    other = tmp_path / "other"
    recommend(models["b"]["path"], "--out", other, "--k", K, "--shard-users", SHARD_USERS)
    before = snapshot(out)
    cases = [
        ((other / "_bundle", "--k", K, "--shard-users", SHARD_USERS), ("another job", "sha256", str(other / "_bundle"))),
        ((models["b"]["path"], "--k", K, "--shard-users", SHARD_USERS), ("weights fingerprint", "nothing was changed")),
        ((job["bundle"], "--k", 5, "--shard-users", SHARD_USERS, "--no-exclude-seen"), ("k 10 there, 5 now",
                                                                                        "exclude_seen True there")),
    ]
    procs = [start(args[0], "--out", out, *args[1:]) for args, _ in cases]  # side by side: 2 cores, 3 starts
    for proc, (_, fragments) in zip(procs, cases):
        assert_one_line_error(finish(proc), *fragments)
    assert snapshot(out) == before


def test_two_ranks_under_torchrun_write_what_one_rank_writes(job, tmp_path):
    out = tmp_path / "recs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "compress_app",
           "recommend", str(job["bundle"]), "--out", str(out), "--k", str(K), "--shard-users", str(SHARD_USERS),
           "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)  # rank 0 alone prints the summary
    assert (summary["shards"], summary["users"], summary["skipped_shards"]) == (5, U, 0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True and (out / SUCCESS).exists()
    assert manifest["model"]["bundle_manifest_sha256"] == json.loads((job["out"] / MANIFEST).read_text())["model"][
        "bundle_manifest_sha256"]
    assert read_table(out).equals(job["table"])


def test_bad_inputs_are_one_line_errors(job, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "COMPRESS_CACHE_DIR": str(tmp_path / "cache")}
    cases = [
        ((job["bundle"], "--k", 0), ("--k must be at least 1",)),
        ((job["bundle"], "--k", I + 1), (f"--k {I + 1} exceeds", f"{I} items")),
        ((tmp_path / "missing", "--k", K), ("missing", "no such bundle directory, checkpoint or run directory")),
        ((job["bundle"], "--k", K, "--out-is-a-file"), ("exists and is not a directory",)),
        (("models:/no-such-model@champion", "--k", K), ("models:/no-such-model@champion",)),
    ]
    procs = []
    for i, (args, _) in enumerate(cases):
        out = a_file if "--out-is-a-file" in args else tmp_path / f"out{i}"
        argv = [a for a in args if a != "--out-is-a-file"]
        procs.append((out, start(argv[0], "--out", out, *argv[1:], cwd=tmp_path, env=env)))
    for (out, proc), (_, fragments) in zip(procs, cases):
        assert_one_line_error(finish(proc), *fragments)
        assert out == a_file or not out.exists()
    assert a_file.read_text() == "x"
