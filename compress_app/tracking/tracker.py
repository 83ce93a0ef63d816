"""MLflow tracking and Model Registry for `compress train` / `compress distill` runs.

One ``MlflowTracker`` (a Trainer callback) turns a run into an MLflow run:
  params     the resolved config, flattened with dotted keys (``train.lr``, ``distill.K`` ...)
  metrics    every numeric value of each epoch's row (losses, diagnostics, validation Recall/NDCG, times),
             step = epoch; at the end ``test_*``, ``best_valid_*``, ``best_epoch``, ``epochs_run``, ``wall_time_s``
  tags       ``compress.command``, ``compress.method``, ``compress.data_fingerprint``, ``compress.package_version``,
             ``mlflow.source.git.commit`` (when the package runs from a git checkout) and, for a student,
             ``compress.teacher.run_id`` / ``compress.teacher.fingerprint`` (teacher -> student lineage)
  artifacts  ``config.yaml``, ``result.json`` (the evaluation report), ``metrics.jsonl``, ``train.log``,
             ``checkpoint/model.safetensors`` and ``plots/valid_ndcg_at_10.png``
MLflow metric and tag names cannot hold ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``.

Registry: ``--register NAME`` logs the run's model as an MLflow pyfunc model "from code" (``pyfunc_model.py`` +
the safetensors checkpoint; nothing pickled) and registers it as a new version of NAME, with metrics and lineage
as version tags. ``--alias`` moves only through the promotion gate (``promotion_gate``); a blocked version keeps
no alias and says why in its ``compress.gate.reason`` tag. ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS``
resolve to the version's checkpoint file (``download_registered_checkpoint``).

Failure behaviour: the server is probed before anything runs (``/health``, a few seconds at most): unreachable
is a ``TrackingError`` naming the URI, or a warning and no tracking with ``optional=True``. A server lost
mid-run never stops training: whatever could not be sent goes to ``<run dir>/mlflow-unsent.jsonl`` (JSON
lines; sent, and the file removed, by a later ``--resume`` of the same run dir once the server is back).

``mlflow`` is imported only when tracking is used, after ``_configure_environment`` has switched off telemetry
and bounded MLflow's HTTP retries.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "compress"
GATE_METRIC = "ndcg@20"  # the promotion gate compares the student's and its teacher's test NDCG@20
DEFAULT_GATE_SHARE = 0.9
UNSENT_FILE = "mlflow-unsent.jsonl"
PLOT_METRIC = "valid_ndcg@10"
MODEL_ARTIFACT_PATH = "model"  # name of the logged pyfunc model
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
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

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?$")


class TrackingError(RuntimeError):
    """MLflow cannot be used as asked (server unreachable, unknown model version, gate refused ...)."""


# ----------------------------------------------------------------------------------------------- plumbing

def _configure_environment() -> None:
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _mlflow():
    _configure_environment()
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
    return _mlflow().get_tracking_uri()


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


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from, if it is one."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _checkpoint_meta(path: Path) -> dict:
    """The compress metadata of a checkpoint, without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return json.loads((f.metadata() or {}).get("compress", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError):
        return {}


def plot_curve(history: list[dict], key: str, path: Path, title: str = "") -> Path | None:
    """PNG of `key` per epoch (matplotlib's Agg canvas, no pyplot state). None when no row has `key`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pts = [(r["epoch"], r[key]) for r in history if _numeric(r.get(key))]
    if not pts:
        return None
    xs, ys = zip(*pts)
    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o", markersize=3)
    best = max(range(len(ys)), key=ys.__getitem__)
    ax.scatter([xs[best]], [ys[best]], color="tab:red", zorder=3, label=f"best {ys[best]:.4g} @ epoch {xs[best]}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------------------------- the gate

def _test_metric(metrics: dict | None, key: str = GATE_METRIC):
    v = ((metrics or {}).get("test") or {}).get(key)
    return float(v) if _numeric(v) else None


def promotion_gate(meta: dict, share: float = DEFAULT_GATE_SHARE, bundle_tags: dict | None = None) -> tuple[bool, str]:
    """May this checkpoint (its metadata) take an alias? (ok, reason).

    Passes when the student's test NDCG@20 >= share x its teacher's (a run without teacher passes), and, when
    a bundle was logged for the version with a recall floor, the bundle's index recall meets that floor."""
    if share < 0:
        raise TrackingError(f"gate share must be >= 0, got {share}")
    student = _test_metric(meta.get("metrics"))
    teacher = meta.get("teacher")
    if student is None:
        return False, f"the checkpoint has no test {GATE_METRIC}"
    if not teacher:
        ok, reason = True, f"no teacher (student test {GATE_METRIC} {student:.5f})"
    else:
        t = _test_metric(teacher.get("metrics"))
        if t is None:
            return False, f"the teacher ({teacher.get('source')}) has no recorded test {GATE_METRIC} to compare with"
        need = share * t
        ok = student >= need - 1e-12  # exactly at the share passes, whatever the float rounding
        reason = (f"student test {GATE_METRIC} {student:.5f} {'>=' if ok else '<'} {share:g} x teacher "
                  f"{t:.5f} = {need:.5f}")
    tags = bundle_tags or {}
    if ok and "compress.bundle.index_recall" in tags and "compress.bundle.recall_floor" in tags:
        recall, floor = float(tags["compress.bundle.index_recall"]), float(tags["compress.bundle.recall_floor"])
        if recall < floor:
            return False, f"{reason}, but bundle index recall {recall:.4f} < floor {floor:.4f}"
        reason += f"; bundle index recall {recall:.4f} >= floor {floor:.4f}"
    return ok, reason


# ----------------------------------------------------------------------------------------------- tracker

class MlflowTracker:
    """Trainer callback: one MLflow run per training run (see the module docstring).

    The constructor probes the server and opens the experiment, so an unreachable server fails fast, before
    any data is loaded. The run itself is created in ``on_start`` (the config and data are known then)."""

    def __init__(self, command: str, tracking_uri: str | None = None, experiment: str | None = None,
                 register: str | None = None, alias: str | None = None,
                 gate_share: float = DEFAULT_GATE_SHARE, optional: bool = False):
        self.command, self.register, self.alias, self.gate_share = command, register, alias, gate_share
        self.experiment_name = experiment or DEFAULT_EXPERIMENT
        self.optional = optional
        self.enabled = True  # False: tracking off for this process (unreachable at start with optional=True)
        self.offline = False  # True: the server was lost mid-run; everything goes to the unsent file
        self.run_id: str | None = None
        self.out: Path | None = None
        self.unsent_rows = 0
        self.registered: dict | None = None
        self.uri = resolve_tracking_uri(tracking_uri)
        if alias and not register:
            raise TrackingError("--alias needs --register NAME")
        if gate_share < 0:
            raise TrackingError(f"--gate-share must be >= 0, got {gate_share}")
        try:
            probe(self.uri)
            self._connect()
        except TrackingError as e:
            self._unavailable(e)
        except Exception as e:  # noqa: BLE001 - anything MLflow raises here means "cannot track"
            self._unavailable(TrackingError(f"MLflow at {redact(self.uri)}: {type(e).__name__}: {e}"))

    def _unavailable(self, err: TrackingError) -> None:
        if not self.optional:
            raise err
        log.warning("%s; --mlflow-optional: this run is not tracked%s", err,
                    f" and not registered as '{self.register}'" if self.register else "")
        self.enabled = False

    def _connect(self) -> None:
        mlflow = _mlflow()
        mlflow.set_tracking_uri(self.uri)
        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment_name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment_name)

    # ----------------------------------------------------------------------------------- lost server
    @property
    def unsent_path(self) -> Path:
        return self.out / UNSENT_FILE

    def _keep(self, record: dict) -> None:
        """Append a record that could not be sent to the unsent file."""
        record = {"run_id": self.run_id, "tracking_uri": redact(self.uri), **record}
        with open(self.unsent_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self.unsent_rows += 1

    def _lost(self, what: str, err: Exception) -> None:
        if not self.offline:
            log.warning("MLflow server %s lost while sending %s (%s: %s); training goes on, and what is not "
                        "sent is kept in %s (continue with --resume on this run dir once the server is back "
                        "to send it)", redact(self.uri), what, type(err).__name__, str(err)[:300], self.unsent_path)
        self.offline = True

    def _send(self, what: str, record: dict, fn, *args, **kwargs) -> bool:
        """Run one MLflow call; on failure go offline and keep `record`. Returns True when sent."""
        if not self.offline:
            try:
                fn(*args, **kwargs)
                return True
            except Exception as e:  # noqa: BLE001 - connection, HTTP and MLflow errors alike mean "not sent"
                self._lost(what, e)
        self._keep(record)
        return False

    def _log_metrics(self, metrics: dict, step: int, ts: int) -> None:
        """Send metrics; a kept copy replays with the same timestamp, so MLflow drops it if it did arrive."""
        from mlflow.entities import Metric

        items = [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000], synchronous=True)

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def _set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100], synchronous=True)

    # ----------------------------------------------------------------------------------- callbacks
    def on_start(self, trainer) -> None:
        if not self.enabled:
            return
        from .config import flatten, to_dict

        self.out = Path(trainer.out)
        previous = self._previous_run(trainer) if trainer.epoch > 0 else None
        tags = self._run_tags(trainer)
        try:
            if previous:
                self.run_id = previous
                self.client.update_run(previous, status="RUNNING")
                log.info("MLflow: continuing run %s at %s", previous, redact(self.uri))
            else:
                run = self.client.create_run(self.experiment_id, run_name=self.out.name, tags=tags)
                self.run_id = run.info.run_id
                log.info("MLflow: run %s in experiment '%s' at %s", self.run_id, self.experiment_name,
                         redact(self.uri))
        except Exception as e:  # noqa: BLE001
            self._unavailable(TrackingError(f"MLflow at {redact(self.uri)}: cannot start a run "
                                            f"({type(e).__name__}: {e})"))
            return
        trainer.extra_meta["mlflow_run_id"] = self.run_id
        trainer.extra_meta["mlflow_experiment_id"] = self.experiment_id
        if previous:
            self._replay_unsent()
            self._send("tags", {"kind": "tags", "tags": tags}, self._set_tags, tags)
        else:
            params = flatten(to_dict(trainer.cfg))
            self._send("params", {"kind": "params", "params": params}, self._log_params, params)
            for row in trainer.history:  # a resumed run whose first part was not tracked
                self.on_epoch_end(trainer, row)

    def on_epoch_end(self, trainer, row: dict) -> None:
        if not self.enabled or self.run_id is None:
            return
        metrics = {k: v for k, v in row.items() if k != "epoch" and _numeric(v)}
        step, ts = int(row["epoch"]), int(time.time() * 1000)
        self._send(f"epoch {step} metrics", {"kind": "metrics", "step": step, "timestamp": ts,
                                             "metrics": {metric_key(k): v for k, v in metrics.items()}},
                   self._log_metrics, metrics, step, ts)

    def on_end(self, trainer, result) -> None:
        if not self.enabled or self.run_id is None:
            return
        out = self.out
        final = {f"test_{k}": v for k, v in result.test.items() if k != "users" and _numeric(v)}
        final.update({f"best_valid_{k}": v for k, v in result.valid.items() if k != "users" and _numeric(v)})
        final.update(best_epoch=result.best_epoch, epochs_run=result.epochs_run, wall_time_s=result.wall_time_s)
        meta = _checkpoint_meta(out / "model.safetensors")
        ts = int(time.time() * 1000)
        self._send("final metrics", {"kind": "metrics", "step": result.best_epoch, "timestamp": ts,
                                     "metrics": {metric_key(k): v for k, v in final.items()}},
                   self._log_metrics, final, result.best_epoch, ts)
        end_tags = {"compress.status": "finished", "compress.checkpoint_fingerprint": meta.get("fingerprint"),
                    "compress.best_epoch": result.best_epoch}
        self._send("tags", {"kind": "tags", "tags": end_tags}, self._set_tags, end_tags)
        plot = plot_curve(trainer.history, PLOT_METRIC if any(PLOT_METRIC in r for r in trainer.history)
                          else f"valid_{trainer.cfg.train.metric}",
                          out / f"{metric_key(PLOT_METRIC)}.png", title=f"{self.command} {out.name}")
        artifacts = [(out / "config.yaml", None), (out / "result.json", None), (out / "metrics.jsonl", None),
                     (out / "train.log", None), (out / "model.safetensors", "checkpoint")]
        if plot is not None:
            artifacts.append((plot, "plots"))
        for path, dest in artifacts:
            if path.exists():
                self._send(f"artifact {path.name}", {"kind": "artifact", "path": str(path), "artifact_path": dest},
                           self.client.log_artifact, self.run_id, str(path), dest)
        if self.register:
            if self.offline:
                self._keep({"kind": "register", "name": self.register, "alias": self.alias,
                            "gate_share": self.gate_share})
            else:
                try:
                    self.registered = self._register(out / "model.safetensors", meta)
                except TrackingError:
                    raise
                except Exception as e:  # noqa: BLE001
                    self._lost(f"model version of '{self.register}'", e)
                    self._keep({"kind": "register", "name": self.register, "alias": self.alias,
                                "gate_share": self.gate_share})
        self._send("run status", {"kind": "status", "status": "FINISHED"},
                   self.client.set_terminated, self.run_id, "FINISHED")
        if self.offline:
            log.warning("MLflow server %s was lost during this run: %d record(s) were not sent and are kept in %s; "
                        "the checkpoint and all run files are complete", redact(self.uri), self.unsent_rows,
                        self.unsent_path)

    def on_error(self, trainer, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED on Ctrl-C); called by the CLI when training raises."""
        if not self.enabled or self.run_id is None or self.offline:
            return
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            self.client.set_tag(self.run_id, "compress.error", f"{type(exc).__name__}: {exc}"[:5000])
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001 - the training error is what the user must see
            log.warning("MLflow: could not mark run %s %s (%s)", self.run_id, status, e)

    # ----------------------------------------------------------------------------------- helpers
    def _run_tags(self, trainer) -> dict:
        from . import __version__

        method = getattr(trainer.objective, "name", "scratch")
        tags = {
            "mlflow.source.name": f"compress {self.command}",
            "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": git_commit(),
            "compress.command": self.command,
            "compress.method": method,
            "compress.data_fingerprint": trainer.data.fingerprint(),
            "compress.data_source": trainer.data.source,
            "compress.package_version": __version__,
            "compress.model_kind": trainer.cfg.model.kind,
            "compress.model_dim": trainer.cfg.model.dim,
            "compress.out": str(Path(trainer.out).resolve()),
        }
        try:
            tags["mlflow.user"] = getpass.getuser()
        except (KeyError, OSError):
            pass
        teacher = trainer.extra_meta.get("teacher")
        if teacher:
            t_run = teacher.get("mlflow_run_id")
            tags.update({"compress.teacher.run_id": t_run, "compress.teacher.fingerprint": teacher.get("fingerprint"),
                         "compress.teacher.source": teacher.get("source"), "compress.teacher.kind": teacher.get("kind"),
                         "compress.teacher.dim": teacher.get("dim")})
            t_ndcg = _test_metric(teacher.get("metrics"))
            if t_ndcg is not None:
                tags[f"compress.teacher.test_{metric_key(GATE_METRIC)}"] = t_ndcg
            link = f"run `{t_run}`" if t_run else "an untracked run"
            tags["mlflow.note.content"] = (f"Distilled with `{method}` from teacher {link} (checkpoint "
                                           f"`{teacher.get('fingerprint')}`, {teacher.get('kind')} dim "
                                           f"{teacher.get('dim')}, source `{teacher.get('source')}`).")
        return {k: str(v) for k, v in tags.items() if v is not None}

    def _previous_run(self, trainer) -> str | None:
        """On --resume: the run id recorded in the run dir's checkpoint, if that run exists on this server."""
        from .checkpoint import RESUME_FILE

        run_id = _checkpoint_meta(Path(trainer.out) / RESUME_FILE).get("mlflow_run_id")
        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - another server, or the run was deleted: start a new run
            log.info("MLflow: run %s of this run dir is not on %s; starting a new run", run_id, redact(self.uri))
            return None
        return run_id

    def _replay_unsent(self) -> None:
        """Send what a previous process of this run dir kept in the unsent file, then remove the file."""
        path = self.unsent_path
        if not path.exists():
            return
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        try:
            for r in records:
                if r.get("run_id") not in (None, self.run_id):
                    continue
                kind = r.get("kind")
                if kind == "metrics":
                    from mlflow.entities import Metric
                    items = [Metric(k, float(v), r["timestamp"], r["step"]) for k, v in r["metrics"].items()]
                    self.client.log_batch(self.run_id, metrics=items, synchronous=True)
                elif kind == "params":
                    self._log_params(r["params"])
                elif kind == "tags":
                    self._set_tags(r["tags"])
                elif kind == "register" and not self.register:
                    self.register, self.alias = r["name"], r.get("alias")
                    self.gate_share = r.get("gate_share", self.gate_share)
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow: could not send the kept records of %s yet (%s); they stay there", path, e)
            return
        path.unlink()
        log.info("MLflow: sent %d record(s) kept in %s", len(records), path)

    def _register(self, checkpoint: Path, meta: dict) -> dict:
        """Log the pyfunc model, create a model version, apply the gate. Returns a summary dict."""
        mlflow = self.mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import ParamSchema, ParamSpec

        from . import __version__
        from .pyfunc_model import CHECKPOINT_ARTIFACT, DEFAULT_K

        sig = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*input example was not provided", category=UserWarning)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT_PATH, python_model=str(PYFUNC_CODE),
                    artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}, signature=sig,
                    pip_requirements=[f"compress-recsys=={__version__}", f"mlflow=={mlflow.__version__}"])
        flavor = info.flavors.get("python_function", {})
        if "model_code_path" not in flavor or "python_model" in flavor:
            raise TrackingError("refusing to register: the logged model is not a models-from-code model "
                                "(a pickled python_model would run code on load)")
        ok, reason = promotion_gate(meta, self.gate_share)
        tags = version_tags(meta, self.run_id)
        tags.update({"compress.gate": "passed" if ok else ("blocked" if self.alias else "failed"),
                     "compress.gate.share": self.gate_share, "compress.gate.reason": reason})
        try:
            self.client.create_registered_model(self.register)
        except Exception as e:  # noqa: BLE001 - already exists is fine; anything else resurfaces below
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) + str(e):
                raise
        mv = self.client.create_model_version(self.register, source=info.model_uri, run_id=self.run_id,
                                              tags={k: str(v) for k, v in tags.items()}, model_id=info.model_id)
        summary = {"name": self.register, "version": mv.version, "model_uri": f"models:/{self.register}/{mv.version}",
                   "gate_passed": ok, "gate_reason": reason, "alias": None}
        if self.alias and ok:
            self.client.set_registered_model_alias(self.register, self.alias, mv.version)
            summary["alias"] = self.alias
            log.info("MLflow: registered %s version %s, alias '%s' (%s)", self.register, mv.version, self.alias,
                     reason)
        elif self.alias:
            log.warning("MLflow: registered %s version %s WITHOUT alias '%s': gate blocked it (%s)", self.register,
                        mv.version, self.alias, reason)
        else:
            log.info("MLflow: registered %s version %s", self.register, mv.version)
        self.client.set_tag(self.run_id, "compress.registered_version", f"{self.register}/{mv.version}")
        return summary


