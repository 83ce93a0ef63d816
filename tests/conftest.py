"""Shared test fixtures: a small real data set, the CLI in a subprocess, a free loopback port, a server process,
and one brute-force top-k oracle."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CLI_MODULE = "compress_app"  # `python -m compress_app` is the `compress` console script

# Tests share a 2-core machine: one thread each keeps FAISS/torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# CLI tests track nothing unless they ask to (tests/test_mlflow.py does, against its own server).
os.environ.setdefault("COMPRESS_NO_MLFLOW", "1")


def write_slice(path: Path, n_users: int = 400, min_items: int = 5) -> Path:
    """The first n_users CiteULike-t users with >= min_items items, as a users.dat-style pairs file."""
    src = ROOT / "compressor" / "datasets" / "citeulike-t" / "users.dat"
    rows = []
    for u, line in enumerate(src.read_text().splitlines()):
        items = line.split()[1:]
        if len(items) >= min_items:
            rows.append(f"{len(items)} " + " ".join(items))
        if len(rows) == n_users:
            break
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def slice_data(tmp_path_factory) -> Path:
    return write_slice(tmp_path_factory.mktemp("data") / "users.dat")


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", CLI_MODULE, *map(str, args)]


def run_cli(*args, check=True, timeout=600, env=None, cwd=ROOT):
    e = dict(os.environ, **(env or {}))
    proc = subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"compress {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


TINY_TRAIN = ["--set", "train.threads=1", "--set", "train.batch_size=512", "--set", "data.format=users_dat",
              "--quiet"]


def assert_one_line_error(proc, *fragments: str) -> str:
    """A user mistake: exit status 1, one `Error: ...` line naming what is wrong, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# Ports for test servers: below Linux's ephemeral range (32768-60999), where the kernel hands out no port of its
# own, and a block per pytest-xdist worker, so two workers never pick the same port between choosing it and their
# server binding it (a port from bind(0) is free only until someone else asks). Each session starts at a random
# place in its block, so two test sessions side by side (two checkouts) rarely walk the same ports.
_PORT_BASE, _PORTS_PER_WORKER, _WORKER_BLOCKS = 20_000, 400, 30
_next_port = random.randrange(_PORTS_PER_WORKER)


def free_port() -> int:
    global _next_port
    worker = int(re.sub(r"\D", "", os.environ.get("PYTEST_XDIST_WORKER", "gw0")) or 0) % _WORKER_BLOCKS
    first = _PORT_BASE + worker * _PORTS_PER_WORKER
    for _ in range(_PORTS_PER_WORKER):
        port = first + _next_port % _PORTS_PER_WORKER
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # still held (TIME_WAIT of an earlier server, another program)
                continue
            return port
    raise RuntimeError(f"no free port in {first}..{first + _PORTS_PER_WORKER - 1}")


def brute_force_topk(user_vecs: np.ndarray, item_vecs: np.ndarray, user: int, k: int,
                     seen: np.ndarray | None = None) -> np.ndarray:
    """The oracle: float64 inner products of one user with every item, seen items removed, best first
    (ties by item index), at most k items."""
    scores = item_vecs.astype(np.float64) @ user_vecs[user].astype(np.float64)
    cand = np.arange(item_vecs.shape[0])
    if seen is not None and len(seen):
        cand = np.setdiff1d(cand, seen)
    order = np.lexsort((cand, -scores[cand]))
    return cand[order][:k]


# ------------------------------------------------------------------ a small distillation: recipe overrides, teacher
SMALL_KD = ["--set", "distill.K=10", "--set", "distill.M=30", "--set", "distill.L=10", "--set", "model.dim=8",
            "--set", "distill.rrd.top_m=40", "--set", "distill.rrd.interesting=10",
            "--set", "distill.rrd.uninteresting=20"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, slice_data):
    out = tmp_path_factory.mktemp("kd") / "teacher"
    run_cli("train", "--out", out, "--set", f"data.path={slice_data}", "--set", "model.dim=64", "--epochs", 12,
            "--set", "train.lr=0.005", *TINY_TRAIN)
    return out


def run_history(run) -> list[dict]:
    """A run directory's metrics.jsonl, one dict per epoch."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


class Server:
    """A server subprocess in its own session (so its uvicorn workers stop with it), on a free loopback port."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, *map(str, args), "--port", str(self.port)], cwd=cwd, env=dict(os.environ, **(env or {})),
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def wait(self, path: str, timeout: float = 60, status: int = 200) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if self.http.get(path).status_code == status:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.url}{path} not {status} after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> str:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("server did not stop within 20 s of SIGTERM")
        text = self.log.read_text()
        assert "Traceback" not in text, text[-3000:]
        # the server's own state directory (metrics, and the control file unless --control-file moved it) goes
        # with it: SIGTERM must not leave one behind per start
        for state_dir in re.findall(r"state directory: (\S+) \(removed on exit\)", text):
            assert not Path(state_dir).exists(), f"{state_dir} left behind"
        return text


# ------------------------------------------------------------------ a history-tower checkpoint and its bundle
HISTORY_MAX_LEN = 20  # the history checkpoint's model.max_len: short enough that many slice users overflow it


@pytest.fixture(scope="session")
def history_run(tmp_path_factory, slice_data) -> Path:
    """A 2-epoch `model.kind: history` run (dim 8, max_len HISTORY_MAX_LEN, hidden 16) on the test slice."""
    run = tmp_path_factory.mktemp("history") / "run"
    run_cli("train", "--out", run, "--set", f"data.path={slice_data}", "--set", "model.kind=history",
            "--set", "model.dim=8", "--set", f"model.max_len={HISTORY_MAX_LEN}", "--set", "model.hidden=16",
            "--epochs", 2, *TINY_TRAIN)
    return run


@pytest.fixture(scope="session")
def history_bundle(history_run) -> Path:
    """`compress export` of `history_run` (a history user tower bundle)."""
    bundle = history_run.parent / "bundle"
    run_cli("export", history_run, "--out", bundle)
    return bundle
