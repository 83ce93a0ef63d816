"""The bundle's user tower as the loader checks it (`serving.bundle.open_bundle` calls `load_tower`).

`model.onnx` is parsed, refused if any tensor uses external data, passed through `onnx.checker` (full_check),
loaded in ONNX Runtime, and its inputs, output and gathered tables are compared with the manifest: an ID tower
gathers rows of a [num_users, dim] user table by `user_index`; a history tower gathers rows of a
[num_items, dim] history table by `history` and also takes `lengths` (`serving.bundle_format`). Each kind is
probed once at its first and last row. Failures raise `FormatError` with the check that failed; the loader puts
the file name in front. This module imports only numpy, onnx and onnxruntime.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data

from serving.bundle_format import (HISTORY_INPUTS, ONNX_HISTORY, ONNX_HISTORY_TABLE, ONNX_LENGTHS, ONNX_TABLE,
                                   FormatError, UserTower, ort_session, short_error)


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes, recursing into subgraphs (If/Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _gathered_tables(model: onnx.ModelProto, input_name: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the initializers the graph gathers rows of by `input_name` (a user or history table, a scale)."""
    inits = {t.name: t for t in model.graph.initializer}
    return {
        node.input[0]: tuple(int(d) for d in inits[node.input[0]].dims)
        for node in model.graph.node
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == input_name and node.input[0] in inits
    }


def load_tower(data: bytes, manifest: dict[str, Any], tower: UserTower, intra_op_num_threads: int,
               checks: list[str]) -> tuple[ort.InferenceSession, str, str]:
    """The checked ONNX Runtime session of `model.onnx` and its (first) input and output names."""
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise FormatError(f"not a parseable ONNX model ({short_error(exc)})") from exc
    for tensor in _all_tensors(model.graph):
        if uses_external_data(tensor) or tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise FormatError(f"tensor {tensor.name!r} uses external data (bundle models must be self-contained)")
    checks.append("model.onnx: no external data")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise FormatError(f"onnx.checker failed ({short_error(exc)})") from exc
    checks.append("model.onnx: onnx.checker full_check passed")
    try:
        session = ort_session(data, intra_op_num_threads)
    except Exception as exc:
        raise FormatError(f"onnxruntime cannot load it ({short_error(exc)})") from exc
    checks.append("model.onnx: loads in onnxruntime")

    if tower.is_history:
        return _check_history(model, session, manifest, tower, checks), ONNX_HISTORY, manifest["onnx"]["output"]
    return _check_id(model, session, manifest, checks), manifest["onnx"]["input"], manifest["onnx"]["output"]


def _check_output(session: ort.InferenceSession, manifest: dict[str, Any]) -> None:
    want_out, dim = manifest["onnx"]["output"], manifest["dim"]
    out = next((o for o in session.get_outputs() if o.name == want_out), None)
    if out is None or out.type != "tensor(float)":
        got = [(o.name, o.type) for o in session.get_outputs()]
        raise FormatError(f"expected float32 output {want_out!r}, model has {got}")
    shape = list(out.shape)
    if len(shape) != 2 or shape[1] != dim:
        raise FormatError(f"output shape {shape} != [batch, manifest dim {dim}]")


def _check_rows(model: onnx.ModelProto, input_name: str, default_table: str, rows: int, dim: int,
                what: str) -> tuple[int, ...] | None:
    """The shape of the table gathered by `input_name` (by its name, else, for a graph written by another tool,
    the first one), checked to have `rows` rows of `dim`; every other table gathered by it must have `rows` rows."""
    tables = _gathered_tables(model, input_name)
    table = tables.get(default_table, next(iter(tables.values()), None))
    if table is not None and table != (rows, dim):
        raise FormatError(f"{what} table shape {list(table)} != [num_{what}s {rows}, dim {dim}]")
    for name, shape in tables.items():
        if not shape or shape[0] != rows:
            raise FormatError(f"initializer {name!r} gathered by {what} index has shape {list(shape)}, not {rows} rows")
    return table


