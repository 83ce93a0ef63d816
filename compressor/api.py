"""The Python API: what the CLI does, for notebooks and other pipelines.

    from compressor import api
    data = api.load_data("builtin:citeulike-t", min_user_interactions=5)
    teacher = api.train("configs/citeulike/mf-teacher.yaml", out="runs/teacher")
    student = api.distill(teacher.out, "configs/citeulike/mf-rcekd.yaml", out="runs/student")
    api.evaluate(student.out)                      # {"recall@10": ..., "ndcg@10": ..., ...}

Export and serving live in their own packages (the data flows compressor -> export -> serving):
``export.from_checkpoint.export_checkpoint(run_dir, bundle_dir)`` and
``serving.bundle.open_bundle(bundle_dir)`` + ``serving.recommender.Recommender``.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
import yaml

from . import distributed
from .checkpoint import load_checkpoint
from .cold import EVAL_USERS, cold_targets, cold_user_vectors
from .config import Config, ConfigError, check_distill, from_dict, load_config, to_dict
from .data import Dataset, load_dataset
from .device import configure_threads, resolve_device
from .distill import TeacherError, load_teachers
from .errors import CompressError, MismatchError
from .evaluation import SplitEvaluation, evaluate_split
from .evaluation import evaluate as run_eval
from .objectives import Scratch, build_objective, method_needs_teacher
from .trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


def _override_pairs(overrides) -> list[tuple[str, object]]:
    """{"train.lr": 0.002}, ["train.lr=0.002"] or [("train.lr", 0.002)] -> [("train.lr", 0.002)]."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    pairs = []
    for ov in overrides:
        if isinstance(ov, tuple):
            pairs.append(ov)
            continue
        key, sep, value = str(ov).partition("=")
        if not sep:
            raise ConfigError(f"--set {ov!r}: expected KEY=VALUE")
        pairs.append((key, yaml.safe_load(value)))
    return pairs


def _suggest(prefix: list[str], key: str, node: dict) -> str:
    """' (did you mean ...?)' with the closest key at that level of the config, or the keys there."""
    close = difflib.get_close_matches(key, list(node), n=1)
    path = ".".join(prefix)
    if close:
        return f" (did you mean '{'.'.join([*prefix, close[0]])}'?)"
    return f" (keys{' under ' + path if path else ''}: {', '.join(node)})"


def make_config(config: str | Path | Config | None = None, overrides=None) -> Config:
    """A validated Config from a YAML recipe (or defaults) plus overrides.

    overrides: {"train.lr": 0.002}, ["train.lr=0.002", ...] (values parsed as YAML) or [(key, value)];
    unknown keys are errors.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    raw = to_dict(cfg)
    for key, value in _override_pairs(overrides):
        node = raw
        parts = key.split(".")
        for depth, p in enumerate(parts):
            last = depth == len(parts) - 1
            if p not in node or (not last and not isinstance(node[p], dict)):
                raise ConfigError(f"override: unknown config key '{key}'{_suggest(parts[:depth], p, node)}")
            if not last:
                node = node[p]
        node[parts[-1]] = value
    cfg = from_dict(raw, str(config) if isinstance(config, (str, Path)) else "<config>")
    # Record where the data really is, so `evaluate` and `--resume` find it from any directory.
    if not cfg.data.path.startswith("builtin:"):
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    return cfg


def load_data(source: str | Config = "builtin:citeulike-t", **kwargs) -> Dataset:
    """Load a data set from a path (kwargs as in ``compressor.data.load_dataset``) or from a config's data section."""
    if isinstance(source, Config):
        d = source.data
        return load_dataset(d.path, d.format, d.min_user_interactions, d.min_item_interactions, d.split.order,
                            tuple(d.split.ratios), d.split.seed, d.cold_users)
    return load_dataset(str(source), **kwargs)


