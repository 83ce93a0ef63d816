"""The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`), built from what the server enforces.

Field names, defaults and limits come from `serving.schema` (the hand-written validation) and the server's
`ServeConfig` (max_k, max_batch, max_body_bytes), so the document cannot drift from the checks: `k` has
minimum 1 and maximum max_k, `user_ids` minItems 1 and maxItems max_batch (`requests` the same, stated in an
`allOf` beside it), request objects refuse unknown fields (`additionalProperties: false`) and take exactly one
of their alternative fields (`oneOf` of `required`). JSON Schema's `integer` also matches 10.0, which the server
refuses (k must be a JSON integer literal); the description says so. A history's length limit is the served
bundle's (`user_tower.max_len` in /metadata), not the server's, so the document states it in words. With a
token configured the document declares the Bearer scheme on every operation except the health probes.
"""

from __future__ import annotations

from typing import Any

from serving.config import ServeConfig
from serving.schema import (
    BATCH_ENTRY_FIELDS,
    BATCH_FIELDS,
    BUNDLE_PATH_PATTERN,
    DEFAULT_K,
    MAX_PATH_LEN,
    MAX_VERSION_LEN,
    RECOMMEND_FIELDS,
    SWAP_FIELDS,
    VERSION_PATTERN,
)

API_VERSION = "1.0.0"
SECURITY_SCHEME = "bearerAuth"

_ERRORS = {
    400: "Malformed JSON (bad syntax or encoding, nested too deeply) or an invalid Content-Length.",
    401: "Missing or wrong `Authorization: Bearer` token.",
    403: "The endpoint needs the server started with a token (--token-file or COMPRESS_SERVE_TOKEN).",
    404: "Unknown user id (without the popular fallback).",
    408: "The request body did not arrive within the server's body timeout.",
    413: "The request body is larger than the server's max_body_bytes.",
    422: "The JSON body breaks the request schema (types, bounds, unknown or missing fields, both or neither of "
         "user_id and history), a history is longer than the bundle's max_len, holds no item id the bundle knows "
         "(without the popular fallback) or is sent to a bundle whose user tower is looked up by user id, or the "
         "bundle to swap to fails verification.",
    503: "No bundle is loaded yet (still loading, or loading failed).",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], fields: tuple[str, ...], required: list[str],
            one_of: tuple[str, str] | None = None) -> dict[str, Any]:
    assert tuple(properties) == fields, (tuple(properties), fields)  # the document names exactly the fields checked
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if one_of:  # exactly one of two alternative fields
        schema["oneOf"] = [{"required": [name]} for name in one_of]
    return schema


