"""MLflow tracking and registry against a real `mlflow server` on a free loopback port (offline throughout)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.checkpoint import load_checkpoint
from compressor.evaluation import topk_excluding
from compress_app.tracking import TrackingError, promotion_gate
from compress_app.tracking.environment import metric_key

from .conftest import ROOT, TINY_TRAIN, assert_one_line_error, cli_command, free_port, run_cli
from .conftest import Server as ServingProcess

VENV_BIN = str(Path(sys.executable).parent)  # `mlflow models serve --env-manager local` execs `uvicorn` from PATH
KD_TINY = ["--set", "distill.K=5", "--set", "distill.M=10", "--set", "distill.L=5"]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:4]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop a process started with start_new_session=True, and its children (uvicorn workers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Server:
    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / f"server-{self.port}.log"
        root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
             "--artifacts-destination", str(root / "artifacts")],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(self.uri + "/health", self.proc, 120, self.log)

    def kill(self) -> None:
        stop(self.proc, signal.SIGKILL)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    yield s
    stop(s.proc)


@pytest.fixture(scope="session")
def env(server, tmp_path_factory):
    return {"MLFLOW_TRACKING_URI": server.uri, "COMPRESS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
            "COMPRESS_NO_MLFLOW": "0", "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture(scope="session")
def client(server):
    import mlflow
    mlflow.set_tracking_uri(server.uri)
    return mlflow.MlflowClient(server.uri)


def _train_args(out, data, epochs):
    return ["--out", out, "--set", f"data.path={data}", "--set", "model.dim=16", "--epochs", epochs, *TINY_TRAIN]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, slice_data, env):
    """A tracked teacher registered as rec-teacher@champion, and an RCE-KD student distilled from that
    models:/ URI and registered as rec-student with a gate it cannot pass (so: no alias)."""
    root = tmp_path_factory.mktemp("runs")
    teacher, student = root / "teacher", root / "student"
    run_cli("train", *_train_args(teacher, slice_data, 3), "--set", "train.lr=0.01", "--experiment", "kd",
            "--register", "rec-teacher", "--alias", "champion", env=env)
    run_cli("distill", "--teacher", "models:/rec-teacher@champion", "--method", "rcekd",
                *_train_args(student, slice_data, 2), *KD_TINY, "--experiment", "kd",
                "--register", "rec-student", "--alias", "champion", "--gate-share", "1000000", env=env)
    return {"teacher": teacher, "student": student}


def _run_of(client, run_dir: Path):
    run_id = load_checkpoint(run_dir).meta["mlflow_run_id"]
    return client.get_run(run_id)


# ----------------------------------------------------------------------------------------------- tracking

def test_train_run_params_metrics_tags_artifacts(runs, client, tmp_path):
    run = _run_of(client, runs["teacher"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "kd"
    p = run.data.params
    assert p["train.lr"] == "0.01" and p["model.dim"] == "16" and p["train.epochs"] == "3"
    assert p["distill.K"] == "50" and p["data.split.ratios"] == "[0.8, 0.1, 0.1]"  # the whole resolved config
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "valid_ndcg_at_10")}
    rows = [json.loads(line) for line in (runs["teacher"] / "metrics.jsonl").read_text().splitlines()]
    assert history == pytest.approx({r["epoch"]: r["valid_ndcg@10"] for r in rows})
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    for key in ("time_epoch_s", "time_eval_s", "valid_recall_at_20", "best_epoch", "wall_time_s"):
        assert key in run.data.metrics
    result = json.loads((runs["teacher"] / "result.json").read_text())
    for k, v in result["test"].items():
        if k != "users":
            assert run.data.metrics[f"test_{metric_key(k)}"] == pytest.approx(v)
    t = run.data.tags
    assert t["compress.command"] == "train" and t["compress.method"] == "scratch"
    assert t["compress.data_fingerprint"] == result["data_fingerprint"]
    assert t["compress.package_version"] == "0.1.0"
    assert t["compress.checkpoint_fingerprint"] == result["fingerprint"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert t["mlflow.source.git.commit"] == head.strip()
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "result.json", "metrics.jsonl", "train.log", "checkpoint", "plots"} <= files
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/valid_ndcg_at_10.png"]
    png = client.download_artifacts(run.info.run_id, "plots/valid_ndcg_at_10.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = client.download_artifacts(run.info.run_id, "checkpoint/model.safetensors", str(tmp_path))
    assert load_checkpoint(ckpt).fingerprint == result["fingerprint"]


def test_distilled_student_records_teacher_lineage(runs, client):
    teacher, student = _run_of(client, runs["teacher"]), _run_of(client, runs["student"])
    t = student.data.tags
    assert t["compress.command"] == "distill" and t["compress.method"] == "rcekd"
    assert t["compress.teacher.run_id"] == teacher.info.run_id
    assert t["compress.teacher.fingerprint"] == load_checkpoint(runs["teacher"]).fingerprint
    assert t["compress.teacher.source"] == "models:/rec-teacher@champion"
    assert teacher.info.run_id in t["mlflow.note.content"]
    assert student.data.params["distill.K"] == "5"
    kd_metrics = [k for k in student.data.metrics if k.startswith(("kd_", "loss"))]
    assert kd_metrics and [m.step for m in client.get_metric_history(student.info.run_id, "loss")] == [1, 2]


# ----------------------------------------------------------------------------------------------- registry

def test_registered_versions_alias_gate_and_tags(runs, client):
    mv = client.get_model_version_by_alias("rec-teacher", "champion")
    assert mv.run_id == _run_of(client, runs["teacher"]).info.run_id
    assert mv.tags["compress.gate"] == "passed" and "no teacher" in mv.tags["compress.gate.reason"]
    assert float(mv.tags["compress.test.ndcg_at_20"]) == pytest.approx(
        json.loads((runs["teacher"] / "result.json").read_text())["test"]["ndcg@20"])
    # the student could not pass a 1e6 x teacher gate: registered, but without the alias, and says why
    (sv,) = client.search_model_versions("name = 'rec-student'")
    assert sv.aliases == [] and sv.tags["compress.gate"] == "blocked"
    assert "< 1e+06 x teacher" in sv.tags["compress.gate.reason"]
    assert sv.tags["compress.teacher.run_id"] == mv.run_id
    assert sv.tags["compress.teacher.fingerprint"] == load_checkpoint(runs["teacher"]).fingerprint


def test_register_checkpoint_uses_the_given_store_not_the_global_one(runs, server, client, tmp_path):
    """From Python, with no MLFLOW_TRACKING_URI set: the version lands on the given server, nothing is written
    to a default ./mlflow.db."""
    code = ("import json, sys; from compress_app.tracking import register_checkpoint; "
            "print(json.dumps(register_checkpoint(sys.argv[1], 'rec-again', tracking_uri=sys.argv[2])))")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    p = subprocess.run([sys.executable, "-c", code, str(runs["teacher"] / "model.safetensors"), server.uri],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    reg = json.loads(p.stdout.strip().splitlines()[-1])
    assert client.get_model_version("rec-again", reg["version"]).run_id == load_checkpoint(runs["teacher"]).meta[
        "mlflow_run_id"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_only_safe_files_in_the_registered_model(runs, client):
    import mlflow

    def walk(uri, path=""):
        for a in mlflow.artifacts.list_artifacts(artifact_uri=f"{uri}/{path}" if path else uri):
            yield from walk(uri, a.path) if a.is_dir else [a.path]

    for name in ("rec-teacher", "rec-student"):
        files = sorted(walk(f"models:/{name}/1"))
        assert "bundle_pyfunc.py" in files, files
        manifest = json.loads(mlflow.artifacts.load_text(f"models:/{name}/1/artifacts/bundle/manifest.json"))
        for f in ("manifest.json", *manifest["files"]):  # every file the manifest hashes, ids and seen items too
            assert f"artifacts/bundle/{f}" in files, (f, files)
        assert "code/serving/recommender.py" in files  # the model carries its serving code
        assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".joblib", ".pt", ".pth",
                                                    ".safetensors"))]
        mlmodel = mlflow.artifacts.load_text(f"models:/{name}/1/MLmodel")
        assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel
        reqs = mlflow.artifacts.load_text(f"models:/{name}/1/requirements.txt")
        assert "torch" not in reqs and "compress-recsys" not in reqs


def _without_training_code(tmp_path: Path) -> dict:
    """Environment of a Python where torch and this project's training code cannot be imported (each is shadowed
    by a package whose import fails), as on a serving host that installed only MLflow's requirements."""
    shadow = tmp_path / "shadow"
    for name in ("torch", "compressor", "compress_app", "export"):
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this host')\n")
    return {"PYTHONPATH": str(shadow)}


