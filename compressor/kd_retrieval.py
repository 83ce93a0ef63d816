"""What every KD term needs from outside its loss: the teacher's top-K (computed once, cached on disk), the
student's top-M (refreshed every epoch: exact with torch, or by an approximate index) and the frozen teacher's
scores of per-user item lists.

One ``KDRetrieval`` per distillation run; it holds the teacher tensors on the training device and what lives
across epochs: an IVF index's trained quantizer, UserClusters' last lists, the raised search parameters. Nothing
here allocates a users x items matrix.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .cluster_search import FACTORY as USER_CLUSTERS
from .cluster_search import UserClusterSearcher, check_params
from .data import Dataset
from .distill import Teacher
from .errors import TrainingError
from .evaluation import topk_excluding
from .losses import rowwise_positions
from .pair_products import pair_dot
from .retrieval import (EXACT_FACTORIES, TopKSearcher, TrainedQuantizer, exact_topk_on_device, faiss_has_gpu,
                        recall_at_k, recall_sample, scores_buffer, topk_cached)

log = logging.getLogger(__name__)

REUSE_RECALL_FLOOR = 0.95  # keep an approximate index's trained quantizer across epochs while recall@M holds
RECALL_EASE = 0.98  # a refresh whose first recall is above this tries half a raised nprobe next time
GPU_MAX_NPROBE = 2048  # FAISS GPU IVF searches take at most this nprobe
RECALL_SAMPLE_USERS = 500  # users whose approximate top-M is checked against exact search every refresh
RECALL_CHECK_SCORES = 1 << 25  # scores per block of that exact search (128 MiB; 167 users at 200k items)
TEACHER_SCORE_BLOCK = 4096  # users per block when scoring per-user item lists with the teacher
MASKED_TOPK_BLOCK = 2048  # users per block of the exact search with the training items masked (block x items)


@torch.no_grad()
def masked_topk(user_vecs: torch.Tensor, item_vecs: torch.Tensor, k: int, exclude_indptr: np.ndarray,
                exclude_indices: np.ndarray) -> torch.Tensor:
    """Exact top-k item indices [U, k] (on the vectors' device) of every user, each user's items in the CSR
    (over the same users) masked out; scored in user blocks, so nothing users x items is allocated."""
    n = user_vecs.shape[0]
    buffer = scores_buffer(user_vecs, item_vecs, min(MASKED_TOPK_BLOCK, n))
    ids = torch.empty((n, k), dtype=torch.long, device=user_vecs.device)  # filled block by block (no concatenation)
    for s in range(0, n, MASKED_TOPK_BLOCK):
        e = min(s + MASKED_TOPK_BLOCK, n)
        ids[s:e] = topk_excluding(user_vecs, item_vecs, np.arange(s, e), k, exclude_indptr, exclude_indices, buffer)
    return ids


class KDRetrieval:
    """Top-K lists and teacher scores for one run: ``index``/``index_params`` are ``distill.index``/``index_params``,
    ``cache_dir`` is where the teacher's top-K is kept (shared by sibling runs with the same teacher);
    ``exclude_seen`` (``distill.exclude_seen``): both top lists leave each user's training items out, by exact
    search with those items masked (``setup`` reads them)."""

    def __init__(self, teacher: Teacher, device: torch.device, cache_dir: Path, index: str, index_params: dict,
                 exclude_seen: bool = False):
        self.teacher, self.device, self.cache_dir = teacher, device, Path(cache_dir)
        self.index, self.index_params = index, index_params
        self.exclude_seen = exclude_seen
        self.seen: tuple[np.ndarray, np.ndarray] | None = None  # the training items as CSR, with exclude_seen
        self.t_user = torch.from_numpy(teacher.user_vectors).to(device)
        self.t_item = torch.from_numpy(teacher.item_vectors).to(device)
        self.use_gpu = device.type == "cuda"
        self._reusable: TrainedQuantizer | None = None  # last epoch's quantizer, while its recall held
        self._raised: dict = {}  # search parameters raised to hold the recall floor, kept for later refreshes
        self._held: int | None = None  # the nprobe (or candidates) at which the last refresh held the floor
        self._previous: np.ndarray | None = None  # UserClusters: the last refresh's lists [U, m] int32
        self._said_torch_topk = False

    @property
    def num_users(self) -> int:
        return self.t_user.shape[0]

    # What a refresh carries to the next one (the kept quantizer, the raised or held nprobe, UserClusters' last
    # lists) is saved with a run's resume state: without it a resumed run retrained k-means and restarted from the
    # configured nprobe, and no longer repeated the uninterrupted run.
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able numbers, tensors) of what the next refresh starts from; ``load_state`` restores them."""
        meta = {"index": self.index, "raised": dict(self._raised), "held": self._held}
        tensors = {} if self._previous is None else {"previous_topm": torch.from_numpy(self._previous)}
        if self._reusable is not None:
            meta["trained"] = {"factory": self._reusable.factory, "dim": self._reusable.dim}
            tensors["ivf_trained"] = torch.from_numpy(self._reusable.to_bytes())
        return meta, tensors

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``state``; nothing when the run now asks for another index (a resume with another
        distill.index starts its refresh afresh)."""
        trained = meta.get("trained")
        # (runs saved before UserClusters name their index only through a kept quantizer, and were not UserClusters)
        saved_index = meta.get("index") or (trained or {}).get("factory")
        if saved_index != self.index and (saved_index is not None or self.index == USER_CLUSTERS):
            return
        self._raised = dict(meta.get("raised") or {})
        self._held = meta.get("held", meta.get("held_nprobe"))  # (the key of runs saved before UserClusters)
        self._previous = tensors["previous_topm"].numpy() if "previous_topm" in tensors else None
        try:
            self._reusable = (TrainedQuantizer.from_bytes(trained["factory"], trained["dim"],
                                                          tensors["ivf_trained"].numpy())
                              if trained and "ivf_trained" in tensors else None)
        except (ValueError, RuntimeError) as e:  # a damaged resume file: FAISS cannot read the quantizer back
            raise TrainingError(f"the resume state's {trained['factory']} quantizer cannot be read: {e}") from None

    def setup(self, data: Dataset) -> None:
        """Once before the first list is asked for: the data whose training items ``exclude_seen`` removes."""
        if self.exclude_seen:
            self.seen = (data.train.indptr, data.train.items)

    def teacher_topk(self, k: int) -> torch.Tensor:
        """The teacher's exact top-k items for every user [U, k] (training positives kept, as in the spec, unless
        ``exclude_seen``)."""
        t0 = time.perf_counter()
        fingerprint, compute = self.teacher.fingerprint, None
        if self.seen is not None:
            digest = hashlib.sha256(self.seen[0].astype(np.int64).tobytes() + self.seen[1].astype(np.int64).tobytes())
            fingerprint = f"{fingerprint}-excluding-{digest.hexdigest()[:16]}"
            compute = lambda: masked_topk(self.t_user, self.t_item, k, *self.seen).cpu().numpy()  # noqa: E731
        ids = topk_cached(self.cache_dir, fingerprint, self.teacher.user_vectors,
                          self.teacher.item_vectors, k, "Flat", compute=compute)
        log.info("teacher top-%d ready in %.1fs", k, time.perf_counter() - t0)
        return torch.from_numpy(ids).to(self.device)

    def student_topm(self, model, m: int) -> tuple[torch.Tensor, dict]:
        """The student's top-m items for every user [U, m] (training positives kept, as in the spec, unless
        ``exclude_seen``), and
        diagnostics (retrieval time; for an approximate index its measured recall and whether it kept the
        quantizer)."""
        t0 = time.perf_counter()
        if self.seen is not None:  # exact, training items masked (the config allows only Flat with it)
            with torch.no_grad():
                u, i = model.vectors()
                ids = masked_topk(u.detach().float(), i.detach().float(), m, *self.seen)
            return ids, {"time_retrieval_s": time.perf_counter() - t0}
        if self.index in EXACT_FACTORIES and not (self.use_gpu and faiss_has_gpu()):
            # The exact search with torch on the training device: a blocked matmul into one reused score block
            # and an introselect, where IndexFlatIP keeps a heap per user (docs/benchmarks.md 4l); with faiss-cpu
            # beside CUDA torch, on the GPU itself instead of one CPU thread. FAISS's own GPU index, where there
            # is one.
            if self.use_gpu and not self._said_torch_topk:
                log.info("FAISS has no GPU support here: exact top-%d on %s with torch (blocked matmul + topk)",
                         m, self.device)
                self._said_torch_topk = True
            with torch.no_grad():
                u, i = model.vectors()
                _, ids = exact_topk_on_device(u.detach().float(), i.detach().float(), m)
            if self.use_gpu:
                torch.cuda.synchronize(self.device)
            return ids, {"time_retrieval_s": time.perf_counter() - t0}
        with torch.no_grad():
            u, i = model.vectors()
            u = u.detach().float().cpu().numpy()
            i = i.detach().float().cpu().numpy()
        ids, diag = self._approximate_topm(u, i, m)
        # An approximate index can come back short (a young student's IVF lists are uneven: the probed lists may
        # hold fewer than m items); never feed -1 to a gather: those users get the exact search instead.
        short = (ids < 0).any(axis=1)
        if short.any():
            ids[short] = exact_topk_on_device(torch.from_numpy(u[short]), torch.from_numpy(i), m)[1].numpy()
            log.info("approximate top-%d (%s) came back short for %d users: searched exactly", m, self.index,
                     int(short.sum()))
            diag["retrieval_short_users"] = float(short.sum())
        # (the search and any redone search; the first recall check apart, as the epoch breakdowns report it)
        diag["time_retrieval_s"] = time.perf_counter() - t0 - diag.get("time_recall_check_s", 0.0)
        return torch.from_numpy(ids).to(self.device), diag

    def _approximate_topm(self, u: np.ndarray, i: np.ndarray, m: int) -> tuple[np.ndarray, dict]:
        """The student's top-m by ``distill.index`` (exact or approximate), an approximate one held to
        REUSE_RECALL_FLOOR: its recall@m against exact search is measured on a sample of users every refresh,
        and below the floor the search is redone: an nprobe stepped down from the last refresh's raised back,
        then a kept quantizer trained afresh, then nprobe doubled up to the list count (UserClusters: its
        candidates, up to every item; each search also ranks every user's list of the last refresh). The floor
        matters: a fresh Gowalla student's IVF256 nprobe 8 recall fell from 0.96 to 0.59 over its first 25 RCE-KD
        epochs, and the KD terms built on those lists lost validation NDCG."""
        params = {**self.index_params, **self._raised}
        if self.index == USER_CLUSTERS:  # (fewer candidates than m would rank m all the same)
            params = check_params(params, sizes=(len(u), len(i)))
            params["candidates"] = max(params["candidates"], m)
            searcher = UserClusterSearcher(i, u, params=params)
        else:
            # An approximate (IVF) index keeps its trained quantizer from the previous epoch while its recall
            # holds: the student moves little per epoch, and k-means is most of an IVF refresh (docs/benchmarks.md 4).
            searcher = TopKSearcher(i, self.index, use_gpu=self.use_gpu, params=params, trained_like=self._reusable)
        # UserClusters ranks every user's last list with its cluster's candidates (cluster_search)
        previous = self._previous if self._previous is not None and self._previous.shape == (len(u), m) else None

        def search() -> np.ndarray:
            if isinstance(searcher, UserClusterSearcher):
                return searcher.search(u, m, previous=previous)[1]
            return searcher.search(u, m)[1]

        ids = search()
        if searcher.is_exact:
            return ids, {}
        checking = time.perf_counter()
        # Recall@m on measure_recall's sample of users against their exact top-m (torch: matmul + topk_rows), once
        # per refresh; a user's approximate list depends on its own vector (up to a matmul's last bits, which may
        # depend on how many rows it multiplies), so the sample's rows of ``ids`` are its lists.
        sample = recall_sample(len(u), RECALL_SAMPLE_USERS)
        exact = exact_topk_on_device(torch.from_numpy(u[sample]), torch.from_numpy(i), m,
                                     block=max(1, RECALL_CHECK_SCORES // len(i)))[1].numpy()
        recall = recall_at_k(ids[sample], exact)
        diag = {"retrieval_recall_first": recall, "time_recall_check_s": time.perf_counter() - checking}
        # the knob that buys recall with time, its configured value and its ceiling
        if isinstance(searcher, UserClusterSearcher):
            knob, limit = "candidates", searcher.n_items
            configured = max(check_params(self.index_params, sizes=(len(u), len(i)))["candidates"], m)
        elif searcher.nlist is not None:
            knob, configured = "nprobe", int(self.index_params.get("nprobe", 1))
            limit = min(searcher.nlist, GPU_MAX_NPROBE) if searcher.on_gpu else searcher.nlist
        else:  # (HNSW: nothing raised here)
            knob, configured, limit = None, 0, 0
        value = int(params.get(knob, configured)) if knob else 0
        held = self._held
        while recall < REUSE_RECALL_FLOOR:
            if knob and held is not None and value < held:  # stepped down too far: back up
                value = min(2 * value, held)
                searcher.set_params(**{knob: value})
            elif searcher.reused_training:  # the kept quantizer went stale: k-means on the current vectors
                searcher = TopKSearcher(i, self.index, use_gpu=self.use_gpu, params={**params, "nprobe": value}
                                        if knob else params)
                diag["retrieval_retrained"] = 1.0
            elif knob and value < limit:
                value = min(2 * value, limit)
                searcher.set_params(**{knob: value})
            else:
                break
            ids = search()
            recall = recall_at_k(ids[sample], exact)
        # The next refresh starts at this value, or at half of it after a recall well above the floor (the
        # student settles, and a raised nprobe costs a proportional share of an exhaustive search).
        self._held = value if knob and recall >= REUSE_RECALL_FLOOR else None
        if knob and value > configured:  # (halved only after a first try well above the floor:
            # a halving that had to be raised back would otherwise repeat every refresh)
            ease = diag["retrieval_recall_first"] >= RECALL_EASE
            self._raised = {knob: max(configured, value // 2) if ease else value}
        else:
            self._raised = {}
        if recall < REUSE_RECALL_FLOOR:
            log.warning("approximate top-%d (%s, %s): recall@%d %.4f below %.2f; use a finer index or Flat", m,
                        self.index, searcher.params, m, recall, REUSE_RECALL_FLOOR)
        diag.update({"retrieval_recall": recall, "retrieval_reused_quantizer": float(searcher.reused_training)})
        if knob in searcher.params:
            diag[f"retrieval_{knob}"] = float(searcher.params[knob])
        # only its trained quantizer is kept for the next epoch, and only while its recall holds
        self._reusable = searcher.release() if recall >= REUSE_RECALL_FLOOR else None
        self._previous = ids.astype(np.int32) if isinstance(searcher, UserClusterSearcher) else None
        log.info("approximate top-%d (%s%s, %s): recall@%d %.4f vs exact", m, self.index,
                 ", quantizer kept" if searcher.reused_training else "", searcher.params, m, recall)
        return ids, diag

    def teacher_scores(self, items: torch.Tensor,
                       previous: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The frozen teacher's scores [U, k] of per-user item lists [U, k] (all users), in user blocks.

        ``previous`` = (items, scores) of an earlier call over the same users: a (user, item) pair it holds is
        not scored again (the student's top lists change little between epochs). On CPU a pair's score depends
        only on its own two rows, whatever is scored beside it (``pair_dot``), so a reused score equals a fresh one
        bit for bit and reuse cannot change a run (a resumed run starts without it). On CUDA a row sum's split
        over threads depends on how many rows are summed together, so a reused score may differ from a fresh one
        in its last bits.
        """
        b = TEACHER_SCORE_BLOCK
        out = torch.empty(items.shape, dtype=self.t_user.dtype, device=items.device)
        for s in range(0, items.shape[0], b):
            block = items[s:s + b]
            todo = torch.ones(block.shape, dtype=torch.bool, device=block.device)
            if previous is not None:
                old_items, old_scores = previous[0][s:s + b].to(block.dtype), previous[1][s:s + b]
                pos = rowwise_positions(block, old_items)
                todo = pos < 0
                out[s:s + b] = old_scores.gather(1, pos.clamp(min=0))
            rows, cols = todo.nonzero(as_tuple=True)
            out[s:s + b][rows, cols] = pair_dot(self.t_user, self.t_item, rows + s, block[rows, cols])
        return out
