"""The MLflow Model Registry: register a run's model, resolve ``models:/`` URIs, log bundles, promote.

``models:/NAME/VERSION``, ``models:/NAME/latest`` and ``models:/NAME@ALIAS`` resolve to the version's checkpoint
file (``download_registered_checkpoint``) or to the serving bundle logged for it (``download_registered_bundle``),
each downloaded once into the cache (``environment.cache_root``) and checked against the version's tags.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import yaml
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

import serving
from compressor.checkpoint import read_meta
from compressor.run_dir import MODEL_FILE, RUN_BUNDLE_DIR
from export.from_checkpoint import export_checkpoint
from serving.bundle import MANIFEST_FILE, BundleError, verify_bundle

from .environment import TrackingError, cache_root, import_mlflow, is_number, probe, redact, resolve_tracking_uri
from .bundle_pyfunc import BUNDLE_ARTIFACT, DEFAULT_K
from .gate import (BUNDLE_ARTIFACT_TAG, BUNDLE_FACTORY_TAG, BUNDLE_MANIFEST_TAG, BUNDLE_RECALL_FLOOR_TAG,
                   BUNDLE_RECALL_TAG, CHECKPOINT_ARTIFACT_TAG, CHECKPOINT_FINGERPRINT_TAG, DEFAULT_GATE_SHARE,
                   promotion_gate, version_tags)

log = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"  # name of the logged pyfunc model
BUNDLE_PYFUNC_CODE = Path(__file__).with_name("bundle_pyfunc.py")
SERVING_CODE = Path(serving.__file__).resolve().parent  # shipped with the model: it loads without this package
# What the registered model needs at load time: the serving stack, not torch or the training code, pinned to the
# versions it was exported and verified with.
SERVING_PACKAGES = ("numpy", "pandas", "faiss-cpu", "onnx", "onnxruntime")
CHECKPOINT_ARTIFACT = "checkpoint"  # versions registered before the bundle was the model carried the checkpoint
CHECKPOINT_RUN_ARTIFACT = f"checkpoint/{MODEL_FILE}"  # where the tracker logs a run's checkpoint
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")
DEFAULT_RECALL_FLOOR = 0.95  # what `compress export` enforces by default; the gate checks it again
REREGISTER_HINT = ("re-register it: `compress export <run dir> --out BUNDLE` is done for you by `compress train|"
                   "distill --register NAME` and `compress pipeline --register NAME`")


class NoBundleError(TrackingError):
    """The version holds no serving bundle (registered before the bundle was the model)."""


def _pinned(packages) -> list[str]:
    out = []
    for name in packages:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:  # e.g. a faiss build installed under another name
            out.append(name)
    return out


def bundle_tags(bundle_dir: Path, recall_floor: float | None) -> dict:
    """Version tags from a bundle's manifest: its sha256 (which pins every file, by their hashes in it), its index,
    the index recall and the floor the gate enforces."""
    raw = (Path(bundle_dir) / MANIFEST_FILE).read_bytes()
    index = json.loads(raw).get("index") or {}
    tags = {BUNDLE_MANIFEST_TAG: hashlib.sha256(raw).hexdigest()}
    if is_number(index.get("recall_at_k")):
        tags[BUNDLE_RECALL_TAG] = index["recall_at_k"]
    if index.get("factory"):
        tags[BUNDLE_FACTORY_TAG] = index["factory"]
    if recall_floor is not None:
        tags[BUNDLE_RECALL_FLOOR_TAG] = recall_floor
    return tags


def register_version(client, run_id: str, bundle_dir: Path, meta: dict, name: str, alias: str | None = None,
                     gate_share: float = DEFAULT_GATE_SHARE, recall_floor: float | None = None) -> dict:
    """Register a verified serving bundle as a new version of NAME and move ``alias`` only through the gate.

    The logged model is a pyfunc "from code" (``bundle_pyfunc.py``; nothing pickled) whose artifact is the bundle
    itself and whose code path is the ``serving`` package, so it loads and serves without torch or the training
    code. The checkpoint stays reachable for re-export: the version's ``compress.checkpoint.artifact_uri`` tag
    names it in the run (``checkpoint/model.safetensors``). Metrics and lineage are version tags; a version the
    gate blocks keeps no alias and says why in ``compress.gate.reason``."""
    mlflow = import_mlflow()
    mlflow.set_tracking_uri(client.tracking_uri)  # log_model writes through the global URI: the client's store
    sig = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("k", "long", DEFAULT_K),
                                                          ParamSpec("exclude_seen", "boolean", True)]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*input example was not provided", category=UserWarning)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_PATH, python_model=str(BUNDLE_PYFUNC_CODE),
                artifacts={BUNDLE_ARTIFACT: str(bundle_dir)}, code_paths=[str(SERVING_CODE)], signature=sig,
                pip_requirements=[f"mlflow=={mlflow.__version__}", *_pinned(SERVING_PACKAGES)])
    flavor = info.flavors.get("python_function", {})
    if "model_code_path" not in flavor or "python_model" in flavor:
        raise TrackingError("refusing to register: the logged model is not a models-from-code model "
                            "(a pickled python_model would run code on load)")
    btags = bundle_tags(bundle_dir, recall_floor)
    ok, reason = promotion_gate(meta, gate_share, {k: str(v) for k, v in btags.items()})
    tags = {**version_tags(meta, run_id), **btags, CHECKPOINT_ARTIFACT_TAG: f"runs:/{run_id}/{CHECKPOINT_RUN_ARTIFACT}"}
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
        log.info("MLflow: registered %s version %s, alias '%s' (%s)", name, mv.version, alias, reason)
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


def _pyfunc_artifacts(mlflow, base: str, tmp: str) -> dict:
    """The ``python_function`` flavor's artifacts of a logged model ({name: {"path": ...}})."""
    mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp)
    flavor = yaml.safe_load(Path(mlmodel).read_text()).get("flavors", {}).get("python_function", {})
    return flavor.get("artifacts") or {}


