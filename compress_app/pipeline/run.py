"""`compress pipeline`: interactions in, a served-ready, verified, registered student out, with a report.

Part of the CLI layer (like cli.py, the only code that touches compressor, export and serving together).
Stages, each a directory under OUT that is reused when finished, resumed when interrupted, redone with --fresh:

  teacher/   compress train (or --teacher: an existing checkpoint, used as is)
  scratch/   the student recipe trained with BPR only (the baseline the report compares against)
  rcekd/     the student distilled with RCE-KD from the teacher
  bundles/   the three models exported (ONNX + FAISS), verified; bundles/rcekd is what `compress serve` serves
  report/    report.md + PNG figures; registered.json when the student was registered in MLflow
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .trainer import Callback

log = logging.getLogger("compressor.pipeline")

STAGE_RUNS = ("teacher", "scratch", "rcekd")


@dataclass
class PipelineOptions:
    out: Path
    data: str | None = None
    teacher: str | None = None
    teacher_config: str = "configs/citeulike/mf-teacher.yaml"
    student_config: str = "configs/citeulike/mf-student.yaml"
    kd_config: str = "configs/citeulike/mf-rcekd.yaml"
    overrides: tuple = ()
    epochs: int | None = None
    patience: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    fresh: bool = False
    quiet: bool = False
    mlflow: dict | None = None  # None: untracked; else {"tracking_uri", "experiment", "optional", ...}
    register: str | None = None
    alias: str | None = None
    gate_share: float = 0.9
    index: str = "auto"
    parallel: bool = True  # train the scratch baseline beside the teacher in a second process
    log_file: Path | None = None  # where the scratch process appends its log lines (the pipeline's log)


def _recipe(path: str) -> str:
    """A recipe path as given, or the shipped recipe of that name when run outside the project directory."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (Path(__file__).resolve().parents[1] / p).exists():
        return str(Path(__file__).resolve().parents[1] / p)
    return path


def _run_done(run_dir: Path) -> dict | None:
    p = run_dir / "result.json"
    return json.loads(p.read_text()) if p.exists() else None


def _prepare_run_dir(run_dir: Path) -> bool:
    """True: resume the interrupted run there. A dir without a resumable checkpoint is cleared: it holds no
    finished epoch (killed during the first one), so nothing is lost."""
    if (run_dir / "last.safetensors").exists():
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return False


def _overrides(o: PipelineOptions, baseline: bool = False) -> list[str]:
    """Overrides of a stage. The scratch baseline keeps its recipe's patience: it is cheap, and a short patience
    would stop it on the plateau of its early validation curve, making the comparison flatter the student."""
    ov = list(o.overrides)
    if o.data:
        ov.append(f"data.path={o.data}")
    if o.epochs is not None:
        ov.append(f"train.epochs={o.epochs}")
    if o.patience is not None and not baseline:
        ov.append(f"train.patience={o.patience}")
    if o.threads is not None:
        ov.append(f"train.threads={o.threads}")
    ov.append(f"train.seed={o.seed}")
    return ov


def _callbacks(o: PipelineOptions, command: str) -> list:
    if o.mlflow is None:
        return []
    from .tracking import MlflowTracker

    return [MlflowTracker(command, tracking_uri=o.mlflow.get("tracking_uri"), experiment=o.mlflow.get("experiment"),
                          optional=o.mlflow.get("optional", False))]


