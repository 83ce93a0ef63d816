"""Export a compressor checkpoint as a serving bundle (the one export module that imports torch).

Vectors come from the checkpoint's own model (`Checkpoint.build_model().vectors()`, for
LightGCN the propagated vectors) under `torch.no_grad()`. A history model (`model.kind: history`) is exported
with its history tower (`history_tower`): its user vectors are `encode` of each training user's history. The checkpoint's own top-k
for a sample of users (`compressor.evaluation.topk_excluding` in user blocks, training
items masked) is handed to `write_bundle` as the reference that the exact bundle must
reproduce.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

import compressor
from compressor.checkpoint import load_checkpoint
from compressor.evaluation import topk_excluding
from export.bundle import ExportError, write_bundle
from export.history_tower import HistoryTower, probe_histories

logger = logging.getLogger(__name__)

REFERENCE_USERS = 200
REFERENCE_SEED = 0
SCORE_BLOCK_USERS = 256  # block of users scored at once: 256 x I float32 stays small
ENCODE_BLOCK_VALUES = 1 << 23  # history rows x max_len x dim embedded per torch encode call
TRAINING_PATH_RTOL = 1e-5  # vectors() (the training path) vs encode() of the same histories, relative to max |v|


def _package_version() -> str:
    try:
        return importlib.metadata.version("compress-recsys")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout: the source's version
        return str(getattr(compressor, "__version__", "0+unknown"))


def reference_topk(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    indptr: np.ndarray,
    indices: np.ndarray,
    k: int,
    num_users: int = REFERENCE_USERS,
    seed: int = REFERENCE_SEED,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Top-k (training items masked) for a seeded sample of users that have >= k unseen items.

    Returns (users (S,), items (S, k)) or None when no user has k unseen items.
    """
    n_items = item_vecs.shape[0]
    # np.diff counts duplicate training rows twice, so this never admits a user with < k unseen.
    eligible = np.flatnonzero(n_items - np.diff(indptr) >= k)
    if eligible.size == 0:
        return None
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(eligible, min(num_users, eligible.size), replace=False)).astype(np.int64)
    out = np.empty((users.size, k), dtype=np.int64)
    for start in range(0, users.size, SCORE_BLOCK_USERS):
        block = users[start : start + SCORE_BLOCK_USERS]
        out[start : start + block.size] = topk_excluding(user_vecs, item_vecs, block, k, indptr, indices).cpu().numpy()
    return users, out


