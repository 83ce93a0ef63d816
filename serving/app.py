"""HTTP serving of one bundle: a plain ASGI application (run by `serving.server.serve()` on uvicorn).

Endpoints (JSON unless noted; every error is `{"error": "<one line>"}` with the status below):

    POST /recommend        {"user_id": "u1", "k": 10, "exclude_seen": true}
                           -> 200 {"user_id": "u1", "items": [...], "scores": [...]}, best first,
                              exactly min(k, available) items; unknown user -> 404, or with
                              fallback="popular" 200 with the most popular items and "fallback": "popular"
                           {"history": ["i1", "i2", ...], "k": 10, "exclude_seen": true}  (history tower)
                           -> 200 {"items": [...], "scores": [...], "unknown_items": n}: the user vector
                              computed from the history's known items (oldest first, at most the bundle's
                              max_len; unknown ids skipped and counted), the history's items left out; no
                              known item -> 422, or with fallback="popular" the most popular items
    POST /recommend/batch  {"user_ids": ["u1", ...], "k": 10, "exclude_seen": true}, or
                           {"requests": [{"user_id": "u1"}, {"history": [...]}, ...], "k": 10, ...}
                           -> 200 {"results": [one entry per user id / request, in order]}; an unknown
                              user's entry is {"user_id": ..., "error": "unknown user id", "status": 404},
                              a history with no known item's {"error": ..., "status": 422, "unknown_items": n}
                              (or a fallback answer), and neither fails the batch
    GET  /healthz          200 while the process runs
    GET  /readyz           200 once the bundle is loaded and verified, 503 before (or if loading failed)
    GET  /metadata         the manifest's public part (lineage, dim, counts, index type and recall) and
                           "model_version"
    GET  /metrics          Prometheus text: requests by endpoint and status, latency histogram, in flight,
                           swaps, auth failures, fallbacks, the model versions served
    GET  /openapi.json     the OpenAPI 3.1 document of all of this (`serving.openapi`)
    POST /admin/swap       {"bundle": "/abs/dir", "version": "label"} -> 200 {"version": ..., "bundle": ...}:
                           verify the bundle in this worker (422 if it fails), then write the control file
                           so every worker swaps to it (`serving.swap`); 403 when no token is configured

Authentication (`serving.auth`): with a token configured, every endpoint but /healthz and /readyz needs
`Authorization: Bearer <token>`, else 401 with `WWW-Authenticate: Bearer`. Every authorized response
while a bundle is loaded carries `X-Model-Version: <label>`: the version that produced the answer.

Status codes: 400 malformed JSON, 401 missing or wrong token, 403 swap without a configured token,
404 unknown user or path, 405 wrong method, 408 body not received within `body_timeout_s`, 413 body
over `max_body_bytes` (refused from Content-Length before reading, or as soon as a streamed body
passes the limit), 422 schema violations (see `serving.schema`) or a swap bundle that fails
verification, 503 before the bundle is ready. User and item ids are looked up in the bundle's id
maps, so only valid indices ever reach ONNX Runtime. For a history tower a user id request is answered
from the user's stored history (its training items, the last max_len of them); an ID tower given a
history answers 422 (`serving.schema.ID_TOWER`).

Why a plain ASGI callable and not FastAPI: the recommender and uvicorn take a fixed share of each
request, so the framework is the one part of the latency budget this layer controls, and FastAPI +
pydantic over the same Recommender costs clearly more server CPU per request and answers fewer
requests/s (`benchmarks/loadtest.py --compare-fastapi`; numbers in docs/benchmarks.md). `serving.schema`
implements the same rules by hand (strict types, bounds, unknown fields refused).

Threads: each worker process computes on its event-loop thread with one ONNX Runtime intra-op
thread and one FAISS/OpenMP thread; single requests are answered inline (they are short), batches
in chunks with a yield to the event loop between chunks, so one big batch cannot starve `/healthz`
or other clients. The bundle is loaded on a background thread after startup, so `/healthz` answers
at once and `/readyz` says 503 until the bundle is ready; later bundles are opened off the event loop
too (`serving.swap.BundleSlot`), and each request keeps the `LoadedBundle` it started with.

This module imports numpy, faiss, orjson and onnxruntime (via serving.bundle) only: never torch
or `compressor`. `serve` and `main` are re-exported from `serving.server`.
"""


from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Awaitable, Callable

import faiss
import numpy as np

