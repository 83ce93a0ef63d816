"""The one trainer behind `compress train` and every `compress distill` method.

An epoch: sample one negative per training positive (never a positive of that user), shuffle, and step the
optimizer on the objective's loss batch by batch; every ``eval_every`` epochs validate with full ranking and keep
the best model; stop after ``patience`` validations without improvement; finally test the best model.

What differs between methods lives in an ``Objective`` (see ``objectives.py``): the trainer never knows whether a
teacher exists. The run directory ``out`` holds the files named in ``run_dir`` (best model, resume state, metrics
log, resolved config, result). A command that refuses (a run already there, nothing to resume, a mismatch) leaves
every file of ``out`` as it was: the checks come before the first write.
Every epoch's randomness derives from (seed, epoch), so a resumed run reproduces the uninterrupted one exactly.

Under torchrun (``distributed``) each rank trains its block of users (``Dataset.user_block``) with the same code:
its model holds its users' rows and the whole item table, the item gradient is summed over ranks every step,
validation sums over ranks, and rank 0 alone writes the run directory, with the user rows gathered, in the
one-process format. Every rank runs ceil(interactions / batch_size) steps per epoch, its own interactions split
evenly over them, so a step's global batch is about ``batch_size``; its randomness derives from (seed, epoch,
rank).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import USER_TABLE, load_checkpoint, restore_optimizer, save_checkpoint
from .config import Config, model_numbers, to_dict
from .data import Dataset
from .device import thread_settings
from .distributed import Distributed
from .errors import CompressError, TrainingError
from .evaluation import evaluate
from .files import atomic_write_bytes
from .models import build_model
from .objectives import Objective, SetupContext, sample_negatives
from .optim import build_optimizer, wants_sparse_gradients
from .run_dir import CONFIG_FILE, METRICS_FILE, MODEL_FILE, RESULT_FILE, RESUME_FILE

log = logging.getLogger(__name__)


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
                 progress: bool = True, dist: Distributed | None = None, reshard: bool = False):
        """``dist``: this process's place in a torchrun job (``distributed.setup``, its blocks assigned from
        ``data``); None for one process. The objective must then have been built for this rank's block.
        ``reshard``: resume a run saved with another world size (checkpoints hold every user, so any count can
        continue one; the continuation just differs from an uninterrupted run)."""
        self.reshard = reshard
        self.cfg, self.data, self.objective = cfg, data, objective
        self.out, self.device, self.command = Path(out), device, command
        self.dist = dist or Distributed.single(device)
        if self.dist.active and not self.dist.blocks:
            self.dist.assign(data.train.indptr)
        self.local = data.user_block(self.dist.lo, self.dist.hi) if self.dist.active else data
        self.extra_meta = {**(extra_meta or {}), "world_size": self.dist.world_size}
        self.threads = thread_settings()  # the pools as the caller set them (api: configure_threads), per checkpoint
        self.callbacks = callbacks or []
        self.progress = progress and self.dist.is_main
        torch.manual_seed(cfg.train.seed)
        m = cfg.model
        if self.dist.active and m.kind != "mf":
            why = {"lightgcn": "its propagation needs the whole graph every step (docs/scaling.md)"}.get(
                m.kind, "only mf splits its users over ranks")
            raise TrainingError(f"model.kind {m.kind} cannot train under torchrun: {why}; train it in one process")
        self.model = build_model(m.kind, num_users=data.num_users, num_items=data.num_items, **model_numbers(m))
        if self.model.needs_graph:
            self.model.set_graph(data.train.users, data.train.items)
        if self.dist.active:  # the same initial table as one process, then this rank's rows of it
            table = self.model.user_emb
            table.weight = torch.nn.Parameter(table.weight.detach()[self.dist.lo:self.dist.hi].clone())
            table.num_embeddings = self.model.num_users = self.dist.hi - self.dist.lo
        self.model.to(device)
        self.replicated = [p for name, p in self.model.named_parameters() if name != USER_TABLE]
        try:
            self.optimizer = build_optimizer(cfg.train.optimizer, self.model.parameters(), lr=cfg.train.lr,
                                             weight_decay=cfg.train.weight_decay)
        except ValueError as e:  # settings the optimizer refuses (e.g. sparse_adamw with lr * weight_decay >= 1)
            raise TrainingError(f"train.optimizer {cfg.train.optimizer}: {e}") from None
        # a row-sparse optimizer gets sparse gradients from models whose tables are leaf parameters
        self.sparse_grads = wants_sparse_gradients(cfg.train.optimizer) and self.model.leaf_tables
        self.stopper = EarlyStopping(cfg.train.patience)
        self.epoch = 0
        self._resumed_run_state: tuple[dict, dict] | None = None  # the objective's, read by resume()
        self.history: list[dict] = []
        self.train_indptr = data.train.indptr
        self.local_train_indptr = self.local.train.indptr

    # ------------------------------------------------------------------------------------------- state
    def _meta(self, status: str) -> dict:
        return {"command": self.command, "method": self.objective.name,
                "package_version": __version__, "config": to_dict(self.cfg),
                "data_fingerprint": self.data.fingerprint(), "data_source": self.data.source,
                "epoch": self.epoch, "status": status, "history": self.history, "threads": self.threads,
                "early_stopping": {"best": self.stopper.best if self.stopper.best > -math.inf else None,
                                   "best_epoch": self.stopper.best_epoch, "bad": self.stopper.bad},
                **self.extra_meta}

    def _save(self, name: str, status: str, with_optimizer: bool, metrics: dict | None = None) -> dict:
        """Write checkpoint ``name`` (rank 0; under torchrun every rank takes part in gathering the user rows);
        returns the metadata written ({} on the other ranks)."""
        self._bring_up_to_date()
        model, optimizer = self._whole_model(with_optimizer)
        objective_state = run_state = None
        if with_optimizer:  # a resume checkpoint: what the objective carries to the next epoch too (every rank's)
            objective_state, run_state = self.dist.gather_run_states(*self.objective.run_state())
        if not self.dist.is_main:
            return {}
        meta = self._meta(status)
        if metrics is not None:
            meta["metrics"] = metrics
        if with_optimizer:
            meta["objective_state"] = objective_state
        return save_checkpoint(self.out / name, model=model, meta=meta, user_ids=self.data.user_ids,
                               item_ids=self.data.item_ids, train_indptr=self.train_indptr,
                               train_indices=self.data.train.items, optimizer=optimizer,
                               rng_state=torch.get_rng_state(), run_state=run_state)

    def _whole_model(self, with_optimizer: bool):
        """(model, optimizer or its state dict) holding every user: this process's own in one process; under
        torchrun the user rows (and their Adam moments) gathered from every rank, on rank 0 (None elsewhere)."""
        if not self.dist.active:
            return self.model, self.optimizer if with_optimizer else None
        m = self.cfg.model
        with torch.device("meta"):  # no second random initialisation of the whole table, only its shape
            whole = build_model(m.kind, num_users=self.data.num_users, num_items=self.data.num_items,
                                **model_numbers(m))
        return self.dist.gather_whole_model(self.model, whole, self.optimizer if with_optimizer else None,
                                            self._user_optim_id())

    def _rows_of_this_rank(self) -> dict:
        """``load_checkpoint`` arguments that read this rank's users only (the user table's rows and their Adam
        moments); {} in one process."""
        if not self.dist.active:
            return {}
        return {"user_rows": (self.dist.lo, self.dist.hi), "user_optim_id": self._user_optim_id()}

    def _user_optim_id(self) -> int:
        """The user table's index among the optimizer's parameters (its state is ``optim.<index>.*``)."""
        table = self.model.user_emb.weight
        return next(i for i, p in enumerate(self.optimizer.param_groups[0]["params"]) if p is table)

    def resume(self) -> None:
        """Restore the state of the run in ``out`` from its resume checkpoint; refuses (TrainingError) before
        changing any file when the run cannot be continued with this data, objective and optimizer."""
        path = self.out / RESUME_FILE
        if not path.exists():
            raise TrainingError(f"{self.out}: nothing to resume (no {RESUME_FILE})")
        ckpt = load_checkpoint(path, with_training_state=True, **self._rows_of_this_rank())
        if ckpt.meta.get("data_fingerprint") != self.data.fingerprint():
            raise TrainingError(f"{path}: was trained on different data (fingerprint "
                                f"{ckpt.meta.get('data_fingerprint')} vs {self.data.fingerprint()})")
        if ckpt.meta.get("method") != self.objective.name:
            raise TrainingError(f"{path}: was a '{ckpt.meta.get('method')}' run, cannot resume it as "
                                f"'{self.objective.name}'")
        saved_world = ckpt.meta.get("world_size", 1)
        if saved_world != self.dist.world_size and not self.reshard:
            raise TrainingError(f"{path}: was trained on {saved_world} rank(s), this job has "
                                f"{self.dist.world_size}; relaunch with {saved_world} (a different count would "
                                f"not reproduce the uninterrupted run), or pass --reshard to continue anyway")
        self.model.load_state_dict({k: v.to(self.device) for k, v in ckpt.model_state.items()}, strict=False)
        saved_opt = ckpt.meta.get("config", {}).get("train", {}).get("optimizer", "adam")
        if saved_opt != self.cfg.train.optimizer:
            raise TrainingError(f"{path}: was trained with train.optimizer {saved_opt}, cannot resume it with "
                                f"{self.cfg.train.optimizer} (the optimizer state differs)")
        restore_optimizer(self.optimizer, ckpt)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        # the objective's carried state (an approximate refresh's quantizer, nprobe, last lists) is restored once
        # it is set up; under torchrun each rank's refresh held its own, and each rank reads its own back
        self._resumed_run_state = self.dist.own_run_state(ckpt.meta.get("objective_state") or {}, ckpt.run_state)
        self.epoch = ckpt.meta["epoch"]
        self.history = ckpt.meta["history"]
        es = ckpt.meta["early_stopping"]
        self.stopper = EarlyStopping(self.cfg.train.patience, es["best"] if es["best"] is not None else -math.inf,
                                     es["best_epoch"], es["bad"])
        # The metrics log may hold epochs after the checkpoint (killed between the two writes): ``_accept_out``
        # rewrites it.
        log.info("resumed %s at epoch %d (best %s=%.5f at epoch %d)", self.out, self.epoch, self.cfg.train.metric,
                 self.stopper.best, self.stopper.best_epoch)

    def _rewrite_metrics_log(self) -> None:
        if not self.dist.is_main:
            return
        text = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_bytes(self.out / METRICS_FILE, text.encode())

    # ------------------------------------------------------------------------------------------- training
    def _bring_up_to_date(self) -> None:
        """Let an optimizer that defers untouched rows' updates (sparse_adamw) apply them, so the weights that are
        evaluated or saved are the current ones."""
        catch_up = getattr(self.optimizer, "catch_up", None)
        if catch_up is not None:
            catch_up()

    def _decay_lr_on_plateau(self, epoch: int, improved: bool) -> None:
        groups = self.optimizer.param_groups  # (their lr is saved with the optimizer state: a resume keeps it)
        if not (improved or self.stopper.stop or self.stopper.bad % self.cfg.train.lr_decay_patience):
            self._bring_up_to_date()  # a deferring optimizer's catch-up assumes one lr since each row's last step
            for group in groups:
                group["lr"] *= self.cfg.train.lr_decay
            log.info("epoch %d: lr %.3g, %d validations without a gain", epoch, groups[0]["lr"], self.stopper.bad)

    def _evaluate(self, split: str) -> dict:
        self._bring_up_to_date()
        self.model.eval()
        with torch.no_grad():
            u, i = self.model.vectors()
            local = self.local
            target = local.valid if split == "valid" else local.test
            res = evaluate(u, i, self.local_train_indptr, local.train.items, target.indptr, target.items,
                           ks=self.cfg.train.eval_ks, block=self.cfg.train.eval_block)
        self.model.train()
        if self.dist.active:  # means over this rank's users -> means over every rank's users
            keys = [k for k in res if k != "users"]
            totals = self.dist.sum_floats([res[k] * res["users"] for k in keys] + [float(res["users"])])
            users = totals[-1]
            res = {k: t / max(users, 1.0) for k, t in zip(keys, totals)} | {"users": int(users)}
        return res

    def _run_epoch(self, epoch: int) -> dict:
        cfg = self.cfg.train
        # one process keeps the (seed, epoch) streams it always had; rank r of a torchrun job gets its own
        rank = self.dist.rank
        rng = np.random.default_rng([cfg.seed, epoch] if not self.dist.active else [cfg.seed, epoch, rank])
        # torch sampling (KD sets) happens on the training device, so its generator lives there too
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed * 100003 + epoch + 7919 * rank)
        t0 = time.perf_counter()
        self._bring_up_to_date()  # the epoch's top lists read every row's current weights
        diag = self.objective.on_epoch_start(self.model, epoch, rng, gen) or {}
        t1 = time.perf_counter()
        users_np, items_np = self.local.train.users, self.local.train.items
        neg_np = sample_negatives(users_np, items_np, self.data.num_items, rng)
        order = rng.permutation(len(users_np))
        users = torch.as_tensor(users_np[order], device=self.device)
        pos = torch.as_tensor(items_np[order], device=self.device)
        neg = torch.as_tensor(neg_np[order], device=self.device)
        t_sample = time.perf_counter() - t1
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        if self.dist.active:  # the same step count everywhere; each rank's interactions spread evenly over it
            n_batches = math.ceil(len(self.data.train) / cfg.batch_size)
            cuts = (np.arange(n_batches + 1) * len(order)) // n_batches
        else:
            n_batches = math.ceil(len(order) / cfg.batch_size)
            cuts = np.minimum(np.arange(n_batches + 1) * cfg.batch_size, len(order))
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}", leave=False, disable=not self.progress or None,
                   unit="batch", dynamic_ncols=True)
        for b in bar:
            sl = slice(int(cuts[b]), int(cuts[b + 1]))
            loss, parts = self.objective.batch_loss(self.model, users[sl], pos[sl], neg[sl])
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch}, batch {b}: loss is {loss.item()} (lr too high?)")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.dist.sum_replicated_grads(self.replicated, sparse=self.sparse_grads)
            self.optimizer.step()
            for k, v in parts.items():
                v = float(v)
                if math.isfinite(v):  # a mean over no users (a batch with no KD users left) is NaN: skipped
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        bar.close()
        out = {k: v / counts[k] for k, v in sums.items()}
        if self.dist.active:  # the job's numbers: a step's losses are sums over its ranks, other parts a mean
            out = self.dist.combine_parts(out)
        out.update({f"diag_{k}" if not k.startswith(("time_", "diag_")) else k: v for k, v in diag.items()})
        out["time_refresh_s"] = t1 - t0
        out["time_sampling_s"] = t_sample
        out["time_epoch_s"] = time.perf_counter() - t0
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's peak
        if self.dist.active:  # what this rank sent for the item gradient, per step (benchmarks/dist_epoch.py)
            out["dist_grad_mb_per_step"] = self.dist.bytes_sent / max(n_batches, 1) / 1e6
            out["dist_sparse_steps"] = self.dist.steps_sparse
            out["dist_peak_rss_mb"] = self.dist.gather_floats(out["peak_rss_mb"])  # every rank's, in rank order
            self.dist.bytes_sent = self.dist.steps_sparse = 0
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
        """Refuse a run directory this command must not touch, then (and only then) write the resolved config.
        Under torchrun every rank checks (the run directory is on a file system they share) and they agree
        before rank 0 writes."""
        error = None
        try:
            if resume:
                self.resume()
            else:
                for stale in (RESUME_FILE, MODEL_FILE, METRICS_FILE, RESULT_FILE):
                    if (self.out / stale).exists():
                        raise TrainingError(f"{self.out}: already holds a run ({stale}); use --resume to continue "
                                            f"it or choose another --out")
        except CompressError as e:
            error = e
        self.dist.agree(error)
        if resume:
            self._rewrite_metrics_log()  # only once every rank accepted the run
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def _fit(self, resume: bool) -> TrainResult:
        self._accept_out(resume)
        error = None
        try:  # the teacher's top-K (its cache) and the run-long sets: a refusal here is every rank's too
            self.objective.setup(SetupContext(data=self.local, sparse_grads=self.sparse_grads))
            if self._resumed_run_state is not None:
                self.objective.load_run_state(*self._resumed_run_state)
                self._resumed_run_state = None
        except (CompressError, OSError) as e:
            error = e
        self.dist.agree(error)
        for cb in self.callbacks:
            cb.on_start(self)
        cfg = self.cfg.train
        log.info("%s %s on %s: %s, model %s dim %d, device %s%s", self.command, self.objective.name,
                 self.data.source, self.data.summary(), self.cfg.model.kind, self.cfg.model.dim, self.device,
                 f", {self.dist.world_size} ranks (users sharded)" if self.dist.active else "")
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
                if cfg.lr_decay < 1:
                    row["lr"] = self.optimizer.param_groups[0]["lr"]  # what this epoch trained with
                    self._decay_lr_on_plateau(epoch, improved)
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
            if self.dist.is_main:
                with open(self.out / METRICS_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
            for cb in self.callbacks:
                cb.on_epoch_end(self, row)
        self.dist.barrier()  # rank 0 has written the best model
        if not (self.out / MODEL_FILE).exists():
            raise TrainingError(f"{self.out}: no validation happened (epochs < eval_every?)")
        # the last epoch's state first (--resume with more epochs continues it), then the best model's test
        self._save(RESUME_FILE, "finished", with_optimizer=True)
        best = load_checkpoint(self.out / MODEL_FILE, **self._rows_of_this_rank())
        self.model.load_state_dict({k: v.to(self.device) for k, v in best.model_state.items()}, strict=False)
        test = self._evaluate("test")
        valid = best.meta["metrics"]["valid"]
        # training time over all sessions of the run (a resumed run counts the epochs before the kill too)
        wall = sum(h.get("time_epoch_s", 0.0) + h.get("time_eval_s", 0.0) for h in self.history)
        last_epoch = self.epoch
        self.epoch = self.stopper.best_epoch
        meta = self._save(MODEL_FILE, "finished", with_optimizer=False, metrics={"valid": valid, "test": test})
        self.epoch = last_epoch
        # The last collective: a rank that tears its connections down while rank 0 still receives its rows
        # makes gloo abort. After it rank 0 works alone (result file, callbacks: MLflow, registration).
        self.dist.barrier()
        result = TrainResult(self.out, self.stopper.best_epoch, last_epoch, valid, test, wall, self.history)
        if not self.dist.is_main:
            return result
        summary = {"best_epoch": result.best_epoch, "epochs_run": last_epoch, "valid": valid, "test": test,
                   "wall_time_s": wall, "fingerprint": meta["fingerprint"], "method": meta["method"],
                   "data_fingerprint": meta["data_fingerprint"]}
        atomic_write_bytes(self.out / RESULT_FILE, json.dumps(summary, indent=2).encode())
        log.info("best epoch %d: test %s", result.best_epoch,
                 "  ".join(f"{k}={v:.5f}" for k, v in test.items() if k != "users"))
        for cb in self.callbacks:
            cb.on_end(self, result)
        return result
