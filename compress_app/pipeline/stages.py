"""The pipeline's training stages: each a run directory that is reused when finished, resumed when interrupted."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from compressor import api
from compressor.config import Config, ConfigError, flatten, to_dict
from compressor.run_dir import CONFIG_FILE, LOG_FILE, RESULT_FILE, RESUME_FILE
from compressor.trainer import TrainingError

from ..logs import PIPELINE_LOGGER, log_file_handler
from ..tracking import GATE_METRIC, MlflowTracker
from .options import PipelineOptions, recipe, stage_overrides

log = logging.getLogger(PIPELINE_LOGGER)

STAGE_RUNS = ("teacher", "scratch", "rcekd")
LOCK_FILE = ".pipeline.lock"
# What a stage did in this invocation (summary.json "stages").
RAN, RESUMED, REUSED, GIVEN = "ran", "resumed", "reused", "given"


def read_result(run_dir: Path) -> dict | None:
    """The finished run's result.json, or None while the run is not finished."""
    p = run_dir / RESULT_FILE
    return json.loads(p.read_text()) if p.exists() else None


def prepare_run_dir(run_dir: Path) -> bool:
    """True: resume the interrupted run there. A dir without a resumable checkpoint is cleared: it holds no
    finished epoch (killed during the first one), so nothing is lost."""
    if (run_dir / RESUME_FILE).exists():
        return True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return False


def tracking_callbacks(o: PipelineOptions, command: str) -> list:
    if o.mlflow is None:
        return []
    return [MlflowTracker(command, tracking_uri=o.mlflow.get("tracking_uri"), experiment=o.mlflow.get("experiment"),
                          optional=o.mlflow.get("optional", False))]


# how many threads a stage ran with does not change what it trained (the teacher's depend on whether the scratch
# baseline trains beside it)
IGNORED_KEYS = frozenset({"train.threads"})


def check_kept_stages(out: Path, configs: dict[str, Config]) -> None:
    """A finished stage is reused and an interrupted one resumed only if it ran the config this invocation asks
    for: a rerun with another --kd-users, --set or recipe would otherwise get the earlier student back without a
    word. ConfigError naming the stage and the first keys that differ; nothing is touched."""
    for name, cfg in configs.items():
        run_dir = out / name
        done = read_result(run_dir) is not None
        if not (run_dir / CONFIG_FILE).exists() or not (done or (run_dir / RESUME_FILE).exists()):
            continue
        kept = flatten(yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {})
        asked = flatten(json.loads(json.dumps(to_dict(cfg))))  # (tuples as lists, as the saved YAML has them)
        differ = [k for k in sorted(set(kept) | set(asked)) if k not in IGNORED_KEYS and kept.get(k) != asked.get(k)]
        if differ:
            said = ", ".join(f"{k} {kept.get(k)!r} (now {asked.get(k)!r})" for k in differ[:3])
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise ConfigError(f"{run_dir}: this stage {'finished' if done else 'was interrupted'} with {said}{more}; "
                              "--fresh redoes every stage, or use another --out")


def run_stage(name: str, run_dir: Path, train) -> tuple[dict, str]:
    """Run ``train(resume)`` into ``run_dir`` unless it finished earlier. Returns (result.json, what happened)."""
    done = read_result(run_dir)
    if done is not None:
        log.info("stage %-8s reused: %s (finished earlier; test %s %.4f) — --fresh redoes it", name, run_dir,
                 GATE_METRIC, done["test"][GATE_METRIC])
        return done, REUSED
    resume = prepare_run_dir(run_dir)
    log.info("stage %-8s %s: %s", name, "resuming" if resume else "running", run_dir)
    t0 = time.perf_counter()
    # Each stage's own log beside its checkpoints, as `compress train` / `compress distill` write it.
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = log_file_handler(run_dir / LOG_FILE)
    logging.getLogger().addHandler(handler)
    try:
        train(resume)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    done = read_result(run_dir)
    log.info("stage %-8s finished in %.0fs: test %s %.4f", name, time.perf_counter() - t0, GATE_METRIC,
             done["test"][GATE_METRIC])
    return done, RESUMED if resume else RAN


def lock(out: Path):
    """One pipeline per directory: a second one would train into the same stage directories."""
    f = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise TrainingError(f"{out}: another compress pipeline is running there (pid {pid}); "
                            "wait for it or use another --out") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def train_teacher(o: PipelineOptions, run_dir: Path, resume: bool, progress: bool, threads: int | None,
                  extra_callbacks=()):
    return api.train(recipe(o.teacher_config), run_dir, overrides=stage_overrides(o, "teacher", threads=threads),
                     device=o.device, resume=resume, callbacks=[*tracking_callbacks(o, "train"), *extra_callbacks],
                     progress=progress)


def train_scratch(o: PipelineOptions, resume: bool, progress: bool, extra_callbacks=()):
    return api.distill(None, recipe(o.student_config), o.out / "scratch", method="scratch",
                       overrides=stage_overrides(o, "scratch"), device=o.device, resume=resume,
                       callbacks=[*tracking_callbacks(o, "distill"), *extra_callbacks], progress=progress)


def train_rcekd(o: PipelineOptions, teacher: Path, teacher_label: str, resume: bool, progress: bool):
    return api.distill(teacher, recipe(o.kd_config), o.out / "rcekd", method="rcekd",
                       overrides=stage_overrides(o, "rcekd"),
                       device=o.device, resume=resume, callbacks=tracking_callbacks(o, "distill"), progress=progress,
                       teacher_label=teacher_label)
