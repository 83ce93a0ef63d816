"""One opened bundle as the HTTP handlers use it (`LoadedBundle`), its version label and public metadata,
and the JSON encoder of the answers.

A `LoadedBundle` never changes once built: a swap builds a new one and replaces the app's reference, so a
request that took the old one finishes on it. This module imports numpy, orjson and (via serving.bundle)
onnxruntime and faiss only.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import orjson

from serving.bundle import open_bundle
from serving.bundle_format import MANIFEST_FILE, FormatError, read_user_tower
from serving.config import ServeConfig
from serving.recommender import Recommender
from serving.schema import version_problem


def dumps(payload: Any) -> bytes:
    """Compact JSON. orjson writes numpy float32 arrays directly (shortest round-trip digits), much faster than
    the json module on a batch answer; json takes what orjson refuses (strings with lone surrogates,
    which a client can send as \\ud800 escapes and expects echoed back)."""
    try:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        return json.dumps(_plain(payload), separators=(",", ":")).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def default_version(manifest: dict[str, Any], manifest_sha256: str) -> str:
    """The manifest's MLflow model version when it names one (and it is a valid label), else sha256:<12 hex>."""
    registered = (manifest.get("lineage") or {}).get("mlflow_model_version")
    if registered is not None and not isinstance(registered, bool):
        label = str(registered)
        if version_problem(label) is None:
            return label
    return f"sha256:{manifest_sha256[:12]}"


def public_metadata(
    manifest: dict[str, Any], manifest_sha256: str, config: ServeConfig, model_version: str | None = None
) -> dict[str, Any]:
    """The manifest minus file hashes and local paths, plus the version label and this server's limits."""
    index = manifest.get("index", {})
    lineage = {k: v for k, v in (manifest.get("lineage") or {}).items() if not k.endswith("_path")}
    return {
        "model_version": model_version or default_version(manifest, manifest_sha256),
        "format_version": manifest.get("format_version"),
        "manifest_sha256": manifest_sha256,
        "created_at": manifest.get("created_at"),
        "dim": manifest.get("dim"),
        "metric": manifest.get("metric"),
        "num_users": manifest.get("num_users"),
        "num_items": manifest.get("num_items"),
        "index": {
            key: index.get(key)
            for key in ("factory", "requested", "exact", "query_transform", "search_params", "recall_at_k", "k")
        },
        "user_tower": _user_tower(manifest),
        "lineage": lineage,
        "metrics": manifest.get("metrics"),
        "versions": manifest.get("versions"),
        "serving": {"max_k": config.max_k, "max_batch": config.max_batch, "fallback": config.fallback},
    }


def _user_tower(manifest: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return read_user_tower(manifest).manifest_entry()
    except FormatError:  # a manifest the loader refuses; metadata is only ever built for loaded ones
        return None


def no_known_item(given: int, unknown: int) -> str:
    """Why a history got no answer (no item id in it is the bundle's, and the server has no fallback)."""
    return (f"no known item in history ({given} item id(s), {unknown} unknown to this bundle); send at least one "
            "item id the bundle knows, or start the server with --fallback popular")


class LoadedBundle:
    """What the request handlers need once a bundle is open: recommender, id maps, version, metadata."""

    def __init__(self, recommender: Recommender, config: ServeConfig, version: str | None = None) -> None:
        bundle = recommender.bundle
        self.recommender = recommender
        self.path = os.path.normpath(str(bundle.path))
        self.user_index = bundle.user_index
        self.item_ids = bundle.item_ids
        self.seen_len = np.diff(bundle.seen_indptr)
        digest = hashlib.sha256((bundle.path / MANIFEST_FILE).read_bytes()).hexdigest()
        self.manifest_sha256 = digest
        self.requested_version = version
        self.version = version or default_version(bundle.manifest, digest)
        self.version_header = self.version.encode("ascii")
        self.metadata = dumps(public_metadata(bundle.manifest, digest, config, self.version))
        self._popular: dict[int, tuple[list[str], np.ndarray]] = {}
        # The longest history a request may send; None: the user tower is looked up by user id.
        self.max_history = bundle.user_tower.max_len if bundle.user_tower.is_history else None
        self._fallback = config.fallback

    def serves(self, bundle: str, version: str | None) -> bool:
        """Whether a request for (bundle, version) is what this already is (version None: the default)."""
        return bundle == self.path and version in (self.version, self.requested_version)

    def answer(self, items: np.ndarray, scores: np.ndarray) -> tuple[list[str], np.ndarray]:
        return self.item_ids[items].tolist(), scores

    def popular(self, k: int) -> tuple[list[str], np.ndarray]:
        """The fallback for unknown users (no history to exclude); cached per k."""
        hit = self._popular.get(k)
        if hit is None:
            if len(self._popular) > 64:
                self._popular.clear()
            hit = self._popular[k] = self.answer(*self.recommender.popular(k))
        return hit


    def history_answers(self, histories: list[list[str]], k: int, exclude_history: bool) -> list[dict[str, Any]]:
        """Per history (external item ids, oldest first): its answer, with ``unknown_items`` (ids skipped as not
        the bundle's). One with no known item gets the popular fallback if the server has one, else an entry
        ``{"error": no_known_item(...), "status": 422, "unknown_items": n}``. One ORT call for all of them."""
        rec = self.recommender
        looked_up = [rec.history_indices(h) for h in histories]
        known = [row for row, (items, _) in enumerate(looked_up) if items.size]
        out: list[dict[str, Any]] = [{}] * len(histories)
        answers = rec.recommend_histories([looked_up[row][0] for row in known], k, exclude_history) if known else []
        for row, (items, scores) in zip(known, answers):
            ids, values = self.answer(items, scores)
            out[row] = {"items": ids, "scores": values, "unknown_items": looked_up[row][1]}
        for row, (items, unknown) in enumerate(looked_up):
            if items.size:
                continue
            if self._fallback == "popular":
                ids, values = self.popular(k)
                out[row] = {"items": ids, "scores": values, "unknown_items": unknown, "fallback": "popular"}
            else:
                out[row] = {"error": no_known_item(len(histories[row]), unknown), "status": 422, "unknown_items": unknown}
        return out


def load(bundle_path: str, version: str | None, config: ServeConfig) -> LoadedBundle:
    """Open and verify a bundle (raises BundleError) and build what serves it; blocking, for a worker thread."""
    bundle = open_bundle(bundle_path, intra_op_num_threads=1, faiss_threads=1)
    return LoadedBundle(Recommender(bundle), config, version)
