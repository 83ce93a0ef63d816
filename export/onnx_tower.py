"""The bundle's ONNX user tower: a Gather over the embedded user vectors, and its parity check in ONNX Runtime."""

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
    ONNX_TABLE,
    ort_session,
)

# Protobuf cannot serialise a message over 2 GiB and we refuse external data.
ONNX_MAX_TABLE_BYTES = 2_000_000_000
PARITY_ATOL = 1e-5
PARITY_BATCH = 65_536  # users per ORT call of the parity check


def build_user_tower(user_vectors: np.ndarray, *, producer_version: str = "") -> onnx.ModelProto:
    """A single Gather over an embedded user-vector table; checked with full_check."""
    if user_vectors.nbytes > ONNX_MAX_TABLE_BYTES:
        raise ExportError(
            f"user table is {user_vectors.nbytes} bytes, over the {ONNX_MAX_TABLE_BYTES}-byte protobuf limit "
            "for an embedded initializer"
        )
    dim = int(user_vectors.shape[1])
    table = numpy_helper.from_array(user_vectors, name=ONNX_TABLE)
    node = helper.make_node("Gather", [ONNX_TABLE, ONNX_INPUT], [ONNX_OUTPUT], axis=0, name="user_lookup")
    graph = helper.make_graph(
        [node],
        "user_tower",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["batch", dim])],
        initializer=[table],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="compress",
        producer_version=producer_version,
        doc_string="User tower: final user vectors looked up by user index.",
    )
    model.ir_version = ONNX_IR_VERSION
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"{MODEL_FILE}: onnx.checker rejected the user tower ({' '.join(str(exc).split())})") from exc
    return model


def check_parity(model_path: Path, user_vectors: np.ndarray) -> float:
    """Max |ORT(user) - user_vectors[user]| over every user, in batches; ExportError above PARITY_ATOL."""
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
