"""Request bodies of the HTTP API: parse JSON and validate it by hand (the hot path has no pydantic).

`POST /recommend`        {"user_id": str, "k": int = 10, "exclude_seen": bool = true}
`POST /recommend/batch`  {"user_ids": [str, ...], "k": int = 10, "exclude_seen": bool = true}
`POST /admin/swap`       {"bundle": "/absolute/bundle/dir", "version": str (optional label)}

Rules: the body is a JSON object; `user_id` / `user_ids` are required; `k` is a JSON integer
(not a bool, not 10.0) in [1, max_k]; `exclude_seen` is a JSON boolean; `user_ids` is a non-empty
array of at most max_batch strings; unknown fields are refused (a misspelt `exlude_seen` must not
be silently ignored). Malformed JSON (bad syntax, bad encoding, nesting past the parser's depth)
is 400; a parseable body that breaks these rules is 422, and so is NaN/Infinity anywhere a value
is checked (Python's json module reads them as floats, which no field accepts).

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
RECOMMEND_FIELDS = ("user_id", "k", "exclude_seen")
BATCH_FIELDS = ("user_ids", "k", "exclude_seen")
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
    user_id: str
    k: int
    exclude_seen: bool


@dataclass(frozen=True, slots=True)
class SwapRequest:
    bundle: str
    version: str | None


@dataclass(frozen=True, slots=True)
class BatchRequest:
    user_ids: list[str]
    k: int
    exclude_seen: bool


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


def _object(doc: Any, fields: tuple[str, ...], required: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ApiError(422, f"request body must be a JSON object, got {kind(doc)}")
    unknown = [key for key in doc if key not in fields]
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(short(k, 40) for k in unknown[:5])}; allowed: {', '.join(fields)}")
    if required not in doc:
        raise ApiError(422, f"missing required field {required!r}")
    return doc


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


def recommend_request(doc: Any, max_k: int) -> RecommendRequest:
    doc = _object(doc, RECOMMEND_FIELDS, "user_id")
    user_id = doc["user_id"]
    if type(user_id) is not str:
        raise ApiError(422, f"user_id must be a string, got {kind(user_id)}")
    return RecommendRequest(user_id, _k(doc, max_k), _exclude_seen(doc))


def batch_request(doc: Any, max_k: int, max_batch: int) -> BatchRequest:
    doc = _object(doc, BATCH_FIELDS, "user_ids")
    user_ids = doc["user_ids"]
    if type(user_ids) is not list:
        raise ApiError(422, f"user_ids must be an array of strings, got {kind(user_ids)}")
    if not user_ids:
        raise ApiError(422, "user_ids is empty; send between 1 and max_batch user ids")
    if len(user_ids) > max_batch:
        raise ApiError(422, f"user_ids has {len(user_ids)} entries, more than max_batch {max_batch}")
    for i, uid in enumerate(user_ids):
        if type(uid) is not str:
            raise ApiError(422, f"user_ids[{i}] must be a string, got {kind(uid)}")
    return BatchRequest(user_ids, _k(doc, max_k), _exclude_seen(doc))


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