def version_tags(meta: dict, run_id: str | None) -> dict:
    """Model-version tags: metrics and lineage of the checkpoint."""
    tags = {"compress.run_id": run_id, "compress.command": meta.get("command"), "compress.method": meta.get("method"),
            "compress.checkpoint_fingerprint": meta.get("fingerprint"),
            "compress.data_fingerprint": meta.get("data_fingerprint"),
            "compress.model_kind": (meta.get("model") or {}).get("kind"),
            "compress.model_dim": (meta.get("model") or {}).get("dim"),
            "compress.package_version": meta.get("package_version")}
    for k, v in ((meta.get("metrics") or {}).get("test") or {}).items():
        if k != "users" and _numeric(v):
            tags[f"compress.test.{metric_key(k)}"] = v
    teacher = meta.get("teacher")
    if teacher:
        tags.update({"compress.teacher.run_id": teacher.get("mlflow_run_id"),
                     "compress.teacher.fingerprint": teacher.get("fingerprint"),
                     "compress.teacher.source": teacher.get("source")})
        t = _test_metric(teacher.get("metrics"))
        if t is not None:
            tags[f"compress.teacher.test.{metric_key(GATE_METRIC)}"] = t
    return {k: v for k, v in tags.items() if v is not None}


# ----------------------------------------------------------------------------------------------- registry

