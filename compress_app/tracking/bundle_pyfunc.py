"""The registered MLflow model: the serving bundle itself, answered by the serving recommender.

MLflow "models from code": ``registry.register_version`` logs *this file* as the model's code, the bundle directory
(model.onnx, items.faiss, id maps, seen items, manifest.json) as the artifact ``bundle``, and the ``serving``
package as the model's code path. Loading executes this file (it ends with ``mlflow.models.set_model``), which
opens the bundle with ``serving.bundle.open_bundle`` (every file's sha256 checked against the manifest) and
answers with ``serving.recommender.Recommender``: exactly what `compress serve` answers for the same bundle.
Nothing here needs torch or the training code; nothing is pickled.

Input: a DataFrame with a ``user_id`` column, or a list / 1-D array of user ids (ids are compared as strings).
A bundle with a history user tower (``manifest.user_tower.kind == "history"``) also takes histories: a DataFrame
with a ``history`` column (each cell a list of external item ids, oldest first, at most the bundle's
``max_len``; with a ``user_id`` column too, each row fills exactly one of them and leaves the other null), or a
dict ``{"history": [[item, ...], ...]}`` (``{"history": [item, ...]}``: one history). Params: ``k`` (default 10),
``exclude_seen`` (default true; for a history: leave its own items out). Each user or history gets what
`POST /recommend` answers; as MLflow models do, a request naming an unknown user, a history with no item id the
bundle knows, a history too long, or any history for an ID-tower bundle fails as a whole (400), where the
server answers per entry. Item ids of a history that the bundle does not know are skipped and counted.
Output: a DataFrame, one row per input row, with ``user_id``, ``items`` (the top-k external item ids, best
first) and ``scores`` (their inner products); with histories in the input also ``unknown_items`` (per history
row; null for user id rows) and ``user_id`` null for history rows.
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
from serving.schema import ID_TOWER

BUNDLE_ARTIFACT = "bundle"
USER_COLUMN = "user_id"
HISTORY_COLUMN = "history"
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


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _history(value, row: int) -> list[str]:
    # element by element, not np.ndim: a ragged list would make numpy raise (a 500 instead of a 400)
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim == 1 else None
    if not isinstance(value, (list, tuple)):
        raise _bad_input(f"history of row {row} must be a list of item ids, got {type(value).__name__}")
    if any(isinstance(v, (list, tuple, dict, np.ndarray)) for v in value):
        raise _bad_input(f"history of row {row} must be a flat list of item ids (it holds a list)")
    if any(_missing(v) for v in value):
        raise _bad_input(f"history of row {row} holds a null item id")
    return [str(v) for v in value]


def _requests(model_input) -> tuple[list[str | None], list[list[str] | None] | None]:
    """(per row: user id or None, per row: history or None); histories None when the input holds none."""
    if isinstance(model_input, pd.DataFrame) and HISTORY_COLUMN in model_input.columns:
        extra = [c for c in model_input.columns if c not in (USER_COLUMN, HISTORY_COLUMN)]
        if extra:
            raise _bad_input(f"unexpected column(s) {extra}: expected '{USER_COLUMN}' and/or '{HISTORY_COLUMN}'")
        cells = model_input[HISTORY_COLUMN].tolist()
        users = (model_input[USER_COLUMN].tolist() if USER_COLUMN in model_input.columns else [None] * len(cells))
    elif isinstance(model_input, dict) and HISTORY_COLUMN in model_input:
        if USER_COLUMN in model_input:
            raise _bad_input(f"send either '{USER_COLUMN}' or '{HISTORY_COLUMN}', not both")
        value = model_input[HISTORY_COLUMN]
        many = isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple, np.ndarray)) for v in value)
        cells = list(value) if many else [value]
        users = [None] * len(cells)
    else:
        return _user_ids(model_input), None
    ids: list[str | None] = []
    histories: list[list[str] | None] = []
    for row, (user, cell) in enumerate(zip(users, cells)):
        has_user = not _missing(user)
        has_history = not (cell is None or (not isinstance(cell, (list, tuple, np.ndarray)) and _missing(cell)))
        if has_user == has_history:
            raise _bad_input(f"row {row}: give exactly one of '{USER_COLUMN}' or '{HISTORY_COLUMN}'")
        ids.append(str(user) if has_user else None)
        histories.append(_history(cell, row) if has_history else None)
    return ids, histories


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
        ids, histories = _requests(model_input)
        if histories is not None:
            return self._predict_mixed(ids, histories, k, exclude_seen)
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


    def _predict_mixed(self, ids: list[str | None], histories: list[list[str] | None], k: int,
                       exclude_seen: bool) -> pd.DataFrame:
        """Rows of user ids and of histories, in order (see the module docstring)."""
        rec = self.recommender
        if not rec.tower.is_history:
            raise _bad_input(ID_TOWER)
        user_rows = [row for row, u in enumerate(ids) if u is not None]
        unknown = [ids[row] for row in user_rows if ids[row] not in rec.bundle.user_index]
        if unknown:
            raise _bad_input(f"{len(unknown)} unknown user id(s), e.g. {unknown[:5]} (the model knows "
                             f"{rec.bundle.num_users:,} users)")
        history_rows = [row for row, h in enumerate(histories) if h is not None]
        looked_up = {}
        for row in history_rows:
            if len(histories[row]) > rec.tower.max_len:
                raise _bad_input(f"history of row {row} has {len(histories[row])} item ids, more than the model's "
                                 f"max_len {rec.tower.max_len}; send the {rec.tower.max_len} most recent")
            looked_up[row] = rec.history_indices(histories[row])
            if looked_up[row][0].size == 0:
                raise _bad_input(f"history of row {row} holds no item id the model knows "
                                 f"({len(histories[row])} given, {looked_up[row][1]} unknown)")
        answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if user_rows:
            users = rec.user_indices([ids[row] for row in user_rows])
            answers.update(zip(user_rows, rec.recommend(users, k, exclude_seen=exclude_seen)))
        if history_rows:
            known = [looked_up[row][0] for row in history_rows]
            answers.update(zip(history_rows, rec.recommend_histories(known, k, exclude_history=exclude_seen)))
        rows = range(len(ids))
        return pd.DataFrame({USER_COLUMN: ids,
                             "items": [rec.item_external_ids(answers[r][0]).tolist() for r in rows],
                             "scores": [answers[r][1].astype(float).tolist() for r in rows],
                             "unknown_items": [looked_up[r][1] if r in looked_up else None for r in rows]})


if __name__ != "compress_app.tracking.bundle_pyfunc":  # executed as model code by MLflow (not imported for constants)
    mlflow.models.set_model(BundleRecommender())