def _stage(name: str, run_dir: Path, fn) -> dict:
    done = _run_done(run_dir)
    if done is not None:
        log.info("stage %-8s reused: %s (finished earlier; test ndcg@20 %.4f) — --fresh redoes it", name, run_dir,
                 done["test"]["ndcg@20"])
        return done
    resume = _prepare_run_dir(run_dir)
    log.info("stage %-8s %s: %s", name, "resuming" if resume else "running", run_dir)
    t0 = time.perf_counter()
    # Each stage's own log beside its checkpoints, as `compress train` / `compress distill` write it.
    from .cli import log_file_handler

    run_dir.mkdir(parents=True, exist_ok=True)
    handler = log_file_handler(run_dir / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        fn(resume)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    done = _run_done(run_dir)
    log.info("stage %-8s finished in %.0fs: test ndcg@20 %.4f", name, time.perf_counter() - t0,
             done["test"]["ndcg@20"])
    return done


def _lock(out: Path):
    """One pipeline per directory: a second one would train into the same stage directories."""
    import fcntl

    f = open(out / ".pipeline.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        from .trainer import TrainingError
        raise TrainingError(f"{out}: another compress pipeline is running there (pid {f.read().strip() or '?'}); "
                            "wait for it or use another --out") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _train_scratch(o: PipelineOptions, resume: bool, progress: bool, extra_callbacks=()):
    from . import api

    return api.distill(None, _recipe(o.student_config), o.out / "scratch", method="scratch",
                       overrides=_overrides(o, baseline=True), device=o.device, resume=resume,
                       callbacks=[*_callbacks(o, "distill"), *extra_callbacks], progress=progress)


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the pipeline process dies, even by SIGKILL, so a killed
    pipeline never leaves an orphan writing into scratch/ while its re-run trains there too."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the parent-pid check below still applies
        pass


class _ReclaimCores(Callback):
    """Teacher callback: once the scratch process beside it has finished, give the teacher every core."""

    def __init__(self, proc, threads: int):
        self.proc, self.threads, self.done = proc, threads, False

    def on_epoch_end(self, trainer, row):
        if not self.done and not self.proc.is_alive():
            from .device import configure_threads

            self.done = True
            n = configure_threads(self.threads)
            log.info("stage teacher  continues with %d thread%s (the scratch process has finished)", n,
                     "" if n == 1 else "s")


class _ExitWithParent(Callback):
    """Trainer callback (portable fallback of _die_with_parent): stop after the epoch in which the parent died."""

    def __init__(self, parent: int):
        self.parent = parent

    def on_epoch_end(self, trainer, row):
        if os.getppid() != self.parent:
            os._exit(3)


def _scratch_process_main(o: PipelineOptions, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the pipeline died before the death signal was armed
        os._exit(3)
    from .cli import setup_pipeline_logging

    setup_pipeline_logging(True, o.log_file)
    from .errors import USER_ERRORS

    try:
        _stage("scratch", o.out / "scratch",
               lambda resume: _train_scratch(o, resume, progress=False, extra_callbacks=[_ExitWithParent(parent)]))
    except USER_ERRORS as e:
        log.error("stage scratch  failed: %s", e)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C reaches both processes; the pipeline process says what happened
        raise SystemExit(130) from None


def _start_scratch_process(o: PipelineOptions):
    log.info("stage scratch  trains in a second process beside the teacher (%d thread%s each)", o.threads,
             "" if o.threads == 1 else "s")
    proc = multiprocessing.get_context("spawn").Process(target=_scratch_process_main, args=(o, os.getpid()),
                                                        name="compress-scratch", daemon=False)
    proc.start()
    return proc


def _join_scratch(proc, run_dir: Path) -> None:
    proc.join()
    if proc.exitcode != 0 and _run_done(run_dir) is None:
        from .trainer import TrainingError
        raise TrainingError(f"stage scratch failed in its process (exit code {proc.exitcode}); its log lines are "
                            "above and in the pipeline's log")


def _stop(proc) -> None:
    if proc is not None and proc.is_alive():
        proc.terminate()
        proc.join(10)


def _export(name: str, checkpoint: Path, bundle_dir: Path, index: str) -> dict:
    from export.from_checkpoint import export_checkpoint
    from serving.bundle import BundleError, verify_bundle

    from .checkpoint import load_checkpoint

    fingerprint = load_checkpoint(checkpoint).fingerprint
    manifest_path = bundle_dir / "manifest.json"
    if manifest_path.exists():
        try:
            verify_bundle(bundle_dir)
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("lineage", {}).get("checkpoint_fingerprint") == fingerprint:
                log.info("stage export   reused: %s (verified, same checkpoint %s)", bundle_dir, fingerprint)
                return manifest
        except BundleError as e:
            log.warning("stage export   %s failed verification (%s); exporting again", bundle_dir, e)
    log.info("stage export   %s -> %s", name, bundle_dir)
    return export_checkpoint(checkpoint, bundle_dir, index_factory=index, overwrite=True)


def _latency(bundle_dir: Path, n: int = 2000, k: int = 20) -> dict:
    """Single-user recommend latency in-process (ONNX Runtime -> FAISS -> exclude seen), 1 thread."""
    from serving.bundle import open_bundle
    from serving.recommender import Recommender

    rec = Recommender(open_bundle(bundle_dir))
    rng = np.random.default_rng(0)
    users = rng.integers(0, rec.bundle.num_users, size=n + 100)
    times = []
    for i, u in enumerate(users):
        t0 = time.perf_counter()
        rec.recommend(np.array([u]), k, exclude_seen=True)
        if i >= 100:  # warm-up
            times.append((time.perf_counter() - t0) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)), "calls": n, "k": k}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def run_pipeline(o: PipelineOptions) -> dict:
    out = o.out
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)  # before --fresh deletes anything: a running pipeline's stages are never touched
    try:
        return _run_locked(o, out)
    finally:
        lock.close()