def _reference_topk(ckpt_path, users: list[str], k: int) -> list[list[str]]:
    ckpt = load_checkpoint(ckpt_path)
    with torch.no_grad():
        u, i = ckpt.build_model().vectors()
    row = {x: n for n, x in enumerate(ckpt.user_ids.tolist())}
    top = topk_excluding(u, i, np.array([row[x] for x in users]), k, ckpt.train_indptr, ckpt.train_indices)
    return [ckpt.item_ids[r].tolist() for r in top.numpy()]


def test_pyfunc_loads_without_torch_and_answers_as_compress_serve(runs, env, tmp_path):
    users = load_checkpoint(runs["teacher"]).user_ids[[0, 5, 17]].tolist()
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch imported')\n"
        "m = mlflow.pyfunc.load_model('models:/rec-teacher@champion')\n"
        "users = json.loads(sys.argv[1])\n"
        "a = m.predict(pd.DataFrame({'user_id': users}), params={'k': 7})\n"
        "b = m.predict(users)\n"
        "assert 'torch' not in sys.modules and 'compressor' not in sys.modules\n"
        "print(json.dumps({'df': a['items'].tolist(), 'scores': a['scores'].tolist(), 'ids': a['user_id'].tolist(),"
        " 'list': b['items'].tolist()}))\n")
    p = subprocess.run([sys.executable, "-c", script, json.dumps(users)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, **env, **_without_training_code(tmp_path)),
                       cwd=runs["teacher"].parent)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["ids"] == users
    assert got["df"] == _reference_topk(runs["teacher"], users, 7)
    assert got["list"] == _reference_topk(runs["teacher"], users, 10)  # k defaults to 10
    # the same answers, scores included, as `compress serve` over the same registered version
    server = ServingProcess(cli_command("serve", "models:/rec-teacher@champion", "--workers", 1)[1:],
                            tmp_path / "serve.log", env=env)
    try:
        server.wait("/readyz")
        for user, items, scores in zip(users, got["df"], got["scores"]):
            answer = server.http.post("/recommend", json={"user_id": user, "k": 7}).json()
            assert answer["items"] == items and answer["scores"] == pytest.approx(scores, rel=1e-6)
    finally:
        server.stop()


