"""`compress pipeline` end to end on a slice: stages, reuse on re-run, kill-and-rerun, report, registry."""

import json
import os
import signal
import subprocess
import time

import pytest

from compress_app.pipeline.options import PipelineOptions, stage_overrides
from compressor.checkpoint import read_meta

from .conftest import ROOT, assert_one_line_error, cli_command, run_cli


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, slice_data):
    d = tmp_path_factory.mktemp("recipes")
    data = f"data: {{path: {slice_data}, format: users_dat}}\n"
    train = "train: {batch_size: 512, lr: 0.005, threads: 1, patience: 5}\n"
    (d / "teacher.yaml").write_text(data + "model: {kind: mf, dim: 32}\n" + train)
    (d / "student.yaml").write_text(data + "model: {kind: mf, dim: 8}\n" + train)
    (d / "kd.yaml").write_text(data + "model: {kind: mf, dim: 8}\n" + train + "distill: {method: rcekd, K: 10, M: 30, "
                               "L: 10, lambda_kd: 1.0, kd_users: user_batches}\n")
    return d


def _args(recipes, out, *extra):
    return ["pipeline", "--out", out, "--teacher-config", recipes / "teacher.yaml", "--student-config",
            recipes / "student.yaml", "--kd-config", recipes / "kd.yaml", "--epochs", 4, "--quiet", *extra]


