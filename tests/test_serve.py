"""`compress serve` / `python -m serving`: the real server, in a subprocess on a free loopback port.

Three servers: the API server (`compress serve`, 2 workers) over a random-vector bundle whose seen
lists include extreme users; a `python -m serving --fallback popular` server that waits before loading
(so 503-before-ready is observable); and `compress serve models:/...` over a checkpoint trained for 2
epochs on the test slice, registered in a file-backed MLflow registry and exported with `compress export`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from export.bundle import topk_mismatch, write_bundle
from serving.app import create_app

from .conftest import TINY_TRAIN, Server, brute_force_topk, free_port, run_cli

U, I, D = 300, 2000, 16
MOSTLY_SEEN, NOTHING_SEEN, HEAVY = 0, 1, 2  # 3 unseen items / no history / 1,500 seen (the exact-scoring path)
MAX_K, MAX_BATCH = 50, 8
MAX_BODY = 600_000
ERROR_STATUSES = {400, 404, 405, 413, 422, 503}


# ------------------------------------------------------------------------------------------- helpers
def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, checking the format line by line."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed.add(name)
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]\w*="[^"\\\n]*",?)*\})? (-?[0-9.e+-]+|\+Inf)', line)
        assert m, f"not a Prometheus sample line: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", m[1]) if m[1] not in typed else m[1]
        assert family in typed, f"{m[1]} has no # TYPE line"
        samples[m[1] + (m[2] or "")] = float(m[3])
    return samples


def make_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 40, U)
    lens[MOSTLY_SEEN], lens[NOTHING_SEEN], lens[HEAVY] = I - 3, 0, 1500
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return {
        "user_vectors": rng.standard_normal((U, D)).astype(np.float32),
        "item_vectors": (rng.standard_normal((I, D)) * rng.lognormal(0.0, 0.5, (I, 1))).astype(np.float32),
        "user_ids": np.array([f"user-{i}" for i in range(U)]),
        "item_ids": np.array([f"item-{i}" for i in range(I)]),
        "seen_indptr": indptr,
        "seen_indices": np.concatenate([rng.choice(I, n, replace=False) for n in lens]).astype(np.int64),
    }


def seen_of(data: dict, user: int) -> np.ndarray:
    return data["seen_indices"][data["seen_indptr"][user] : data["seen_indptr"][user + 1]]


def item_index(names: list[str]) -> np.ndarray:
    return np.array([int(n.rsplit("-", 1)[1]) for n in names], dtype=np.int64)


def assert_error(resp: httpx.Response, status: int, needle: str = "") -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert needle.lower() in body["error"].lower(), body


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data() -> dict:
    return make_data()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("serve") / "bundle"
    write_bundle(out, **data, index_factory="Flat", lineage={"checkpoint_fingerprint": "test", "checkpoint_path": "/x"},
                 metrics={"ndcg@20": 0.1}, package_version="0.0.test")
    return out


@pytest.fixture(scope="module")
def api(bundle, tmp_path_factory):
    """`compress serve` with 2 workers, waited on until both workers report ready."""
    log = tmp_path_factory.mktemp("api") / "server.log"
    server = Server(["-m", "compress_app", "serve", bundle, "--workers", 2, "--max-k", MAX_K,
                     "--max-batch", MAX_BATCH, "--max-body-bytes", MAX_BODY], log)
    try:
        server.wait("/readyz")
        deadline = time.monotonic() + 60
        while metric_samples(server.http.get("/metrics").text).get("compress_workers_ready") != 2:
            assert time.monotonic() < deadline, "both workers never became ready"
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, slice_data):
    """A 2-epoch MF on the test slice, registered as models:/rec-serve@champion (the registered model is its
    serving bundle), and exported again from that URI with `compress export`."""
    root = tmp_path_factory.mktemp("trained")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "COMPRESS_CACHE_DIR": str(root / "cache")}
    run, bundle = root / "run", root / "bundle"
    train = ["train", "--out", run, "--set", f"data.path={slice_data}", "--set", "model.dim=16", "--epochs", 2,
             "--set", "train.lr=0.01", *TINY_TRAIN]
    uri = "models:/rec-serve@champion"
    run_cli(*train, "--register", "rec-serve", "--alias", "champion", cwd=root,  # cwd: MLflow writes ./mlruns
            env={**env, "COMPRESS_NO_MLFLOW": "0"})
    run_cli("export", uri, "--out", bundle, cwd=root, env=env)
    return {"root": root, "env": env, "run": run, "bundle": bundle, "uri": uri}


# -------------------------------------------------------------------------------- export CLI, refusal
def test_export_cli_verify_and_one_line_errors(trained, bundle, tmp_path):
    ok = run_cli("export", "--verify", trained["bundle"])
    assert ok.stdout.strip().splitlines()[-1].startswith("ok: ") and "sha256" in ok.stdout
    again = run_cli("export", trained["run"], "--out", trained["bundle"], check=False)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "not empty" in last and again.stderr.count("Error") == 1
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "seen.npz").write_bytes(b"\0" * (bad / "seen.npz").stat().st_size)
    p = run_cli("export", "--verify", bad, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"Error: {bad}: seen.npz: sha256 does not match manifest (file modified)"
    usage = run_cli("export", trained["run"], check=False)
    assert usage.returncode == 2 and "--out" in usage.stderr


def test_refuses_to_start_on_a_corrupt_bundle_before_binding(bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    blob = bytearray((bad / "items.faiss").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "items.faiss").write_bytes(bytes(blob))
    port = free_port()
    p = run_cli("serve", bad, "--port", port, check=False, timeout=60)  # refused before binding, within the timeout
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == f"Error: {bad}: items.faiss: sha256 does not match manifest (file modified)"
    assert "Uvicorn running" not in p.stderr and "Traceback" not in p.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # never bound, so free
    missing = run_cli("serve", tmp_path / "nope", "--port", port, check=False, timeout=60)
    assert missing.returncode == 1 and "bundle directory does not exist" in missing.stderr


# ------------------------------------------------------------------------------------------ the API
def test_health_metadata_and_no_torch(api, bundle):
    assert api.http.get("/healthz").json() == {"status": "ok"}
    assert api.http.get("/readyz").json() == {"status": "ready"}
    meta = api.http.get("/metadata").json()
    assert (meta["num_users"], meta["num_items"], meta["dim"]) == (U, I, D)
    assert meta["index"]["factory"] == "Flat" and meta["index"]["exact"] and meta["index"]["recall_at_k"] == 1.0
    assert meta["lineage"] == {"checkpoint_fingerprint": "test"}  # local paths are not published
    assert meta["metrics"] == {"ndcg@20": 0.1} and "files" not in meta
    assert meta["serving"] == {"max_k": MAX_K, "max_batch": MAX_BATCH, "fallback": None}
    assert api.http.head("/healthz").status_code == 200
    # The serving processes (the exec'd `compress serve` and its workers) never load torch or compressor.
    psutil = pytest.importorskip("psutil")
    procs = [psutil.Process(api.proc.pid), *psutil.Process(api.proc.pid).children(recursive=True)]
    assert len(procs) >= 3
    for proc in procs:
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "torch" not in maps, f"process {proc.pid} {proc.cmdline()} mapped torch"
        assert "compress_app" not in " ".join(proc.cmdline())


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommend_exact_against_brute_force_topk(api, data, exclude_seen):
    users = [MOSTLY_SEEN, NOTHING_SEEN, HEAVY, *np.random.default_rng(1).choice(np.arange(3, U), 12, replace=False)]
    for user in users:
        seen = seen_of(data, user) if exclude_seen else None
        for k in (1, 10, MAX_K):
            r = api.http.post("/recommend", json={"user_id": f"user-{user}", "k": k, "exclude_seen": exclude_seen})
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"user_id", "items", "scores"} and body["user_id"] == f"user-{user}"
            got = item_index(body["items"])
            want = brute_force_topk(data["user_vectors"], data["item_vectors"], user, k, seen)
            assert got.size == want.size == min(k, I - (seen.size if seen is not None else 0))
            assert topk_mismatch(data["user_vectors"][user], data["item_vectors"], got, want, seen) is None
            expected = data["item_vectors"][got].astype(np.float64) @ data["user_vectors"][user].astype(np.float64)
            np.testing.assert_allclose(body["scores"], expected, rtol=1e-5, atol=1e-5)
            assert body["scores"] == sorted(body["scores"], reverse=True)
    # The mostly-seen user has exactly 3 unseen items: never padded, never a seen item.
    r = api.http.post("/recommend", json={"user_id": f"user-{MOSTLY_SEEN}", "k": 10}).json()
    assert sorted(item_index(r["items"]).tolist()) == sorted(np.setdiff1d(np.arange(I), seen_of(data, 0)).tolist())


def test_batch_order_unknowns_and_same_answers(api):
    ids = ["user-5", "nobody", f"user-{MOSTLY_SEEN}", "user-5", f"user-{HEAVY}", ""]
    r = api.http.post("/recommend/batch", json={"user_ids": ids, "k": 7})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [e["user_id"] for e in results] == ids
    for entry in (results[1], results[5]):
        assert entry == {"user_id": entry["user_id"], "error": "unknown user id", "status": 404}
    for entry in (results[0], results[2], results[3], results[4]):
        single = api.http.post("/recommend", json={"user_id": entry["user_id"], "k": 7}).json()
        assert entry == single
    assert len(results[2]["items"]) == 3
    full = api.http.post("/recommend/batch", json={"user_ids": [f"user-{i}" for i in range(MAX_BATCH)], "k": MAX_K,
                                                   "exclude_seen": False})
    assert full.status_code == 200 and all(len(e["items"]) == MAX_K for e in full.json()["results"])


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/recommend", b'{"user_id": "user-1", ', 400, "malformed JSON"),
        ("/recommend", b"", 400, "empty"),
        ("/recommend", b"\xff\xfe\xfd", 400, "malformed JSON"),
        ("/recommend", b"[" * 100_000, 400, "malformed JSON"),
        ("/recommend", b'{"user_id": "user-1", "k": NaN}', 422, "k must be an integer, got NaN"),
        ("/recommend", b'{"user_id": "user-1", "k": Infinity}', 422, "got Infinity"),
        ("/recommend", b'{"user_id": "user-1", "k": 1e999}', 422, "got Infinity"),
        ("/recommend", b'{"user_id": NaN}', 422, "user_id must be a string"),
        ("/recommend", b'{"user_id": "user-1", "k": 0}', 422, "between 1 and 50"),
        ("/recommend", b'{"user_id": "user-1", "k": -3}', 422, "between 1 and 50"),
        ("/recommend", b'{"user_id": "user-1", "k": 51}', 422, "between 1 and 50"),
        ("/recommend", b'{"user_id": "user-1", "k": 100000000000000000000000000000}', 422, "between 1 and 50"),
        ("/recommend", b'{"user_id": "user-1", "k": true}', 422, "k must be an integer, got boolean"),
        ("/recommend", b'{"user_id": "user-1", "k": 10.0}', 422, "k must be an integer"),
        ("/recommend", b'{"user_id": "user-1", "k": "10"}', 422, "k must be an integer"),
        ("/recommend", b'{"user_id": "user-1", "k": null}', 422, "k must be an integer, got null"),
        ("/recommend", b'{"user_id": "user-1", "exclude_seen": 1}', 422, "exclude_seen must be a boolean"),
        ("/recommend", b'{"user_id": 1}', 422, "user_id must be a string"),
        ("/recommend", b'{"k": 10}', 422, "missing required field 'user_id'"),
        ("/recommend", b'{"user_id": "user-1", "exlude_seen": false}', 422, "unknown field"),
        ("/recommend", b'["user-1"]', 422, "must be a JSON object"),
        ("/recommend", b'"user-1"', 422, "must be a JSON object"),
        ("/recommend", b'{"user_id": "nobody"}', 404, "unknown user id 'nobody'"),
        ("/recommend/batch", b'{"user_ids": []}', 422, "empty"),
        ("/recommend/batch", json.dumps({"user_ids": ["user-1"] * (MAX_BATCH + 1)}).encode(), 422, "max_batch"),
        ("/recommend/batch", b'{"user_ids": "user-1"}', 422, "array"),
        ("/recommend/batch", b'{"user_ids": ["user-1", 2]}', 422, "user_ids[1] must be a string"),
        ("/recommend/batch", b'{"user_id": "user-1"}', 422, "unknown field"),
        ("/recommend/batch", b'{"user_ids": ["user-1"], "k": 0}', 422, "between 1 and 50"),
        ("/recommend/batch", b'{"user_ids": ["user-1"], "k": -Infinity}', 422, "got -Infinity"),
        ("/recommend/batch", b'{"user_ids": ["user-1"]', 400, "malformed JSON"),
    ],
)
def test_error_cases(api, path, body, status, needle):
    assert_error(api.http.post(path, content=body, headers={"content-type": "application/json"}), status, needle)


def test_lone_surrogate_ids_are_echoed_not_500(api):
    """orjson refuses lone surrogates (a client can send them as JSON escapes); the json fallback answers."""
    r = api.http.post("/recommend/batch", content=b'{"user_ids": ["\\ud800x", "user-1"], "k": 3}',
                      headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    first, second = json.loads(r.content)["results"]
    assert first == {"user_id": "\ud800x", "error": "unknown user id", "status": 404}
    assert len(second["items"]) == 3
    assert_error(api.http.post("/recommend", content=b'{"user_id": "\\udfff"}',
                               headers={"content-type": "application/json"}), 404, "unknown user id")


def test_methods_and_paths(api):
    r = api.http.get("/recommend")
    assert_error(r, 405, "accepts POST only")
    assert r.headers["allow"] == "POST"
    assert_error(api.http.post("/healthz"), 405, "accepts GET only")
    assert_error(api.http.get("/nope"), 404, "no such endpoint")
    assert_error(api.http.get("/recommend/"), 404, "no such endpoint")


def _raw(port: int, payload: bytes, chunks: list[bytes] = ()) -> bytes:
    """Send raw bytes (ignoring a server that closes early) and return what comes back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(payload)
            for chunk in chunks:
                s.sendall(chunk)
        except OSError:
            pass
        reply = b""
        while True:
            try:
                part = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not part:
                break
            reply += part
        return reply


