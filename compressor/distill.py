"""Distillation: a frozen teacher, and the objectives (RCE-KD and its baselines) the one trainer optimises.

The teacher is only ever a pair of vector tables (user [U, dT], item [I, dT]): a checkpoint written by
`compress train`, or an ``.npz`` from any other two-tower system. Top-K lists come from ``retrieval`` (FAISS);
losses are the pure functions in ``losses``. Nothing here allocates a users x items matrix.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import Config
from .data import Dataset
from .errors import CompressError
from .losses import (_rowwise_isin, ce_kd_loss, rcekd_loss_on_sets, rcekd_sets, rrd_loss, sample_interesting_positions,
                     rrd_positive_keys, sample_rrd_sets, teacher_pair_scores)
from .objectives import Scratch
from .retrieval import TopKSearcher, exact_topk_on_device, faiss_has_gpu, measure_recall, topk_cached

log = logging.getLogger(__name__)

TOPK_CACHE_DIR = ".topk-cache"  # beside the run directory, so sibling runs share a teacher's top-K
REUSE_RECALL_FLOOR = 0.95  # keep an approximate index's trained quantizer across epochs while recall@M holds


class TeacherError(CompressError, ValueError):
    """A teacher that cannot be used with this data; raised before any training."""


@dataclass
class Teacher:
    user_vectors: np.ndarray  # float32 [U, dT], in the data's user index order
    item_vectors: np.ndarray  # float32 [I, dT], in the data's item index order
    fingerprint: str
    source: str
    info: dict = field(default_factory=dict)  # lineage: kind, dim, metrics, mlflow run id ...


def _align(ids_teacher: np.ndarray, ids_data: np.ndarray, what: str, source: str) -> np.ndarray:
    """Index array mapping data index -> teacher row; a clear error when the id sets differ."""
    if len(ids_teacher) != len(ids_data):
        raise TeacherError(f"{source}: teacher has {len(ids_teacher):,} {what}s, the data has {len(ids_data):,}")
    if (ids_teacher == ids_data).all():
        return np.arange(len(ids_data))
    pos = {s: i for i, s in enumerate(ids_teacher.tolist())}
    missing = [s for s in ids_data.tolist() if s not in pos]
    if missing:
        raise TeacherError(f"{source}: {len(missing):,} data {what} id(s) unknown to the teacher, "
                           f"e.g. {missing[:3]}")
    return np.array([pos[s] for s in ids_data.tolist()], dtype=np.int64)


def load_teacher(source: str | Path, data: Dataset) -> Teacher:
    """Load a teacher checkpoint (run dir / .safetensors) or an .npz of vectors and align it to the data's ids."""
    source = str(source)
    if source.endswith(".npz"):
        try:
            with np.load(source, allow_pickle=False) as z:
                need = {"user_vectors", "item_vectors", "user_ids", "item_ids"}
                if not need <= set(z.files):
                    raise TeacherError(f"{source}: .npz teacher needs arrays {sorted(need)}, has {sorted(z.files)}")
                uv, iv = z["user_vectors"], z["item_vectors"]
                uids, iids = z["user_ids"].astype(str), z["item_ids"].astype(str)
        except FileNotFoundError:
            raise TeacherError(f"{source}: teacher file not found") from None
        except ValueError as e:  # allow_pickle=False refuses object arrays
            raise TeacherError(f"{source}: unreadable .npz teacher ({e})") from None
        if uv.ndim != 2 or iv.ndim != 2 or uv.shape[1] != iv.shape[1]:
            raise TeacherError(f"{source}: user_vectors {uv.shape} and item_vectors {iv.shape} must be 2-D "
                               f"with the same dimension")
        if len(uids) != len(uv) or len(iids) != len(iv):
            raise TeacherError(f"{source}: {len(uids)} user ids for {len(uv)} user vectors, "
                               f"{len(iids)} item ids for {len(iv)} item vectors")
        h = hashlib.sha256()
        for a in (uv, iv):
            h.update(np.ascontiguousarray(a).tobytes())
        info = {"kind": "npz", "dim": int(uv.shape[1])}
        fp = h.hexdigest()[:16]
    else:
        try:
            ckpt = load_checkpoint(source)
        except CheckpointError as e:
            raise TeacherError(str(e)) from None
        with torch.no_grad():
            u, i = ckpt.build_model().vectors()
        uv, iv = u.detach().numpy(), i.detach().numpy()
        uids, iids = ckpt.user_ids, ckpt.item_ids
        fp = ckpt.fingerprint
        info = {"kind": ckpt.meta["model"]["kind"], "dim": ckpt.meta["model"]["dim"],
                "metrics": ckpt.meta.get("metrics", {}), "mlflow_run_id": ckpt.meta.get("mlflow_run_id"),
                "data_fingerprint": ckpt.meta.get("data_fingerprint")}
    urow = _align(uids, data.user_ids, "user", source)
    irow = _align(iids, data.item_ids, "item", source)
    uv = np.ascontiguousarray(uv[urow], dtype=np.float32)
    iv = np.ascontiguousarray(iv[irow], dtype=np.float32)
    if not (np.isfinite(uv).all() and np.isfinite(iv).all()):
        raise TeacherError(f"{source}: teacher vectors contain NaN or infinity")
    return Teacher(uv, iv, fp, source, info)