def test_pipeline_runs_reuses_and_reports(recipes, tmp_path):
    out = tmp_path / "p"
    env = {"COMPRESS_NO_MLFLOW": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    # cwd: MLflow's SQLite store puts artifacts under ./mlruns, which must not be the checkout
    p = run_cli(*_args(recipes, out, "--register", "pipe-student", "--alias", "champion", "--gate-share", "0"),
                env=env, cwd=tmp_path)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    report = (out / "report" / "report.md").read_text()
    for label in ("teacher", "scratch student", "RCE-KD student"):
        assert f"| {label} |" in report
    # how each model was trained, from its checkpoint: the teacher at its recipe's patience (5), not --patience
    teacher_line = next(x for x in report.splitlines() if x.startswith("- Teacher: trained here"))
    assert "train.optimizer adam" in teacher_line and "patience 5;" in teacher_line and "of 4 (" in teacher_line
    assert "- RCE-KD student: trained here" in report
    configs = {st: read_meta(out / st)["config"] for st in ("teacher", "scratch", "rcekd")}
    assert {st: c["train"]["patience"] for st, c in configs.items()} == {"teacher": 5, "scratch": 5, "rcekd": 5}
    assert configs["rcekd"]["distill"]["kd_users"] == "once_per_epoch"  # --kd-users' default, not the recipe's
    assert "distill.kd_users once_per_epoch" in report
    assert (out / "report" / "valid_ndcg10.png").stat().st_size > 1000
    for stage in ("teacher", "scratch", "rcekd"):  # each stage keeps its own log, epochs included
        assert "epoch 1 " in (out / stage / "train.log").read_text()
    assert (out / "bundles" / "rcekd" / "manifest.json").exists()
    assert summary["registered"]["alias"] == "champion"
    assert summary["parameter_ratio"] == pytest.approx(4.0)  # dim 32 teacher, dim 8 students, same users x items
    assert 1 < summary["bundle_ratio"] <= summary["parameter_ratio"]
    # the gap share with its 95% CI: the same paired bootstrap `compress evaluate --gap` reports on these runs
    share = summary["gap_share"]
    ev = json.loads(run_cli("evaluate", out / "rcekd", "--gap", out / "scratch", out / "teacher", "--json")
                    .stdout.strip().splitlines()[-1])
    assert share == ev["gap"]["share"]["ndcg@20"]
    student_row = next(x for x in report.splitlines() if x.startswith("| RCE-KD student |"))
    if share["lo"] is not None:
        assert share["lo"] <= share["value"] <= share["hi"]
        assert f"{100 * share['value']:.0f}% [{100 * share['lo']:.0f}%, {100 * share['hi']:.0f}%]" in student_row
    else:  # a gap whose own interval holds 0 (4 epochs on a slice): the share without an interval, said so
        assert f"{100 * share['value']:.0f}% [CI undefined]" in student_row
    lo, hi = ev["metrics"]["ndcg@20"]["lo"], ev["metrics"]["ndcg@20"]["hi"]
    assert f"[{lo:.4f}, {hi:.4f}]" in student_row
    assert "paired bootstrap over the" in report
    assert "compress serve" in p.stdout
    run_cli("export", "--verify", out / "bundles" / "rcekd")
    # second run: every stage reused, and summary.json says so
    model_mtime = {s: (out / s / "model.safetensors").stat().st_mtime_ns for s in ("teacher", "scratch", "rcekd")}
    p2 = run_cli(*_args(recipes, out, "--register", "pipe-student", "--alias", "champion", "--gate-share", "0"),
                 env=env, cwd=tmp_path)
    stages = json.loads(p2.stdout.strip().splitlines()[-1])["stages"]
    assert stages == {"teacher": "reused", "scratch": "reused", "rcekd": "reused", "export.teacher": "reused",
                      "export.scratch": "reused", "export.rcekd": "reused", "register": "reused"}
    assert json.loads((out / "report" / "summary.json").read_text())["stages"] == stages
    assert {s: (out / s / "model.safetensors").stat().st_mtime_ns for s in model_mtime} == model_mtime
    # a rerun asking for another student is refused, not answered with the kept one; nothing is touched
    p3 = run_cli(*_args(recipes, out, "--kd-users", "every_batch"), env=env, cwd=tmp_path, check=False)
    assert_one_line_error(p3, str(out / "rcekd"), "distill.kd_users 'once_per_epoch' (now 'every_batch')", "--fresh")
    assert {s: (out / s / "model.safetensors").stat().st_mtime_ns for s in model_mtime} == model_mtime


def test_kill_midway_then_rerun_finishes_without_redoing_stages(recipes, tmp_path):
    out = tmp_path / "k"
    cmd = cli_command(*_args(recipes, out, "--epochs", 30))
    env = dict(os.environ, COMPRESS_NO_MLFLOW="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "rcekd" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "teacher" / "result.json").exists() and not (out / "rcekd" / "result.json").exists()
    teacher_mtime = (out / "teacher" / "model.safetensors").stat().st_mtime
    p = run_cli(*_args(recipes, out, "--epochs", 30, "--bootstrap", 0), env={"COMPRESS_NO_MLFLOW": "1"})
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    stages = summary["stages"]
    assert stages["teacher"] == "reused" and stages["rcekd"] == "resumed"
    assert (out / "teacher" / "model.safetensors").stat().st_mtime == teacher_mtime
    # --bootstrap 0: the report says no intervals were computed and shows the point estimates only
    assert summary["gap_share"] is None
    report = (out / "report" / "report.md").read_text()
    assert "Confidence intervals: not computed (--bootstrap 0)." in report
    assert " [" not in next(x for x in report.splitlines() if x.startswith("| RCE-KD student |"))
    hist = [json.loads(x) for x in (out / "rcekd" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))  # no epoch lost or repeated


def test_scratch_trains_beside_teacher_and_dies_with_a_killed_pipeline(recipes, tmp_path):
    """The scratch baseline trains in a second process during the teacher stage; SIGKILL of the pipeline takes
    it down too (no orphan keeps writing into scratch/), and the re-run resumes both stages cleanly."""
    out = tmp_path / "par"
    # A teacher slow enough that the scratch process (which must first start an interpreter and import the
    # library) trains epochs while the teacher is still at it, even on a loaded 2-core box.
    slow = recipes / "teacher-slow.yaml"
    slow.write_text((recipes / "teacher.yaml").read_text().replace("dim: 32", "dim: 1024"))
    cmd = cli_command(*_args(recipes, out, "--epochs", 60, "--set", "train.patience=60", "--teacher-config", slow))
    env = dict(os.environ, COMPRESS_NO_MLFLOW="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scratch_log, teacher_log = out / "scratch" / "metrics.jsonl", out / "teacher" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (scratch_log.exists() and teacher_log.exists()
                                          and len(scratch_log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    assert not (out / "teacher" / "result.json").exists(), "the teacher finished before the scratch stage started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    size = scratch_log.stat().st_size
    time.sleep(2.0)
    assert scratch_log.stat().st_size == size, "the scratch process outlived the killed pipeline"
    p = run_cli(*_args(recipes, out, "--epochs", 60, "--set", "train.patience=60", "--teacher-config", slow),
                env={"COMPRESS_NO_MLFLOW": "1"})
    assert json.loads(p.stdout.strip().splitlines()[-1])["stages"]["scratch"] == "resumed"
    for stage in ("teacher", "scratch"):
        hist = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))
        # every process the pipeline starts sets its pools deliberately (the scratch one is its own process)
        assert read_meta(out / stage)["threads"]["omp_wait_policy"] == "PASSIVE"
    assert read_meta(out / "scratch")["threads"]["torch"] == 1  # its recipe's train.threads
    assert (out / "report" / "report.md").exists()


def test_second_pipeline_in_the_same_directory_is_refused(recipes, tmp_path):
    import fcntl

    out = tmp_path / "locked"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "metrics.jsonl").write_text("the running pipeline's\n")
    with open(out / ".pipeline.lock", "w") as f:
        f.write("4242")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        p = run_cli(*_args(recipes, out, "--fresh"), env={"COMPRESS_NO_MLFLOW": "1"}, check=False)
    assert_one_line_error(p, "another compress pipeline is running there (pid 4242)")
    # --fresh deleted nothing of the running pipeline's
    assert (out / "teacher" / "metrics.jsonl").read_text() == "the running pipeline's\n"


def test_pipeline_refuses_recipes_it_cannot_compare_before_training(recipes, tmp_path):
    """The report and the promotion gate compare test NDCG@20: eval_ks without 20 is refused up front, in one
    line, before any stage runs."""
    out = tmp_path / "no20"
    p = run_cli(*_args(recipes, out, "--set", "train.eval_ks=[10]", "--set", "train.metric=ndcg@10"),
                env={"COMPRESS_NO_MLFLOW": "1"}, check=False)
    assert_one_line_error(p, "train.eval_ks", "20")
    assert not (out / "teacher").exists() and not (out / "scratch").exists()


def test_fresh_deletes_nothing_when_the_run_is_refused(recipes, tmp_path):
    """--fresh with a missing --teacher (or any other refusal) is refused before a single stage is removed."""
    out = tmp_path / "fresh"
    (out / "rcekd").mkdir(parents=True)
    (out / "rcekd" / "metrics.jsonl").write_text("an earlier run's\n")
    p = run_cli(*_args(recipes, out, "--fresh", "--teacher", tmp_path / "no-such-teacher"),
                env={"COMPRESS_NO_MLFLOW": "1"}, check=False)
    assert_one_line_error(p, "no-such-teacher")
    assert (out / "rcekd" / "metrics.jsonl").read_text() == "an earlier run's\n"


def test_patience_and_kd_users_reach_the_rcekd_stage_only(tmp_path):
    o = PipelineOptions(out=tmp_path, patience=3, kd_users="every_batch", epochs=7)
    for stage in ("teacher", "scratch"):
        ov = stage_overrides(o, stage)
        assert "train.epochs=7" in ov and not any(x.startswith(("train.patience", "distill.kd_users")) for x in ov)
    ov = stage_overrides(o, "rcekd")
    assert "train.patience=3" in ov and "distill.kd_users=every_batch" in ov
