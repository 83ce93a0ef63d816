"""The registered MLflow model: the serving bundle itself, answered by the serving recommender.

MLflow "models from code": ``registry.register_version`` logs *this file* as the model's code, the bundle directory
(model.onnx, items.faiss, id maps, seen items, manifest.json) as the artifact ``bundle``, and the ``serving``
package as the model's code path. Loading executes this file (it ends with ``mlflow.models.set_model``), which
opens the bundle with ``serving.bundle.open_bundle`` (every file's sha256 checked against the manifest) and
answers with ``serving.recommender.Recommender``: exactly what `compress serve` answers for the same bundle.
Nothing here needs torch or the training code; nothing is pickled.

Input: a DataFrame with a ``user_id`` column, or a list / 1-D array of user ids (ids are compared as strings).
Params: ``k`` (default 10), ``exclude_seen`` (default true). Each user gets what `POST /recommend` answers; as
MLflow models do, a request naming an unknown user fails as a whole (400), where the server answers per user. Output: a DataFrame, one row per input user, with
``user_id``, ``items`` (the top-k external item ids, best first) and ``scores`` (their inner products).
This file imports only mlflow, numpy, pandas and serving.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from serving.bundle import open_bundle
from serving.recommender import Recommender

BUNDLE_ARTIFACT = "bundle"
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


def _params(params: dict | None) -> tuple[int, bool]:
    params = params or {}
    k = params.get("k", DEFAULT_K)
    if isinstance(k, bool) or (isinstance(k, float) and not k.is_integer()):
        raise _bad_input(f"param k must be an integer, got {k!r}")
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise _bad_input(f"param k must be an integer, got {k!r}") from None
    if k < 1:
        raise _bad_input(f"param k must be >= 1, got {k}")
    exclude_seen = params.get("exclude_seen", True)
    if not isinstance(exclude_seen, (bool, np.bool_)):
        raise _bad_input(f"param exclude_seen must be true or false, got {exclude_seen!r}")
    return k, bool(exclude_seen)


class BundleRecommender(PythonModel):
    """Top-k over the registered serving bundle, training items excluded (as `compress serve` answers)."""
    # The input is checked by _user_ids / _params (a DataFrame, a list or an array of ids), not by type hints:
    # MLflow's type-hint validation (and its warning, at class definition, that hints are missing) is skipped.
    _skip_type_hint_validation = True

    def load_context(self, context):
        # Thread pools are the host process's business (a notebook, `mlflow models serve`): leave them alone.
        bundle = open_bundle(context.artifacts[BUNDLE_ARTIFACT], faiss_threads=None)
        self.recommender = Recommender(bundle, blas_threads=None)
        self.manifest = bundle.manifest

    def predict(self, context, model_input, params: dict | None = None):
        k, exclude_seen = _params(params)
        ids = _user_ids(model_input)
        rec = self.recommender
        unknown = [u for u in ids if u not in rec.bundle.user_index]
        if unknown:
            raise _bad_input(f"{len(unknown)} unknown user id(s), e.g. {unknown[:5]} (the model knows "
                             f"{rec.bundle.num_users:,} users)")
        if not ids:
            return pd.DataFrame({USER_COLUMN: [], "items": [], "scores": []})
        answers = rec.recommend(rec.user_indices(ids), k, exclude_seen=exclude_seen)
        return pd.DataFrame({USER_COLUMN: ids,
                             "items": [rec.item_external_ids(items).tolist() for items, _ in answers],
                             "scores": [scores.astype(float).tolist() for _, scores in answers]})


if __name__ != "compress_app.tracking.bundle_pyfunc":  # executed as model code by MLflow (not imported for constants)
    mlflow.models.set_model(BundleRecommender())