def test_version_without_a_bundle_is_refused_by_serve_with_how_to_fix(runs, client, env, tmp_path):
    """A version registered the old way (the checkpoint as its artifact, no bundle) still resolves to its
    checkpoint, and `compress serve` says how to re-register it instead of failing obscurely."""
    import mlflow

    code = tmp_path / "legacy_model.py"
    code.write_text("import mlflow\nfrom mlflow.pyfunc import PythonModel\n\n\nclass Legacy(PythonModel):\n"
                    "    def predict(self, context, model_input, params=None):\n        return model_input\n\n\n"
                    "mlflow.models.set_model(Legacy())\n")
    run_id = load_checkpoint(runs["teacher"]).meta["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="legacy", python_model=str(code),
                                       artifacts={"checkpoint": str(runs["teacher"] / "model.safetensors")},
                                       pip_requirements=["mlflow"])
    client.create_registered_model("rec-legacy")
    mv = client.create_model_version("rec-legacy", source=info.model_uri, run_id=run_id, model_id=info.model_id)
    p = run_cli("evaluate", f"models:/rec-legacy/{mv.version}", "--json", env=env)
    want = json.loads((runs["teacher"] / "result.json").read_text())["test"]
    assert json.loads(p.stdout)["ndcg@20"] == pytest.approx(want["ndcg@20"], abs=1e-9)
    p = run_cli("serve", f"models:/rec-legacy/{mv.version}", "--port", free_port(), env=env, check=False)
    assert_one_line_error(p, "holds no serving bundle", "re-register")