def _download_once(uri: str, mv, tracking_uri: str, what: str, dest: Path, source) -> Path:
    """Download into ``dest`` (a cache path keyed by the immutable version) unless it is there already.
    ``source(mlflow, base, tmp)`` returns the downloaded local path."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            got = source(import_mlflow(), f"models:/{mv.name}/{mv.version}", tmp)
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"{uri}: cannot download the {what} of version {mv.version} from "
                                f"{redact(tracking_uri)} ({type(e).__name__}: {e})") from None
        os.replace(got, dest)
    return dest


def download_registered_checkpoint(uri: str) -> Path:
    """The local checkpoint file of a registered model version (downloaded once into the cache).

    New versions name the checkpoint in their run (``compress.checkpoint.artifact_uri``); versions registered
    before the bundle was the model carry it as their ``checkpoint`` artifact. The file's fingerprint is checked
    against the version's ``compress.checkpoint_fingerprint`` tag."""
    client, tracking_uri = _client()
    mv = resolve_model_version(uri, client)
    tags = mv.tags or {}

    def source(mlflow, base, tmp):
        if tags.get(CHECKPOINT_ARTIFACT_TAG):
            return mlflow.artifacts.download_artifacts(artifact_uri=tags[CHECKPOINT_ARTIFACT_TAG], dst_path=tmp)
        rel = _pyfunc_artifacts(mlflow, base, tmp).get(CHECKPOINT_ARTIFACT, {}).get("path")
        if not rel:
            raise TrackingError(f"{uri} (version {mv.version}) names no checkpoint ({CHECKPOINT_ARTIFACT_TAG} tag "
                                f"or '{CHECKPOINT_ARTIFACT}' artifact): not a compress model")
        return mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}", dst_path=tmp)

    key = hashlib.sha256(f"{tracking_uri}\n{mv.name}\n{mv.version}\n{mv.source}".encode()).hexdigest()[:16]
    dest = _download_once(uri, mv, tracking_uri, "checkpoint", cache_root() / "registry" / key / MODEL_FILE, source)
    want = tags.get(CHECKPOINT_FINGERPRINT_TAG)
    have = read_meta(dest).get("fingerprint")
    if want and have != want:
        dest.unlink(missing_ok=True)
        raise TrackingError(f"{uri}: downloaded checkpoint has fingerprint {have}, the version says {want}")
    log.info("%s -> version %s, checkpoint %s", uri, mv.version, dest)
    return dest