def _run_locked(o: PipelineOptions, out: Path) -> dict:
    from . import api
    from .checkpoint import load_checkpoint
    from .report import ReportEntry, read_history, write_report

    if o.fresh:
        log.info("--fresh: removing %s and the cached teacher top-K beside it", out)
        for sub in (*STAGE_RUNS, "bundles", "report", ".topk-cache"):
            shutil.rmtree(out / sub, ignore_errors=True)
    ov = _overrides(o)
    t_start = time.perf_counter()
    progress = not o.quiet

    # 1. teacher, 2. scratch student. The two are independent: when both must be trained, the scratch baseline
    # trains in a second process beside the teacher, each with half the cores (two stages at one thread each
    # on 2 cores is close to twice as fast as one after the other, and a single process cannot use 2 threads
    # well on these small matmuls).
    scratch_proc = None
    if o.teacher:
        teacher_ckpt = Path(o.teacher)
        log.info("stage teacher  given: %s", o.teacher)
        teacher_res = {"test": load_checkpoint(teacher_ckpt).meta.get("metrics", {}).get("test")}
        if not teacher_res["test"]:
            from .errors import MismatchError
            raise MismatchError(f"{o.teacher}: the teacher checkpoint has no test metrics (train it with compress)")
        teacher_dir = teacher_ckpt if teacher_ckpt.is_dir() else teacher_ckpt.parent
    else:
        teacher_dir = out / "teacher"
        teacher_ckpt = teacher_dir
        parallel = (o.parallel and _run_done(teacher_dir) is None and _run_done(out / "scratch") is None)
        half = max(1, _cores() // 2)
        if parallel:
            scratch_proc = _start_scratch_process(dataclasses.replace(o, threads=o.threads or half))
        teacher_ov = ov if not parallel or o.threads else [*ov, f"train.threads={half}"]
        reclaim = [_ReclaimCores(scratch_proc, o.threads or 0)] if parallel else []
        try:
            teacher_res = _stage("teacher", teacher_dir, lambda resume: api.train(
                _recipe(o.teacher_config), teacher_dir, overrides=teacher_ov, device=o.device, resume=resume,
                callbacks=[*_callbacks(o, "train"), *reclaim], progress=progress))
        except BaseException:
            _stop(scratch_proc)
            raise
    scratch_res = None
    if scratch_proc is not None:
        _join_scratch(scratch_proc, out / "scratch")
        scratch_res = _run_done(out / "scratch")
    if scratch_res is None:
        scratch_res = _stage("scratch", out / "scratch", lambda resume: _train_scratch(o, resume, progress))
    # 3. RCE-KD student (the same student recipe as the scratch one, with the teacher)
    rcekd_res = _stage("rcekd", out / "rcekd", lambda resume: api.distill(
        teacher_ckpt, _recipe(o.kd_config), out / "rcekd", method="rcekd", overrides=ov, device=o.device, resume=resume,
        callbacks=_callbacks(o, "distill"), progress=progress, teacher_label=str(o.teacher or teacher_dir)))
    # 4. export all three (the RCE-KD bundle is the product; the others size and time the comparison)
    manifests = {}
    for name, run in (("teacher", teacher_ckpt), ("scratch", out / "scratch"), ("rcekd", out / "rcekd")):
        manifests[name] = _export(name, Path(run), out / "bundles" / name, o.index)
    bundle = out / "bundles" / "rcekd"
    # 5. register the RCE-KD student (after its bundle verified), with the gated alias
    registered = None
    if o.register:
        registered = _register(o, out / "rcekd", bundle)
    # 6. report
    entries = []
    for label, name, res in (("teacher", "teacher", teacher_res), ("scratch student", "scratch", scratch_res),
                             ("RCE-KD student", "rcekd", rcekd_res)):
        m = manifests[name]
        run_dir = teacher_dir if name == "teacher" else out / name
        entries.append(ReportEntry(label, run_dir, params=(m["num_users"] + m["num_items"]) * m["dim"], dim=m["dim"],
                                   test=res["test"], bundle_bytes=_dir_bytes(out / "bundles" / name),
                                   latency_ms=_latency(out / "bundles" / name), history=read_history(run_dir)))
    notes = [f"Data: {load_checkpoint(out / 'rcekd').meta['data_source']}.",
             f"Bundle index: {manifests['rcekd']['index']['factory']} "
             f"({'exact' if manifests['rcekd']['index']['exact'] else 'approximate'}).",
             f"Pipeline wall time this invocation: {time.perf_counter() - t_start:.0f}s (stages reused: see log)."]
    if registered:
        notes.append(f"Registered as {registered['model_uri']}"
                     + (f" with alias '{registered['alias']}'" if registered.get("alias")
                        else f" without alias ({registered.get('gate_reason')})") + ".")
    report = write_report(out / "report", *entries, title="Compression report", notes=notes)
    if o.mlflow is not None:
        _log_report(o, out / "report")
    summary = {"out": str(out), "teacher": str(teacher_dir), "scratch": str(out / "scratch"),
               "rcekd": str(out / "rcekd"), "bundle": str(bundle), "report": str(report),
               "test_ndcg@20": {e.label: e.test["ndcg@20"] for e in entries}, "registered": registered,
               "serve": f"compress serve {bundle}"}
    (out / "report" / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _register(o: PipelineOptions, run_dir: Path, bundle: Path) -> dict | None:
    from .checkpoint import load_checkpoint
    from .tracking import log_bundle_to_model_version, register_checkpoint

    marker = o.out / "report" / "registered.json"
    fingerprint = load_checkpoint(run_dir).fingerprint
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == fingerprint and done.get("name") == o.register:
            log.info("stage register reused: %s", done["model_uri"])
            return done
    if o.mlflow is None:
        log.warning("--register needs MLflow tracking; skipped")
        return None
    reg = register_checkpoint(run_dir / "model.safetensors", o.register, o.alias, o.gate_share,
                              tracking_uri=o.mlflow.get("tracking_uri"))
    log_bundle_to_model_version(reg["model_uri"], bundle, recall_floor=0.95)
    reg["fingerprint"] = fingerprint
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(reg, indent=1))
    return reg


def _log_report(o: PipelineOptions, report_dir: Path) -> None:
    """One MLflow run named 'pipeline' holding the report (Markdown + figures)."""
    from .tracking import TrackingError, _mlflow, resolve_tracking_uri

    try:
        mlflow = _mlflow()
        client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(o.mlflow.get("tracking_uri")))
        exp = client.get_experiment_by_name(o.mlflow.get("experiment") or "compress")
        exp_id = exp.experiment_id if exp else client.create_experiment(o.mlflow.get("experiment") or "compress")
        run = client.create_run(exp_id, run_name=f"pipeline {o.out.name}", tags={"compress.command": "pipeline"})
        client.log_artifacts(run.info.run_id, str(report_dir), "report")
        client.set_terminated(run.info.run_id, "FINISHED")
        log.info("MLflow: report logged to run %s", run.info.run_id)
    except (TrackingError, Exception) as e:  # noqa: BLE001 - the report is on disk either way
        log.warning("MLflow: could not log the report (%s); it is in %s", e, report_dir)
