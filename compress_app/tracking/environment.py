"""MLflow plumbing shared by the tracker and the registry: environment defaults, the server probe, names.

``mlflow`` is imported only through ``import_mlflow()``, after ``configure_environment`` has switched off
telemetry and bounded MLflow's HTTP retries (its defaults hang for minutes on a dead server).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from compressor.errors import CompressError

DEFAULT_EXPERIMENT = "compress"
PROBE_TIMEOUT_S = 5.0  # /health request timeout; the whole probe (incl. DNS) is cut off at PROBE_DEADLINE_S
PROBE_DEADLINE_S = 8.0

# MLflow's own switches (mlflow.environment_variables), set before mlflow is imported unless the user set them.
# Telemetry off; HTTP retries bounded (MLflow defaults: 7 retries with backoff factor 2 and a 120 s timeout,
# i.e. minutes of hanging on a dead server); no URL banners on stdout (our stdout is JSON); no progress bars.
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class TrackingError(CompressError, RuntimeError):
    """MLflow cannot be used as asked (server unreachable, unknown model version, gate refused ...)."""


def cache_root() -> Path:
    """Where downloaded registry artifacts are kept: $COMPRESS_CACHE_DIR, else $XDG_CACHE_HOME/compress."""
    if os.environ.get("COMPRESS_CACHE_DIR"):
        return Path(os.environ["COMPRESS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


def configure_environment() -> None:
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def import_mlflow():
    """mlflow, imported after its environment defaults are set (telemetry off, bounded retries)."""
    configure_environment()
    fresh = "mlflow" not in sys.modules
    import mlflow
    if fresh and logging.getLogger("mlflow").level == logging.INFO:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." etc.
    return mlflow


def redact(uri: str) -> str:
    """The URI without a password (user:pass@host -> user:***@host), for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else MLflow's own default (sqlite:///mlflow.db in the cwd)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return import_mlflow().get_tracking_uri()


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise TrackingError when an http(s) tracking server does not answer (any HTTP answer counts as alive).

    Database and file stores are not probed: MLflow opens them locally."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return

    outcome: list[BaseException | None] = []

    def get():
        req = urllib.request.Request(uri.rstrip("/") + "/health", method="GET")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only, checked above
                resp.read(64)
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # the server answered (auth proxy, server without /health ...): it is there
        except (urllib.error.URLError, OSError, ValueError) as e:
            outcome.append(e)

    # A daemon thread bounds the whole probe, DNS included, and never delays the interpreter's exit.
    t = threading.Thread(target=get, name="mlflow-probe", daemon=True)
    t.start()
    t.join(PROBE_DEADLINE_S)
    if not outcome:
        raise TrackingError(f"MLflow tracking server {redact(uri)} did not answer within {PROBE_DEADLINE_S:g}s"
                            f"{_HINT}")
    if outcome[0] is not None:
        reason = getattr(outcome[0], "reason", outcome[0])
        raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}){_HINT}")


_HINT = ("; start it, point --tracking-uri / MLFLOW_TRACKING_URI at a running server, pass --mlflow-optional "
         "to train without it when it is down, or --no-mlflow")


def metric_key(key: str) -> str:
    """A metric/tag name MLflow accepts: 'valid_ndcg@10' -> 'valid_ndcg_at_10'."""
    return re.sub(r"[^\w.\- /:]", "_", key.replace("@", "_at_"))


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from, if it is one."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