def _fit(cfg: Config, out, make_objective, *, command: str, device: str, resume: bool, callbacks, progress: bool,
         data: Dataset | None, reshard: bool = False) -> TrainResult:
    """Resolve the device (and, under torchrun, join the job), load the data, build the objective
    (``make_objective(data, device, dist) -> (objective, checkpoint metadata)``) and run the trainer; its
    callbacks see ``on_error`` when training raises."""
    dist = distributed.setup(device)
    try:
        # ranks on one node share its cores: each takes its share, never all of them
        configure_threads(cfg.train.threads, share=dist.local_world_size)
        error = trainer = None
        try:
            data = data if data is not None else load_data(cfg)
            dist.assign(data.train.indptr)
            objective, extra_meta = make_objective(data, dist.device, dist)
            trainer = Trainer(cfg, data, objective, Path(out), dist.device, command=command, extra_meta=extra_meta,
                              callbacks=list(callbacks or []), progress=progress, dist=dist, reshard=reshard)
        except (CompressError, OSError) as e:  # e.g. a rank that cannot read the data: every rank stops
            error = e
        dist.agree(error)
        return trainer.fit(resume=resume)
    finally:
        dist.close()


def train(config: str | Path | Config | None = None, out: str | Path = "runs/train", *, overrides=None,
          device: str = "auto", resume: bool = False, callbacks=None, progress: bool = True,
          data: Dataset | None = None, reshard: bool = False) -> TrainResult:
    """Train a model with BPR (the teacher, usually). Returns a TrainResult (``.out``, ``.test``, ...).

    config: a YAML path, None (defaults) or a Config; callbacks: ``trainer.Callback`` objects. Under torchrun
    (WORLD_SIZE > 1) this process trains its rank's block of users (``compressor.distributed``); ``reshard``
    lets it resume a run saved with another world size."""
    cfg = make_config(config, overrides)
    return _fit(cfg, out, lambda d, dev, dist: (Scratch(), {}), command="train", device=device, resume=resume,
                callbacks=callbacks, progress=progress, data=data, reshard=reshard)


def distill(teacher: str | Path | list | None, config: str | Path | Config | None = None, out: str | Path = "runs/student",
            *, method: str | None = None, overrides=None, device: str = "auto", resume: bool = False,
            callbacks=None, progress: bool = True, data: Dataset | None = None,
            teacher_label: str | None = None, reshard: bool = False) -> TrainResult:
    """Distil a student from a frozen teacher (a run dir, .safetensors or .npz) with RCE-KD or a baseline; a list of
    teachers distils from their ensemble (``compressor.distill.ensemble``, weights ``distill.teacher_weights``).

    The teacher is loaded and id-aligned to the data before any training; ``teacher_label`` is how checkpoints
    and logs name it (default: the path, e.g. the models:/ URI it was downloaded from)."""
    ov = _override_pairs(overrides) + ([("distill.method", method)] if method else [])
    cfg = check_distill(make_config(config, ov))
    label = str(teacher_label or (" + ".join(map(str, teacher)) if isinstance(teacher, (list, tuple)) else teacher))

    def make_objective(d: Dataset, dev: torch.device, dist: distributed.Distributed):
        meta = {"teacher": None}
        t = None
        if method_needs_teacher(cfg.distill.method):
            if teacher is None:
                raise TeacherError(f"--method {cfg.distill.method} needs --teacher")
            t = load_teachers(teacher, d, cfg.distill.teacher_weights, cfg.train.eval_ks)
            meta["teacher"] = {"source": label, "fingerprint": t.fingerprint, **t.info}
            log.info("teacher %s: %s dim %s, fingerprint %s", label, t.info.get("kind"), t.info.get("dim"),
                     t.fingerprint)
            if dist.active:  # this rank's users only: their top-K, sets and scores
                t = t.user_block(dist.lo, dist.hi)
        return build_objective(cfg, t, dev, Path(out)), meta

    return _fit(cfg, out, make_objective, command="distill", device=device, resume=resume, callbacks=callbacks,
                progress=progress, data=data, reshard=reshard)


def _evaluation_data(ckpt, data_path: str | None) -> tuple[Config, Dataset]:
    """The checkpoint's config (threads set) and its data, or the data at ``data_path`` read the same way."""
    cfg = from_dict(ckpt.meta["config"], str(ckpt.path))
    configure_threads(cfg.train.threads)
    if data_path:
        cfg.data.path = data_path
    return cfg, load_data(cfg)