def _client(tracking_uri: str | None = None):
    uri = resolve_tracking_uri(tracking_uri)
    probe(uri)
    mlflow = _mlflow()
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


def _cache_root() -> Path:
    if os.environ.get("COMPRESS_CACHE_DIR"):
        return Path(os.environ["COMPRESS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress"


def download_registered_checkpoint(uri: str) -> Path:
    """The local checkpoint file of a registered model version (downloaded once into the cache).

    The cache is keyed by the version's source (its logged model), which never changes for a version; the
    file's fingerprint is checked against the version's ``compress.checkpoint_fingerprint`` tag."""
    client, tracking_uri = _client()
    mv = resolve_model_version(uri, client)
    mlflow = _mlflow()
    from .pyfunc_model import CHECKPOINT_ARTIFACT

    key = hashlib.sha256(f"{tracking_uri}\n{mv.name}\n{mv.version}\n{mv.source}".encode()).hexdigest()[:16]
    dest = _cache_root() / "registry" / key / "model.safetensors"
    base = f"models:/{mv.name}/{mv.version}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp)
                import yaml
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
    want = (mv.tags or {}).get("compress.checkpoint_fingerprint")
    have = _checkpoint_meta(dest).get("fingerprint")
    if want and have != want:
        dest.unlink(missing_ok=True)
        raise TrackingError(f"{uri}: downloaded checkpoint has fingerprint {have}, the version says {want}")
    log.info("%s -> version %s, checkpoint %s", uri, mv.version, dest)
    return dest


def download_registered_bundle(uri: str) -> Path:
    """The local copy of the serving bundle logged for a model version by ``log_bundle_to_model_version``."""
    client, tracking_uri = _client()
    mv = resolve_model_version(uri, client)
    art = (mv.tags or {}).get("compress.bundle.artifact_uri")
    if not art:
        raise TrackingError(f"{uri} (version {mv.version}) has no bundle logged (compress.bundle.artifact_uri)")
    key = hashlib.sha256(f"{tracking_uri}\n{mv.name}\n{mv.version}\n{art}".encode()).hexdigest()[:16]
    dest = _cache_root() / "bundles" / key / "bundle"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                got = _mlflow().artifacts.download_artifacts(artifact_uri=art, dst_path=tmp)
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
        tags = {"compress.bundle.artifact_uri": art}
        manifest = bundle_dir / "manifest.json"
        if manifest.exists():
            index = json.loads(manifest.read_text()).get("index") or {}
            if _numeric(index.get("recall_at_k")):
                tags["compress.bundle.index_recall"] = index["recall_at_k"]
            if index.get("factory"):
                tags["compress.bundle.index_factory"] = index["factory"]
        if recall_floor is not None:
            tags["compress.bundle.recall_floor"] = recall_floor
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
    ok, reason = promotion_gate(_checkpoint_meta(ckpt), share, mv.tags)
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
    meta = _checkpoint_meta(checkpoint)
    run_id = meta.get("mlflow_run_id")
    if not run_id:
        raise TrackingError(f"{checkpoint}: this run was not tracked in MLflow, so it cannot be registered "
                            f"(train it without --no-mlflow)")
    tracker = MlflowTracker("register", tracking_uri=tracking_uri, register=name, alias=alias, gate_share=gate_share)
    tracker.run_id = run_id
    try:
        return tracker._register(checkpoint, meta)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"MLflow at {redact(tracker.uri)}: cannot register {checkpoint} as '{name}' "
                            f"({type(e).__name__}: {e})") from None
