"""The one trainer behind `compress train` and every `compress distill` method.

An epoch: sample one negative per training positive (never a positive of that user), shuffle, and step the
optimizer on the objective's loss batch by batch; every ``eval_every`` epochs validate with full ranking and keep
the best model; stop after ``patience`` validations without improvement; finally test the best model.

What differs between methods lives in an ``Objective`` (see ``objectives.py``): the trainer never knows whether a
teacher exists. The run directory ``out`` holds the files named in ``run_dir`` (best model, resume state, metrics
log, resolved config, result). A command that refuses (a run already there, nothing to resume, a mismatch) leaves
every file of ``out`` as it was: the checks come before the first write.
Every epoch's randomness derives from (seed, epoch), so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from .config import Config, to_dict
from .data import Dataset
from .errors import CompressError
from .evaluation import evaluate
from .files import atomic_write_bytes
from .models import build_model
from .objectives import Objective, SetupContext
from .optim import build_optimizer, wants_sparse_gradients
from .run_dir import CONFIG_FILE, METRICS_FILE, MODEL_FILE, RESULT_FILE, RESUME_FILE

log = logging.getLogger(__name__)


class TrainingError(CompressError, RuntimeError):
    """Training cannot go on as asked (nothing to resume, a run already there, a diverging loss ...)."""


def sample_negatives(train_users: np.ndarray, train_items: np.ndarray, num_items: int,
                     rng: np.random.Generator) -> np.ndarray:
    """One uniformly sampled negative per positive, never a training positive of that user (vectorised
    rejection sampling against the sorted (user, item) keys)."""
    keys = np.sort(train_users * num_items + train_items)
    neg = rng.integers(0, num_items, size=len(train_users))
    todo = np.arange(len(train_users))
    for _ in range(1000):
        cand = train_users[todo] * num_items + neg[todo]
        pos = np.searchsorted(keys, cand).clip(max=len(keys) - 1)
        bad = keys[pos] == cand
        if not bad.any():
            return neg
        todo = todo[bad]
        neg[todo] = rng.integers(0, num_items, size=len(todo))
    raise TrainingError("could not sample negatives: some user has interacted with (almost) every item")


@dataclass
class EarlyStopping:
    patience: int
    best: float = -math.inf
    best_epoch: int = 0
    bad: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Returns True when value is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad = value, epoch, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience


@dataclass
class TrainResult:
    out: Path
    best_epoch: int
    epochs_run: int
    valid: dict
    test: dict
    wall_time_s: float
    history: list = field(default_factory=list)


class Callback(Protocol):
    """What the trainer calls on its callbacks. Implement all four hooks, or subclass this class and override the
    ones you need (the others do nothing). Callbacks may read ``trainer.out, .cfg, .data, .epoch, .history,
    .extra_meta`` (written into every checkpoint's metadata) and ``.objective.name``."""

    def on_start(self, trainer) -> None:
        """After the run directory was accepted and the objective set up, before the first epoch."""

    def on_epoch_end(self, trainer, row: dict) -> None:
        """After each epoch's row was written to the metrics log."""

    def on_end(self, trainer, result) -> None:
        """After the final checkpoint and result file."""

    def on_error(self, trainer, exc: BaseException) -> None:
        """When ``fit`` raises (also for a refused run directory, and for Ctrl-C), before the exception propagates."""


class Trainer:
    def __init__(self, cfg: Config, data: Dataset, objective: Objective, out: Path, device: torch.device,
                 command: str = "train", extra_meta: dict | None = None, callbacks: list | None = None,
                 progress: bool = True):
        self.cfg, self.data, self.objective = cfg, data, objective
        self.out, self.device, self.command = Path(out), device, command
        self.extra_meta = extra_meta or {}
        self.callbacks = callbacks or []
        self.progress = progress
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        self.model = build_model(m.kind, num_users=data.num_users, num_items=data.num_items, dim=m.dim,
                                 layers=m.layers, init_std=m.init_std)
        if m.kind == "lightgcn":
            self.model.set_graph(data.train.users, data.train.items)
        self.model.to(device)
        self.optimizer = build_optimizer(cfg.train.optimizer, self.model.parameters(), lr=cfg.train.lr,
                                         weight_decay=cfg.train.weight_decay)
        # a row-sparse optimizer gets sparse gradients from models whose tables are leaf parameters
        self.sparse_grads = wants_sparse_gradients(cfg.train.optimizer) and self.model.leaf_tables
        self.stopper = EarlyStopping(cfg.train.patience)
        self.epoch = 0
        self.history: list[dict] = []
        self.train_indptr = data.train.indptr
        self.valid_indptr = data.valid.indptr

    # ------------------------------------------------------------------------------------------- state
    def _meta(self, status: str) -> dict:
        return {"command": self.command, "method": self.objective.name,
                "package_version": __version__, "config": to_dict(self.cfg),
                "data_fingerprint": self.data.fingerprint(), "data_source": self.data.source,
                "epoch": self.epoch, "status": status, "history": self.history,
                "early_stopping": {"best": self.stopper.best if self.stopper.best > -math.inf else None,
                                   "best_epoch": self.stopper.best_epoch, "bad": self.stopper.bad},
                **self.extra_meta}

    def _save(self, name: str, status: str, with_optimizer: bool, metrics: dict | None = None) -> dict:
        meta = self._meta(status)
        if metrics is not None:
            meta["metrics"] = metrics
        return save_checkpoint(self.out / name, model=self.model, meta=meta, user_ids=self.data.user_ids,
                               item_ids=self.data.item_ids, train_indptr=self.train_indptr,
                               train_indices=self.data.train.items,
                               optimizer=self.optimizer if with_optimizer else None,
                               rng_state=torch.get_rng_state())

    def resume(self) -> None:
        """Restore the state of the run in ``out`` from its resume checkpoint; refuses (TrainingError) before
        changing any file when the run cannot be continued with this data, objective and optimizer."""
        path = self.out / RESUME_FILE
        if not path.exists():
            raise TrainingError(f"{self.out}: nothing to resume (no {RESUME_FILE})")
        ckpt = load_checkpoint(path, with_training_state=True)
        if ckpt.meta.get("data_fingerprint") != self.data.fingerprint():
            raise TrainingError(f"{path}: was trained on different data (fingerprint "
                                f"{ckpt.meta.get('data_fingerprint')} vs {self.data.fingerprint()})")
        if ckpt.meta.get("method") != self.objective.name:
            raise TrainingError(f"{path}: was a '{ckpt.meta.get('method')}' run, cannot resume it as "
                                f"'{self.objective.name}'")
        self.model.load_state_dict({k: v.to(self.device) for k, v in ckpt.model_state.items()}, strict=False)
        saved_opt = ckpt.meta.get("config", {}).get("train", {}).get("optimizer", "adam")
        if saved_opt != self.cfg.train.optimizer:
            raise TrainingError(f"{path}: was trained with train.optimizer {saved_opt}, cannot resume it with "
                                f"{self.cfg.train.optimizer} (the optimizer state differs)")
        restore_optimizer(self.optimizer, ckpt)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        self.epoch = ckpt.meta["epoch"]
        self.history = ckpt.meta["history"]
        es = ckpt.meta["early_stopping"]
        self.stopper = EarlyStopping(self.cfg.train.patience, es["best"] if es["best"] is not None else -math.inf,
                                     es["best_epoch"], es["bad"])
        # The metrics log may hold epochs after the checkpoint (killed between the two writes): rewrite it.
        self._rewrite_metrics_log()
        log.info("resumed %s at epoch %d (best %s=%.5f at epoch %d)", self.out, self.epoch, self.cfg.train.metric,
                 self.stopper.best, self.stopper.best_epoch)

    def _rewrite_metrics_log(self) -> None:
        text = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_bytes(self.out / METRICS_FILE, text.encode())

    # ------------------------------------------------------------------------------------------- training
    def _evaluate(self, split: str) -> dict:
        self.model.eval()
        with torch.no_grad():
            u, i = self.model.vectors()
            target = self.data.valid if split == "valid" else self.data.test
            res = evaluate(u, i, self.train_indptr, self.data.train.items, target.indptr, target.items,
                           ks=self.cfg.train.eval_ks, block=self.cfg.train.eval_block)
        self.model.train()
        return res

    def _run_epoch(self, epoch: int) -> dict:
        cfg = self.cfg.train
        rng = np.random.default_rng([cfg.seed, epoch])
        # torch sampling (KD sets) happens on the training device, so its generator lives there too
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 100003 + epoch)
        t0 = time.perf_counter()
        diag = self.objective.on_epoch_start(self.model, epoch, rng, gen) or {}
        t1 = time.perf_counter()
        users_np, items_np = self.data.train.users, self.data.train.items
        neg_np = sample_negatives(users_np, items_np, self.data.num_items, rng)
        order = rng.permutation(len(users_np))
        users = torch.as_tensor(users_np[order], device=self.device)
        pos = torch.as_tensor(items_np[order], device=self.device)
        neg = torch.as_tensor(neg_np[order], device=self.device)
        t_sample = time.perf_counter() - t1
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        n_batches = math.ceil(len(order) / cfg.batch_size)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}", leave=False, disable=not self.progress or None,
                   unit="batch", dynamic_ncols=True)
        for b in bar:
            sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
            loss, parts = self.objective.batch_loss(self.model, users[sl], pos[sl], neg[sl])
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch}, batch {b}: loss is {loss.item()} (lr too high?)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for k, v in parts.items():
                v = float(v)
                if math.isfinite(v):  # a mean over no users (a batch with no KD users left) is NaN: skipped
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        bar.close()
        out = {k: v / counts[k] for k, v in sums.items()}
        out.update({f"diag_{k}" if not k.startswith(("time_", "diag_")) else k: v for k, v in diag.items()})
        out["time_refresh_s"] = t1 - t0
        out["time_sampling_s"] = t_sample
        out["time_epoch_s"] = time.perf_counter() - t0
        return out

    def fit(self, resume: bool = False) -> TrainResult:
        """Train (or, with ``resume``, continue the run in ``out``) to the end; the callbacks' ``on_error`` sees
        any exception before it propagates."""
        try:
            return self._fit(resume)
        except BaseException as e:
            for cb in self.callbacks:
                on_error = getattr(cb, "on_error", None)  # optional for callbacks written before it existed
                if on_error is not None:
                    on_error(self, e)
            raise

    def _accept_out(self, resume: bool) -> None:
        """Refuse a run directory this command must not touch, then (and only then) write the resolved config."""
        if resume:
            self.resume()
        else:
            for stale in (RESUME_FILE, MODEL_FILE, METRICS_FILE, RESULT_FILE):
                if (self.out / stale).exists():
                    raise TrainingError(f"{self.out}: already holds a run ({stale}); use --resume to continue it "
                                        f"or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def _fit(self, resume: bool) -> TrainResult:
        self._accept_out(resume)
        self.objective.setup(SetupContext(data=self.data, sparse_grads=self.sparse_grads))
        for cb in self.callbacks:
            cb.on_start(self)
        cfg = self.cfg.train
        log.info("%s %s on %s: %s, model %s dim %d, device %s", self.command, self.objective.name,
                 self.data.source, self.data.summary(), self.cfg.model.kind, self.cfg.model.dim, self.device)
        while self.epoch < cfg.epochs and not self.stopper.stop:
            epoch = self.epoch + 1
            row = {"epoch": epoch, **self._run_epoch(epoch)}
            improved = False
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                t_eval = time.perf_counter()
                valid = self._evaluate("valid")
                row["time_eval_s"] = time.perf_counter() - t_eval
                row.update({f"valid_{k}": v for k, v in valid.items() if k != "users"})
                improved = self.stopper.update(valid[cfg.metric], epoch)
                parts = "  ".join(f"{k}={row[k]:.4f}" for k in row if k.startswith(("loss", "kd_", "base_")))
                log.info("epoch %d  %s  valid %s=%.5f recall@%d=%.5f%s  (%.1fs)", epoch, parts, cfg.metric,
                         valid[cfg.metric], cfg.eval_ks[-1], valid[f"recall@{cfg.eval_ks[-1]}"],
                         "  *best*" if improved else f"  (best {self.stopper.best:.5f} @ {self.stopper.best_epoch})",
                         row["time_epoch_s"] + row["time_eval_s"])
            self.epoch = epoch
            self.history.append(row)
            if improved:
                self._save(MODEL_FILE, "training", with_optimizer=False, metrics={"valid": valid})
            if epoch % cfg.checkpoint_every == 0:
                self._save(RESUME_FILE, "training", with_optimizer=True)
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            for cb in self.callbacks:
                cb.on_epoch_end(self, row)
        if not (self.out / MODEL_FILE).exists():
            raise TrainingError(f"{self.out}: no validation happened (epochs < eval_every?)")
        # Test the best-validation model and record its metrics in the final checkpoint.
        best = load_checkpoint(self.out / MODEL_FILE)
        self.model.load_state_dict({k: v.to(self.device) for k, v in best.model_state.items()}, strict=False)
        test = self._evaluate("test")
        valid = best.meta["metrics"]["valid"]
        # training time over all sessions of the run (a resumed run counts the epochs before the kill too)
        wall = sum(h.get("time_epoch_s", 0.0) + h.get("time_eval_s", 0.0) for h in self.history)
        last_epoch = self.epoch
        self.epoch = self.stopper.best_epoch
        meta = self._save(MODEL_FILE, "finished", with_optimizer=False, metrics={"valid": valid, "test": test})
        self.epoch = last_epoch
        self._save(RESUME_FILE, "finished", with_optimizer=True)
        result = TrainResult(self.out, self.stopper.best_epoch, last_epoch, valid, test, wall, self.history)
        summary = {"best_epoch": result.best_epoch, "epochs_run": last_epoch, "valid": valid, "test": test,
                   "wall_time_s": wall, "fingerprint": meta["fingerprint"], "method": meta["method"],
                   "data_fingerprint": meta["data_fingerprint"]}
        atomic_write_bytes(self.out / RESULT_FILE, json.dumps(summary, indent=2).encode())
        log.info("best epoch %d: test %s", result.best_epoch,
                 "  ".join(f"{k}={v:.5f}" for k, v in test.items() if k != "users"))
        for cb in self.callbacks:
            cb.on_end(self, result)
        return result
