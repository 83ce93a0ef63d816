"""The bundle's ONNX user tower for a history model (`model.kind: history`), and its parity check in ONNX Runtime.

The graph (`serving.bundle_format`, "History tower") computes, for padded histories ``history`` [b, L] and
``lengths`` [b], with E the history table:

    mean = sum(E[h]) / max(len(h), 1)           Gather, a Less mask of the padding, ReduceSum, Div
    user = mean + mlp_out(relu(mlp_in(mean)))   Gemm (transB=1: torch Linear's y = x W^T + b), Relu, Gemm, Add

all in float32, so it reproduces `compressor.models.HistoryPool.encode` up to summation order. The torch side (the
reference outputs) is computed by `export.from_checkpoint`; this module imports numpy, onnx and onnxruntime only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError
from export.onnx_tower import ONNX_MAX_TABLE_BYTES, PARITY_ATOL, checked_model
from serving.bundle_format import (MODEL_FILE, ONNX_HISTORY, ONNX_HISTORY_TABLE, ONNX_LENGTHS, ONNX_OUTPUT,
                                   UserTower, csr_histories, ort_session)

PARITY_BLOCK_VALUES = 1 << 23  # history rows x max_len x dim gathered per ORT call of the parity check (32 MiB)
PROBE_HISTORIES = 64  # random histories checked besides every training user's
PROBE_SEED = 0


@dataclass
class HistoryTower:
    """A history tower's float32 weights, and the reference outputs of random histories that its graph must give.

    ``probe_history`` [n, max_len] holds histories of every length from 0 to max_len (``probe_histories``: lengths
    0, 1 and max_len always among them), padded with random valid items; ``probe_vectors`` [n, dim] are the
    reference model's outputs for them."""

    history_table: np.ndarray  # [num_items, dim]
    mlp_in_weight: np.ndarray  # [hidden, dim]
    mlp_in_bias: np.ndarray  # [hidden]
    mlp_out_weight: np.ndarray  # [dim, hidden]
    mlp_out_bias: np.ndarray  # [dim]
    max_len: int
    probe_history: np.ndarray
    probe_lengths: np.ndarray
    probe_vectors: np.ndarray

    @property
    def spec(self) -> UserTower:
        return UserTower("history", int(self.max_len))

    def initializers(self) -> dict[str, np.ndarray]:
        return {ONNX_HISTORY_TABLE: self.history_table, "mlp_in_weight": self.mlp_in_weight,
                "mlp_in_bias": self.mlp_in_bias, "mlp_out_weight": self.mlp_out_weight,
                "mlp_out_bias": self.mlp_out_bias}

    def check(self, num_items: int, dim: int) -> None:
        """ExportError unless the weights fit a [num_items, dim] bundle (finite float32, consistent shapes)."""
        if type(self.max_len) is not int or self.max_len < 1:
            raise ExportError(f"history tower: max_len must be a positive integer, got {self.max_len!r}")
        hidden = self.mlp_in_weight.shape[0] if self.mlp_in_weight.ndim == 2 else -1
        want = {ONNX_HISTORY_TABLE: (num_items, dim), "mlp_in_weight": (hidden, dim), "mlp_in_bias": (hidden,),
                "mlp_out_weight": (dim, hidden), "mlp_out_bias": (dim,)}
        for name, array in self.initializers().items():
            if array.shape != want[name] or array.dtype != np.float32 or not np.isfinite(array).all():
                raise ExportError(f"history tower: {name} is {array.dtype}{list(array.shape)}, expected finite "
                                  f"float32{list(want[name])}")
        n = self.probe_history.shape[0]
        if self.probe_lengths.shape != (n,) or self.probe_vectors.shape != (n, dim):
            raise ExportError("history tower: probe histories, lengths and vectors do not match")


def probe_histories(num_items: int, max_len: int, n: int = PROBE_HISTORIES,
                    seed: int = PROBE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random histories [n, max_len] int64 and their lengths [n]: lengths 0, 1 and max_len, the rest
    uniform in [0, max_len]; the padding beyond each length holds random valid items too (the graph must mask it)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, n).astype(np.int64)
    lengths[:3] = [0, 1, max_len]
    return rng.integers(0, num_items, (n, max_len)).astype(np.int64), lengths


