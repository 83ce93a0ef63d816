"""`compress pipeline`: interactions in, a served-ready, verified, registered student out, with a report.

Stages, each a directory under OUT that is reused when finished, resumed when interrupted, redone with --fresh:

  teacher/   compress train (or --teacher: an existing checkpoint, used as is)
  scratch/   the student recipe trained with BPR only (the baseline the report compares against)
  rcekd/     the student distilled with RCE-KD from the teacher
  bundles/   the three models exported (ONNX + FAISS), verified; bundles/rcekd is what `compress serve` serves
  report/    report.md + PNG figures, summary.json; registered.json when the student was registered in MLflow
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from compressor import api
from compressor.checkpoint import load_checkpoint, read_meta
from compressor.device import available_cores, resolve_device
from compressor.errors import MismatchError
from compressor.evaluation import report as evaluation_report
from compressor.files import atomic_write_text
from compressor.run_dir import RESUME_FILE, TOPK_CACHE_DIR

from ..logs import PIPELINE_LOGGER
from ..report import ReportEntry, read_history, write_report
from ..tracking.gate import GATE_METRIC
from . import scratch_process
from .deliver import dir_bytes, export_stage, log_report, register_stage, serving_latency
from .options import PipelineOptions, stage_configs
from .stages import (GIVEN, RAN, RESUMED, STAGE_RUNS, check_kept_stages, lock, read_result, run_stage, train_rcekd,
                     train_scratch, train_teacher)

log = logging.getLogger(PIPELINE_LOGGER)

SUMMARY_FILE = "summary.json"


def run_pipeline(o: PipelineOptions) -> dict:
    out = o.out
    out.mkdir(parents=True, exist_ok=True)
    held = lock(out)  # before --fresh deletes anything: a running pipeline's stages are never touched
    try:
        return _run_locked(o, out)
    finally:
        held.close()


def _given_teacher(o: PipelineOptions) -> tuple[Path, Path, dict]:
    """(checkpoint, run dir, result) of --teacher; refused unless it carries the test metric the report compares."""
    ckpt = Path(o.teacher)
    test = load_checkpoint(ckpt).meta.get("metrics", {}).get("test") or {}
    if GATE_METRIC not in test:
        raise MismatchError(f"{o.teacher}: the teacher checkpoint has no test {GATE_METRIC} to compare the students "
                            f"with (train it with compress, with {GATE_METRIC.partition('@')[2]} in train.eval_ks)")
    return ckpt, ckpt if ckpt.is_dir() else ckpt.parent, {"test": test}


def _run_locked(o: PipelineOptions, out: Path) -> dict:
    # Everything that can be refused is checked before --fresh deletes anything or a stage trains.
    configs = stage_configs(o)
    if not o.fresh:
        check_kept_stages(out, configs)
    resolve_device(o.device)
    given = _given_teacher(o) if o.teacher else None
    if o.fresh:
        log.info("--fresh: removing %s and the cached teacher top-K beside it", out)
        for sub in (*STAGE_RUNS, "bundles", "report", TOPK_CACHE_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
    t_start = time.perf_counter()
    progress = not o.quiet
    stages: dict[str, str] = {}
    results: dict[str, dict] = {}

    # 1. teacher and 2. scratch student: independent, so when both must be trained the scratch baseline trains in
    # a second process beside the teacher, each with half the cores (see scratch_process).
    scratch_proc = None
    if given:
        teacher_ckpt, teacher_dir, results["teacher"] = given
        log.info("stage teacher  given: %s", o.teacher)
        stages["teacher"] = GIVEN
    else:
        teacher_dir = teacher_ckpt = out / "teacher"
        parallel = o.parallel and read_result(teacher_dir) is None and read_result(out / "scratch") is None
        half = max(1, available_cores() // 2)
        if parallel:
            scratch_status = RESUMED if (out / "scratch" / RESUME_FILE).exists() else RAN
            scratch_proc = scratch_process.start(dataclasses.replace(o, threads=o.threads or half))
        threads = None if not parallel or o.threads else half
        reclaim = [scratch_process.ReclaimCores(scratch_proc, o.threads or 0)] if parallel else []
        try:
            results["teacher"], stages["teacher"] = run_stage("teacher", teacher_dir, lambda resume: train_teacher(
                o, teacher_dir, resume, progress, threads, reclaim))
        except BaseException:
            scratch_process.stop(scratch_proc)
            raise
    if scratch_proc is not None:
        scratch_process.join(scratch_proc, out / "scratch")
        results["scratch"], stages["scratch"] = read_result(out / "scratch"), scratch_status
    if results.get("scratch") is None:
        results["scratch"], stages["scratch"] = run_stage("scratch", out / "scratch",
                                                          lambda resume: train_scratch(o, resume, progress))
    # 3. RCE-KD student (the same student recipe as the scratch one, with the teacher)
    results["rcekd"], stages["rcekd"] = run_stage("rcekd", out / "rcekd", lambda resume: train_rcekd(
        o, teacher_ckpt, str(o.teacher or teacher_dir), resume, progress))
    # 4. export all three (the RCE-KD bundle is the product; the others size and time the comparison)
    run_dirs = {"teacher": teacher_dir, "scratch": out / "scratch", "rcekd": out / "rcekd"}
    checkpoints = {**run_dirs, "teacher": teacher_ckpt}
    manifests = {}
    for name in STAGE_RUNS:
        manifests[name], stages[f"export.{name}"] = export_stage(name, Path(checkpoints[name]),
                                                                 out / "bundles" / name, o.index)
    bundle = out / "bundles" / "rcekd"
    # 5. register the RCE-KD student (after its bundle verified), with the gated alias
    registered = None
    if o.register:
        registered, stages["register"] = register_stage(o, out / "rcekd", bundle)
    # 6. report
    intervals, gap_share, ci_note = test_intervals(checkpoints, o.bootstrap, o.device)
    entries = []
    for label, name in (("teacher", "teacher"), ("scratch student", "scratch"), ("RCE-KD student", "rcekd")):
        m = manifests[name]
        entries.append(ReportEntry(label, run_dirs[name], params=(m["num_users"] + m["num_items"]) * m["dim"],
                                   dim=m["dim"], test=results[name]["test"],
                                   bundle_bytes=dir_bytes(out / "bundles" / name),
                                   latency_ms=serving_latency(out / "bundles" / name),
                                   history=read_history(run_dirs[name]), test_ci=intervals.get(name, {}),
                                   gap_ci=gap_share if name == "rcekd" else None))
    index = manifests["rcekd"]["index"]
    notes = [f"Data: {load_checkpoint(out / 'rcekd').meta['data_source']}.",
             *(how_trained(label, Path(checkpoints[name]), results[name], given=name == "teacher" and bool(given))
               for label, name in (("Teacher", "teacher"), ("Scratch student", "scratch"),
                                   ("RCE-KD student", "rcekd"))),
             f"Bundle index: {index['factory']} ({'exact' if index['exact'] else 'approximate'}).",
             ci_note,
             f"Pipeline wall time this invocation: {time.perf_counter() - t_start:.0f}s (stages: see summary.json)."]
    if registered:
        notes.append(f"Registered as {registered['model_uri']}"
                     + (f" with alias '{registered['alias']}'" if registered.get("alias")
                        else f" without alias ({registered.get('gate_reason')})") + ".")
    report = write_report(out / "report", *entries, title="Compression report", notes=notes)
    if o.mlflow is not None:
        log_report(o, out / "report")
    summary = {"out": str(out), "teacher": str(teacher_dir), "scratch": str(out / "scratch"),
               "rcekd": str(out / "rcekd"), "bundle": str(bundle), "report": str(report),
               f"test_{GATE_METRIC}": {e.label: e.test[GATE_METRIC] for e in entries}, "registered": registered,
               "gap_share": gap_share, "bootstrap": {"resamples": o.bootstrap, "seed": 0, "note": ci_note},
               "parameter_ratio": entries[0].params / max(entries[2].params, 1),
               "bundle_ratio": entries[0].bundle_bytes / max(entries[2].bundle_bytes, 1),
               "stages": stages, "serve": f"compress serve {bundle}"}
    atomic_write_text(out / "report" / SUMMARY_FILE, json.dumps(summary, indent=1))
    return summary


def test_intervals(checkpoints: dict, n_resamples: int, device: str) -> tuple[dict, dict | None, str]:
    """Paired bootstrap over the test users of the three models: ({stage: {metric: (lo, hi)}}, the student's gap
    share {"value", "lo", "hi"} on GATE_METRIC, a report line). With no resamples, or models that cannot be paired
    (a given teacher trained on other data or splits), no intervals and a line that says why."""
    if n_resamples <= 0:
        return {}, None, "Confidence intervals: not computed (--bootstrap 0)."
    trained_on = {name: read_meta(ckpt).get("data_fingerprint") for name, ckpt in checkpoints.items()}
    if len(set(trained_on.values())) > 1:  # a given teacher from other splits: its numbers are on other users
        return {}, None, ("Confidence intervals: not computed (the teacher was trained and tested on other data "
                          "or splits than the students, so the three cannot be paired on the same users).")
    try:
        evals = api.evaluate_per_user([checkpoints["rcekd"], checkpoints["scratch"], checkpoints["teacher"]], "test",
                                      device=device)
    except MismatchError as e:
        return {}, None, f"Confidence intervals: not computed ({e})."
    rep = evaluation_report(evals[0], None, evals[1], evals[2], n_resamples=n_resamples, seed=0)
    per_stage = {"rcekd": rep["metrics"], "scratch": rep["gap"]["scratch"], "teacher": rep["gap"]["teacher"]}
    intervals = {name: {m: (e["lo"], e["hi"]) for m, e in ms.items() if e["lo"] is not None}
                 for name, ms in per_stage.items()}
    note = (f"Confidence intervals: 95% percentile intervals from a paired bootstrap over the {rep['users']:,} test "
            f"users ({n_resamples:,} resamples, seed 0; the same resampled users for all three models and for the "
            f"gap share). They cover the sampling of users, not training randomness (one seed per model here).")
    return intervals, rep["gap"]["share"][GATE_METRIC], note


def how_trained(label: str, checkpoint: Path, result: dict, given: bool = False) -> str:
    """One report line: how a model was trained (optimizer, patience, where it stopped), read from its checkpoint's
    metadata; for a --teacher given from elsewhere only what its checkpoint records."""
    meta = read_meta(checkpoint)
    train = meta.get("config", {}).get("train", {})
    model = meta.get("config", {}).get("model", {})
    what = (f"{model.get('kind', '?')} dim {model.get('dim', '?')}, train.optimizer {train.get('optimizer', 'adam')}, "
            f"lr {train.get('lr')}, patience {train.get('patience')}")
    distill = meta.get("config", {}).get("distill", {})
    if meta.get("method") not in (None, "scratch"):  # the method the run trained with (a teacher's is scratch)
        what += f", distill.method {meta['method']}, distill.kd_users {distill.get('kd_users', 'every_batch')}"
    best, ran, limit = result.get("best_epoch", meta.get("best_epoch")), result.get("epochs_run"), train.get("epochs")
    if given:
        return f"{label}: given ({checkpoint}); {what}" + (f"; best validation epoch {best}." if best else ".")
    if ran is not None and limit is not None and ran < limit:
        stop = f"stopped early after {train.get('patience')} validations without a better {train.get('metric')}"
    else:
        stop = f"ran its train.epochs ({limit})"
    return f"{label}: trained here; {what}; best validation epoch {best} of {ran} ({stop})."
