"""The MLflow Model Registry: register a run's model, resolve ``models:/`` URIs, log bundles, promote.

``models:/NAME/VERSION``, ``models:/NAME/latest`` and ``models:/NAME@ALIAS`` resolve to the version's checkpoint
file (``download_registered_checkpoint``) or to the serving bundle logged for it (``download_registered_bundle``),
each downloaded once into the cache (``environment.cache_root``) and checked against the version's tags.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import yaml
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

from compressor import __version__
from compressor.checkpoint import read_meta
from compressor.run_dir import MODEL_FILE
from serving.bundle import MANIFEST_FILE

from .environment import TrackingError, cache_root, import_mlflow, is_number, probe, redact, resolve_tracking_uri
from .gate import (BUNDLE_ARTIFACT_TAG, BUNDLE_FACTORY_TAG, BUNDLE_RECALL_FLOOR_TAG, BUNDLE_RECALL_TAG,
                   CHECKPOINT_FINGERPRINT_TAG, DEFAULT_GATE_SHARE, promotion_gate, version_tags)
from .pyfunc_model import CHECKPOINT_ARTIFACT, DEFAULT_K

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"  # name of the logged pyfunc model
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


def register_version(client, run_id: str, checkpoint: Path, meta: dict, name: str, alias: str | None = None,
                     gate_share: float = DEFAULT_GATE_SHARE) -> dict:
    """Log the run's model as a pyfunc "from code" (``pyfunc_model.py`` + the safetensors checkpoint; nothing
    pickled), create a new version of NAME with metrics and lineage as tags, and move ``alias`` to it only
    through the promotion gate (a blocked version keeps no alias and says why in ``compress.gate.reason``)."""
    mlflow = import_mlflow()
    mlflow.set_tracking_uri(client.tracking_uri)  # log_model writes through the global URI: the client's store

    sig = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*input example was not provided", category=UserWarning)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_PATH, python_model=str(PYFUNC_CODE),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}, signature=sig,
                pip_requirements=[f"compress-recsys=={__version__}", f"mlflow=={mlflow.__version__}"])
    flavor = info.flavors.get("python_function", {})
    if "model_code_path" not in flavor or "python_model" in flavor:
        raise TrackingError("refusing to register: the logged model is not a models-from-code model "
                            "(a pickled python_model would run code on load)")
    ok, reason = promotion_gate(meta, gate_share)
    tags = version_tags(meta, run_id)
    tags.update({"compress.gate": "passed" if ok else ("blocked" if alias else "failed"),
                 "compress.gate.share": gate_share, "compress.gate.reason": reason})
    try:
        client.create_registered_model(name)
    except Exception as e:  # noqa: BLE001 - already exists is fine; anything else resurfaces below
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) + str(e):
            raise
    mv = client.create_model_version(name, source=info.model_uri, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()}, model_id=info.model_id)
    summary = {"name": name, "version": mv.version, "model_uri": f"models:/{name}/{mv.version}",
               "gate_passed": ok, "gate_reason": reason, "alias": None}
    if alias and ok:
        client.set_registered_model_alias(name, alias, mv.version)
        summary["alias"] = alias
        log.info("MLflow: registered %s version %s, alias '%s' (%s)", name, mv.version, alias,
                 reason)
    elif alias:
        log.warning("MLflow: registered %s version %s WITHOUT alias '%s': gate blocked it (%s)", name,
                    mv.version, alias, reason)
    else:
        log.info("MLflow: registered %s version %s", name, mv.version)
    client.set_tag(run_id, "compress.registered_version", f"{name}/{mv.version}")
    return summary


def _client(tracking_uri: str | None = None):
    uri = resolve_tracking_uri(tracking_uri)
    probe(uri)
    mlflow = import_mlflow()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def resolve_model_version(uri: str, client=None):
    """The ModelVersion of `models:/NAME/VERSION`, `models:/NAME/latest` or `models:/NAME@ALIAS`."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise TrackingError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    if client is None:
        client, _ = _client()
    name, version, alias = m["name"], m["version"], m["alias"]
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise TrackingError(f"{uri}: registered model '{name}' has no versions")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow's not-found / bad-request errors, named
        raise TrackingError(f"{uri}: no such model version ({getattr(e, 'message', e)})") from None


def download_registered_checkpoint(uri: str) -> Path:
    """The local checkpoint file of a registered model version (downloaded once into the cache).

    The cache is keyed by the version's source (its logged model), which never changes for a version; the
    file's fingerprint is checked against the version's ``compress.checkpoint_fingerprint`` tag."""
    client, tracking_uri = _client()
    mv = resolve_model_version(uri, client)
    mlflow = import_mlflow()
    key = hashlib.sha256(f"{tracking_uri}\n{mv.name}\n{mv.version}\n{mv.source}".encode()).hexdigest()[:16]
    dest = cache_root() / "registry" / key / MODEL_FILE
    base = f"models:/{mv.name}/{mv.version}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp)
                flavor = yaml.safe_load(Path(mlmodel).read_text()).get("flavors", {}).get("python_function", {})
                rel = (flavor.get("artifacts") or {}).get(CHECKPOINT_ARTIFACT, {}).get("path")
                if not rel:
                    raise TrackingError(f"{uri} (version {mv.version}) is not a compress model: its MLmodel has no "
                                        f"'{CHECKPOINT_ARTIFACT}' artifact")
                got = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}", dst_path=tmp)
            except TrackingError:
                raise
            except Exception as e:  # noqa: BLE001
                raise TrackingError(f"{uri}: cannot download the checkpoint of version {mv.version} from "
                                    f"{redact(tracking_uri)} ({type(e).__name__}: {e})") from None
            os.replace(got, dest)
    want = (mv.tags or {}).get(CHECKPOINT_FINGERPRINT_TAG)
    have = read_meta(dest).get("fingerprint")
    if want and have != want:
        dest.unlink(missing_ok=True)
        raise TrackingError(f"{uri}: downloaded checkpoint has fingerprint {have}, the version says {want}")
    log.info("%s -> version %s, checkpoint %s", uri, mv.version, dest)
    return dest


