"""The promotion gate: may a registered student take an alias? And the model-version tags it reads.

A student passes when its test NDCG@20 reaches ``share`` x its teacher's (a run without a teacher passes), and,
when a serving bundle was logged for the version with a recall floor, the bundle's index recall meets it.
"""

from __future__ import annotations

from .environment import TrackingError, is_number, metric_key

GATE_METRIC = "ndcg@20"  # the promotion gate compares the student's and its teacher's test NDCG@20
DEFAULT_GATE_SHARE = 0.9
# Model-version tags of the registered bundle (registry.bundle_tags); BUNDLE_ARTIFACT_TAG names the bundle that
# versions registered before the bundle was the model had logged beside them.
BUNDLE_ARTIFACT_TAG = "compress.bundle.artifact_uri"
BUNDLE_RECALL_TAG = "compress.bundle.index_recall"
BUNDLE_RECALL_FLOOR_TAG = "compress.bundle.recall_floor"
BUNDLE_FACTORY_TAG = "compress.bundle.index_factory"
BUNDLE_MANIFEST_TAG = "compress.bundle.manifest_sha256"
CHECKPOINT_FINGERPRINT_TAG = "compress.checkpoint_fingerprint"
CHECKPOINT_ARTIFACT_TAG = "compress.checkpoint.artifact_uri"  # the run artifact a version was exported from


def test_metric(metrics: dict | None, key: str = GATE_METRIC):
    v = ((metrics or {}).get("test") or {}).get(key)
    return float(v) if is_number(v) else None


def promotion_gate(meta: dict, share: float = DEFAULT_GATE_SHARE, bundle_tags: dict | None = None) -> tuple[bool, str]:
    """May this checkpoint (its metadata) take an alias? (ok, reason).

    Passes when the student's test NDCG@20 >= share x its teacher's (a run without teacher passes), and, when
    a bundle was logged for the version with a recall floor, the bundle's index recall meets that floor."""
    if share < 0:
        raise TrackingError(f"gate share must be >= 0, got {share}")
    student = test_metric(meta.get("metrics"))
    teacher = meta.get("teacher")
    if student is None:
        return False, f"the checkpoint has no test {GATE_METRIC}"
    if not teacher:
        ok, reason = True, f"no teacher (student test {GATE_METRIC} {student:.5f})"
    else:
        t = test_metric(teacher.get("metrics"))
        if t is None:
            return False, f"the teacher ({teacher.get('source')}) has no recorded test {GATE_METRIC} to compare with"
        need = share * t
        ok = student >= need - 1e-12  # exactly at the share passes, whatever the float rounding
        reason = (f"student test {GATE_METRIC} {student:.5f} {'>=' if ok else '<'} {share:g} x teacher "
                  f"{t:.5f} = {need:.5f}")
    tags = bundle_tags or {}
    if ok and BUNDLE_RECALL_TAG in tags and BUNDLE_RECALL_FLOOR_TAG in tags:
        recall, floor = float(tags[BUNDLE_RECALL_TAG]), float(tags[BUNDLE_RECALL_FLOOR_TAG])
        if recall < floor:
            return False, f"{reason}, but bundle index recall {recall:.4f} < floor {floor:.4f}"
        reason += f"; bundle index recall {recall:.4f} >= floor {floor:.4f}"
    return ok, reason


def version_tags(meta: dict, run_id: str | None) -> dict:
    """Model-version tags: metrics and lineage of the checkpoint."""
    tags = {"compress.run_id": run_id, "compress.command": meta.get("command"), "compress.method": meta.get("method"),
            CHECKPOINT_FINGERPRINT_TAG: meta.get("fingerprint"),
            "compress.data_fingerprint": meta.get("data_fingerprint"),
            "compress.model_kind": (meta.get("model") or {}).get("kind"),
            "compress.model_dim": (meta.get("model") or {}).get("dim"),
            "compress.package_version": meta.get("package_version")}
    for k, v in ((meta.get("metrics") or {}).get("test") or {}).items():
        if k != "users" and is_number(v):
            tags[f"compress.test.{metric_key(k)}"] = v
    teacher = meta.get("teacher")
    if teacher:
        tags.update({"compress.teacher.run_id": teacher.get("mlflow_run_id"),
                     "compress.teacher.fingerprint": teacher.get("fingerprint"),
                     "compress.teacher.source": teacher.get("source")})
        t = test_metric(teacher.get("metrics"))
        if t is not None:
            tags[f"compress.teacher.test.{metric_key(GATE_METRIC)}"] = t
    return {k: v for k, v in tags.items() if v is not None}