from serving.auth import OPEN_PATHS, authorized, worker_token
from serving.bundle import BundleError
from serving.config import CONFIG_ENV, DEFAULT_MAX_BODY_BYTES, FALLBACKS, ServeConfig
from serving.loaded import LoadedBundle, dumps, public_metadata
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import Metrics, endpoint_label
from serving.openapi import build_openapi
from serving.schema import ApiError, batch_request, parse_json, recommend_request, short, swap_request
from serving.server import main, serve
from serving.swap import BundleSlot, Target, write_control

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
Answer = tuple[int, bytes, bytes]
UNAUTHORIZED = "unauthorized: send a valid Authorization: Bearer header"


class _Reply:
    """Per request: the bundle version that answered it (set when a handler takes the current bundle)."""

    __slots__ = ("version",)

    def __init__(self) -> None:
        self.version: bytes | None = None


class App:
    """The ASGI application (HTTP and lifespan scopes)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._token = worker_token(config)  # fails closed: a configured token that cannot be read stops the worker
        self.metrics = Metrics(config.metrics_dir)
        self.slot = BundleSlot(config, self.metrics)
        self._openapi = dumps(build_openapi(config, auth=self._token is not None))
        self._routes: dict[str, tuple[str, Callable[..., Awaitable[Answer]]]] = {
            "/recommend": ("POST", self._recommend),
            "/recommend/batch": ("POST", self._recommend_batch),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/metadata": ("GET", self._metadata),
            "/metrics": ("GET", self._metrics),
            "/openapi.json": ("GET", self._openapi_json),
            "/admin/swap": ("POST", self._admin_swap),
        }

    # ------------------------------------------------------------------ lifecycle
    def start_loading(self) -> None:
        """Open the bundle on a background thread, then watch the control file (idempotent)."""
        # OpenMP thread counts are per calling thread: pin the one that runs FAISS searches.
        faiss.omp_set_num_threads(1)
        self.slot.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.slot.wait_loaded(timeout)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start_loading()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.slot.stop()
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
        reply = _Reply()
        allowed = True
        try:
            # Before routing: a client without the token learns nothing, not even which paths exist.
            if self._token is not None and path not in OPEN_PATHS and not authorized(scope["headers"], self._token):
                allowed = False
                metrics.auth_failed()
                raise ApiError(401, UNAUTHORIZED, ((b"www-authenticate", b"Bearer"),))
            route = self._routes.get(path)
            if route is None:
                raise ApiError(404, f"no such endpoint {short(path)}; see /openapi.json")
            method, handler = route
            got = scope["method"]
            if got != method and not (got == "HEAD" and method == "GET"):
                raise ApiError(405, f"{path} accepts {method} only, got {short(got)}", ((b"allow", method.encode()),))
            status, body, content_type = await handler(scope, receive, reply)
        except ApiError as exc:
            status, body, content_type = exc.status, dumps({"error": exc.message}), JSON_TYPE
            headers.extend(exc.headers)
        except _ClientGone:
            metrics.request_finished(endpoint_label(path), 499, time.perf_counter() - started)
            return
        except Exception:
            logger.exception("unhandled error answering %s %s", scope.get("method"), path)
            status, body, content_type = 500, dumps({"error": "internal server error"}), JSON_TYPE
        version = reply.version
        # The open probes name no version when a token guards everything else.
        named = allowed and (self._token is None or path not in OPEN_PATHS)
        if version is None and named and (current := self.slot.current) is not None:
            version = current.version_header
        if version is not None:
            headers.append((b"x-model-version", version))
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

    def _ready(self, reply: _Reply) -> LoadedBundle:
        """The bundle this request will use from start to end (a swap meanwhile does not change it)."""
        loaded = self.slot.current
        if loaded is None:
            if self.slot.load_error is not None:
                raise ApiError(503, f"bundle failed to load: {self.slot.load_error}")
            raise ApiError(503, "not ready: the bundle is still loading")
        reply.version = loaded.version_header
        return loaded

    # ------------------------------------------------------------------- handlers
    async def _recommend(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        body = await self._body(scope, receive)
        loaded = self._ready(reply)
        req = recommend_request(parse_json(body), self.config.max_k, loaded.max_history)
        if req.history is not None:
            [entry] = loaded.history_answers([req.history], req.k, req.exclude_seen)
            self._count_histories([entry])
            if "error" in entry:
                raise ApiError(422, entry["error"])
            return 200, dumps(entry), JSON_TYPE
        user = loaded.user_index.get(req.user_id)
        if user is None:
            if self.config.fallback != "popular":
                self.metrics.users("unknown")
                raise ApiError(404, f"unknown user id {short(req.user_id)}")
            self.metrics.users("fallback")
            items, scores = loaded.popular(req.k)
            return 200, dumps({"user_id": req.user_id, "items": items, "scores": scores, "fallback": "popular"}), JSON_TYPE
        [(items, scores)] = loaded.recommender.recommend(np.array([user], dtype=np.int64), req.k, req.exclude_seen)
        self.metrics.users("ok")
        ids, values = loaded.answer(items, scores)
        return 200, dumps({"user_id": req.user_id, "items": ids, "scores": values}), JSON_TYPE

    async def _recommend_batch(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        body = await self._body(scope, receive)
        loaded = self._ready(reply)
        req = batch_request(parse_json(body), self.config.max_k, self.config.max_batch, loaded.max_history)
        lookup = loaded.user_index
        results: list[dict[str, Any]] = [{}] * len(req.user_ids)
        rows: list[int] = []
        users: list[int] = []
        unknown = 0
        for row, uid in enumerate(req.user_ids):
            if uid is None:  # a history entry: answered below
                continue
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
        history_rows = [row for row, h in enumerate(req.histories or ()) if h is not None]
        for start in range(0, len(history_rows), BATCH_CHUNK):
            if start or users:
                await asyncio.sleep(0)
            part = history_rows[start : start + BATCH_CHUNK]
            entries = loaded.history_answers([req.histories[row] for row in part], req.k, req.exclude_seen)
            self._count_histories(entries)
            for row, entry in zip(part, entries):
                results[row] = entry
        return 200, dumps({"results": results}), JSON_TYPE

    def _count_histories(self, entries: list[dict[str, Any]]) -> None:
        """User outcomes of history answers: served, fallback, or refused (no known item)."""
        for entry in entries:
            self.metrics.users("unknown" if "error" in entry else "fallback" if "fallback" in entry else "ok")

    async def _healthz(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        return 200, b'{"status":"ok"}', JSON_TYPE

    async def _readyz(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        if self.slot.current is not None:
            return 200, b'{"status":"ready"}', JSON_TYPE
        if self.slot.load_error is not None:
            # Open to everyone: with a token configured the reason (it names paths) is only in the server's log.
            detail = {} if self._token is not None else {"error": self.slot.load_error}
            return 503, dumps({"status": "failed", **detail}), JSON_TYPE
        return 503, b'{"status":"loading"}', JSON_TYPE

    async def _metadata(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        return 200, self._ready(reply).metadata, JSON_TYPE

    async def _metrics(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        return 200, self.metrics.render().encode(), METRICS_CONTENT_TYPE.encode()

    async def _openapi_json(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        return 200, self._openapi, JSON_TYPE

    async def _admin_swap(self, scope: dict, receive: Callable, reply: _Reply) -> Answer:
        """Verify the bundle here (off the event loop), publish it in the control file, serve it here."""
        if self._token is None:
            raise ApiError(403, "POST /admin/swap needs the server started with --token-file (or COMPRESS_SERVE_TOKEN)")
        if self.config.admin_swap_owner:
            raise ApiError(409, f"POST /admin/swap is off: {self.config.admin_swap_owner} chooses what this server "
                                "serves")
        body = await self._body(scope, receive)
        req = swap_request(parse_json(body))
        target = Target(os.path.normpath(req.bundle), req.version)
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, self.slot.open, target)
        except (BundleError, OSError) as exc:
            message = " ".join(str(exc).split())[:300]
            if not message.startswith(target.bundle):
                message = f"{target.bundle}: {message}"
            self.slot.failed(f"POST /admin/swap: {message}")
            raise ApiError(422, f"bundle refused: {message}") from None
        if self.config.control_file:
            # The control file names the resolved label, so every worker serves the same one.
            write_control(self.config.control_file, Target(loaded.path, loaded.version, loaded.manifest_sha256))
        self.slot.install(loaded, swap=True)
        reply.version = loaded.version_header
        logger.info("worker %d swapped to version %s (%s) on request", os.getpid(), loaded.version, loaded.path)
        return 200, dumps({"version": loaded.version, "bundle": loaded.path}), JSON_TYPE


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
    token_file: str | None = None,
    control_file: str | None = None,
    swap_poll_s: float = 1.0,
    model_version: str | None = None,
) -> App:
    """The ASGI app for one bundle. It loads the bundle when the server sends lifespan startup
    (or when `start_loading()` is called); until then `/readyz` and the API answer 503."""
    return App(
        ServeConfig(
            bundle_path=str(bundle_path), max_k=max_k, max_batch=max_batch, fallback=fallback,
            max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s, metrics_dir=metrics_dir,
            load_delay_s=load_delay_s, token_file=token_file, control_file=control_file, swap_poll_s=swap_poll_s,
            model_version=model_version,
        )
    )


def app_from_env() -> App:
    """uvicorn factory for worker processes: the config comes from serve() through the environment."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set; start the server with serving.app.serve()")
    return App(ServeConfig(**json.loads(raw)))