def _schemas(config: ServeConfig) -> dict[str, Any]:
    k = {"type": "integer", "minimum": 1, "maximum": config.max_k, "default": DEFAULT_K,
         "description": "Items to return; a JSON integer literal (not a boolean, not 10.0)."}
    exclude_seen = {"type": "boolean", "default": True, "description": "Leave out the user's training items (for a history: the history's items)."}
    version = {"type": "string", "minLength": 1, "maxLength": MAX_VERSION_LEN, "pattern": VERSION_PATTERN,
               "description": "Model version label: printable ASCII, no leading or trailing space."}
    strings = {"type": "array", "items": {"type": "string"}}
    history = {**strings, "description": "External item ids, oldest first: at most the bundle's user_tower.max_len "
                                         "(GET /metadata). Ids the bundle does not know are skipped and counted. "
                                         "Only a bundle with a history user tower reads one."}
    scores = {"type": "array", "items": {"type": "number"},
              "description": "Inner products (or popularity counts for the fallback), one per item."}
    recommendation = {
        "type": "object",
        "properties": {
            "user_id": {"type": "string"},
            "items": {**strings, "description": "Item ids, best first: min(k, available) of them."},
            "scores": scores,
            "fallback": {"type": "string", "enum": ["popular"],
                         "description": "Present when an unknown user got the most popular items."},
        },
        "required": ["user_id", "items", "scores"],
        "additionalProperties": False,
    }
    unknown_items = {"type": "integer", "minimum": 0, "description": "Item ids of the history the bundle does not "
                                                                     "know (skipped)."}
    history_recommendation = {
        "type": "object",
        "properties": {
            "items": {**strings, "description": "Item ids, best first, none of the history's: min(k, available)."},
            "scores": scores,
            "unknown_items": unknown_items,
            "fallback": {"type": "string", "enum": ["popular"],
                         "description": "Present when a history with no known item got the most popular items."},
        },
        "required": ["items", "scores", "unknown_items"],
        "additionalProperties": False,
    }
    return {
        "Error": {"type": "object", "properties": {"error": {"type": "string", "description": "One line."}},
                  "required": ["error"], "additionalProperties": False},
        "RecommendRequest": _object(
            {"user_id": {"type": "string", "description": "A training user of the bundle."}, "history": history,
             "k": k, "exclude_seen": exclude_seen}, RECOMMEND_FIELDS, [], ("user_id", "history")),
        "BatchEntry": _object(
            {"user_id": {"type": "string"}, "history": history}, BATCH_ENTRY_FIELDS, [], ("user_id", "history")),
        "BatchRequest": _object(
            {"user_ids": {**strings, "minItems": 1, "maxItems": config.max_batch},
             "requests": {"type": "array", "items": _ref("BatchEntry"),
                          "allOf": [{"minItems": 1, "maxItems": config.max_batch}],
                          "description": "User ids and histories mixed, answered in order (instead of user_ids)."},
             "k": k, "exclude_seen": exclude_seen},
            BATCH_FIELDS, [], ("user_ids", "requests")),
        "SwapRequest": _object(
            {"bundle": {"type": "string", "maxLength": MAX_PATH_LEN, "pattern": BUNDLE_PATH_PATTERN,
                        "description": "Absolute path of the bundle directory, as the server's machine sees it."},
             "version": {**version, "description": version["description"] + " Default: the manifest's MLflow model "
                                                                             "version, else sha256:<12 hex of manifest>."}},
            SWAP_FIELDS, ["bundle"]),
        "Recommendation": recommendation,
        "HistoryRecommendation": history_recommendation,
        "BatchEntryError": {
            "type": "object",
            "properties": {"user_id": {"type": "string"}, "error": {"type": "string"}, "status": {"enum": [404, 422]},
                           "unknown_items": unknown_items},
            "required": ["error", "status"],
            "description": "An unknown user id (404, with its user_id) or a history with no known item (422, with "
                           "unknown_items), without the popular fallback.",
            "additionalProperties": False,
        },
        "BatchResponse": {
            "type": "object",
            "properties": {"results": {"type": "array", "items": {"oneOf": [
                               _ref("Recommendation"), _ref("HistoryRecommendation"), _ref("BatchEntryError")]},
                                       "description": "One entry per requested user id or request, in order."}},
            "required": ["results"],
            "additionalProperties": False,
        },
        "SwapResponse": {
            "type": "object",
            "properties": {"version": version, "bundle": {"type": "string"}},
            "required": ["version", "bundle"],
            "additionalProperties": False,
        },
        "Status": {
            "type": "object",
            "properties": {"status": {"type": "string", "enum": ["ok", "ready", "loading", "failed"]},
                           "error": {"type": "string"}},
            "required": ["status"],
        },
        "Metadata": {
            "type": "object",
            "properties": {
                "model_version": version,
                "manifest_sha256": {"type": "string"},
                "format_version": {"type": "integer"},
                "dim": {"type": "integer"},
                "num_users": {"type": "integer"},
                "num_items": {"type": "integer"},
                "index": {"type": "object"},
                "user_tower": {"type": "object", "description": 'What the user vector is computed from: {"kind": "id"}'
                               ' (a user id) or {"kind": "history", "max_len": ..., "inputs": [...]}.'},
                "lineage": {"type": "object"},
                "serving": {
                    "type": "object",
                    "properties": {"max_k": {"const": config.max_k}, "max_batch": {"const": config.max_batch},
                                   "fallback": {"enum": [config.fallback]}},
                },
            },
            "required": ["model_version", "manifest_sha256", "num_users", "num_items", "serving"],
        },
    }