def _nodes() -> list[onnx.NodeProto]:
    node = helper.make_node
    return [
        node("Gather", [ONNX_HISTORY_TABLE, ONNX_HISTORY], ["rows"], axis=0, name="history_lookup"),  # [b, L, d]
        # mask [b, L, 1]: position < length (the padding beyond a row's length counts for nothing)
        node("Shape", [ONNX_HISTORY], ["history_shape"], name="history_shape"),
        node("Gather", ["history_shape", "one"], ["length"], axis=0, name="padded_length"),
        node("Range", ["zero", "length", "one"], ["positions"], name="positions"),
        node("Unsqueeze", ["positions", "axis0"], ["positions_row"], name="positions_row"),
        node("Unsqueeze", [ONNX_LENGTHS, "axis1"], ["lengths_col"], name="lengths_col"),
        node("Less", ["positions_row", "lengths_col"], ["mask"], name="mask"),
        node("Cast", ["mask"], ["mask_float"], to=TensorProto.FLOAT, name="mask_float"),
        node("Unsqueeze", ["mask_float", "axis2"], ["mask3"], name="mask3"),
        node("Mul", ["rows", "mask3"], ["masked"], name="masked"),
        node("ReduceSum", ["masked", "axis1"], ["sums"], keepdims=0, name="sums"),  # [b, d]
        # mean = sums / max(length, 1): an empty history pools to zeros
        node("Cast", [ONNX_LENGTHS], ["lengths_float"], to=TensorProto.FLOAT, name="lengths_float"),
        node("Max", ["lengths_float", "one_float"], ["counts"], name="counts"),
        node("Unsqueeze", ["counts", "axis1"], ["counts_col"], name="counts_col"),
        node("Div", ["sums", "counts_col"], ["mean"], name="mean"),
        node("Gemm", ["mean", "mlp_in_weight", "mlp_in_bias"], ["hidden_pre"], transB=1, name="mlp_in"),
        node("Relu", ["hidden_pre"], ["hidden"], name="relu"),
        node("Gemm", ["hidden", "mlp_out_weight", "mlp_out_bias"], ["residual"], transB=1, name="mlp_out"),
        node("Add", ["mean", "residual"], [ONNX_OUTPUT], name="user_vector"),
    ]


def build_history_tower(tower: HistoryTower, *, producer_version: str = "") -> onnx.ModelProto:
    """The history tower's graph over `tower`'s weights (float32, embedded); checked with full_check."""
    nbytes = sum(a.nbytes for a in tower.initializers().values())
    if nbytes > ONNX_MAX_TABLE_BYTES:
        raise ExportError(f"history tower is {nbytes} bytes, over the {ONNX_MAX_TABLE_BYTES}-byte protobuf limit "
                          "for embedded initializers")
    dim = int(tower.history_table.shape[1])
    constants = {"zero": np.array(0, dtype=np.int64), "one": np.array(1, dtype=np.int64),
                 "one_float": np.array(1.0, dtype=np.float32), "axis0": np.array([0], dtype=np.int64),
                 "axis1": np.array([1], dtype=np.int64), "axis2": np.array([2], dtype=np.int64)}
    arrays = {**{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tower.initializers().items()}, **constants}
    graph = helper.make_graph(
        _nodes(),
        "history_user_tower",
        [helper.make_tensor_value_info(ONNX_HISTORY, TensorProto.INT64, ["batch", "length"]),
         helper.make_tensor_value_info(ONNX_LENGTHS, TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(array, name=name) for name, array in arrays.items()],
    )
    return checked_model(graph, producer_version, f"User tower: mean of the last {tower.max_len} history items' "
                                                  f"embeddings plus a residual MLP.", "the history tower")


def check_history_parity(model: Path | bytes, tower: HistoryTower, indptr: np.ndarray, indices: np.ndarray,
                         user_vectors: np.ndarray) -> tuple[float, np.ndarray]:
    """ORT vs the reference over every training user (its last max_len training items, as serving reads them
    from the seen CSR) and `tower`'s random probe histories; ExportError above PARITY_ATOL x max(1, max|ref|).

    Returns the largest difference and ORT's vectors of the training users (what the bundle serves)."""
    session = ort_session(model if isinstance(model, bytes) else str(model))

    def run(history: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        out = session.run([ONNX_OUTPUT], {ONNX_HISTORY: history, ONNX_LENGTHS: lengths})[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    num_users, dim = user_vectors.shape
    block = max(1, PARITY_BLOCK_VALUES // (tower.max_len * dim))
    served = np.concatenate([
        run(*csr_histories(indptr, indices, np.arange(start, min(start + block, num_users)), tower.max_len))
        for start in range(0, num_users, block)
    ])
    worst = 0.0
    for what, got, want in (("training users' histories", served, user_vectors),
                            ("random histories", run(tower.probe_history, tower.probe_lengths), tower.probe_vectors)):
        if got.shape != want.shape:
            raise ExportError(f"{MODEL_FILE}: ORT output shape {got.shape} != {want.shape} for {what}")
        diff = float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0))
        limit = PARITY_ATOL * max(1.0, float(np.max(np.abs(want), initial=0.0)))
        if not diff <= limit:
            raise ExportError(f"{MODEL_FILE}: ONNX Runtime's history tower differs from the checkpoint's by "
                              f"{diff:.3g} > {limit:.3g} on {what}")
        worst = max(worst, diff)
    return worst, served
