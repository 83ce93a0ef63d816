"""The bundle's ONNX user tower: a Gather over the embedded user vectors (float32, float16 or int8 with a per-row
scale, dequantized in the graph), and its parity check in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.errors import ExportError
from serving.bundle_format import (
    MODEL_FILE,
    ONNX_INPUT,
    ONNX_IR_VERSION,
    ONNX_OPSET,
    ONNX_OUTPUT,
    ONNX_SCALE,
    ONNX_TABLE,
    QUANTIZATIONS,
    ort_session,
)

# Protobuf cannot serialise a message over 2 GiB and we refuse external data.
ONNX_MAX_TABLE_BYTES = 2_000_000_000
PARITY_ATOL = 1e-5
PARITY_BATCH = 65_536  # users per ORT call of the parity check
INT8_MAX = 127  # symmetric codes in [-127, 127]: -128 would make the range lopsided


def quantize_user_table(user_vectors: np.ndarray, quantize: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The initializers storing `user_vectors` at `quantize` precision, and the float32 rows the graph outputs.

    The returned rows are computed with the graph's own float32 operations (an fp16 -> fp32 cast is exact; the
    int8 dequantization is one float32 multiply), so ONNX Runtime reproduces them bit for bit.
    """
    if quantize == "fp32":
        return {ONNX_TABLE: user_vectors}, user_vectors
    if quantize == "fp16":
        half = user_vectors.astype(np.float16)
        if not np.isfinite(half).all():
            raise ExportError(f"user_vectors: values beyond float16's range ({float(np.abs(user_vectors).max()):.3g})")
        return {ONNX_TABLE: half}, half.astype(np.float32)
    if quantize == "int8":
        scale = (np.abs(user_vectors).max(axis=1, keepdims=True) / np.float32(INT8_MAX)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        codes = np.clip(np.rint(user_vectors / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
        return {ONNX_TABLE: codes, ONNX_SCALE: scale}, codes.astype(np.float32) * scale
    raise ExportError(f"quantize {quantize!r} not in {QUANTIZATIONS}")


def _nodes(quantize: str) -> list[onnx.NodeProto]:
    if quantize == "fp32":
        return [helper.make_node("Gather", [ONNX_TABLE, ONNX_INPUT], [ONNX_OUTPUT], axis=0, name="user_lookup")]
    rows = [helper.make_node("Gather", [ONNX_TABLE, ONNX_INPUT], ["rows"], axis=0, name="user_lookup")]
    if quantize == "fp16":
        return rows + [helper.make_node("Cast", ["rows"], [ONNX_OUTPUT], to=TensorProto.FLOAT, name="to_float")]
    return rows + [
        helper.make_node("Cast", ["rows"], ["rows_float"], to=TensorProto.FLOAT, name="to_float"),
        helper.make_node("Gather", [ONNX_SCALE, ONNX_INPUT], ["row_scale"], axis=0, name="scale_lookup"),
        helper.make_node("Mul", ["rows_float", "row_scale"], [ONNX_OUTPUT], name="dequantize"),
    ]


def build_user_tower(user_vectors: np.ndarray, *, quantize: str = "fp32", producer_version: str = "") -> onnx.ModelProto:
    """The user tower over `user_vectors` stored at `quantize` precision; checked with full_check.

    Its output for user i is `quantize_user_table(user_vectors, quantize)[1][i]`.
    """
    tables, _ = quantize_user_table(np.ascontiguousarray(user_vectors, dtype=np.float32), quantize)
    nbytes = sum(t.nbytes for t in tables.values())
    if nbytes > ONNX_MAX_TABLE_BYTES:
        raise ExportError(
            f"user table is {nbytes} bytes, over the {ONNX_MAX_TABLE_BYTES}-byte protobuf limit for an embedded initializer"
        )
    dim = int(user_vectors.shape[1])
    graph = helper.make_graph(
        _nodes(quantize),
        "user_tower",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(array, name=name) for name, array in tables.items()],
    )
    return checked_model(graph, producer_version, f"User tower: final user vectors ({quantize}) looked up by user "
                                                  f"index.", "the user tower")


def checked_model(graph: onnx.GraphProto, producer_version: str, doc_string: str, what: str) -> onnx.ModelProto:
    """`graph` as a model at the bundle's opset and IR version, passed through onnx.checker (full_check);
    ExportError naming `what` when the checker rejects it."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="compress",
        producer_version=producer_version,
        doc_string=doc_string,
    )
    model.ir_version = ONNX_IR_VERSION
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"{MODEL_FILE}: onnx.checker rejected {what} ({' '.join(str(exc).split())})") from exc
    return model


def check_parity(model_path: Path, user_vectors: np.ndarray) -> float:
    """Max |ORT(user) - user_vectors[user]| over every user, in batches; ExportError above PARITY_ATOL.

    `user_vectors` are the rows the graph stores (`quantize_user_table`'s second value).
    """
    session = ort_session(str(model_path))
    worst = 0.0
    for start in range(0, user_vectors.shape[0], PARITY_BATCH):
        users = np.arange(start, min(start + PARITY_BATCH, user_vectors.shape[0]), dtype=np.int64)
        out = session.run([ONNX_OUTPUT], {ONNX_INPUT: users})[0]
        if out.shape != (users.size, user_vectors.shape[1]):
            raise ExportError(f"{MODEL_FILE}: ORT output shape {out.shape} != {(users.size, user_vectors.shape[1])}")
        worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - user_vectors[users]))))
    if worst > PARITY_ATOL:
        raise ExportError(f"{MODEL_FILE}: ONNX Runtime output differs from user_vectors by {worst:.3g} > {PARITY_ATOL}")
    return worst
