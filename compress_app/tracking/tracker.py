"""MLflow tracking of `compress train` / `compress distill` runs, with a buffer for what a lost server missed.

One ``MlflowTracker`` (a trainer callback) turns a run into an MLflow run:
  params     the resolved config, flattened with dotted keys (``train.lr``, ``distill.K`` ...)
  metrics    every numeric value of each epoch's row (losses, diagnostics, validation Recall/NDCG, times),
             step = epoch; at the end ``test_*``, ``best_valid_*``, ``best_epoch``, ``epochs_run``, ``wall_time_s``
  tags       ``compress.command``, ``compress.method``, ``compress.data_fingerprint``, ``compress.package_version``,
             ``mlflow.source.git.commit`` (when the package runs from a git checkout) and, for a student,
             ``compress.teacher.run_id`` / ``compress.teacher.fingerprint`` (teacher -> student lineage)
  artifacts  ``config.yaml``, ``result.json`` (the evaluation report), ``metrics.jsonl``, ``train.log``,
             ``checkpoint/model.safetensors`` and ``plots/valid_ndcg_at_10.png``
MLflow metric and tag names cannot hold ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``. With ``register``, the
finished run's model is exported as a serving bundle into ``<run dir>/bundle`` and that bundle becomes a registered
version (``registry.register_version``).

Failure behaviour: the server is probed before anything runs (``/health``, a few seconds at most): unreachable
is a ``TrackingError`` naming the URI, or a warning and no tracking with ``optional=True``. A server lost
mid-run never stops training: whatever could not be sent goes to ``<run dir>/mlflow-unsent.jsonl`` (JSON
lines; sent, and the file removed, by a later ``--resume`` of the same run dir once the server is back).
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag

from compressor import __version__
from compressor.checkpoint import read_meta
from compressor.config import flatten, to_dict
from compressor.run_dir import CONFIG_FILE, LOG_FILE, METRICS_FILE, MODEL_FILE, RESULT_FILE, RESUME_FILE

from .environment import (DEFAULT_EXPERIMENT, TrackingError, git_commit, import_mlflow, is_number, metric_key,
                          probe, redact, resolve_tracking_uri)
from .gate import DEFAULT_GATE_SHARE, GATE_METRIC, test_metric
from .plots import plot_curve
from .registry import DEFAULT_RECALL_FLOOR, export_for_registration, register_version

log = logging.getLogger(__name__)

UNSENT_FILE = "mlflow-unsent.jsonl"
PLOT_METRIC = "valid_ndcg@10"


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
        mlflow = import_mlflow()
        mlflow.set_tracking_uri(self.uri)
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
        items = [Metric(metric_key(k), float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000], synchronous=True)

    def _log_params(self, params: dict) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100], synchronous=True)

    def _set_tags(self, tags: dict) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100], synchronous=True)

    # ----------------------------------------------------------------------------------- callbacks
    def on_start(self, trainer) -> None:
        if not self.enabled:
            return
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
            params["world_size"] = trainer.extra_meta.get("world_size", 1)  # ranks of a torchrun job
            self._send("params", {"kind": "params", "params": params}, self._log_params, params)
            for row in trainer.history:  # a resumed run whose first part was not tracked
                self.on_epoch_end(trainer, row)

    def on_epoch_end(self, trainer, row: dict) -> None:
        if not self.enabled or self.run_id is None:
            return
        metrics = {k: v for k, v in row.items() if k != "epoch" and is_number(v)}
        step, ts = int(row["epoch"]), int(time.time() * 1000)
        self._send(f"epoch {step} metrics", {"kind": "metrics", "step": step, "timestamp": ts,
                                             "metrics": {metric_key(k): v for k, v in metrics.items()}},
                   self._log_metrics, metrics, step, ts)

    def on_end(self, trainer, result) -> None:
        if not self.enabled or self.run_id is None:
            return
        out = self.out
        final = {f"test_{k}": v for k, v in result.test.items() if k != "users" and is_number(v)}
        final.update({f"best_valid_{k}": v for k, v in result.valid.items() if k != "users" and is_number(v)})
        final.update(best_epoch=result.best_epoch, epochs_run=result.epochs_run, wall_time_s=result.wall_time_s)
        meta = read_meta(out / MODEL_FILE)
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
        artifacts = [(out / CONFIG_FILE, None), (out / RESULT_FILE, None), (out / METRICS_FILE, None),
                     (out / LOG_FILE, None), (out / MODEL_FILE, "checkpoint")]
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
                    bundle = export_for_registration(out / MODEL_FILE)
                    self.registered = register_version(self.client, self.run_id, bundle, meta, self.register,
                                                       self.alias, self.gate_share, DEFAULT_RECALL_FLOOR)
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
            t_ndcg = test_metric(teacher.get("metrics"))
            if t_ndcg is not None:
                tags[f"compress.teacher.test_{metric_key(GATE_METRIC)}"] = t_ndcg
            link = f"run `{t_run}`" if t_run else "an untracked run"
            tags["mlflow.note.content"] = (f"Distilled with `{method}` from teacher {link} (checkpoint "
                                           f"`{teacher.get('fingerprint')}`, {teacher.get('kind')} dim "
                                           f"{teacher.get('dim')}, source `{teacher.get('source')}`).")
        return {k: str(v) for k, v in tags.items() if v is not None}

    def _previous_run(self, trainer) -> str | None:
        """On --resume: the run id recorded in the run dir's checkpoint, if that run exists on this server."""
        run_id = read_meta(Path(trainer.out) / RESUME_FILE).get("mlflow_run_id")
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