class _KDBase(Scratch):
    """Shared plumbing: teacher tensors on the device, top-K retrieval with FAISS, diagnostics."""

    def __init__(self, cfg: Config, teacher: Teacher, device: torch.device, cache_dir: Path):
        self.cfg, self.d, self.teacher, self.device = cfg, cfg.distill, teacher, device
        self.cache_dir = Path(cache_dir)
        self.t_user = torch.from_numpy(teacher.user_vectors).to(device)
        self.t_item = torch.from_numpy(teacher.item_vectors).to(device)
        self.use_gpu = device.type == "cuda"
        self._reusable: TopKSearcher | None = None  # last epoch's released searcher, while its recall held
        self._said_torch_topk = False
        # once_per_epoch: which users have had their KD terms this epoch (cleared at every epoch start)
        self._kd_done = (torch.zeros(self.t_user.shape[0], dtype=torch.bool, device=device)
                         if self.d.kd_users == "once_per_epoch" else None)

    def teacher_topk(self, k: int) -> torch.Tensor:
        t0 = time.perf_counter()
        ids = topk_cached(self.cache_dir, self.teacher.fingerprint, self.teacher.user_vectors,
                          self.teacher.item_vectors, k, "Flat")
        log.info("teacher top-%d ready in %.1fs", k, time.perf_counter() - t0)
        return torch.from_numpy(ids).to(self.device)

    def student_topm(self, model, m: int) -> tuple[torch.Tensor, dict]:
        """The student's top-m items for every user (training positives not removed, as in the spec)."""
        t0 = time.perf_counter()
        if self.use_gpu and self.d.index in ("Flat", "FlatIP") and not faiss_has_gpu():
            # faiss-cpu beside CUDA torch: the exact search on the GPU itself, not on one CPU thread.
            if not self._said_torch_topk:
                log.info("FAISS has no GPU support here: exact top-%d on %s with torch (blocked matmul + topk)",
                         m, self.device)
                self._said_torch_topk = True
            with torch.no_grad():
                u, i = model.vectors()
                _, ids = exact_topk_on_device(u.detach().float(), i.detach().float(), m)
            torch.cuda.synchronize(self.device)
            return ids, {"time_retrieval_s": time.perf_counter() - t0}
        with torch.no_grad():
            u, i = model.vectors()
            u = u.detach().float().cpu().numpy()
            i = i.detach().float().cpu().numpy()
        # An approximate (IVF) index keeps its trained quantizer from the previous epoch while the recall
        # measured on it stays >= REUSE_RECALL_FLOOR: the student moves little per epoch, and k-means is most
        # of an IVF refresh (1.8 of 3.0 s at Gowalla size). Below the floor, the next refresh trains afresh.
        searcher = TopKSearcher(i, self.d.index, use_gpu=self.use_gpu, params=self.d.index_params,
                                trained_like=self._reusable)
        _, ids = searcher.search(u, m)
        diag = {"time_retrieval_s": time.perf_counter() - t0}
        if not searcher.is_exact:
            diag["retrieval_recall"] = measure_recall(searcher, u, i, m, sample_users=500)
            diag["retrieval_reused_quantizer"] = float(searcher.reused_training)
            # only its trained quantizer is kept for the next epoch, and only while its recall holds
            ok = diag["retrieval_recall"] >= REUSE_RECALL_FLOOR
            self._reusable = searcher.release() if ok else None
            log.info("approximate top-%d (%s%s): recall@%d %.4f vs exact", m, self.d.index,
                     ", quantizer kept" if searcher.reused_training else "", m, diag["retrieval_recall"])
        if (ids < 0).any():  # an approximate index can come back short; never feed -1 to a gather
            raise RuntimeError(f"index {self.d.index!r} returned fewer than {m} items; raise its search params")
        return torch.from_numpy(ids).to(self.device), diag

    def on_epoch_start(self, model, epoch, rng, gen) -> dict:
        if self._kd_done is not None:
            self._kd_done.zero_()
        return self.epoch_sets(model, epoch, rng, gen)

    def epoch_sets(self, model, epoch, rng, gen) -> dict:
        """Each method's per-epoch work (student top-M, sampled sets, teacher scores); returns diagnostics."""
        raise NotImplementedError

    def _batch_users(self, users: torch.Tensor) -> torch.Tensor:
        """The KD users of a BPR batch: each distinct user once (distill.kd_users every_batch, the spec's), or
        only those not yet distilled this epoch (once_per_epoch)."""
        bu = torch.unique(users)
        if self._kd_done is not None:
            bu = bu[~self._kd_done[bu]]
            self._kd_done[bu] = True
        return bu

    def _score_teacher(self, items: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """Teacher scores [U, k] of per-user item lists [U, k], in user blocks."""
        return torch.cat([teacher_pair_scores(self.t_user[s:s + block], self.t_item, items[s:s + block])
                          for s in range(0, items.shape[0], block)])


class RCEKD(_KDBase):
    """RCE-KD (rcekd.md steps 1-7): CE over the student's closed top-K plus CE over sampled + teacher-top items."""

    name = "rcekd"

    def setup(self, trainer) -> None:
        self.qt = self.teacher_topk(self.d.K)  # step 1, once
        # The sets' layout is [QS | A | QT] and QT never changes: its teacher scores are computed once, here.
        self.t_scores_qt = self._score_teacher(self.qt)

    def epoch_sets(self, model, epoch, rng, gen) -> dict:
        p, diag = self.student_topm(model, self.d.M)  # step 2
        t0 = time.perf_counter()
        self.qs = p[:, : self.d.K].contiguous()  # step 3
        self.a = sample_interesting_positions(p, self.qt, self.d.L, self.d.T, generator=gen)  # step 4
        # The sets are fixed for the epoch, so score them with the (wide, frozen) teacher once here instead of
        # gathering teacher vectors in every batch: [U, K+L] floats instead of batches x [b, K+L+K, dT].
        self.sets = rcekd_sets(self.qt, self.qs, self.a)
        moving = self.sets.items.shape[1] - self.qt.shape[1]  # the [QS | A] columns
        self.t_scores = torch.cat([self._score_teacher(self.sets.items[:, :moving]), self.t_scores_qt], dim=1)
        diag["time_kd_sampling_s"] = time.perf_counter() - t0
        # closure gap: how much of the teacher's top-K the student's own top-K already holds
        diag["topk_overlap"] = float(_rowwise_isin(self.qs, self.qt).float().mean())
        return diag

    def batch_loss(self, model, users, pos, neg):
        base, u, i = self.base_loss(model, users, pos, neg)
        bu = self._batch_users(users)
        kd, parts = rcekd_loss_on_sets(u[bu], i, self.sets.rows(bu), self.t_scores[bu], tau=self.d.tau,
                                       beta=self.d.beta, use_loss_s=self.d.use_loss_s,
                                       use_loss_t=self.d.use_loss_t, constant_alpha=self.d.constant_alpha)
        loss = base + self.d.lambda_kd * kd
        return loss, {"loss": loss.detach(), "loss_base": base.detach(), "loss_kd": kd.detach(),
                      "kd_loss_s": parts["loss_s"], "kd_loss_t": parts["loss_t"], "kd_alpha": parts["alpha"],
                      "kd_overlap": parts["overlap"]}


class CEKD(_KDBase):
    """Vanilla CE-KD over the teacher's top-K (fixed) or the student's own top-K (refreshed every epoch)."""

    name = "ce"

    def setup(self, trainer) -> None:
        self.qt = self.teacher_topk(self.d.K)

    def epoch_sets(self, model, epoch, rng, gen) -> dict:
        if self.d.ce_target == "teacher":
            if epoch == 1 or not hasattr(self, "t_scores"):
                self.items = self.qt
                self.t_scores = self._score_teacher(self.items)
            return {}
        self.items, diag = self.student_topm(model, self.d.K)
        self.t_scores = self._score_teacher(self.items)
        diag["topk_overlap"] = float(_rowwise_isin(self.items, self.qt).float().mean())
        return diag

    def batch_loss(self, model, users, pos, neg):
        base, u, i = self.base_loss(model, users, pos, neg)
        bu = self._batch_users(users)
        kd = ce_kd_loss(u[bu], i, None, None, self.items[bu], tau=self.d.tau, teacher_scores=self.t_scores[bu])
        loss = base + self.d.lambda_kd * kd
        return loss, {"loss": loss.detach(), "loss_base": base.detach(), "loss_kd": kd.detach()}


class RRD(_KDBase):
    """Relaxed ranking distillation (DE-RRD's RRD): keep the teacher's order of sampled top items."""

    name = "rrd"

    def setup(self, trainer) -> None:
        self.topm = self.teacher_topk(self.d.rrd.top_m)
        self.train_indptr = trainer.data.train.indptr
        self.train_indices = trainer.data.train.items
        self.n_items = trainer.data.num_items
        self.positive_keys = rrd_positive_keys(self.topm, self.n_items, self.train_indptr, self.train_indices,
                                               self.d.rrd.uninteresting)

    def epoch_sets(self, model, epoch, rng, gen) -> dict:
        t0 = time.perf_counter()
        r = self.d.rrd
        self.interesting, self.uninteresting = sample_rrd_sets(
            self.topm, self.n_items, self.train_indptr, self.train_indices, r.interesting, r.uninteresting,
            r.temperature, generator=gen, positive_keys=self.positive_keys)
        return {"time_kd_sampling_s": time.perf_counter() - t0}

    def batch_loss(self, model, users, pos, neg):
        base, u, i = self.base_loss(model, users, pos, neg)
        bu = self._batch_users(users)
        kd = rrd_loss(u[bu], i, self.interesting[bu], self.uninteresting[bu])
        loss = base + self.d.lambda_kd * kd
        return loss, {"loss": loss.detach(), "loss_base": base.detach(), "loss_kd": kd.detach()}


METHODS = {"rcekd": RCEKD, "ce": CEKD, "rrd": RRD}


def build_objective(cfg: Config, teacher: Teacher | None, device: torch.device, out: Path):
    method = cfg.distill.method
    if method == "scratch":
        return Scratch()
    if teacher is None:
        raise TeacherError(f"--method {method} needs --teacher")
    return METHODS[method](cfg, teacher, device, Path(out).resolve().parent / TOPK_CACHE_DIR)
