import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

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


def run_cli(*args, check=True, timeout=600, env=None):
    e = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "compressor.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"compress {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


TINY_TRAIN = ["--set", "train.threads=1", "--set", "train.batch_size=512", "--set", "data.format=users_dat",
              "--quiet"]
