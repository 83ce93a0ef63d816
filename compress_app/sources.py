"""Where a command's model comes from: a path as given, or a `models:/` registry URI downloaded to the cache."""

from __future__ import annotations

from .tracking import download_registered_bundle, download_registered_checkpoint

MODELS_PREFIX = "models:/"


def resolve_checkpoint(source: str) -> str:
    """A checkpoint path, or a `models:/NAME/VERSION` / `models:/NAME@ALIAS` URI -> the version's checkpoint."""
    if source.startswith(MODELS_PREFIX):
        return str(download_registered_checkpoint(source))
    return source


def resolve_bundle(source: str) -> str:
    """A bundle directory, or a `models:/NAME@ALIAS` (or /VERSION) URI -> the bundle logged for that version."""
    if source.startswith(MODELS_PREFIX):
        return str(download_registered_bundle(source))
    return source
