"""The pipeline's delivery stages: verified bundles, in-process serving latency, registration, the report run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from compressor.checkpoint import load_checkpoint
from compressor.files import atomic_write_text
from compressor.run_dir import MODEL_FILE
from export.from_checkpoint import export_checkpoint
from serving.bundle import MANIFEST_FILE, BundleError, open_bundle, verify_bundle
from serving.recommender import Recommender

from ..logs import PIPELINE_LOGGER
from ..tracking import TrackingError, register_checkpoint, resolve_tracking_uri
from ..tracking.environment import DEFAULT_EXPERIMENT, import_mlflow
from .options import PipelineOptions
from .stages import RAN, REUSED

log = logging.getLogger(PIPELINE_LOGGER)

REGISTERED_FILE = "registered.json"
LATENCY_CALLS, LATENCY_WARMUP, LATENCY_K = 2000, 100, 20


def export_stage(name: str, checkpoint: Path, bundle_dir: Path, index: str) -> tuple[dict, str]:
    """Export unless bundle_dir already holds a verified bundle of the same checkpoint. (manifest, what happened)"""
    fingerprint = load_checkpoint(checkpoint).fingerprint
    manifest_path = bundle_dir / MANIFEST_FILE
    if manifest_path.exists():
        try:
            verify_bundle(bundle_dir)
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("lineage", {}).get("checkpoint_fingerprint") == fingerprint:
                log.info("stage export   reused: %s (verified, same checkpoint %s)", bundle_dir, fingerprint)
                return manifest, REUSED
        except BundleError as e:
            log.warning("stage export   %s failed verification (%s); exporting again", bundle_dir, e)
    log.info("stage export   %s -> %s", name, bundle_dir)
    return export_checkpoint(checkpoint, bundle_dir, index_factory=index, overwrite=True), RAN


def serving_latency(bundle_dir: Path, n: int = LATENCY_CALLS, k: int = LATENCY_K) -> dict:
    """Single-user recommend latency in-process (ONNX Runtime -> FAISS -> exclude seen), 1 thread."""
    rec = Recommender(open_bundle(bundle_dir))
    users = np.random.default_rng(0).integers(0, rec.bundle.num_users, size=n + LATENCY_WARMUP)
    times = []
    for i, u in enumerate(users):
        t0 = time.perf_counter()
        rec.recommend(np.array([u]), k, exclude_seen=True)
        if i >= LATENCY_WARMUP:
            times.append((time.perf_counter() - t0) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)), "calls": n, "k": k}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def register_stage(o: PipelineOptions, run_dir: Path, bundle: Path) -> tuple[dict | None, str]:
    """Register the student's verified bundle with the gated alias; reused while the checkpoint is the same."""
    marker = o.out / "report" / REGISTERED_FILE
    fingerprint = load_checkpoint(run_dir).fingerprint
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == fingerprint and done.get("name") == o.register:
            log.info("stage register reused: %s", done["model_uri"])
            return done, REUSED
    if o.mlflow is None:
        log.warning("--register needs MLflow tracking; skipped")
        return None, "skipped"
    reg = register_checkpoint(run_dir / MODEL_FILE, o.register, o.alias, o.gate_share,
                              tracking_uri=o.mlflow.get("tracking_uri"), bundle_dir=bundle)
    reg["fingerprint"] = fingerprint
    atomic_write_text(marker, json.dumps(reg, indent=1))
    return reg, RAN


def log_report(o: PipelineOptions, report_dir: Path) -> None:
    """One MLflow run named 'pipeline' holding the report (Markdown + figures); the report is on disk either way."""
    experiment = o.mlflow.get("experiment") or DEFAULT_EXPERIMENT
    try:
        client = import_mlflow().MlflowClient(tracking_uri=resolve_tracking_uri(o.mlflow.get("tracking_uri")))
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=f"pipeline {o.out.name}", tags={"compress.command": "pipeline"})
        client.log_artifacts(run.info.run_id, str(report_dir), "report")
        client.set_terminated(run.info.run_id, "FINISHED")
        log.info("MLflow: report logged to run %s", run.info.run_id)
    except (TrackingError, Exception) as e:  # noqa: BLE001 - the report is on disk either way
        log.warning("MLflow: could not log the report (%s); it is in %s", e, report_dir)