def model_on_data(ckpt, data: Dataset, dev: torch.device, data_label: str = "the data"):
    """The checkpoint's model on ``dev``, once its ids are checked against ``data``'s."""
    if len(ckpt.user_ids) != data.num_users or len(ckpt.item_ids) != data.num_items:
        raise MismatchError(f"{ckpt.path}: model has {len(ckpt.user_ids):,} users x {len(ckpt.item_ids):,} items, "
                            f"{data_label} has {data.num_users:,} x {data.num_items:,}")
    if not (ckpt.user_ids == data.user_ids).all() or not (ckpt.item_ids == data.item_ids).all():
        raise MismatchError(f"{ckpt.path}: model's user/item ids differ from those of {data_label}")
    return ckpt.build_model(dev)


def evaluate(checkpoint: str | Path, split: str = "test", data_path: str | None = None, ks=None,
             device: str = "auto") -> dict:
    """Full-ranking Recall@K / NDCG@K of a checkpoint on its own data (or ``data_path`` with the same ids)."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    cfg, data = _evaluation_data(ckpt, data_path)
    with torch.no_grad():
        u, i = model_on_data(ckpt, data, dev).vectors()
    target = data.valid if split == "valid" else data.test
    return run_eval(u, i, data.train.indptr, data.train.items, target.indptr, target.items,
                    ks=ks or cfg.train.eval_ks, block=cfg.train.eval_block)


def evaluate_per_user(checkpoints, split: str = "test", data_path: str | None = None, ks=None,
                      device: str = "auto", users: str = "warm") -> list[SplitEvaluation]:
    """Per-user Recall / NDCG / MRR / MAP @K of each checkpoint, all on the same users: the data of the first
    checkpoint (or ``data_path``), whose ids every checkpoint must have. Each result also holds the metrics on warm
    targets and the cold-target count (``compressor.evaluation.evaluate_split``).

    ``users="cold"``: the users the data holds out of training (``data.cold_users``), each ranked from its
    history with the history excluded (``compressor.cold``): a history model encodes the history, an ID model has
    no vector for such a user and is scored by popularity, as serving answers it."""
    if users not in EVAL_USERS:
        raise ValueError(f"users {users!r}; expected one of {', '.join(EVAL_USERS)}")
    dev = resolve_device(device)
    first = load_checkpoint(checkpoints[0])
    cfg, data = _evaluation_data(first, data_path)
    if users == "cold" and data.cold is None:
        raise MismatchError(f"{first.path}: its data holds out no cold users (data.cold_users is 0); train with "
                            f"--set data.cold_users=0.2 to evaluate users never seen in training")
    target = data.valid if split == "valid" else data.test
    fingerprint = data.fingerprint()
    results = []
    for n, source in enumerate(checkpoints):
        ckpt = first if n == 0 else load_checkpoint(source)
        label = "the data" if n == 0 else f"the data of {first.path}"
        try:
            model = model_on_data(ckpt, data, dev, label)
        except MismatchError as e:
            raise MismatchError(f"{e}; paired results need every model on the same users" if n else str(e)) from None
        if ckpt.meta.get("data_fingerprint") not in (None, fingerprint):  # same ids, other splits (or --data)
            log.warning("%s was trained on other data or splits than %s (fingerprint %s vs %s): its %s users may "
                        "include interactions it trained on", ckpt.path, label, ckpt.meta.get("data_fingerprint"),
                        fingerprint, split)
        if users == "cold":
            u, i = cold_user_vectors(model, data)
            history, held = data.cold.history, cold_targets(data.cold, split)
            results.append(evaluate_split(u, i, history.indptr, history.items, held.indptr, held.items,
                                          ks=ks or cfg.train.eval_ks, block=cfg.train.eval_block,
                                          trained_items=data.train.items))
            continue
        with torch.no_grad():
            u, i = model.vectors()
        results.append(evaluate_split(u, i, data.train.indptr, data.train.items, target.indptr, target.items,
                                      ks=ks or cfg.train.eval_ks, block=cfg.train.eval_block))
    return results