def download_registered_bundle(uri: str) -> Path:
    """The local copy of a version's serving bundle: the registered model's own ``bundle`` artifact, or, for a
    version registered before the bundle was the model, the bundle logged beside it (tag ``compress.bundle.artifact_uri``).
    The caller verifies it (``serving.bundle``) before serving."""
    client, tracking_uri = _client()
    mv = resolve_model_version(uri, client)
    legacy = (mv.tags or {}).get(BUNDLE_ARTIFACT_TAG)

    def source(mlflow, base, tmp):
        rel = _pyfunc_artifacts(mlflow, base, tmp).get(BUNDLE_ARTIFACT, {}).get("path")
        if rel:
            return mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}", dst_path=tmp)
        if legacy:
            return mlflow.artifacts.download_artifacts(artifact_uri=legacy, dst_path=tmp)
        raise NoBundleError(f"{uri} (version {mv.version}) holds no serving bundle (registered before the bundle was "
                            f"the model, without one logged beside it); {REREGISTER_HINT}")

    key = hashlib.sha256(f"{tracking_uri}\n{mv.name}\n{mv.version}\n{mv.source}\n{legacy}".encode()).hexdigest()[:16]
    return _download_once(uri, mv, tracking_uri, "bundle", cache_root() / "bundles" / key / "bundle", source)


def fetch_verified_bundle(uri: str) -> tuple[Path, str]:
    """(bundle, manifest sha256) of a model version, verified file by file against its manifest and the manifest
    against the version's ``compress.bundle.manifest_sha256`` tag. A cached copy that fails is downloaded once
    more (a damaged cache heals itself); a copy that fails again is refused (BundleError): the registry's own
    artifact is not what was registered."""
    mv = resolve_model_version(uri)
    want = (mv.tags or {}).get(BUNDLE_MANIFEST_TAG)
    for attempt in (1, 2):
        bundle = download_registered_bundle(f"models:/{mv.name}/{mv.version}")
        try:
            verify_bundle(bundle)
            have = hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()
            if want and have != want:
                raise BundleError(f"{MANIFEST_FILE}: sha256 {have[:12]}... is not the {want[:12]}... registered for "
                                  f"models:/{mv.name}/{mv.version}")
            return bundle, have
        except BundleError:
            shutil.rmtree(bundle, ignore_errors=True)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


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


def export_for_registration(checkpoint: Path, bundle_dir: Path | None = None) -> Path:
    """The verified serving bundle a version is registered as: ``bundle_dir`` as given (already exported), or the
    checkpoint exported with the defaults of `compress export` into ``<run dir>/bundle``."""
    if bundle_dir is not None:
        return Path(bundle_dir)
    bundle_dir = Path(checkpoint).parent / RUN_BUNDLE_DIR
    export_checkpoint(checkpoint, bundle_dir, recall_floor=DEFAULT_RECALL_FLOOR, overwrite=True)
    return bundle_dir


def register_checkpoint(checkpoint: str | Path, name: str, alias: str | None = None,
                        gate_share: float = DEFAULT_GATE_SHARE, tracking_uri: str | None = None,
                        bundle_dir: str | Path | None = None) -> dict:
    """Register a finished, tracked run's model as a new version of NAME (same gate and tags as ``--register``).

    ``bundle_dir``: the run's verified bundle when it was already exported (the pipeline's); otherwise the
    checkpoint is exported into ``<run dir>/bundle`` first. The checkpoint must carry the MLflow run id of its
    training run (it does when the run was tracked)."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    run_id = meta.get("mlflow_run_id")
    if not run_id:
        raise TrackingError(f"{checkpoint}: this run was not tracked in MLflow, so it cannot be registered "
                            f"(train it without --no-mlflow)")
    client, uri = _client(tracking_uri)
    bundle = export_for_registration(checkpoint, None if bundle_dir is None else Path(bundle_dir))
    try:
        return register_version(client, run_id, bundle, meta, name, alias, gate_share, DEFAULT_RECALL_FLOOR)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"MLflow at {redact(uri)}: cannot register {checkpoint} as '{name}' "
                            f"({type(e).__name__}: {e})") from None