def test_body_limit_413_without_reading_the_body(api):
    big = json.dumps({"user_id": "user-1", "pad": "x" * (1 << 21)}).encode()  # 2 MiB
    assert_error(api.http.post("/recommend", content=big), 413, "exceeds the limit")
    # --max-body-bytes is honoured: 700 kB is under the 1 MiB default but over this server's limit.
    assert_error(api.http.post("/recommend", content=b" " * 700_000 + b'{"user_id": "user-1"}'), 413,
                 f"exceeds the limit of {MAX_BODY} bytes")
    # A declared 1 TB body is refused from its Content-Length, before any of it arrives (a server that waited for
    # the body would leave _raw's read to time out with no reply).
    reply = _raw(api.port, b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000\r\n\r\n{")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # A chunked body with no Content-Length is cut off as soon as it passes the limit.
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    reply = _raw(api.port, b"POST /recommend/batch HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n", [chunk] * 24)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert api.http.get("/healthz").status_code == 200


def test_body_that_never_arrives_is_408_not_a_hang(bundle):
    """In-process (the server's limit is 10 s): a client that stops mid-body gets 408 and a closed connection."""
    app = create_app(bundle, body_timeout_s=0.2)
    sent: list[dict] = []

    async def receive():
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/recommend", "method": "POST", "headers": [(b"content-length", b"10")]}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert "not received within 0.2 s" in json.loads(sent[1]["body"])["error"]


# ------------------------------------------------------------------------------------------- fuzzing
JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)
USER_IDS = st.sampled_from(["user-0", "user-1", "user-2", "user-17", "nobody", ""]) | st.text(max_size=8)
SINGLE_BODIES = st.fixed_dictionaries(
    {}, optional={"user_id": USER_IDS | JSON_VALUES, "k": st.integers(-2, MAX_K + 2) | JSON_VALUES,
                  "exclude_seen": st.booleans() | JSON_VALUES, "extra": JSON_VALUES}
) | JSON_VALUES
BATCH_BODIES = st.fixed_dictionaries(
    {}, optional={"user_ids": st.lists(USER_IDS, max_size=MAX_BATCH + 2) | JSON_VALUES,
                  "k": st.integers(-2, MAX_K + 2) | JSON_VALUES, "exclude_seen": st.booleans() | JSON_VALUES}
) | JSON_VALUES


def _check_answer(data: dict, body: dict, k: int, exclude_seen: bool) -> None:
    user = int(body["user_id"].split("-")[1])
    seen = seen_of(data, user) if exclude_seen else np.empty(0, np.int64)
    got = item_index(body["items"])
    assert got.size == min(k, I - np.unique(seen).size) == len(body["scores"])
    assert not np.isin(got, seen).any() and np.unique(got).size == got.size


@settings(max_examples=250, deadline=None, database=None)
@given(body=SINGLE_BODIES | st.binary(max_size=40).map(lambda b: ("raw", b)))
def test_fuzz_recommend_never_5xx(api, data, body):
    if isinstance(body, tuple) and body[:1] == ("raw",):
        r = api.http.post("/recommend", content=body[1])
    else:
        r = api.http.post("/recommend", content=json.dumps(body).encode())  # NaN/Infinity pass through as such
    assert r.status_code in {200, 400, 404, 422}, (r.status_code, r.text)
    if r.status_code != 200:
        assert_error(r, r.status_code)
    else:
        _check_answer(data, r.json(), body.get("k", 10), body.get("exclude_seen", True))


@settings(max_examples=150, deadline=None, database=None)
@given(body=BATCH_BODIES)
def test_fuzz_batch_never_5xx(api, data, body):
    r = api.http.post("/recommend/batch", content=json.dumps(body).encode())
    assert r.status_code in {200, 400, 422}, (r.status_code, r.text)
    if r.status_code != 200:
        assert_error(r, r.status_code)
        return
    results = r.json()["results"]
    assert [e["user_id"] for e in results] == body["user_ids"]
    for entry in results:
        if "error" in entry:
            assert entry["status"] == 404 and entry["user_id"] not in {f"user-{i}" for i in range(U)}
        else:
            _check_answer(data, entry, body.get("k", 10), body.get("exclude_seen", True))


def test_metrics_prometheus_text(api):
    before = metric_samples(api.http.get("/metrics").text)
    key = 'compress_http_requests_total{endpoint="/recommend",status="422"}'
    for _ in range(3):
        api.http.post("/recommend", json={"user_id": "user-1", "k": 0})
    r = api.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = metric_samples(r.text)
    assert after[key] == before.get(key, 0) + 3
    assert after["compress_http_requests_in_flight"] >= 1  # this request
    assert after["compress_workers"] == 2 and after["compress_workers_ready"] == 2
    # 5xx: only the 503s of /readyz polled while the workers loaded.
    assert [n for n in after if 'status="5' in n] in ([], ['compress_http_requests_total{endpoint="/readyz",status="503"}'])
    for endpoint in ("/recommend", "/recommend/batch"):
        buckets = [(float(m[1]), v) for name, v in after.items()
                   if (m := re.fullmatch(rf'compress_http_request_duration_seconds_bucket\{{endpoint="{endpoint}",le="([^"]+)"\}}', name))]
        assert [b for b, _ in buckets] == sorted(b for b, _ in buckets) and buckets[-1][0] == math.inf
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == after[f'compress_http_request_duration_seconds_count{{endpoint="{endpoint}"}}']
        assert after[f'compress_http_request_duration_seconds_sum{{endpoint="{endpoint}"}}'] > 0
    total = sum(v for n, v in after.items() if n.startswith('compress_http_requests_total{endpoint="/recommend"'))
    assert total == after['compress_http_request_duration_seconds_count{endpoint="/recommend"}']


# --------------------------------------------------------------------- readiness, fallback, models:/
def test_readiness_before_and_after_load_and_popular_fallback(bundle, data, tmp_path):
    server = Server(["-m", "serving", bundle, "--workers", 1, "--fallback", "popular", "--load-delay-s", 2], tmp_path / "log")
    try:
        server.wait("/healthz")
        assert server.http.get("/readyz").status_code == 503
        assert server.http.get("/readyz").json() == {"status": "loading"}
        assert_error(server.http.post("/recommend", json={"user_id": "user-3"}), 503, "still loading")
        assert_error(server.http.get("/metadata"), 503, "still loading")
        assert metric_samples(server.http.get("/metrics").text)["compress_workers_ready"] == 0
        server.wait("/readyz", timeout=60)
        assert server.http.get("/readyz").json() == {"status": "ready"}

        counts = np.bincount(data["seen_indices"], minlength=I)
        popular = np.lexsort((np.arange(I), -counts))[:5]
        r = server.http.post("/recommend", json={"user_id": "nobody", "k": 5}).json()
        assert r["fallback"] == "popular" and item_index(r["items"]).tolist() == popular.tolist()
        assert r["scores"] == counts[popular].astype(float).tolist()
        known = server.http.post("/recommend", json={"user_id": "user-3", "k": 5}).json()
        assert "fallback" not in known and len(known["items"]) == 5
        batch = server.http.post("/recommend/batch", json={"user_ids": ["user-3", "nobody"], "k": 5}).json()["results"]
        assert batch == [known, {**r, "user_id": "nobody"}]
    finally:
        server.stop()


def test_serve_trained_checkpoint_end_to_end(trained):
    torch = pytest.importorskip("torch")
    from compressor.checkpoint import load_checkpoint

    server = Server(["-m", "compress_app", "serve", trained["uri"], "--workers", 1], trained["root"] / "serve.log",
                    env=trained["env"], cwd=trained["root"])
    try:
        server.wait("/readyz")
        ckpt = load_checkpoint(trained["run"])
        meta = server.http.get("/metadata").json()
        assert meta["lineage"]["checkpoint_fingerprint"] == ckpt.fingerprint
        assert meta["lineage"]["model_kind"] == "mf" and "checkpoint_path" not in meta["lineage"]
        assert meta["model_version"] == "models:/rec-serve/1"  # the registered version, as it answers
        with torch.no_grad():
            u, i = (t.detach().float().numpy() for t in ckpt.build_model().vectors())
        item_pos = {iid: n for n, iid in enumerate(ckpt.item_ids.tolist())}
        for user in (0, 7, 123, 399):
            seen = ckpt.train_indices[ckpt.train_indptr[user] : ckpt.train_indptr[user + 1]]
            r = server.http.post("/recommend", json={"user_id": str(ckpt.user_ids[user]), "k": 20})
            assert r.status_code == 200, r.text
            got = np.array([item_pos[x] for x in r.json()["items"]])
            assert topk_mismatch(u[user], i, got, brute_force_topk(u, i, user, 20, seen), seen) is None
    finally:
        server.stop()
