"""The registered MLflow model: external user ids in, their top-k external item ids out.

MLflow "models from code": ``compress_app.tracking.registry`` logs *this file* as the model's code (``python_model=<path>``)
with the run's safetensors checkpoint as the artifact ``checkpoint``. Loading executes this file (it ends with
``mlflow.models.set_model``) and reads the checkpoint with ``load_checkpoint``; no pickled object is written or
read, so a registered model is a .py file, a safetensors file and MLflow's YAML/JSON metadata. Loading needs this
package installed (``pip install compress-recsys``), nothing from the training run.

Input: a DataFrame with a ``user_id`` column, or a list / 1-D array of user ids (ids are compared as strings).
Params: ``k`` (default 10). Output: a DataFrame, one row per input user, with ``user_id``, ``items`` (the top-k
external item ids, best first, the user's training items excluded) and ``scores`` (their inner products).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from compressor.checkpoint import load_checkpoint
from compressor.evaluation import topk_excluding

CHECKPOINT_ARTIFACT = "checkpoint"
USER_COLUMN = "user_id"
DEFAULT_K = 10


def _bad_input(msg: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: `mlflow models serve` answers 400 with this message, not 500.
    return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)


def _user_ids(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if USER_COLUMN in model_input.columns:
            col = model_input[USER_COLUMN]
        elif model_input.shape[1] == 1:
            col = model_input.iloc[:, 0]
        else:
            raise _bad_input(f"expected a '{USER_COLUMN}' column, got columns {list(model_input.columns)}")
        values = col.tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, np.ndarray):
        if model_input.ndim > 1 and model_input.shape[1] != 1:
            raise _bad_input(f"expected a 1-D array of user ids, got shape {model_input.shape}")
        values = model_input.reshape(-1).tolist()
    elif isinstance(model_input, dict) and USER_COLUMN in model_input:
        v = model_input[USER_COLUMN]
        values = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    elif isinstance(model_input, (str, int, np.integer)):
        values = [model_input]
    else:
        raise _bad_input(f"expected a DataFrame with a '{USER_COLUMN}' column or a list of user ids, "
                         f"got {type(model_input).__name__}")
    return [str(v) for v in values]


class TopKRecommender(PythonModel):
    """Inner-product top-k over the checkpoint's final user and item vectors, training items excluded."""

    def load_context(self, context):
        ckpt = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        with torch.no_grad():
            u, i = ckpt.build_model("cpu").vectors()
        self.user_vecs, self.item_vecs = u.detach().float(), i.detach().float()
        self.user_ids, self.item_ids = ckpt.user_ids, ckpt.item_ids
        self.row = {uid: n for n, uid in enumerate(ckpt.user_ids.tolist())}
        self.train_indptr, self.train_indices = ckpt.train_indptr, ckpt.train_indices
        self.fingerprint = ckpt.fingerprint

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        k = (params or {}).get("k", DEFAULT_K)
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise _bad_input(f"param k must be an integer, got {k!r}") from None
        if k < 1:
            raise _bad_input(f"param k must be >= 1, got {k}")
        ids = _user_ids(model_input)
        unknown = [u for u in ids if u not in self.row]
        if unknown:
            raise _bad_input(f"{len(unknown)} unknown user id(s), e.g. {unknown[:5]} (the model knows "
                             f"{len(self.row):,} users)")
        if not ids:
            return pd.DataFrame({USER_COLUMN: [], "items": [], "scores": []})
        users = np.array([self.row[u] for u in ids], dtype=np.int64)
        kk = min(k, len(self.item_ids))
        with torch.no_grad():
            top = topk_excluding(self.user_vecs, self.item_vecs, users, kk, self.train_indptr, self.train_indices)
            scores = torch.einsum("ud,ukd->uk", self.user_vecs[torch.as_tensor(users)], self.item_vecs[top])
        top, scores = top.numpy(), scores.numpy()
        items, item_scores = [], []
        for r, u in enumerate(users):
            keep = np.ones(kk, dtype=bool)
            seen = self.train_indptr[u + 1] - self.train_indptr[u]
            if kk > len(self.item_ids) - seen:  # fewer unseen items than k: drop the masked tail
                keep = ~np.isin(top[r], self.train_indices[self.train_indptr[u]:self.train_indptr[u + 1]])
            items.append(self.item_ids[top[r][keep]].tolist())
            item_scores.append(scores[r][keep].astype(float).tolist())
        return pd.DataFrame({USER_COLUMN: ids, "items": items, "scores": item_scores})


if __name__ != "compress_app.tracking.pyfunc_model":  # executed as model code by MLflow (not imported for its constants)
    mlflow.models.set_model(TopKRecommender())
