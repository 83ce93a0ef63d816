"""HTTP serving of one bundle: a plain ASGI application (run by `serving.server.serve()` on uvicorn).

Endpoints (JSON unless noted; every error is `{"error": "<one line>"}` with the status below):

    POST /recommend        {"user_id": "u1", "k": 10, "exclude_seen": true}
                           -> 200 {"user_id": "u1", "items": [...], "scores": [...]}, best first,
                              exactly min(k, available) items; unknown user -> 404, or with
                              fallback="popular" 200 with the most popular items and "fallback": "popular"
    POST /recommend/batch  {"user_ids": ["u1", ...], "k": 10, "exclude_seen": true}
                           -> 200 {"results": [one entry per user id, in order]}; an unknown user's
                              entry is {"user_id": ..., "error": "unknown user id", "status": 404}
                              (or a fallback answer) and does not fail the batch
    GET  /healthz          200 while the process runs
    GET  /readyz           200 once the bundle is loaded and verified, 503 before (or if loading failed)
    GET  /metadata         the manifest's public part (lineage, dim, counts, index type and recall)
    GET  /metrics          Prometheus text: requests by endpoint and status, latency histogram, in flight

Status codes: 400 malformed JSON, 404 unknown user or path, 405 wrong method, 408 body not
received within `body_timeout_s`, 413 body over `max_body_bytes` (refused from Content-Length before
reading, or as soon as a streamed body passes the limit), 422 schema violations (see
`serving.schema`), 503 before the bundle is ready. User ids are looked up in the bundle's id map,
so only valid indices ever reach ONNX Runtime.

Why a plain ASGI callable and not FastAPI: the recommender and uvicorn take a fixed share of each
request, so the framework is the one part of the latency budget this layer controls, and FastAPI +
pydantic over the same Recommender costs clearly more server CPU per request and answers fewer
requests/s (`benchmarks/loadtest.py --compare-fastapi`; numbers in docs/benchmarks.md). `serving.schema`
implements the same rules by hand (strict types, bounds, unknown fields refused).

Threads: each worker process computes on its event-loop thread with one ONNX Runtime intra-op
thread and one FAISS/OpenMP thread; single requests are answered inline (they are short), batches
in chunks with a yield to the event loop between chunks, so one big batch cannot starve `/healthz`
or other clients. The bundle is loaded on a background thread after startup, so `/healthz` answers
at once and `/readyz` says 503 until the bundle is ready.

This module imports numpy, faiss, orjson and onnxruntime (via serving.bundle) only: never torch
or `compressor`. `serve` and `main` are re-exported from `serving.server`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Awaitable, Callable

import faiss
import numpy as np
import orjson

from serving.bundle import BundleError, open_bundle
from serving.bundle_format import MANIFEST_FILE
from serving.config import CONFIG_ENV, DEFAULT_MAX_BODY_BYTES, FALLBACKS, ServeConfig
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import Metrics, endpoint_label
from serving.recommender import Recommender
from serving.schema import ApiError, batch_request, parse_json, recommend_request, short
from serving.server import main, serve

__all__ = [
    "App",
    "CONFIG_ENV",
    "DEFAULT_MAX_BODY_BYTES",
    "FALLBACKS",
    "ServeConfig",
    "app_from_env",
    "create_app",
    "main",
    "public_metadata",
    "serve",
]

logger = logging.getLogger(__name__)

# Users answered per recommender call in a batch; the event loop gets a turn between chunks.
# Users are sorted by history length first, so each chunk's FAISS over-fetch (k + seen) fits its users.
BATCH_CHUNK = 32

JSON_TYPE = b"application/json"
Headers = list[tuple[bytes, bytes]]


def public_metadata(manifest: dict[str, Any], manifest_sha256: str, config: ServeConfig) -> dict[str, Any]:
    """The manifest minus file hashes and local paths, plus this server's limits."""
    index = manifest.get("index", {})
    lineage = {k: v for k, v in (manifest.get("lineage") or {}).items() if not k.endswith("_path")}
    return {
        "format_version": manifest.get("format_version"),
        "manifest_sha256": manifest_sha256,
        "created_at": manifest.get("created_at"),
        "dim": manifest.get("dim"),
        "metric": manifest.get("metric"),
        "num_users": manifest.get("num_users"),
        "num_items": manifest.get("num_items"),
        "index": {
            key: index.get(key)
            for key in ("factory", "requested", "exact", "query_transform", "search_params", "recall_at_k", "k")
        },
        "lineage": lineage,
        "metrics": manifest.get("metrics"),
        "versions": manifest.get("versions"),
        "serving": {"max_k": config.max_k, "max_batch": config.max_batch, "fallback": config.fallback},
    }


