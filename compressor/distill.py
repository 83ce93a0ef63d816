"""The frozen teacher of a distillation run: loaded, checked and id-aligned to the data before any training.

The teacher is only ever a pair of vector tables (user [U, dT], item [I, dT]): a checkpoint written by
`compress train`, or an ``.npz`` from any other two-tower system. Several teachers are one teacher too: the
weighted sum of their scores is the dot product of their concatenated, weighted vectors (``ensemble``), so every
retrieval and score downstream works on it unchanged. What distillation does with it lives in
``kd_retrieval`` (its top-K and scores), ``kd_terms`` (each method's KD term) and ``objectives`` (the assembly).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint
from .data import Dataset
from .errors import CompressError
from .evaluation import evaluate

SCALE_PAIRS = 65_536  # random (user, item) pairs whose score spread puts the teachers of an ensemble on one scale
SCALE_SEED = 0


class TeacherError(CompressError, ValueError):
    """A teacher that cannot be used with this data; raised before any training."""


@dataclass
class Teacher:
    user_vectors: np.ndarray  # float32 [U, dT], in the data's user index order
    item_vectors: np.ndarray  # float32 [I, dT], in the data's item index order
    fingerprint: str
    source: str
    info: dict = field(default_factory=dict)  # lineage: kind, dim, metrics, mlflow run id ...

    def user_block(self, lo: int, hi: int) -> Teacher:
        """The teacher of users [lo, hi) (one rank's block, see ``distributed``): the item table whole. Its
        fingerprint names the block, so a cached top-K of one block is never read for another."""
        return Teacher(np.ascontiguousarray(self.user_vectors[lo:hi]), self.item_vectors,
                       f"{self.fingerprint}:users[{lo},{hi})", self.source, self.info)


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
    trained_on = info.get("data_fingerprint")
    if data.cold is not None and trained_on is not None and trained_on != data.fingerprint():
        # a teacher that trained on the held-out users' interactions would hand their item geometry to the
        # student, and the cold-user evaluation would no longer measure users never seen in training
        raise TeacherError(f"{source}: was trained on other data (fingerprint {trained_on}, this run's "
                           f"{data.fingerprint()}); with data.cold_users the teacher must hold out the same users: "
                           f"train it with the same data settings (--set data.cold_users=...)")
    urow = _align(uids, data.user_ids, "user", source)
    irow = _align(iids, data.item_ids, "item", source)
    uv = np.ascontiguousarray(uv[urow], dtype=np.float32)
    iv = np.ascontiguousarray(iv[irow], dtype=np.float32)
    if not (np.isfinite(uv).all() and np.isfinite(iv).all()):
        raise TeacherError(f"{source}: teacher vectors contain NaN or infinity")
    return Teacher(uv, iv, fp, source, info)


def load_teachers(sources, data: Dataset, weights=(), ks=(10, 20)) -> Teacher:
    """``load_teacher`` of one source, or of several as their ``ensemble`` (its metrics at cut-offs ``ks``)."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not sources:
        raise TeacherError("no teacher given")
    if weights and len(weights) != len(sources):
        raise TeacherError(f"distill.teacher_weights has {len(weights)} weight(s) for {len(sources)} teacher(s)")
    members = [load_teacher(s, data) for s in sources]
    return members[0] if len(members) == 1 and not weights else ensemble(members, data, weights, ks)


def score_spread(t: Teacher, n_pairs: int = SCALE_PAIRS, seed: int = SCALE_SEED) -> float:
    """Standard deviation of a teacher's scores over a fixed sample of random (user, item) pairs."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, len(t.user_vectors), n_pairs)
    i = rng.integers(0, len(t.item_vectors), n_pairs)
    scores = np.einsum("nd,nd->n", t.user_vectors[u].astype(np.float64), t.item_vectors[i].astype(np.float64))
    return float(scores.std())


def ensemble(members: list[Teacher], data: Dataset, weights=(), ks=(10, 20)) -> Teacher:
    """Several teachers as one, scoring ``sum_k w_k * (u_k . i_k)``: user vectors [w_1 u_1 | w_2 u_2 | ...], item
    vectors [i_1 | i_2 | ...]. Without ``weights`` each teacher's scores are brought to the first teacher's spread
    (``score_spread``: an MF and a LightGCN teacher score on very different scales) and averaged, and the average
    is scaled back to that spread (an average of members that disagree spreads less than each of them), so the
    ensemble scores on the first teacher's scale and the softmax temperature keeps its meaning. Its validation and
    test metrics (at cut-offs ``ks``) are measured here, as a trained teacher's are recorded in its checkpoint
    (the report and the promotion gate compare a student with them)."""
    def combined(w):
        return np.ascontiguousarray(np.concatenate([wk * t.user_vectors for wk, t in zip(w, members)], axis=1),
                                    dtype=np.float32)

    iv = np.ascontiguousarray(np.concatenate([t.item_vectors for t in members], axis=1), dtype=np.float32)

    if weights:
        w = [float(x) for x in weights]
    else:
        spreads = [score_spread(t) for t in members]
        if min(spreads) <= 0:
            raise TeacherError(f"{members[spreads.index(min(spreads))].source}: teacher scores do not vary; it "
                               f"cannot be put on a common scale (give distill.teacher_weights)")
        w = [spreads[0] / (len(members) * s) for s in spreads]
        mean = score_spread(Teacher(combined(w), iv, "", ""))
        w = [wk * spreads[0] / mean for wk in w] if mean > 0 else w
    uv = combined(w)
    h = hashlib.sha256()
    for wk, t in zip(w, members):
        h.update(f"{t.fingerprint}:{wk!r};".encode())
    metrics = {}
    with torch.no_grad():
        u, i = torch.from_numpy(uv), torch.from_numpy(iv)
        for split, target in (("valid", data.valid), ("test", data.test)):
            m = evaluate(u, i, data.train.indptr, data.train.items, target.indptr, target.items, ks=tuple(ks))
            metrics[split] = {k: v for k, v in m.items() if k != "users"}
    fingerprints = {t.info.get("data_fingerprint") for t in members}
    info = {"kind": "ensemble", "dim": int(uv.shape[1]), "metrics": metrics,
            "members": [{"source": t.source, "fingerprint": t.fingerprint, "kind": t.info.get("kind"),
                         "dim": t.info.get("dim"), "weight": wk} for wk, t in zip(w, members)]}
    if len(fingerprints) == 1:
        info["data_fingerprint"] = fingerprints.pop()
    return Teacher(uv, iv, h.hexdigest()[:16], " + ".join(t.source for t in members), info)
