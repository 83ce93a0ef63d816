"""The served top-k of a written bundle against the caller's reference top-k.

The bundle is read back with the serving loader and answered by the serving `Recommender`, so the export
checks exactly what the server will answer (ONNX user vector, index, seen items excluded).
"""

from __future__ import annotations

import logging

import numpy as np

from export.errors import ExportError
from serving.bundle import Bundle
from serving.recommender import Recommender

logger = logging.getLogger(__name__)

TIE_ATOL = 1e-6
_F32_EPS = float(np.finfo(np.float32).eps)


def topk_mismatch(
    user_vector: np.ndarray,
    item_vectors: np.ndarray,
    got: np.ndarray,
    reference: np.ndarray,
    seen: np.ndarray | None = None,
) -> str | None:
    """Why `got` is not an acceptable top-k given `reference`, or None when it is.

    Scores are recomputed in float64. Items whose reference scores tie (within
    TIE_ATOL plus the float32 rounding bound 2*d*eps*sum|q_i x_i|, since reference and
    bundle scored in float32 with different summation orders) are compared as sets;
    elsewhere order must match exactly. The last tie group may hold any tied item
    (the tie can extend past k), so there only the scores must agree.
    """
    got, reference = np.asarray(got, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    if got.shape != reference.shape:
        return f"{got.size} items != reference {reference.size}"
    if np.unique(got).size != got.size:
        return "duplicate items"
    if seen is not None and seen.size and np.isin(got, seen).any():
        return f"contains seen items {got[np.isin(got, seen)][:5].tolist()}"
    if got.size == 0:
        return None
    q = user_vector.astype(np.float64)
    x_got, x_ref = item_vectors[got].astype(np.float64), item_vectors[reference].astype(np.float64)
    s_got, s_ref = x_got @ q, x_ref @ q
    scale = max(float(np.abs(x_got * q).sum(1).max()), float(np.abs(x_ref * q).sum(1).max()))
    tol = TIE_ATOL + 2.0 * q.size * _F32_EPS * scale
    bad = np.flatnonzero(np.abs(s_got - s_ref) > tol)
    if bad.size:
        i = int(bad[0])
        return (
            f"position {i}: item {got[i]} (score {s_got[i]:.7g}) vs reference item {reference[i]} "
            f"(score {s_ref[i]:.7g}), tolerance {tol:.2g}"
        )
    # Tie groups: maximal runs of consecutive reference scores within tol.
    breaks = np.flatnonzero(np.abs(np.diff(s_ref)) > tol) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [reference.size]])
    for start, end in zip(starts[:-1], ends[:-1]):  # all but the last group
        if set(got[start:end].tolist()) != set(reference[start:end].tolist()):
            return f"positions {start}-{end - 1}: items {got[start:end].tolist()} != reference {reference[start:end].tolist()}"
    return None


def check_served_topk(
    bundle: Bundle,
    users: np.ndarray,
    reference: np.ndarray,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    what: str = "the checkpoint's reference",
) -> None:
    """ExportError naming the first user whose served top-k (seen items excluded) is not `reference`'s.

    Scores are judged on `user_vectors`/`item_vectors`: the export's inputs for an fp32 bundle, the stored
    (quantized) vectors when `reference` is what the quantization check measured. `what` names the reference.
    """
    # blas_threads=None: a check inside the exporting process must not change its BLAS thread pool.
    served = Recommender(bundle, blas_threads=None).recommend(users, reference.shape[1], exclude_seen=True)
    for row, (user, (items, _)) in enumerate(zip(users.tolist(), served)):
        why = topk_mismatch(user_vectors[user], item_vectors, items, reference[row], bundle.seen(user))
        if why is not None:
            raise ExportError(
                f"top-k of user {user} ({bundle.user_ids[user]}) differs from {what}: {why}"
            )
    logger.info("served top-%d equals %s for %d users", reference.shape[1], what, users.size)