def _dumps(payload: Any) -> bytes:
    """Compact JSON. orjson writes numpy float32 arrays directly (shortest round-trip digits), much faster than
    the json module on a batch answer; json takes what orjson refuses (strings with lone surrogates,
    which a client can send as \\ud800 escapes and expects echoed back)."""
    try:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        return json.dumps(_plain(payload), separators=(",", ":")).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class _Loaded:
    """What the request handlers need once the bundle is open."""

    def __init__(self, recommender: Recommender, config: ServeConfig) -> None:
        bundle = recommender.bundle
        self.recommender = recommender
        self.user_index = bundle.user_index
        self.item_ids = bundle.item_ids
        self.seen_len = np.diff(bundle.seen_indptr)
        digest = hashlib.sha256((bundle.path / MANIFEST_FILE).read_bytes()).hexdigest()
        self.metadata = _dumps(public_metadata(bundle.manifest, digest, config))
        self._popular: dict[int, tuple[list[str], np.ndarray]] = {}

    def answer(self, items: np.ndarray, scores: np.ndarray) -> tuple[list[str], np.ndarray]:
        return self.item_ids[items].tolist(), scores

    def popular(self, k: int) -> tuple[list[str], np.ndarray]:
        """The fallback for unknown users (no history to exclude); cached per k."""
        hit = self._popular.get(k)
        if hit is None:
            if len(self._popular) > 64:
                self._popular.clear()
            hit = self._popular[k] = self.answer(*self.recommender.popular(k))
        return hit