def _encode(model: torch.nn.Module, history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`HistoryPool.encode` of padded histories, in blocks, as float32 numpy."""
    block = max(1, ENCODE_BLOCK_VALUES // (max(history.shape[1], 1) * model.dim))
    with torch.no_grad():
        parts = [model.encode(torch.as_tensor(history[s : s + block]), torch.as_tensor(lengths[s : s + block]))
                 for s in range(0, history.shape[0], block)]
    return torch.cat(parts).float().numpy() if parts else np.empty((0, model.dim), dtype=np.float32)


def history_tower(model: torch.nn.Module, indptr: np.ndarray, indices: np.ndarray,
                  user_vectors: np.ndarray) -> tuple[HistoryTower, np.ndarray]:
    """A history model's tower for export, and the reference vectors of every training user: `encode` (what the
    ONNX graph computes) of its last max_len training items in split order (the checkpoint's train CSR).

    ExportError when those differ from the training path's `vectors()` (`user_vectors`): the checkpoint's
    histories would then not be the ones the model was trained and evaluated on."""
    from compressor.models import padded_histories

    encoded = _encode(model, *padded_histories(indptr, indices, model.max_len))
    scale = max(1.0, float(np.abs(user_vectors).max(initial=0.0)))
    diff = float(np.abs(encoded - user_vectors).max(initial=0.0))
    if not diff <= TRAINING_PATH_RTOL * scale:
        raise ExportError(f"history model: encode() of the checkpoint's training histories differs from its "
                          f"vectors() by {diff:.3g} (> {TRAINING_PATH_RTOL * scale:.3g})")
    probe, lengths = probe_histories(model.num_items, model.max_len)
    weights = {name: t.detach().float().cpu().numpy().copy() for name, t in (
        ("history_table", model.history_emb.weight), ("mlp_in_weight", model.mlp_in.weight),
        ("mlp_in_bias", model.mlp_in.bias), ("mlp_out_weight", model.mlp_out.weight),
        ("mlp_out_bias", model.mlp_out.bias))}
    tower = HistoryTower(**weights, max_len=int(model.max_len), probe_history=probe, probe_lengths=lengths,
                         probe_vectors=_encode(model, probe, lengths))
    return tower, encoded


def export_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    index_factory: str = "auto",
    k_max: int = 100,
    recall_floor: float = 0.95,
    quantize: str = "fp32",
    force: bool = False,
    overwrite: bool = False,
    lineage_extra: dict[str, Any] | None = None,
    test_indptr: np.ndarray | None = None,
    test_indices: np.ndarray | None = None,
) -> dict[str, Any]:
    """Load a checkpoint (run dir or .safetensors), compute its vectors and write a verified bundle.

    `quantize` ("fp32", "fp16", "int8") and the optional held-out test CSR (`test_indptr`/`test_indices`, for the
    quantization check's NDCG) go to `write_bundle`. Returns the manifest. Raises ExportError (and
    CheckpointError from loading).
    """
    ckpt = load_checkpoint(checkpoint_path)
    meta = ckpt.meta
    model = ckpt.build_model()
    model.eval()
    with torch.no_grad():
        user_t, item_t = model.vectors()
        user_t, item_t = user_t.detach().float().contiguous(), item_t.detach().float().contiguous()
    user_vecs = user_t.numpy()
    item_vecs = item_t.numpy()
    indptr = np.asarray(ckpt.train_indptr, dtype=np.int64)
    indices = np.asarray(ckpt.train_indices, dtype=np.int64)
    if user_vecs.shape[0] != len(ckpt.user_ids) or item_vecs.shape[0] != len(ckpt.item_ids):
        raise ExportError(
            f"{checkpoint_path}: model has {user_vecs.shape[0]} users / {item_vecs.shape[0]} items but the checkpoint "
            f"lists {len(ckpt.user_ids)} / {len(ckpt.item_ids)} ids"
        )
    tower = None
    if getattr(model, "kind", None) == "history":
        tower, user_vecs = history_tower(model, indptr, indices, user_vecs)
        user_t = torch.from_numpy(user_vecs)
    user_ids = np.asarray(ckpt.user_ids)
    held_out = 0
    if ((meta.get("config") or {}).get("data") or {}).get("cold_users", 0) > 0:
        # Users held out of training (data.cold_users) keep an index in the checkpoint but have no trained row
        # (an ID tower) or no history (a history tower): left out, so serving answers them as unknown users.
        keep = np.flatnonzero(np.diff(indptr) > 0)
        held_out = len(user_ids) - len(keep)
        user_vecs, user_ids = np.ascontiguousarray(user_vecs[keep]), user_ids[keep]
        user_t = torch.from_numpy(user_vecs)
        indptr = np.concatenate([[0], np.cumsum(np.diff(indptr)[keep])]).astype(np.int64)  # empty rows only
        if test_indptr is not None:
            test_indptr = np.concatenate([[0], np.cumsum(np.diff(test_indptr)[keep])]).astype(np.int64)
        logger.info("%d users held out of training (data.cold_users) left out of the bundle", held_out)
    k_ref = min(int(k_max), item_vecs.shape[0])
    reference = reference_topk(user_t, item_t, indptr, indices, k_ref)
    if reference is None:
        logger.warning("no user has %d unseen items: exporting without a reference top-k check", k_ref)

    model_spec = meta.get("model", {})
    lineage: dict[str, Any] = {
        "checkpoint_path": str(getattr(ckpt, "path", checkpoint_path)),
        "checkpoint_fingerprint": meta.get("fingerprint"),
        "model_kind": model_spec.get("kind"),
        "model": model_spec,
        "method": meta.get("method"),
        "data_fingerprint": meta.get("data_fingerprint"),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "mlflow_model_version": meta.get("mlflow_model_version"),
        "held_out_users": held_out,
    }
    lineage.update(lineage_extra or {})
    metrics = (meta.get("metrics") or {}).get("test") or {}
    logger.info(
        "exporting %s (%s, %d users, %d items, dim %d) to %s",
        checkpoint_path, model_spec.get("kind"), user_vecs.shape[0], item_vecs.shape[0], user_vecs.shape[1], out_dir,
    )
    return write_bundle(
        out_dir,
        user_vectors=user_vecs,
        item_vectors=item_vecs,
        user_ids=user_ids,
        item_ids=np.asarray(ckpt.item_ids),
        seen_indptr=indptr,
        seen_indices=indices,
        index_factory=index_factory,
        k_max=k_max,
        recall_floor=recall_floor,
        quantize=quantize,
        force=force,
        overwrite=overwrite,
        lineage=lineage,
        metrics=metrics,
        reference_topk=reference,
        test_indptr=test_indptr,
        test_indices=test_indices,
        package_version=_package_version(),
        history_tower=tower,
    )
