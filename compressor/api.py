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

from pathlib import Path

import yaml

from .config import Config, ConfigError, from_dict, load_config, to_dict
from .data import Dataset, load_dataset


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
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override: unknown config key '{key}'")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override: unknown config key '{key}'")
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
                            tuple(d.split.ratios), d.split.seed)
    return load_dataset(str(source), **kwargs)


def _fit(cfg: Config, out, objective_factory, *, command: str, device: str = "auto", resume: bool = False,
         callbacks=None, progress: bool = True, data: Dataset | None = None):
    from .device import configure_threads, resolve_device
    from .trainer import Trainer

    dev = resolve_device(device)
    configure_threads(cfg.train.threads)
    data = data if data is not None else load_data(cfg)
    objective, extra_meta = objective_factory(cfg, data, dev)
    trainer = Trainer(cfg, data, objective, Path(out), dev, command=command, extra_meta=extra_meta,
                      callbacks=callbacks, progress=progress)
    try:
        return trainer.fit(resume=resume)
    except BaseException as e:
        for cb in callbacks or ():
            if hasattr(cb, "on_error"):
                cb.on_error(trainer, e)
        raise


def train(config: str | Path | Config | None = None, out: str | Path = "runs/train", *, overrides=None,
          device: str = "auto", resume: bool = False, callbacks=None, progress: bool = True,
          data: Dataset | None = None):
    """Train a model with BPR (the teacher, usually). Returns a TrainResult (``.out``, ``.test``, ...)."""
    from .objectives import Scratch

    cfg = make_config(config, overrides)
    return _fit(cfg, out, lambda c, d, dev: (Scratch(), {}), command="train", device=device, resume=resume,
                callbacks=callbacks, progress=progress, data=data)


def distill_objective(teacher: str | Path | None, out: str | Path, label: str | None = None):
    """The trainer's objective factory for `distill`: (cfg, data, device) -> (objective, checkpoint metadata).

    Loads and id-aligns the teacher (a run dir, .safetensors or .npz) before any training."""
    import logging

    from .distill import TeacherError, build_objective, load_teacher

    def prepare(c, d, dev):
        meta = {"teacher": None}
        t = None
        if c.distill.method != "scratch":
            if teacher is None:
                raise TeacherError(f"--method {c.distill.method} needs --teacher")
            t = load_teacher(teacher, d)
            meta["teacher"] = {"source": str(label or teacher), "fingerprint": t.fingerprint, **t.info}
            logging.getLogger("compressor").info("teacher %s: %s dim %s, fingerprint %s", label or teacher,
                                                 t.info.get("kind"), t.info.get("dim"), t.fingerprint)
        return build_objective(c, t, dev, Path(out)), meta

    return prepare


def distill(teacher: str | Path | None, config: str | Path | Config | None = None, out: str | Path = "runs/student",
            *, method: str | None = None, overrides=None, device: str = "auto", resume: bool = False,
            callbacks=None, progress: bool = True, data: Dataset | None = None, teacher_label: str | None = None):
    """Distil a student from a frozen teacher (a run dir, .safetensors or .npz) with RCE-KD or a baseline."""
    ov = _override_pairs(overrides) + ([("distill.method", method)] if method else [])
    cfg = make_config(config, ov)

    prepare = distill_objective(teacher, out, label=teacher_label)
    return _fit(cfg, out, prepare, command="distill", device=device, resume=resume, callbacks=callbacks,
                progress=progress, data=data)


def evaluate(checkpoint: str | Path, split: str = "test", data_path: str | None = None, ks=None,
             device: str = "auto") -> dict:
    """Full-ranking Recall@K / NDCG@K of a checkpoint on its own data (or ``data_path`` with the same ids)."""
    import torch

    from .checkpoint import load_checkpoint
    from .device import configure_threads, resolve_device
    from .errors import MismatchError
    from .evaluation import evaluate as run_eval

    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    cfg = from_dict(ckpt.meta["config"], str(ckpt.path))
    configure_threads(cfg.train.threads)
    if data_path:
        cfg.data.path = data_path
    data = load_data(cfg)
    if len(ckpt.user_ids) != data.num_users or len(ckpt.item_ids) != data.num_items:
        raise MismatchError(f"{ckpt.path}: model has {len(ckpt.user_ids):,} users x {len(ckpt.item_ids):,} items, "
                            f"data has {data.num_users:,} x {data.num_items:,}")
    if not (ckpt.user_ids == data.user_ids).all() or not (ckpt.item_ids == data.item_ids).all():
        raise MismatchError(f"{ckpt.path}: model's user/item ids differ from the data's")
    model = ckpt.build_model(dev)
    with torch.no_grad():
        u, i = model.vectors()
        target = data.valid if split == "valid" else data.test
        return run_eval(u, i, data.train.indptr, data.train.items, target.indptr, target.items,
                        ks=ks or cfg.train.eval_ks, block=cfg.train.eval_block)
