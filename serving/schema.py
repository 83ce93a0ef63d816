"""Request bodies of the HTTP API: parse JSON and validate it by hand (the hot path has no pydantic).

`POST /recommend`        {"user_id": str, "k": int = 10, "exclude_seen": bool = true}
                         or {"history": [item id, ...], "k": ..., "exclude_seen": ...} (a history tower)
`POST /recommend/batch`  {"user_ids": [str, ...], "k": int = 10, "exclude_seen": bool = true}
                         or {"requests": [{"user_id": str} or {"history": [item id, ...]}, ...], "k": ..., ...}
`POST /admin/swap`       {"bundle": "/absolute/bundle/dir", "version": str (optional label)}

Rules: the body is a JSON object; exactly one of `user_id` / `history` (of `user_ids` / `requests` in a batch)
is required; `k` is a JSON integer (not a bool, not 10.0) in [1, max_k]; `exclude_seen` is a JSON boolean (for a
history: leave the history's own items out); `user_ids` and `requests` are non-empty arrays of at most max_batch
entries, `user_ids` of strings, `requests` of objects holding exactly one of `user_id` (a string) or `history`;
a `history` is an array of at most the bundle's `max_len` item id strings, oldest first, and only a history
tower reads one (`ID_TOWER`); unknown fields are refused (a misspelt `exlude_seen` must not be silently
ignored). Malformed JSON (bad syntax, bad encoding, nesting past the parser's depth) is 400; a parseable body
that breaks these rules is 422, and so is NaN/Infinity anywhere a value is checked (Python's json module reads
them as floats, which no field accepts).

A model version label (`version`, `--model-version`, the control file's `version`) is 1 to
MAX_VERSION_LEN printable ASCII characters, no leading or trailing space: it goes into the
`X-Model-Version` header and a Prometheus label as is. `serving.openapi` documents these rules from
the constants below.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_K = 10
RECOMMEND_FIELDS = ("user_id", "history", "k", "exclude_seen")
BATCH_FIELDS = ("user_ids", "requests", "k", "exclude_seen")
BATCH_ENTRY_FIELDS = ("user_id", "history")
ID_TOWER = ("this bundle's user tower is looked up by user id; send \"user_id\" (a history needs a bundle "
            "exported from a model.kind: history checkpoint)")
SWAP_FIELDS = ("bundle", "version")
MAX_VERSION_LEN = 128
VERSION_PATTERN = "^[!-~](?:[ -~]*[!-~])?$"  # printable ASCII, no surrounding spaces (ECMA and Python regex alike)
MAX_PATH_LEN = 4096
BUNDLE_PATH_PATTERN = "^/[^\\u0000]*$"  # absolute, no NUL byte


class ApiError(Exception):
    """An answer other than 200: HTTP status and a one-line message (sent as {"error": message})."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True, slots=True)
class RecommendRequest:
    user_id: str | None  # None: a history request
    k: int
    exclude_seen: bool
    history: list[str] | None = None  # external item ids, oldest first


@dataclass(frozen=True, slots=True)
class SwapRequest:
    bundle: str
    version: str | None


@dataclass(frozen=True, slots=True)
class BatchRequest:
    user_ids: list[str | None]  # per entry: its user id, None for a history entry
    k: int
    exclude_seen: bool
    histories: list[list[str] | None] | None = None  # per entry: its history, None for a user id; None: no history


def short(value: Any, limit: int = 60) -> str:
    """repr() cut to `limit` characters, for echoing client input in messages."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"<integer with more than {limit} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind(value: Any) -> str:
    """A JSON-ish description of a value's type for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return f"number {short(value)}"
    if isinstance(value, int):
        return f"integer {short(value)}"
    if isinstance(value, str):
        return f"string {short(value)}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def parse_json(body: bytes) -> Any:
    if not body:
        raise ApiError(400, "empty request body; expected a JSON object")
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ApiError(400, f"malformed JSON: {' '.join(str(exc).split())[:200]}") from None


def _object(doc: Any, fields: tuple[str, ...], required: str | None, where: str = "request body") -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ApiError(422, f"{where} must be a JSON object, got {kind(doc)}")
    unknown = [key for key in doc if key not in fields]
    if unknown:
        prefix = "" if where == "request body" else f"{where}: "
        raise ApiError(422, f"{prefix}unknown field(s) {', '.join(short(k, 40) for k in unknown[:5])}; "
                            f"allowed: {', '.join(fields)}")
    if required is not None and required not in doc:
        raise ApiError(422, f"missing required field {required!r}")
    return doc


def _one_of(doc: dict[str, Any], first: str, second: str, prefix: str = "") -> str:
    """Which of the two alternative fields `doc` holds (exactly one is required)."""
    if first in doc and second in doc:
        raise ApiError(422, f"{prefix}send either {first!r} or {second!r}, not both")
    if first not in doc and second not in doc:
        raise ApiError(422, f"{prefix}missing required field {first!r} or {second!r}")
    return first if first in doc else second


