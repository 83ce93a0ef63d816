"""Production serving: bearer-token auth, refusal to bind non-loopback hosts without one, zero-downtime bundle
swaps (POST /admin/swap and the control file), the OpenAPI document against the real server, and the new
Prometheus series. Every server is a real `python -m serving` subprocess on loopback.

Bundles A and B share their ids but not their vectors, so each answer says which one produced it; T is B with
one byte of items.faiss flipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from export.bundle import write_bundle
from serving.config import CONFIG_ENV

from .conftest import ROOT, Server, assert_one_line_error, brute_force_topk, free_port

U, I, D = 1100, 400, 8
BATCH = 1024
MAX_K = 50
K = 10
TOKEN = "s3cret-Token-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}
POLL_S = 0.2


# ------------------------------------------------------------------------------------------- helpers
def make_data(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 6, U)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return {
        "user_vectors": rng.standard_normal((U, D)).astype(np.float32),
        "item_vectors": rng.standard_normal((I, D)).astype(np.float32),
        "user_ids": np.array([f"user-{i}" for i in range(U)]),
        "item_ids": np.array([f"item-{i}" for i in range(I)]),
        "seen_indptr": indptr,
        "seen_indices": np.concatenate([rng.choice(I, n, replace=False) for n in lens]).astype(np.int64),
    }


def expected_items(data: dict, users: range, k: int = K) -> list[list[str]]:
    """Brute-force top-k (seen items excluded) of each user, as item ids."""
    out = []
    for u in users:
        seen = data["seen_indices"][data["seen_indptr"][u] : data["seen_indptr"][u + 1]]
        top = brute_force_topk(data["user_vectors"], data["item_vectors"], u, k, seen)
        out.append([f"item-{i}" for i in top])
    return out


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page, parsed by prometheus_client: {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def versions_served(text: str) -> set[str]:
    return {dict(labels)["version"] for (name, labels) in samples(text) if name == "compress_model_version_info"}


def fresh(server: Server, headers: dict | None = None) -> httpx.Client:
    """A client that opens a new connection per request, so requests spread over the workers."""
    return httpx.Client(base_url=server.url, headers=headers or {}, timeout=30,
                        limits=httpx.Limits(max_keepalive_connections=0))


def poll(what, timeout: float = 15.0, every: float = 0.05):
    """Call what() until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(every)


def wait_all_workers(server: Server, version: str, workers: int = 2) -> str:
    """Until every live worker serves `version`; the /metrics text at that moment."""
    def done():
        text = server.http.get("/metrics", headers=AUTH).text
        ok = versions_served(text) == {version} and metric(text, "compress_workers_ready") == workers
        return text if ok else None
    return poll(done)


def write_control_file(path: Path, doc: dict) -> None:
    """What an operator's deploy step does: temp file in the same directory, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def serving_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "serving", *map(str, args)]


def assert_error(resp: httpx.Response, status: int, needle: str = "") -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and "\n" not in body["error"], body
    assert needle.lower() in body["error"].lower(), body
    return body


def check_answers(server: Server, data: dict, version: str, users=range(0, 40, 7)) -> None:
    """Fresh connections (both workers): each answer carries `version` and equals that bundle's brute force."""
    want = expected_items(data, users)
    with fresh(server, AUTH) as client:
        for _ in range(3):
            for u, items in zip(users, want):
                r = client.post("/recommend", json={"user_id": f"user-{u}", "k": K})
                assert r.status_code == 200, r.text
                assert r.headers["x-model-version"] == version
                assert r.json()["items"] == items


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data_a() -> dict:
    return make_data(0)


