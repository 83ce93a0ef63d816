import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.checkpoint import load_checkpoint
from compressor.config import Config, ConfigError, from_dict, load_config, reference_markdown
from compressor.models import MODEL_KINDS
from compressor.objectives import METHOD_NAMES
from compressor.optim import OPTIMIZER_NAMES
from compressor.run_dir import CONFIG_FILE
from compressor.trainer import Callback, TrainingError

from .conftest import CLI_MODULE, ROOT, TINY_TRAIN, run_cli


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
    # a setting the chosen form never reads is an error too, and one it reads is checked
    bad.write_text("distill: {kd_batch_users: 512}\n")
    with pytest.raises(ConfigError, match=r"'distill.kd_batch_users' is read only with 'distill.kd_users: "
                                          r"user_batches', not 'every_batch'"):
        load_config(bad)
    bad.write_text("distill: {kd_users: user_batches, kd_batch_users: 0}\n")
    with pytest.raises(ConfigError, match=r"'distill.kd_batch_users' must be >= 1, got 0"):
        load_config(bad)
    bad.write_text("distill: {kd_users: user_batches, kd_batch_users: 512}\n")
    assert load_config(bad).distill.kd_batch_users == 512


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
    cmd = [sys.executable, "-m", CLI_MODULE, "train", "--out", str(killed), "--set", f"data.path={slice_data}",
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


@pytest.mark.parametrize("key", ["distill.tau", "distill.T", "distill.rrd.temperature"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0])
def test_temperatures_must_be_positive(key, value):
    section, *rest = key.split(".")
    raw = {section: {rest[0]: value} if len(rest) == 1 else {rest[0]: {rest[1]: value}}}
    with pytest.raises(ConfigError, match=rf"'{key}' must be > 0, got {value}"):
        from_dict(raw)
    with pytest.raises(ConfigError, match=rf"'{key}' must be > 0"):
        api.make_config(None, {key: value})
    from_dict({section: {rest[0]: 0.01} if len(rest) == 1 else {rest[0]: {rest[1]: 0.01}}})  # any positive value
    row = next(line for line in reference_markdown().splitlines() if line.startswith(f"| `{key}` |"))
    assert "Must be > 0." in row


def test_choice_lists_come_from_the_registries():
    assert METHOD_NAMES == ("rcekd", "ce", "rrd", "scratch")
    fields = {f"{sec}.{f.name}": f for sec in ("model", "train", "distill")
              for f in dataclasses.fields(type(getattr(Config(), sec)))}
    assert fields["distill.method"].metadata["choices"] == METHOD_NAMES
    assert fields["model.kind"].metadata["choices"] == MODEL_KINDS
    assert fields["train.optimizer"].metadata["choices"] == OPTIMIZER_NAMES


class _Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_start(self, trainer):
        self.calls.append("start")

    def on_error(self, trainer, exc):
        self.calls.append(exc)


def _files(out: Path) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_refused_command_changes_nothing_of_the_run(tmp_path, slice_data):
    """Refusals come before any write: another config into a finished run, a resume with another optimizer, a
    resume of nothing."""
    base = {"data.path": str(slice_data), "data.format": "users_dat", "train.threads": 1, "train.batch_size": 512,
            "model.dim": 8, "train.epochs": 2}
    out = tmp_path / "run"
    api.train(None, out, overrides=base, device="cpu", progress=False)
    before = _files(out)
    assert CONFIG_FILE in {str(p) for p in before}
    rec = _Recorder()
    with pytest.raises(TrainingError, match="already holds a run"):
        api.train(None, out, overrides=base | {"model.dim": 16}, device="cpu", progress=False, callbacks=[rec])
    assert _files(out) == before
    assert len(rec.calls) == 1 and isinstance(rec.calls[0], TrainingError)  # on_error, and no on_start
    with pytest.raises(TrainingError, match="train.optimizer adam"):
        api.train(None, out, overrides=base | {"train.optimizer": "lazy_adam", "train.epochs": 3}, device="cpu",
                  progress=False, resume=True)
    assert _files(out) == before
    with pytest.raises(TrainingError, match="nothing to resume"):
        api.train(None, tmp_path / "none", overrides=base, device="cpu", progress=False, resume=True)
    assert not (tmp_path / "none").exists()