def _history(value: Any, max_history: int | None, where: str) -> list[str]:
    """A history: at most `max_history` item id strings (None: the bundle's user tower reads no history)."""
    if max_history is None:
        raise ApiError(422, ID_TOWER if where == "history" else f"{where}: {ID_TOWER}")
    if type(value) is not list:
        raise ApiError(422, f"{where} must be an array of item id strings (oldest first), got {kind(value)}")
    if len(value) > max_history:
        raise ApiError(422, f"{where} has {len(value)} item ids, more than this bundle's max_len {max_history}; "
                            f"send the {max_history} most recent")
    for i, item in enumerate(value):
        if type(item) is not str:
            raise ApiError(422, f"{where}[{i}] must be a string (an item id), got {kind(item)}")
    return value


def _k(doc: dict[str, Any], max_k: int) -> int:
    k = doc.get("k", DEFAULT_K)
    if type(k) is not int:  # bool is an int subclass: refuse it too
        raise ApiError(422, f"k must be an integer, got {kind(k)}")
    if not 1 <= k <= max_k:
        raise ApiError(422, f"k must be between 1 and {max_k}, got {short(k)}")
    return k


def _exclude_seen(doc: dict[str, Any]) -> bool:
    value = doc.get("exclude_seen", True)
    if type(value) is not bool:
        raise ApiError(422, f"exclude_seen must be a boolean, got {kind(value)}")
    return value


def recommend_request(doc: Any, max_k: int, max_history: int | None = None) -> RecommendRequest:
    """`max_history`: the bundle's history length limit (its `max_len`); None for an ID tower."""
    doc = _object(doc, RECOMMEND_FIELDS, None)
    if _one_of(doc, "user_id", "history") == "history":
        history = _history(doc["history"], max_history, "history")
        return RecommendRequest(None, _k(doc, max_k), _exclude_seen(doc), history)
    user_id = doc["user_id"]
    if type(user_id) is not str:
        raise ApiError(422, f"user_id must be a string, got {kind(user_id)}")
    return RecommendRequest(user_id, _k(doc, max_k), _exclude_seen(doc))


def _entries(name: str, value: Any, max_batch: int, what: str) -> list:
    if type(value) is not list:
        raise ApiError(422, f"{name} must be an array of {what}, got {kind(value)}")
    if not value:
        raise ApiError(422, f"{name} is empty; send between 1 and max_batch {what}")
    if len(value) > max_batch:
        raise ApiError(422, f"{name} has {len(value)} entries, more than max_batch {max_batch}")
    return value


def batch_request(doc: Any, max_k: int, max_batch: int, max_history: int | None = None) -> BatchRequest:
    """`max_history` as for `recommend_request`."""
    doc = _object(doc, BATCH_FIELDS, None)
    if _one_of(doc, "user_ids", "requests") == "user_ids":
        user_ids = _entries("user_ids", doc["user_ids"], max_batch, "user ids")
        for i, uid in enumerate(user_ids):
            if type(uid) is not str:
                raise ApiError(422, f"user_ids[{i}] must be a string, got {kind(uid)}")
        return BatchRequest(user_ids, _k(doc, max_k), _exclude_seen(doc))
    entries = _entries("requests", doc["requests"], max_batch, 'requests ({"user_id": ...} or {"history": [...]})')
    ids: list[str | None] = []
    histories: list[list[str] | None] = []
    for i, entry in enumerate(entries):
        entry = _object(entry, BATCH_ENTRY_FIELDS, None, f"requests[{i}]")
        if _one_of(entry, "user_id", "history", f"requests[{i}]: ") == "history":
            ids.append(None)
            histories.append(_history(entry["history"], max_history, f"requests[{i}].history"))
            continue
        if type(entry["user_id"]) is not str:
            raise ApiError(422, f"requests[{i}].user_id must be a string, got {kind(entry['user_id'])}")
        ids.append(entry["user_id"])
        histories.append(None)
    return BatchRequest(ids, _k(doc, max_k), _exclude_seen(doc), histories)


def version_problem(label: Any) -> str | None:
    """Why `label` is not a valid model version label, or None when it is."""
    if type(label) is not str:
        return f"must be a string, got {kind(label)}"
    if not 1 <= len(label) <= MAX_VERSION_LEN:
        return f"must have 1 to {MAX_VERSION_LEN} characters, got {len(label)}"
    if not re.fullmatch(VERSION_PATTERN, label):
        return "must be printable ASCII without leading or trailing spaces"
    return None


def swap_request(doc: Any) -> SwapRequest:
    doc = _object(doc, SWAP_FIELDS, "bundle")
    bundle = doc["bundle"]
    if type(bundle) is not str:
        raise ApiError(422, f"bundle must be a string, got {kind(bundle)}")
    if len(bundle) > MAX_PATH_LEN or not re.fullmatch(BUNDLE_PATH_PATTERN, bundle):
        raise ApiError(422, f"bundle must be an absolute path of at most {MAX_PATH_LEN} characters, got {short(bundle)}")
    version = doc.get("version")
    if version is not None or "version" in doc:
        problem = version_problem(version)
        if problem:
            raise ApiError(422, f"version {problem}")
    return SwapRequest(bundle, version)