def download_registered_bundle(uri: str) -> Path:
    """The local copy of the serving bundle logged for a model version by ``log_bundle_to_model_version``."""
    client, tracking_uri = _client()
    mv = resolve_model_version(uri, client)
    art = (mv.tags or {}).get(BUNDLE_ARTIFACT_TAG)
    if not art:
        raise TrackingError(f"{uri} (version {mv.version}) has no bundle logged ({BUNDLE_ARTIFACT_TAG})")
    key = hashlib.sha256(f"{tracking_uri}\n{mv.name}\n{mv.version}\n{art}".encode()).hexdigest()[:16]
    dest = cache_root() / "bundles" / key / "bundle"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                got = import_mlflow().artifacts.download_artifacts(artifact_uri=art, dst_path=tmp)
            except Exception as e:  # noqa: BLE001
                raise TrackingError(f"{uri}: cannot download bundle {art} ({type(e).__name__}: {e})") from None
            os.replace(got, dest)
    return dest


def log_bundle_to_model_version(uri: str, bundle_dir: str | Path, recall_floor: float | None = None,
                                artifact_path: str = "bundle") -> str:
    """Log a serving bundle directory as an artifact of a model version's run; tag the version with it.

    Tags ``compress.bundle.artifact_uri``, and from the bundle's manifest.json (when there) its index factory
    and ``compress.bundle.index_recall``; with `recall_floor`, ``compress.bundle.recall_floor``, which the
    promotion gate then enforces. Returns the artifact URI (``runs:/RUN/bundle``)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise TrackingError(f"{bundle_dir}: bundle directory not found")
    client, _ = _client()
    mv = resolve_model_version(uri, client)
    if not mv.run_id:
        raise TrackingError(f"{uri}: version {mv.version} has no source run to log the bundle to")
    try:
        client.log_artifacts(mv.run_id, str(bundle_dir), artifact_path)
        art = f"runs:/{mv.run_id}/{artifact_path}"
        tags = {BUNDLE_ARTIFACT_TAG: art}
        manifest = bundle_dir / MANIFEST_FILE
        if manifest.exists():
            index = json.loads(manifest.read_text()).get("index") or {}
            if is_number(index.get("recall_at_k")):
                tags[BUNDLE_RECALL_TAG] = index["recall_at_k"]
            if index.get("factory"):
                tags[BUNDLE_FACTORY_TAG] = index["factory"]
        if recall_floor is not None:
            tags[BUNDLE_RECALL_FLOOR_TAG] = recall_floor
        for k, v in tags.items():
            client.set_model_version_tag(mv.name, mv.version, k, str(v))
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"{uri}: cannot log bundle {bundle_dir} ({type(e).__name__}: {e})") from None
    return art


def promote(name: str, version: str, alias: str, share: float = DEFAULT_GATE_SHARE, force: bool = False,
            tracking_uri: str | None = None) -> dict:
    """Move `alias` to NAME/VERSION if the promotion gate passes (or `force`); record the decision on the version."""
    client, _ = _client(tracking_uri)
    mv = resolve_model_version(f"models:/{name}/{version}", client)
    ckpt = download_registered_checkpoint(f"models:/{name}/{mv.version}")
    ok, reason = promotion_gate(read_meta(ckpt), share, mv.tags)
    decision = "passed" if ok else ("forced" if force else "blocked")
    try:
        client.set_model_version_tag(name, mv.version, "compress.gate", decision)
        client.set_model_version_tag(name, mv.version, "compress.gate.reason", reason)
        client.set_model_version_tag(name, mv.version, "compress.gate.share", str(share))
        if ok or force:
            client.set_registered_model_alias(name, alias, mv.version)
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"models:/{name}/{mv.version}: cannot update the registry ({e})") from None
    if not (ok or force):
        raise TrackingError(f"models:/{name}/{mv.version} not promoted to '{alias}': {reason} "
                            f"(--force overrides the gate)")
    return {"name": name, "version": mv.version, "alias": alias, "gate": decision, "reason": reason}


def register_checkpoint(checkpoint: str | Path, name: str, alias: str | None = None,
                        gate_share: float = DEFAULT_GATE_SHARE, tracking_uri: str | None = None) -> dict:
    """Register a finished, tracked run's model as a new version of NAME (same gate and tags as ``--register``).

    For pipelines that register only after later stages (export) succeeded. The checkpoint must carry the MLflow
    run id of its training run (it does when the run was tracked)."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    run_id = meta.get("mlflow_run_id")
    if not run_id:
        raise TrackingError(f"{checkpoint}: this run was not tracked in MLflow, so it cannot be registered "
                            f"(train it without --no-mlflow)")
    client, uri = _client(tracking_uri)
    try:
        return register_version(client, run_id, checkpoint, meta, name, alias, gate_share)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"MLflow at {redact(uri)}: cannot register {checkpoint} as '{name}' "
                            f"({type(e).__name__}: {e})") from None
