"""MLflow for compress: run tracking (``tracker``), the registry (``registry``), the promotion gate (``gate``),
the registered pyfunc model over the serving bundle (``bundle_pyfunc``) and their shared plumbing (``environment``).

MLflow's environment defaults (telemetry off, bounded HTTP retries) are set here, when this package is first
imported and before any of its modules imports mlflow.
"""

from .environment import configure_environment

configure_environment()

from .environment import TrackingError, probe, resolve_tracking_uri  # noqa: E402
from .gate import DEFAULT_GATE_SHARE, GATE_METRIC, promotion_gate  # noqa: E402
from .registry import (download_registered_bundle, download_registered_checkpoint, promote,  # noqa: E402
                       register_checkpoint)
from .tracker import MlflowTracker  # noqa: E402

__all__ = ["DEFAULT_GATE_SHARE", "GATE_METRIC", "MlflowTracker", "TrackingError", "download_registered_bundle",
           "download_registered_checkpoint", "probe", "promote", "promotion_gate",
           "register_checkpoint", "resolve_tracking_uri"]