@pytest.fixture(scope="module")
def data_b() -> dict:
    return make_data(1)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, data_a, data_b) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    for name, data in (("a", data_a), ("b", data_b)):
        write_bundle(root / name, **data, index_factory="Flat", lineage={"checkpoint_fingerprint": name},
                     metrics={}, package_version="0.0.test")
    shutil.copytree(root / "b", root / "tampered")
    blob = bytearray((root / "tampered" / "items.faiss").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (root / "tampered" / "items.faiss").write_bytes(bytes(blob))
    return {"a": root / "a", "b": root / "b", "tampered": root / "tampered", "root": root}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(f"\n  {TOKEN}  \n")
    return path


@pytest.fixture(scope="module")
def secured(bundles, token_file, tmp_path_factory):
    """2 workers, a token file, an explicit control file, the popular fallback and max_batch 1,024."""
    state = tmp_path_factory.mktemp("secured")
    control = state / "control.json"
    server = Server(["-m", "serving", bundles["a"], "--workers", 2, "--token-file", token_file,
                     "--control-file", control, "--swap-poll-s", POLL_S, "--model-version", "v-a",
                     "--fallback", "popular", "--max-k", MAX_K, "--max-batch", BATCH, "--access-log"],
                    state / "server.log")
    server.control = control
    try:
        server.wait("/readyz")
        wait_all_workers(server, "v-a")
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ auth
def test_bearer_token_required_except_probes(secured):
    before = secured.http.get("/metrics", headers=AUTH).text
    refused = [
        secured.http.post("/recommend", json={"user_id": "user-1"}),
        secured.http.post("/recommend", json={"user_id": "user-1"}, headers={"authorization": "Bearer wrong"}),
        secured.http.post("/recommend", json={"user_id": "user-1"}, headers={"authorization": f"Basic {TOKEN}"}),
        secured.http.post("/recommend", json={"user_id": "user-1"}, headers={"authorization": f"Bearer {TOKEN}x"}),
        secured.http.get("/metadata"),
        secured.http.get("/metrics"),
        secured.http.get("/openapi.json"),
        secured.http.post("/admin/swap", json={"bundle": "/x"}),
        secured.http.get("/no-such-path"),  # 401 before routing: nothing is revealed without the token
    ]
    for r in refused:
        body = assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in r.text and "x-model-version" not in r.headers
    assert refused[0].json() == refused[1].json()  # missing and wrong token: the same answer
    for path in ("/healthz", "/readyz"):
        assert secured.http.get(path).status_code == 200
    ok = secured.http.post("/recommend", json={"user_id": "user-1", "k": 3}, headers=AUTH)
    assert ok.status_code == 200 and len(ok.json()["items"]) == 3
    assert ok.headers["x-model-version"] == "v-a"
    lower = secured.http.post("/recommend", json={"user_id": "user-1"}, headers={"authorization": f"bearer {TOKEN}"})
    assert lower.status_code == 200  # the scheme is case-insensitive
    after = secured.http.get("/metrics", headers=AUTH).text
    assert metric(after, "compress_auth_failures_total") == metric(before, "compress_auth_failures_total") + len(refused)
    assert metric(after, "compress_http_requests_total", endpoint="/recommend", status="401") >= 4

    # The token is in no answer, no log line and no worker's config.
    meta = secured.http.get("/metadata", headers=AUTH)
    assert meta.json()["model_version"] == "v-a" and meta.headers["x-model-version"] == "v-a"
    for text in (meta.text, after, secured.http.get("/openapi.json", headers=AUTH).text, secured.log.read_text()):
        assert TOKEN not in text
    psutil = pytest.importorskip("psutil")
    workers = psutil.Process(secured.proc.pid).children(recursive=True)
    configs = [p.environ().get(CONFIG_ENV) for p in [psutil.Process(secured.proc.pid), *workers]]
    assert any(configs) and all(TOKEN not in (c or "") for c in configs)


def test_unusable_token_or_public_host_without_token_exit_1_before_binding(bundles, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_SERVE_TOKEN"}
    cases = [
        (["--token-file", empty], env, "is empty"),
        (["--token-file", tmp_path / "missing"], env, "cannot read token file"),
        (["--host", "0.0.0.0"], env, "--insecure-no-token"),
        ([], {**env, "COMPRESS_SERVE_TOKEN": "   "}, "COMPRESS_SERVE_TOKEN is empty"),
    ]
    for args, case_env, needle in cases:
        p = subprocess.run(serving_cmd(bundles["a"], "--port", port, *args), capture_output=True, text=True,
                           timeout=60, env=case_env, cwd=ROOT)
        assert_one_line_error(p, needle)
        assert "Uvicorn running" not in p.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing was bound


def test_public_host_with_insecure_no_token_and_env_token(bundles, tmp_path):
    """0.0.0.0 (traffic to 127.0.0.1 only): allowed with --insecure-no-token (then /admin/swap is 403), and with a
    token from COMPRESS_SERVE_TOKEN (then auth applies)."""
    open_server = Server(["-m", "serving", bundles["a"], "--host", "0.0.0.0", "--insecure-no-token", "--workers", 1],
                         tmp_path / "open.log")
    env_server = Server(["-m", "serving", bundles["a"], "--host", "0.0.0.0", "--workers", 1], tmp_path / "env.log",
                        env={"COMPRESS_SERVE_TOKEN": f" {TOKEN}\n"})
    try:
        open_server.wait("/readyz")
        r = open_server.http.post("/recommend", json={"user_id": "user-2", "k": 4})
        assert r.status_code == 200 and r.headers["x-model-version"].startswith("sha256:")
        assert_error(open_server.http.post("/admin/swap", json={"bundle": str(bundles["b"])}), 403, "--token-file")
        doc = open_server.http.get("/openapi.json").json()
        validate(doc)
        assert "security" not in doc and "securitySchemes" not in doc["components"]
        assert "401" not in doc["paths"]["/recommend"]["post"]["responses"]
        meta = open_server.http.get("/metadata").json()
        assert meta["model_version"] == f"sha256:{meta['manifest_sha256'][:12]}"

        env_server.wait("/readyz")
        assert_error(env_server.http.post("/recommend", json={"user_id": "user-2"}), 401)
        assert env_server.http.post("/recommend", json={"user_id": "user-2"}, headers=AUTH).status_code == 200
    finally:
        open_server.stop()
        assert TOKEN not in env_server.stop()


# --------------------------------------------------------------------------------------------- OpenAPI
def _wrong_types(schema: dict) -> list:
    """JSON values the schema's type refuses (as the server must)."""
    return {"string": [5, None, ["x"]], "integer": ["5", 5.5, True, None], "boolean": [1, "true", None],
            "array": ["x", {"a": 1}, None]}[schema["type"]]


PATTERN_VIOLATIONS = {"^/": "relative/bundle", "^[!-~]": " leading-space"}


def test_openapi_document_matches_the_server(secured, bundles):
    doc = secured.http.get("/openapi.json", headers=AUTH).json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/recommend", "/recommend/batch", "/healthz", "/readyz", "/metadata", "/metrics",
                                 "/openapi.json", "/admin/swap"}
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    schemas = doc["components"]["schemas"]
    observed: list[tuple[str, int]] = []

    def post(path: str, body) -> httpx.Response:
        r = secured.http.post(path, content=json.dumps(body), headers={**AUTH, "content-type": "application/json"})
        observed.append((path, r.status_code))
        if r.status_code != 200:
            assert_error(r, r.status_code)
        return r

    # Security as documented: open operations answer without a token, every other one is 401 without it.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            r = secured.http.request(method.upper(), path)
            assert (r.status_code == 401) == (op.get("security", doc["security"]) != []), (path, r.status_code)
            assert ("401" in op["responses"]) == (op.get("security", doc["security"]) != [])

    bases = {"/recommend": ("RecommendRequest", {"user_id": "user-3"}),
             "/recommend/batch": ("BatchRequest", {"user_ids": ["user-3"]}),
             "/admin/swap": ("SwapRequest", None)}  # no valid body here: a valid one would swap
    for path, (name, base) in bases.items():
        schema = schemas[name]
        assert doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(name)
        assert schema["additionalProperties"] is False
        valid = base or {"bundle": str(bundles["tampered"])}  # shape-valid; the tampered bundle is then refused
        if base:
            assert post(path, base).status_code == 200
        assert post(path, {**valid, "unexpected": 1}).status_code == 422
        for field in schema["required"]:
            assert post(path, {k: v for k, v in valid.items() if k != field}).status_code == 422
        for field, prop in schema["properties"].items():
            for wrong in _wrong_types(prop):
                assert post(path, {**valid, field: wrong}).status_code == 422, (path, field, wrong)
            if "minimum" in prop:
                assert post(path, {**valid, field: prop["minimum"] - 1}).status_code == 422
                assert post(path, {**valid, field: prop["maximum"] + 1}).status_code == 422
                for ok in (prop["minimum"], prop["maximum"]):
                    r = post(path, {**valid, field: ok})
                    assert r.status_code == 200, r.text
                    entries = r.json()["results"] if "results" in r.json() else [r.json()]
                    assert all(len(e["items"]) == ok for e in entries)
            if "maxItems" in prop:
                assert post(path, {**valid, field: []}).status_code == 422 and prop["minItems"] == 1
                ids = [f"user-{i}" for i in range(prop["maxItems"] + 1)]
                assert post(path, {**valid, field: ids}).status_code == 422
                r = post(path, {**valid, field: ids[:-1]})
                assert r.status_code == 200 and len(r.json()["results"]) == prop["maxItems"]
                assert post(path, {**valid, field: [1]}).status_code == 422  # items: string
            if "maxLength" in prop and field == "version":
                assert post(path, {**valid, field: "v" * (prop["maxLength"] + 1)}).status_code == 422
            for prefix, violation in PATTERN_VIOLATIONS.items():
                if prop.get("pattern", "").startswith(prefix):
                    assert post(path, {**valid, field: violation}).status_code == 422, (field, violation)
    assert schemas["RecommendRequest"]["properties"]["k"]["maximum"] == MAX_K
    assert schemas["BatchRequest"]["properties"]["user_ids"]["maxItems"] == BATCH
    r = post("/admin/swap", {"bundle": str(bundles["tampered"])})  # valid shape, bundle fails verification
    assert r.status_code == 422
    assert_error(secured.http.post("/recommend", content=b"{", headers=AUTH), 400)
    observed.append(("/recommend", 400))
    for path, status in observed:  # every answer seen is documented for its operation
        assert str(status) in doc["paths"][path]["post"]["responses"], (path, status)
    assert secured.http.get("/metadata", headers=AUTH).json()["model_version"] == "v-a"  # nothing was swapped


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_new_series(secured):
    before = secured.http.get("/metrics", headers=AUTH).text
    secured.http.get("/metadata")  # 401
    r = secured.http.post("/recommend", json={"user_id": "nobody", "k": 5}, headers=AUTH)
    assert r.status_code == 200 and r.json()["fallback"] == "popular"
    batch = secured.http.post("/recommend/batch", json={"user_ids": ["nobody", "user-1", "no-one"], "k": 5},
                              headers=AUTH).json()["results"]
    assert [("fallback" in e) for e in batch] == [True, False, True]
    text = secured.http.get("/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the whole page parses
    for name, kind in (("compress_swaps", "counter"), ("compress_swap_failures", "counter"),
                       ("compress_auth_failures", "counter"), ("compress_fallbacks", "counter"),
                       ("compress_model_version_info", "gauge"), ("compress_http_requests", "counter"),
                       ("compress_http_request_duration_seconds", "histogram")):
        assert families[name].type == kind, name
    assert metric(text, "compress_auth_failures_total") == metric(before, "compress_auth_failures_total") + 1
    assert metric(text, "compress_fallbacks_total") == metric(before, "compress_fallbacks_total") + 3
    assert versions_served(text) == {"v-a"}
    assert metric(text, "compress_model_version_info", version="v-a") == 1


# ----------------------------------------------------------------------------------------------- swaps
def test_admin_swap_reaches_both_workers(secured, bundles, data_a, data_b):
    before = secured.http.get("/metrics", headers=AUTH).text
    r = secured.http.post("/admin/swap", json={"bundle": str(bundles["b"]), "version": "v-b"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"version": "v-b", "bundle": str(bundles["b"])} and r.headers["x-model-version"] == "v-b"
    after = wait_all_workers(secured, "v-b")
    assert metric(after, "compress_swaps_total") == metric(before, "compress_swaps_total") + 2  # one per worker
    check_answers(secured, data_b, "v-b")
    control = json.loads(secured.control.read_text())
    digest = hashlib.sha256((bundles["b"] / "manifest.json").read_bytes()).hexdigest()
    assert control == {"bundle": str(bundles["b"]), "version": "v-b", "manifest_sha256": digest}  # pinned
    with fresh(secured, AUTH) as client:
        for _ in range(4):
            meta = client.get("/metadata").json()
            assert meta["model_version"] == "v-b" and meta["lineage"] == {"checkpoint_fingerprint": "b"}

    # Without a label the new version is named from the manifest's sha256.
    r = secured.http.post("/admin/swap", json={"bundle": str(bundles["a"])}, headers=AUTH)
    assert r.status_code == 200, r.text
    label = r.json()["version"]
    assert label.startswith("sha256:") and len(label) == len("sha256:") + 12
    wait_all_workers(secured, label)
    check_answers(secured, data_a, label)


def test_tampered_bundle_is_refused_and_the_old_one_keeps_serving(secured, bundles, data_a):
    r = secured.http.post("/admin/swap", json={"bundle": str(bundles["a"]), "version": "v-a2"}, headers=AUTH)
    assert r.status_code == 200
    before = wait_all_workers(secured, "v-a2")
    r = secured.http.post("/admin/swap", json={"bundle": str(bundles["tampered"]), "version": "v-t"}, headers=AUTH)
    assert_error(r, 422, "items.faiss: sha256 does not match manifest")
    assert json.loads(secured.control.read_text())["version"] == "v-a2"  # not published to the other workers
    assert_error(secured.http.post("/admin/swap", json={"bundle": str(bundles["root"] / "nope")}, headers=AUTH),
                 422, "bundle directory does not exist")
    after = secured.http.get("/metrics", headers=AUTH).text
    assert metric(after, "compress_swap_failures_total") == metric(before, "compress_swap_failures_total") + 2
    assert metric(after, "compress_swaps_total") == metric(before, "compress_swaps_total")
    assert versions_served(after) == {"v-a2"}
    check_answers(secured, data_a, "v-a2")


def test_swap_through_the_control_file_alone(secured, bundles, data_a, data_b):
    before = secured.http.get("/metrics", headers=AUTH).text
    write_control_file(secured.control, {"bundle": str(bundles["b"]), "version": "ctl-b"})
    after = wait_all_workers(secured, "ctl-b")
    assert metric(after, "compress_swaps_total") == metric(before, "compress_swaps_total") + 2
    check_answers(secured, data_b, "ctl-b")

    # A control file naming a bundle that fails: each worker refuses it once and keeps ctl-b.
    write_control_file(secured.control, {"bundle": str(bundles["tampered"]), "version": "ctl-t"})
    failures = metric(after, "compress_swap_failures_total")
    poll(lambda: metric(secured.http.get("/metrics", headers=AUTH).text, "compress_swap_failures_total") == failures + 2)
    time.sleep(3 * POLL_S)  # more polls of the unchanged file add no failure
    text = secured.http.get("/metrics", headers=AUTH).text
    assert metric(text, "compress_swap_failures_total") == failures + 2 and versions_served(text) == {"ctl-b"}
    check_answers(secured, data_b, "ctl-b")

    # Pinned to a manifest the directory no longer holds (rewritten after it was verified): refused as well.
    failures = metric(text, "compress_swap_failures_total")
    write_control_file(secured.control, {"bundle": str(bundles["a"]), "version": "ctl-pinned",
                                         "manifest_sha256": "0" * 64})
    poll(lambda: metric(secured.http.get("/metrics", headers=AUTH).text, "compress_swap_failures_total") == failures + 2)
    assert versions_served(secured.http.get("/metrics", headers=AUTH).text) == {"ctl-b"}

    digest = hashlib.sha256((bundles["a"] / "manifest.json").read_bytes()).hexdigest()
    write_control_file(secured.control, {"bundle": str(bundles["a"]), "version": "ctl-a", "manifest_sha256": digest})
    wait_all_workers(secured, "ctl-a")
    check_answers(secured, data_a, "ctl-a")


def test_batches_in_flight_during_swaps_answer_from_one_version(secured, bundles, data_a, data_b):
    users = range(BATCH)
    want = {"batch-a": expected_items(data_a, users), "batch-b": expected_items(data_b, users)}
    body = json.dumps({"user_ids": [f"user-{u}" for u in users], "k": K})
    seen: list[str] = []
    problems: list[str] = []
    stop = threading.Event()

    def send_batches():
        with fresh(secured, AUTH) as client:
            while not stop.is_set():
                r = client.post("/recommend/batch", content=body)
                version = r.headers.get("x-model-version")
                if r.status_code != 200 or version not in want:
                    problems.append(f"{r.status_code} {version}")
                    continue
                got = [entry["items"] for entry in r.json()["results"]]
                if got != want[version]:
                    problems.append(f"batch tagged {version}: {sum(g != w for g, w in zip(got, want[version]))} "
                                    f"entries differ from that version's answers")
                seen.append(version)

    secured.http.post("/admin/swap", json={"bundle": str(bundles["a"]), "version": "batch-a"}, headers=AUTH)
    wait_all_workers(secured, "batch-a")
    senders = [threading.Thread(target=send_batches) for _ in range(2)]
    for t in senders:
        t.start()
    try:
        for version, bundle in (("batch-b", "b"), ("batch-a", "a"), ("batch-b", "b")):
            n = len(seen)
            poll(lambda: len(seen) > n + 1 or problems)  # batches are in flight when the swap starts
            r = secured.http.post("/admin/swap", json={"bundle": str(bundles[bundle]), "version": version}, headers=AUTH)
            assert r.status_code == 200, r.text
            wait_all_workers(secured, version)
            poll(lambda: seen[-2:] == [version, version] or problems)
    finally:
        stop.set()
        for t in senders:
            t.join(30)
    assert not problems, problems[:5]
    assert {"batch-a", "batch-b"} <= set(seen)


def test_default_version_is_the_manifests_mlflow_model_version(tmp_path, data_a):
    """In-process (no token, no control file): the label comes from lineage.mlflow_model_version when set."""
    from serving.app import create_app

    write_bundle(tmp_path / "registered", **data_a, index_factory="Flat",
                 lineage={"checkpoint_fingerprint": "a", "mlflow_model_version": 7}, metrics={}, package_version="0")
    app = create_app(tmp_path / "registered")
    app.start_loading()
    assert app.wait_ready(60)

    async def ask() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.get("/metadata"), await client.post("/recommend", json={"user_id": "user-4"}),
                    await client.post("/admin/swap", json={"bundle": str(tmp_path)})]

    meta, answer, swap = asyncio.run(ask())
    assert meta.json()["model_version"] == "7" and answer.headers["x-model-version"] == "7"
    assert answer.json()["items"] == expected_items(data_a, [4])[0]
    assert_error(swap, 403, "--token-file")