class App:
    """The ASGI application (HTTP and lifespan scopes)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics(config.metrics_dir)
        self._loaded: _Loaded | None = None
        self._load_error: str | None = None
        self._loader: threading.Thread | None = None
        self._routes: dict[str, tuple[str, Callable[..., Awaitable[tuple[int, bytes, bytes]]]]] = {
            "/recommend": ("POST", self._recommend),
            "/recommend/batch": ("POST", self._recommend_batch),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metadata": ("GET", self._metadata),
            "/metrics": ("GET", self._metrics),
        }

    # ------------------------------------------------------------------ lifecycle
    def start_loading(self) -> None:
        """Open the bundle on a background thread (idempotent)."""
        if self._loader is not None:
            return
        # OpenMP thread counts are per calling thread: pin the one that runs FAISS searches.
        faiss.omp_set_num_threads(1)
        self._loader = threading.Thread(target=self._load, name="bundle-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            if self.config.load_delay_s:
                time.sleep(self.config.load_delay_s)
            started = time.perf_counter()
            bundle = open_bundle(self.config.bundle_path, intra_op_num_threads=1, faiss_threads=1)
            loaded = _Loaded(Recommender(bundle), self.config)
        except BundleError as exc:
            self._load_error = str(exc)
            logger.error("bundle %s failed verification: %s", self.config.bundle_path, exc)
            return
        except Exception as exc:  # anything else is a bug or an I/O failure: stay unready, say why
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading bundle %s failed", self.config.bundle_path)
            return
        self._loaded = loaded
        self.metrics.set_ready(True)
        logger.info(
            "worker %d ready in %.2f s: %d users, %d items, index %s",
            os.getpid(), time.perf_counter() - started, bundle.num_users, bundle.num_items,
            bundle.manifest["index"].get("factory"),
        )

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self._loaded is not None

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start_loading()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.metrics.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ----------------------------------------------------------------------- ASGI
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # uvicorn runs with ws="none"; refuse politely if hosted elsewhere
            await send({"type": "websocket.close", "code": 1003})

    async def _http(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = time.perf_counter()
        path = scope["path"]
        metrics = self.metrics
        metrics.request_started()
        headers: Headers = []
        try:
            route = self._routes.get(path)
            if route is None:
                raise ApiError(404, f"no such endpoint {short(path)}; see /metadata, /recommend, /recommend/batch")
            method, handler = route
            got = scope["method"]
            if got != method and not (got == "HEAD" and method == "GET"):
                raise ApiError(405, f"{path} accepts {method} only, got {short(got)}", ((b"allow", method.encode()),))
            status, body, content_type = await handler(scope, receive)
        except ApiError as exc:
            status, body, content_type = exc.status, _dumps({"error": exc.message}), JSON_TYPE
            headers.extend(exc.headers)
        except _ClientGone:
            metrics.request_finished(endpoint_label(path), 499, time.perf_counter() - started)
            return
        except Exception:
            logger.exception("unhandled error answering %s %s", scope.get("method"), path)
            status, body, content_type = 500, _dumps({"error": "internal server error"}), JSON_TYPE
        headers.append((b"content-type", content_type))
        headers.append((b"content-length", str(len(body)).encode()))
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            metrics.request_finished(endpoint_label(path), status, time.perf_counter() - started)

    async def _body(self, scope: dict, receive: Callable) -> bytes:
        """The request body, refusing more than max_body_bytes without reading past the limit."""
        limit = self.config.max_body_bytes
        close = ((b"connection", b"close"),)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    raise ApiError(400, "invalid Content-Length header", close)
                if int(value) > limit:
                    raise ApiError(413, f"request body of {int(value)} bytes exceeds the limit of {limit} bytes", close)
                break
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"request body exceeds the limit of {limit} bytes", close)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.config.body_timeout_s:g} s", close) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _ready(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            if self._load_error is not None:
                raise ApiError(503, f"bundle failed to load: {self._load_error}")
            raise ApiError(503, "not ready: the bundle is still loading")
        return loaded

    # ------------------------------------------------------------------- handlers
    async def _recommend(self, scope: dict, receive: Callable) -> tuple[int, bytes, bytes]:
        body = await self._body(scope, receive)
        loaded = self._ready()
        req = recommend_request(parse_json(body), self.config.max_k)
        user = loaded.user_index.get(req.user_id)
        if user is None:
            if self.config.fallback != "popular":
                self.metrics.users("unknown")
                raise ApiError(404, f"unknown user id {short(req.user_id)}")
            self.metrics.users("fallback")
            items, scores = loaded.popular(req.k)
            return 200, _dumps({"user_id": req.user_id, "items": items, "scores": scores, "fallback": "popular"}), JSON_TYPE
        [(items, scores)] = loaded.recommender.recommend(np.array([user], dtype=np.int64), req.k, req.exclude_seen)
        self.metrics.users("ok")
        ids, values = loaded.answer(items, scores)
        return 200, _dumps({"user_id": req.user_id, "items": ids, "scores": values}), JSON_TYPE

    async def _recommend_batch(self, scope: dict, receive: Callable) -> tuple[int, bytes, bytes]:
        body = await self._body(scope, receive)
        loaded = self._ready()
        req = batch_request(parse_json(body), self.config.max_k, self.config.max_batch)
        lookup = loaded.user_index
        results: list[dict[str, Any]] = [{}] * len(req.user_ids)
        rows: list[int] = []
        users: list[int] = []
        unknown = 0
        for row, uid in enumerate(req.user_ids):
            user = lookup.get(uid)
            if user is None:
                unknown += 1
                if self.config.fallback == "popular":
                    items, scores = loaded.popular(req.k)
                    results[row] = {"user_id": uid, "items": items, "scores": scores, "fallback": "popular"}
                else:
                    results[row] = {"user_id": uid, "error": "unknown user id", "status": 404}
            else:
                rows.append(row)
                users.append(user)
        if users:
            known = np.array(users, dtype=np.int64)
            # Similar history lengths per chunk: the over-fetch is sized for the chunk's largest.
            order = np.argsort(loaded.seen_len[known], kind="stable") if req.exclude_seen else np.arange(known.size)
            for start in range(0, order.size, BATCH_CHUNK):
                if start:
                    await asyncio.sleep(0)  # let other requests in between chunks
                part = order[start : start + BATCH_CHUNK]
                answers = loaded.recommender.recommend(known[part], req.k, req.exclude_seen)
                for pos, (items, scores) in zip(part.tolist(), answers):
                    ids, values = loaded.answer(items, scores)
                    row = rows[pos]
                    results[row] = {"user_id": req.user_ids[row], "items": ids, "scores": values}
            self.metrics.users("ok", len(users))
        if unknown:
            self.metrics.users("fallback" if self.config.fallback == "popular" else "unknown", unknown)
        return 200, _dumps({"results": results}), JSON_TYPE

    async def _healthz(self, scope: dict, receive: Callable) -> tuple[int, bytes, bytes]:
        return 200, b'{"status":"ok"}', JSON_TYPE

    async def _readyz(self, scope: dict, receive: Callable) -> tuple[int, bytes, bytes]:
        if self._loaded is not None:
            return 200, b'{"status":"ready"}', JSON_TYPE
        if self._load_error is not None:
            return 503, _dumps({"status": "failed", "error": self._load_error}), JSON_TYPE
        return 503, b'{"status":"loading"}', JSON_TYPE

    async def _metadata(self, scope: dict, receive: Callable) -> tuple[int, bytes, bytes]:
        return 200, self._ready().metadata, JSON_TYPE

    async def _metrics(self, scope: dict, receive: Callable) -> tuple[int, bytes, bytes]:
        return 200, self.metrics.render().encode(), METRICS_CONTENT_TYPE.encode()


class _ClientGone(Exception):
    """The client disconnected before sending its whole body: nothing to answer."""


def create_app(
    bundle_path: str | os.PathLike,
    *,
    max_k: int = 1000,
    max_batch: int = 1024,
    fallback: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = 10.0,
    metrics_dir: str | None = None,
    load_delay_s: float = 0.0,
) -> App:
    """The ASGI app for one bundle. It loads the bundle when the server sends lifespan startup
    (or when `start_loading()` is called); until then `/readyz` and the API answer 503."""
    return App(
        ServeConfig(
            bundle_path=str(bundle_path), max_k=max_k, max_batch=max_batch, fallback=fallback,
            max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s, metrics_dir=metrics_dir,
            load_delay_s=load_delay_s,
        )
    )


def app_from_env() -> App:
    """uvicorn factory for worker processes: the config comes from serve() through the environment."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with serving.app.serve()")
    return App(ServeConfig(**json.loads(raw)))