def _json(schema: str, description: str, versioned: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {"application/json": {"schema": _ref(schema)}}}
    if versioned:
        answer["headers"] = {"X-Model-Version": {"$ref": "#/components/headers/ModelVersion"}}
    return answer


def _json_one_of(schemas: list[str], description: str) -> dict[str, Any]:
    return {"description": description, "headers": {"X-Model-Version": {"$ref": "#/components/headers/ModelVersion"}},
            "content": {"application/json": {"schema": {"oneOf": [_ref(name) for name in schemas]}}}}


def _operation(summary: str, ok: dict[str, Any], errors: list[int], *, body: str | None = None,
               open_: bool = False, auth: bool = False) -> dict[str, Any]:
    codes = sorted(set(errors) | ({401} if auth and not open_ else set()))
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok}}
    for code in codes:
        op["responses"][str(code)] = _json("Error", _ERRORS[code], versioned=code in (404, 422))
        if code == 401:
            op["responses"]["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if open_ and auth:
        op["security"] = []
    return op


def build_openapi(config: ServeConfig, *, auth: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server with `config`; `auth`: a token is configured."""
    body_errors = [400, 408, 413, 422]
    paths = {
        "/recommend": {"post": _operation(
            "Top-k items for one user, or for a history of items (a history user tower).",
            _json_one_of(["Recommendation", "HistoryRecommendation"], "Recommendations, best first."),
            [*body_errors, 404, 503], body="RecommendRequest", auth=auth)},
        "/recommend/batch": {"post": _operation(
            "Top-k items for each of up to max_batch users or histories; an unknown user or a history with no "
            "known item fails its entry, not the batch.",
            _json("BatchResponse", "One entry per user id, all from the same model version.", True),
            [*body_errors, 503], body="BatchRequest", auth=auth)},
        "/healthz": {"get": _operation("Liveness: 200 while the process runs.", _json("Status", "Alive."), [],
                                       open_=True, auth=auth)},
        "/readyz": {"get": _operation("Readiness: 200 once a bundle is loaded and verified.",
                                      _json("Status", "Ready."), [], open_=True, auth=auth)},
        "/metadata": {"get": _operation("The served bundle's public manifest, model version and limits.",
                                        _json("Metadata", "Metadata of the bundle being served.", True), [503], auth=auth)},
        "/metrics": {"get": _operation("Prometheus text exposition of all workers.", {
            "description": "Prometheus text format 0.0.4.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}, [], auth=auth)},
        "/openapi.json": {"get": _operation("This document.", {
            "description": "OpenAPI 3.1 document.", "content": {"application/json": {"schema": {"type": "object"}}}},
            [], auth=auth)},
        "/admin/swap": {"post": _operation(
            "Verify a bundle in this worker, then have every worker swap to it through the control file.",
            _json("SwapResponse", "Swapped: this worker serves it now, the others within the poll interval.", True),
            [*body_errors] + ([] if auth else [403]), body="SwapRequest", auth=auth)},
    }
    paths["/readyz"]["get"]["responses"]["503"] = _json("Status", _ERRORS[503])
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "compress-recsys serving API",
            "version": API_VERSION,
            "description": f"Recommendations from an ONNX + FAISS bundle. Request bodies over {config.max_body_bytes} "
                           "bytes are refused with 413, a method a path does not list with 405 (and an Allow "
                           "header), an unknown path with 404; every error body is {\"error\": \"<one line>\"}.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(config),
            "headers": {"ModelVersion": {"description": "Version label of the bundle that produced this answer.",
                                         "schema": {"type": "string"}}},
        },
    }
    if auth:
        doc["components"]["securitySchemes"] = {SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{SECURITY_SCHEME: []}]
    return doc
