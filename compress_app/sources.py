"""Where a command's model comes from: a path as given, or a `models:/` registry URI downloaded to the cache."""

from __future__ import annotations

from pathlib import Path

from .tracking import download_registered_checkpoint
from .tracking.registry import fetch_verified_bundle, resolve_model_version

MODELS_PREFIX = "models:/"


def resolve_checkpoint(source: str) -> str:
    """A checkpoint path, or a `models:/NAME/VERSION` / `models:/NAME@ALIAS` URI -> the version's checkpoint."""
    if source.startswith(MODELS_PREFIX):
        return str(download_registered_checkpoint(source))
    return source


def version_label(mv) -> str:
    """How a served model version is named in answers and metadata: models:/NAME/VERSION."""
    return f"models:/{mv.name}/{mv.version}"


def resolve_registered_bundle(uri: str) -> tuple[str, Path, str]:
    """(version label, verified local bundle, its manifest sha256) of what a `models:/` URI names now. The
    version is pinned before the download, so an alias that moves meanwhile cannot mix two versions."""
    label = version_label(resolve_model_version(uri))
    bundle, digest = fetch_verified_bundle(label)
    return label, bundle, digest