def _probe(session: ort.InferenceSession, output: str, feeds: dict[str, np.ndarray], rows: int, dim: int,
           what: str) -> None:
    try:
        probe = session.run([output], feeds)[0]
    except Exception as exc:
        raise FormatError(f"probe of {what} failed ({short_error(exc)})") from exc
    if probe.shape != (rows, dim) or probe.dtype != np.float32:
        raise FormatError(f"probe output {probe.dtype}{list(probe.shape)} != float32[{rows}, {dim}]")


def _refuses(session: ort.InferenceSession, output: str, feeds: dict[str, np.ndarray]) -> bool:
    try:
        session.run([output], feeds)
    except Exception:
        return True
    return False


def _check_id(model: onnx.ModelProto, session: ort.InferenceSession, manifest: dict[str, Any],
              checks: list[str]) -> ort.InferenceSession:
    want_in, want_out = manifest["onnx"]["input"], manifest["onnx"]["output"]
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != want_in or inputs[0].type != "tensor(int64)":
        got = [(i.name, i.type) for i in inputs]
        raise FormatError(f"expected one int64 input {want_in!r}, model has {got}")
    _check_output(session, manifest)
    dim, num_users = manifest["dim"], manifest["num_users"]
    table = _check_rows(model, want_in, ONNX_TABLE, num_users, dim, "user")
    # Probe the first and last user (and, when the table is not a plain initializer,
    # that one past the last is rejected) so the row count is checked either way.
    _probe(session, want_out, {want_in: np.array([0, num_users - 1], dtype=np.int64)}, 2, dim,
           f"users 0 and {num_users - 1}")
    if table is None and not _refuses(session, want_out, {want_in: np.array([num_users], dtype=np.int64)}):
        raise FormatError(f"accepts user index {num_users} = num_users (table has more rows than users)")
    checks.append(f"model.onnx: int64[batch] -> float32[batch, {dim}], {num_users} user rows")
    return session


def _check_history(model: onnx.ModelProto, session: ort.InferenceSession, manifest: dict[str, Any],
                   tower: UserTower, checks: list[str]) -> ort.InferenceSession:
    want_out = manifest["onnx"]["output"]
    inputs = {i.name: i for i in session.get_inputs()}
    if sorted(inputs) != sorted(HISTORY_INPUTS) or any(i.type != "tensor(int64)" for i in inputs.values()):
        got = [(i.name, i.type) for i in session.get_inputs()]
        raise FormatError(f"expected int64 inputs {list(HISTORY_INPUTS)} (a history tower), model has {got}")
    ranks = [len(inputs[ONNX_HISTORY].shape), len(inputs[ONNX_LENGTHS].shape)]
    if ranks != [2, 1]:
        raise FormatError(f"history/lengths inputs have ranks {ranks}, expected [2, 1] ([batch, length], [batch])")
    _check_output(session, manifest)
    dim, num_items = manifest["dim"], manifest["num_items"]
    table = _check_rows(model, ONNX_HISTORY, ONNX_HISTORY_TABLE, num_items, dim, "item")
    # The first and last item, and an empty history (pooled to zeros).
    feeds = {ONNX_HISTORY: np.array([[0, num_items - 1], [0, 0]], dtype=np.int64),
             ONNX_LENGTHS: np.array([2, 0], dtype=np.int64)}
    _probe(session, want_out, feeds, 2, dim, f"a history of items 0 and {num_items - 1} and an empty one")
    past = {ONNX_HISTORY: np.array([[num_items]], dtype=np.int64), ONNX_LENGTHS: np.array([1], dtype=np.int64)}
    if table is None and not _refuses(session, want_out, past):
        raise FormatError(f"accepts item index {num_items} = num_items (table has more rows than items)")
    checks.append(f"model.onnx: history int64[batch, <= {tower.max_len}] + lengths int64[batch] -> "
                  f"float32[batch, {dim}], {num_items} item rows")
    return session