def test_models_uri_accepted_by_evaluate(runs, env):
    p = run_cli("evaluate", "models:/rec-teacher/1", "--json", env=env)
    want = json.loads((runs["teacher"] / "result.json").read_text())["test"]
    got = json.loads(p.stdout)
    assert got == pytest.approx({k: v for k, v in want.items() if k != "users"}, abs=1e-9)
    p = run_cli("evaluate", "models:/rec-teacher/99", "--json", env=env, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "models:/rec-teacher/99" in p.stderr


def test_promote_applies_the_gate_and_force_overrides(runs, client, env):
    p = run_cli("promote", "rec-student", "1", "--alias", "staging", "--gate-share", "1000000", env=env,
                check=False)
    assert p.returncode == 1 and "not promoted" in p.stderr and "--force" in p.stderr
    mv = client.get_model_version("rec-student", "1")
    assert mv.aliases == [] and mv.tags["compress.gate"] == "blocked"
    p = run_cli("promote", "rec-student", "1", "--alias", "staging", "--gate-share", "1000000", "--force", env=env)
    assert json.loads(p.stdout)["gate"] == "forced"
    assert client.get_model_version_by_alias("rec-student", "staging").version == "1"
    p = run_cli("promote", "rec-student", "1", "--alias", "champion", "--gate-share", "0", env=env)
    assert json.loads(p.stdout)["gate"] == "passed"
    assert client.get_model_version("rec-student", "1").tags["compress.gate"] == "passed"


def test_promotion_gate_rule():
    meta = {"metrics": {"test": {"ndcg@20": 0.09}}, "teacher": {"metrics": {"test": {"ndcg@20": 0.1}}}}
    assert promotion_gate(meta, 0.9)[0] and not promotion_gate(meta, 0.95)[0]
    assert "0.09000 < 0.95 x teacher 0.10000" in promotion_gate(meta, 0.95)[1]
    assert promotion_gate({"metrics": {"test": {"ndcg@20": 0.0}}, "teacher": None}, 0.9)[0]  # no teacher
    ok, why = promotion_gate({"metrics": {"test": {"ndcg@20": 0.2}}, "teacher": {"source": "t.npz"}}, 0.9)
    assert not ok and "no recorded test ndcg@20" in why
    tags = {"compress.bundle.index_recall": "0.80", "compress.bundle.recall_floor": "0.95"}
    ok, why = promotion_gate(meta, 0.9, tags)
    assert not ok and "bundle index recall 0.8000 < floor 0.9500" in why
    with pytest.raises(TrackingError):
        promotion_gate(meta, -1)


# ----------------------------------------------------------------------------------------------- failures

def test_unreachable_server_is_a_fast_clear_error(tmp_path, slice_data, env):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # MLflow's default retries block for minutes; bounded ones fail in seconds: the command must be done well
    # inside the subprocess timeout (which leaves room for start-up on a loaded 2-core box), or the test fails.
    p = run_cli("train", *_train_args(tmp_path / "r", slice_data, 2), env=dict(env, MLFLOW_TRACKING_URI=dead),
                check=False, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"MLflow tracking server {dead} is unreachable" in p.stderr and "--mlflow-optional" in p.stderr
    assert not (tmp_path / "r" / "model.safetensors").exists()
    p = run_cli("train", *_train_args(tmp_path / "r", slice_data, 2), "--tracking-uri", dead, "--mlflow-optional",
                env=env)
    assert (tmp_path / "r" / "model.safetensors").exists()
    assert load_checkpoint(tmp_path / "r").meta.get("mlflow_run_id") is None  # trained, untracked


def test_server_lost_mid_run_keeps_unsent_metrics_and_resume_sends_them(tmp_path, slice_data, env):
    srv = Server(tmp_path / "srv")
    out = tmp_path / "run"
    try:
        cmd = [*cli_command("train"), *map(str, _train_args(out, slice_data, 6)),
               "--set", "train.patience=100", "--tracking-uri", srv.uri]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=dict(os.environ, **env))
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # freeze training after its first epoch, lose the server, go on
        srv.kill()
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        stop(srv.proc, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert (out / "model.safetensors").exists() and json.loads(stdout.strip().splitlines()[-1])["epochs_run"] == 6
    unsent = [json.loads(line) for line in (out / "mlflow-unsent.jsonl").read_text().splitlines()]
    steps = {r["step"] for r in unsent if r["kind"] == "metrics" and "valid_ndcg_at_10" in r["metrics"]}
    assert steps and max(steps) == 6
    assert any(r["kind"] == "artifact" and r["path"].endswith("model.safetensors") for r in unsent)
    run_id = load_checkpoint(out).meta["mlflow_run_id"]

    # The server is back (same store, new port): --resume on the finished run dir sends what was kept.
    srv2 = Server(tmp_path / "srv")
    try:
        run_cli("train", "--out", out, "--resume", "--quiet", "--tracking-uri", srv2.uri, env=env)
        import mlflow
        c = mlflow.MlflowClient(srv2.uri)
        assert sorted(m.step for m in c.get_metric_history(run_id, "valid_ndcg_at_10")) == [1, 2, 3, 4, 5, 6]
        assert c.get_run(run_id).info.status == "FINISHED"
        assert "checkpoint" in {a.path for a in c.list_artifacts(run_id)}
        assert not (out / "mlflow-unsent.jsonl").exists()
    finally:
        stop(srv2.proc)


# ----------------------------------------------------------------------------------------------- serving

def test_mlflow_models_serve_answers_topk_over_http(runs, env, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/rec-teacher@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, **env, **_without_training_code(tmp_path)),
        start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, 180, log)
        users = load_checkpoint(runs["teacher"]).user_ids[[1, 2, 3]].tolist()
        body = json.dumps({"dataframe_records": [{"user_id": u} for u in users], "params": {"k": 5}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            preds = json.loads(resp.read())["predictions"]
        assert [p["user_id"] for p in preds] == users
        assert [p["items"] for p in preds] == _reference_topk(runs["teacher"], users, 5)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"inputs": ["no-such-user"]}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 400 and "unknown user id" in e.value.read().decode()
    finally:
        stop(proc)


def test_registry_option_mistakes_are_one_line_errors(tmp_path, slice_data, env):
    p = run_cli("train", *_train_args(tmp_path / "a", slice_data, 1), "--no-mlflow", "--register", "x", env=env,
                check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--register needs MLflow" in p.stderr
    p = run_cli("train", *_train_args(tmp_path / "b", slice_data, 1), "--alias", "champion", env=env, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "--alias needs --register" in p.stderr


def test_serve_follows_the_alias_and_refuses_a_tampered_version(runs, client, server, env, tmp_path, slice_data,
                                                                 monkeypatch):
    """`compress serve models:/NAME@ALIAS --follow-alias`: moving the alias swaps the answering version in both
    workers without a restart; a version whose bundle fails verification is not swapped in."""
    from compress_app.tracking import download_registered_bundle
    from serving.bundle import open_bundle
    from serving.recommender import Recommender

    for seed in (1, 2, 3):
        run_cli("train", *_train_args(tmp_path / f"v{seed}", slice_data, 1), "--seed", seed, "--experiment", "follow",
                "--register", "rec-follow", env=env)
    client.set_registered_model_alias("rec-follow", "live", "1")
    monkeypatch.setenv("COMPRESS_CACHE_DIR", env["COMPRESS_CACHE_DIR"])  # the cache the server's follower reads
    # Version 3's bundle is tampered with in the registry's own artifact store: it must never be served (a damaged
    # local copy alone would be downloaded again).
    model_id = client.get_model_version("rec-follow", "3").source.rsplit("/", 1)[-1]
    (stored,) = [p for p in server.root.rglob("items.faiss") if model_id in str(p)]
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    stored.write_bytes(bytes(blob))

    def expected(version, user):
        rec = Recommender(open_bundle(download_registered_bundle(f"models:/rec-follow/{version}"), faiss_threads=None))
        return rec.item_external_ids(rec.recommend(rec.user_indices([user]), 5)[0][0]).tolist()

    user = load_checkpoint(tmp_path / "v1").user_ids[3]
    srv = ServingProcess(cli_command("serve", "models:/rec-follow@live", "--follow-alias", "--poll-s", 0.5,
                                        "--workers", 2)[1:], tmp_path / "follow.log", env=env)

    def answers(n=12):
        out = []
        for _ in range(n):
            r = srv.http.post("/recommend", json={"user_id": user, "k": 5})
            assert r.status_code == 200, r.text
            out.append((r.headers["x-model-version"], r.json()["items"]))
        return out

    def wait_for(version, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = answers()
            if all(v == f"models:/rec-follow/{version}" for v, _ in got):
                return got
            time.sleep(0.3)
        raise AssertionError(f"still answering {sorted({v for v, _ in got})}, not version {version}")

    try:
        srv.wait("/readyz")
        assert all(items == expected(1, user) for _, items in wait_for(1))
        client.set_registered_model_alias("rec-follow", "live", "2")
        assert all(items == expected(2, user) for _, items in wait_for(2))
        assert srv.http.get("/metadata").json()["model_version"] == "models:/rec-follow/2"
        client.set_registered_model_alias("rec-follow", "live", "3")
        time.sleep(3)  # several polls: version 3 is downloaded from the cache, fails verification, is refused
        assert all(v == "models:/rec-follow/2" for v, _ in answers())
        client.set_registered_model_alias("rec-follow", "live", "1")
        wait_for(1)
        r = srv.http.post("/admin/swap", json={"bundle": str(tmp_path / "v2" / "bundle")})
        assert r.status_code in (403, 409)  # the alias alone chooses what a following server serves
    finally:
        srv.stop()


def test_a_torchrun_job_is_one_run_tracked_by_rank_0(tmp_path, slice_data, env, client, runs):
    out = tmp_path / "two-ranks"
    run_cli("train", *_train_args(out, slice_data, 2), "--nproc", 2, "--experiment", "two-ranks", env=env)
    experiment = client.get_experiment_by_name("two-ranks")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert found[0].data.params["world_size"] == "2"
    assert found[0].info.run_id == load_checkpoint(out).meta["mlflow_run_id"]
    assert _run_of(client, runs["teacher"]).data.params["world_size"] == "1"
