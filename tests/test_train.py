import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor.checkpoint import load_checkpoint
from compressor.config import ConfigError, load_config

from .conftest import ROOT, TINY_TRAIN, run_cli


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(recipes) >= 6
    for r in recipes:
        load_config(r)


def test_unknown_or_misspelled_key_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'"):
        load_config(bad)
    bad.write_text("model:\n  dim: twenty\n")
    with pytest.raises(ConfigError, match=r"'model.dim' must be int"):
        load_config(bad)
    bad.write_text("distill:\n  method: magic\n")
    with pytest.raises(ConfigError, match=r"'distill.method' is 'magic'"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_cli_help_lists_commands_and_explains_options():
    top = run_cli("--help").stdout
    for cmd in ("train", "evaluate"):
        assert cmd in top
    for cmd in ("train", "evaluate"):
        out = run_cli(cmd, "--help").stdout
        for line in out.splitlines():
            if line.strip().startswith("--") and "  " in line.strip():
                assert len(line.strip().split("  ", 1)[1].strip()) > 5, line


def test_user_mistakes_are_one_line_errors(tmp_path):
    p = run_cli("train", "--out", tmp_path / "r", "--set", "train.lr_typo=1", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "unknown config key 'train.lr_typo'" in p.stderr
    p = run_cli("evaluate", tmp_path / "missing", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "not found" in p.stderr


def _train(out, slice_data, epochs, *extra):
    return run_cli("train", "--out", out, "--set", f"data.path={slice_data}", "--set", "model.dim=16",
                   "--epochs", epochs, *TINY_TRAIN, *extra)


def test_train_evaluate_json(tmp_path, slice_data):
    _train(tmp_path / "r", slice_data, 3)
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    assert res["best_epoch"] >= 1
    p = run_cli("evaluate", tmp_path / "r", "--json")
    metrics = json.loads(p.stdout)
    assert set(metrics) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
    assert metrics == pytest.approx(res["test"] | {}, abs=1e-9) or all(
        abs(metrics[k] - res["test"][k]) < 1e-9 for k in metrics)
    # a second train into the same directory refuses instead of clobbering the run
    p = run_cli("train", "--out", tmp_path / "r", "--set", f"data.path={slice_data}", *TINY_TRAIN, check=False)
    assert p.returncode == 1 and "--resume" in p.stderr


def test_sigkill_mid_training_then_resume_matches_uninterrupted_run(tmp_path, slice_data):
    epochs = 8
    _train(tmp_path / "full", slice_data, epochs, "--set", "train.patience=100")
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "compressor.cli", "train", "--out", str(killed), "--set", f"data.path={slice_data}",
           "--set", "model.dim=16", "--epochs", str(epochs), "--set", "train.patience=100", *TINY_TRAIN]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(log.read_text().splitlines())
    assert 3 <= done < epochs, f"kill landed after {done} epochs"
    run_cli("train", "--out", killed, "--resume", "--set", f"data.path={slice_data}", "--set", "model.dim=16",
            "--epochs", epochs, "--set", "train.patience=100", *TINY_TRAIN)
    a = load_checkpoint(tmp_path / "full" / "last.safetensors")
    b = load_checkpoint(killed / "last.safetensors")
    assert a.meta["epoch"] == b.meta["epoch"] == epochs
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == epochs
