"""What one `compress pipeline` invocation was asked to do, and how that becomes each stage's config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compressor import api
from compressor.config import Config, ConfigError

from ..tracking import DEFAULT_GATE_SHARE, GATE_METRIC

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class PipelineOptions:
    out: Path
    data: str | None = None
    teacher: str | None = None
    teacher_config: str = "configs/citeulike/mf-teacher.yaml"
    student_config: str = "configs/citeulike/mf-student.yaml"
    kd_config: str = "configs/citeulike/mf-rcekd.yaml"
    overrides: tuple = ()
    epochs: int | None = None
    patience: int | None = None
    kd_users: str | None = None  # distill.kd_users of the RCE-KD stage (None: the recipe's)
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    fresh: bool = False
    quiet: bool = False
    mlflow: dict | None = None  # None: untracked; else {"tracking_uri", "experiment", "optional"}
    register: str | None = None
    alias: str | None = None
    gate_share: float = DEFAULT_GATE_SHARE
    index: str = "auto"
    bootstrap: int = 1000  # resamples of the test users behind the report's 95% CIs (0: point estimates only)
    parallel: bool = True  # train the scratch baseline beside the teacher in a second process
    log_file: Path | None = None  # where the scratch process appends its log lines (the pipeline's log)


def recipe(path: str) -> str:
    """A recipe path as given, or the shipped recipe of that name when run outside the project directory."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (PROJECT_ROOT / p).exists():
        return str(PROJECT_ROOT / p)
    return path


def stage_overrides(o: PipelineOptions, stage: str, threads: int | None = None) -> list[str]:
    """Overrides of a stage ("teacher", "scratch" or "rcekd"). ``--patience`` shortens the RCE-KD stage only: the
    teacher and the scratch baseline keep their recipes' patience, so the report never compares the student with
    a teacher (or a baseline) stopped on the plateau of its early validation curve."""
    ov = list(o.overrides)
    if o.data:
        ov.append(f"data.path={o.data}")
    if o.epochs is not None:
        ov.append(f"train.epochs={o.epochs}")
    if o.patience is not None and stage == "rcekd":
        ov.append(f"train.patience={o.patience}")
    if o.kd_users is not None and stage == "rcekd":
        ov.append(f"distill.kd_users={o.kd_users}")
    threads = o.threads if threads is None else threads
    if threads is not None:
        ov.append(f"train.threads={threads}")
    ov.append(f"train.seed={o.seed}")
    return ov


def stage_configs(o: PipelineOptions) -> dict[str, Config]:
    """Every stage's validated config, built before anything trains: a mistake in any recipe or override, or a
    recipe the report cannot compare, is refused before the first epoch."""
    configs = {"scratch": api.make_config(recipe(o.student_config), [*stage_overrides(o, "scratch"),
                                                                      "distill.method=scratch"]),
               "rcekd": api.make_config(recipe(o.kd_config), [*stage_overrides(o, "rcekd"), "distill.method=rcekd"])}
    if not o.teacher:
        configs["teacher"] = api.make_config(recipe(o.teacher_config), stage_overrides(o, "teacher"))
    k = int(GATE_METRIC.partition("@")[2])
    for name, cfg in configs.items():
        if k not in cfg.train.eval_ks:
            raise ConfigError(f"{name} stage: the pipeline compares models by test {GATE_METRIC} (report and "
                              f"promotion gate), so 'train.eval_ks' must include {k}; got {cfg.train.eval_ks}")
    return configs
