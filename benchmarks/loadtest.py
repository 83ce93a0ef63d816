"""Load test of `compress serve` with wrk on loopback (optionally against `mlflow models serve` too).

    python benchmarks/loadtest.py --bundle BUNDLE_DIR --duration 60 \
        [--history-bundle HISTORY_BUNDLE_DIR [--history-len 50]] \
        [--mlflow-model-uri models:/NAME@ALIAS] [--compare-fastapi] [--out-dir bench-out/serve]

For each server the script starts it on a free 127.0.0.1 port, waits until it is ready, warms it up,
and runs wrk (one wrk thread, so the load generator takes as little of the shared cores as it can):

    /recommend        1 user per request, k=10, exclude_seen   at concurrency 1 and 32
    /recommend/batch  64 users per request                    at concurrency 1 and 32

`--history-bundle` also serves a bundle with a history user tower (`model.kind: history`) and runs

    /recommend        1 history of --history-len items, k=10   at concurrency 1 and 32
    /recommend        1 user per request (its stored history)  at concurrency 1 and 32

beside the ID tower's rows (`--bundle` may then be left out). The histories are drawn (seeded) from the
bundle's stored histories: users with at least --history-len training items (capped at the bundle's max_len)
give their most recent ones; when no user has that many, the longest histories are used as they are.

Request bodies cycle through user ids drawn (seeded) from the bundle's own users. Every run is bounded
by --duration and by --max-requests (wrk stops its thread once it has that many responses). Reported
per run: requests/s, recommendations/s (requests/s x users per request), p50/p90/p99/max latency,
every wrk error class (connect, read, write, timeout, non-2xx status), the server's CPU seconds per
request (less sensitive to other load on the box than throughput), and the load average around it.
The RSS of the server's processes (parent + workers) is taken after warm-up and after the last run.

`--mlflow-model-uri` also runs the same load against `mlflow models serve -m URI --env-manager local`
(the registered pyfunc model; `/invocations` with `dataframe_records` and `params.k`); without it
that part is skipped. `--compare-fastapi` runs the single-user runs against a FastAPI + pydantic
version of /recommend over the same recommender (`fastapi_baseline_app` below): the measurement behind
serving.app's plain-ASGI choice.

Writes `<out-dir>/loadtest.json` and `<out-dir>/loadtest.md` (a snippet for docs/benchmarks.md).

    python benchmarks/loadtest.py --make-gowalla-bundle bench-out/gowalla-random

writes a stand-in bundle of Gowalla's shape (29,858 users x 40,981 items, dim 20): the real Gowalla
training interactions as seen items, random vectors. Use a bundle of a trained student for reports.

    python benchmarks/loadtest.py --register-checkpoint RUN_DIR_OR_SAFETENSORS --register-name NAME \
        --tracking-uri sqlite:///bench-out/serve/mlflow.db

registers a checkpoint as a new version of NAME in an MLflow store for the `mlflow models serve` side,
with the same pyfunc model-from-code `compress distill --register` logs (`registry.register_version`), and
prints its models:/ URI. A checkpoint of an untracked run (no MLflow run id) gets a new run in the
experiment "loadtest" to hold the model; artifacts go beside a local database (`<db>-artifacts/`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serving.bundle import open_bundle  # noqa: E402  (the checkout first on sys.path)

GOWALLA = ROOT.parent / "shared" / "data" / "gowalla"
BATCH_USERS = 64
K = 10
SCENARIOS = (("single", 1), ("single", 32), ("batch", 1), ("batch", 32))
HISTORY_SCENARIOS = (("history", 1), ("history", 32), ("single", 1), ("single", 32))
N_BODIES = {"single": 2000, "batch": 200, "history": 2000}
HISTORY_LEN = 50

LUA = r"""
local bodies = dofile(os.getenv("LOADTEST_BODIES"))
local path = os.getenv("LOADTEST_PATH")
local max_per_thread = tonumber(os.getenv("LOADTEST_MAX_PER_THREAD"))
local n = #bodies
local i = 0
local seen = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function init(args)
  i = math.random(n) - 1
end

function request()
  i = i % n + 1
  return wrk.format(nil, path, nil, bodies[i])
end

function response(status, headers, body)
  seen = seen + 1
  if seen >= max_per_thread then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


# ----------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_tree(pid: int):
    import psutil  # optional: only the load test's memory and CPU readings need it

    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def memory_mib(pid: int) -> dict[str, Any]:
    """RSS of the server's processes (sum and each) and PSS (shared library pages split, not counted per process)."""
    rss, pss = {}, 0.0
    for p in _process_tree(pid):
        try:
            info = p.memory_full_info()
        except Exception:  # noqa: BLE001 - a worker may exit between listing and reading
            continue
        rss[str(p.pid)] = round(info.rss / 2**20, 1)
        pss += getattr(info, "pss", info.rss) / 2**20
    return {"total": round(sum(rss.values()), 1), "pss_total": round(pss, 1), "per_process": rss}


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in _process_tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # noqa: BLE001
            pass
    return total


class Server:
    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, log: Path, env: dict | None = None,
                 start_timeout: float = 300) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **(env or {})), stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited ({self.proc.returncode}) before it was ready:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=5) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} not ready after {start_timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# -------------------------------------------------------------------------------------- bodies
def write_bodies(path: Path, bodies: list[bytes]) -> None:
    with open(path, "w") as f:
        f.write("return {\n")
        for b in bodies:
            f.write("  " + json.dumps(b.decode()) + ",\n")  # JSON string escapes are valid Lua escapes here
        f.write("}\n")


def sample_histories(bundle, length: int, n: int = N_BODIES["history"], seed: int = 0) -> list[list[str]]:
    """`n` seeded histories (external item ids, oldest first) of `length` items (capped at the tower's max_len):
    the most recent items of users with that many, else the longest stored histories as they are."""
    length = min(length, bundle.user_tower.max_len)
    lens = np.diff(bundle.seen_indptr)
    users = np.flatnonzero(lens >= length)
    if users.size == 0:
        users = np.argsort(-lens, kind="stable")[: max(1, min(100, lens.size))]
    picks = np.random.default_rng(seed).choice(users, size=n)
    ids = bundle.item_ids
    return [ids[bundle.seen(int(u))[-length:]].tolist() for u in picks]


def make_bodies(user_ids: np.ndarray, kind: str, api: str, seed: int = 0,
                histories: list[list[str]] | None = None) -> list[bytes]:
    if kind == "history":  # POST /recommend with a history (compress serve only)
        return [json.dumps({"history": h, "k": K, "exclude_seen": True}).encode() for h in histories or []]
    rng = np.random.default_rng(seed)
    per = 1 if kind == "single" else BATCH_USERS
    picks = rng.choice(user_ids, size=(N_BODIES[kind], per))
    out = []
    for row in picks.tolist():
        if api == "compress":
            doc = ({"user_id": row[0], "k": K, "exclude_seen": True} if kind == "single"
                   else {"user_ids": row, "k": K, "exclude_seen": True})
        else:  # mlflow pyfunc scoring protocol
            doc = {"dataframe_records": [{"user_id": u} for u in row], "params": {"k": K}}
        out.append(json.dumps(doc).encode())
    return out


def check_answer(url: str, body: bytes, api: str, users: int) -> None:
    """One request outside wrk: the server answers 200 with `users` results (guards against measuring errors)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{url} answered {e.code}: {e.read()[:500]!r} to {body[:200]!r}") from None
    if api == "compress":
        results = doc["results"] if "results" in doc else [doc]
    else:
        results = doc["predictions"]
    if len(results) != users or any(len(x["items"]) != K for x in results):
        raise SystemExit(f"unexpected answer from {url}: {str(doc)[:300]}")


# ---------------------------------------------------------------------------------------- wrk
def run_wrk(url: str, path: str, bodies_file: Path, concurrency: int, duration: float, max_requests: int) -> dict:
    env = dict(os.environ, LOADTEST_BODIES=str(bodies_file), LOADTEST_PATH=path,
               LOADTEST_MAX_PER_THREAD=str(max(1, max_requests)))
    script = bodies_file.with_suffix(".wrk.lua")
    script.write_text(LUA)
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "-s", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({proc.returncode}): {proc.stderr[-2000:]}\n{proc.stdout[-2000:]}")
    return json.loads(line[len("RESULT "):])


def scenario(server: Server, api: str, kind: str, concurrency: int, user_ids: np.ndarray, args, work: Path,
             histories: list[list[str]] | None = None) -> dict:
    if api == "compress":
        path = "/recommend/batch" if kind == "batch" else "/recommend"
    else:
        path = "/invocations"
    per = BATCH_USERS if kind == "batch" else 1
    bodies = make_bodies(user_ids, kind, api, histories=histories)
    bodies_file = work / f"{server.name}-{kind}.lua"
    write_bodies(bodies_file, bodies)
    check_answer(server.url + path, bodies[0], api, per)
    load0 = os.getloadavg()[0]
    cpu0 = cpu_seconds(server.proc.pid)
    wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    res = run_wrk(server.url, path, bodies_file, concurrency, args.duration, args.max_requests)
    wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = cpu_seconds(server.proc.pid)
    wrk_cpu = (wrk1.ru_utime + wrk1.ru_stime) - (wrk0.ru_utime + wrk0.ru_stime)
    seconds = res["duration_us"] / 1e6
    rps = res["requests"] / seconds if seconds else 0.0
    lat = res["latency_us"]
    request = {"single": "user id", "batch": f"{per} user ids",
               "history": f"history of {np.mean([len(h) for h in histories or [[]]]):.0f} items"}[kind]
    out = {
        "server": server.name, "endpoint": path, "request": request, "users_per_request": per,
        "concurrency": concurrency,
        "duration_s": round(seconds, 2), "requests": res["requests"], "requests_per_s": round(rps, 1),
        "recommendations_per_s": round(rps * per, 1),
        "latency_ms": {p: round(lat[p] / 1000, 3) for p in ("p50", "p90", "p99", "max", "mean")},
        "errors": res["errors"], "error_total": sum(res["errors"].values()),
        "server_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(1, res["requests"]), 3),
        "wrk_cpu_ms_per_request": round(wrk_cpu * 1000 / max(1, res["requests"]), 3),
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    # What the cores could do if this test had them to itself: CPU-bound ceiling, not a measurement.
    per_request = out["server_cpu_ms_per_request"] + out["wrk_cpu_ms_per_request"]
    out["cpu_bound_ceiling_recommendations_per_s"] = round((os.cpu_count() or 1) * 1000 / per_request * per) if per_request else None
    print(f"  {server.name:8s} {path:17s} {request:22s} c={concurrency:<3d} {out['requests_per_s']:9.1f} req/s "
          f"{out['recommendations_per_s']:9.1f} rec/s  p50 {out['latency_ms']['p50']:.2f} ms  "
          f"p99 {out['latency_ms']['p99']:.2f} ms  errors {out['error_total']}  "
          f"cpu {out['server_cpu_ms_per_request']:.3f} ms/req  load {out['loadavg_1m']}", flush=True)
    return out


def warm_up(server: Server, api: str, user_ids: np.ndarray, work: Path,
            histories: list[list[str]] | None = None) -> None:
    path = "/recommend" if api == "compress" else "/invocations"
    bodies_file = work / f"{server.name}-warmup.lua"
    bodies = make_bodies(user_ids, "single", api, seed=1)
    if histories:
        bodies += make_bodies(user_ids, "history", api, histories=histories)
    write_bodies(bodies_file, bodies)
    run_wrk(server.url, path, bodies_file, 8, 3, 10**9)


def measure(server: Server, api: str, user_ids: np.ndarray, args, work: Path, kinds=("single", "batch"),
            scenarios=SCENARIOS, histories: list[list[str]] | None = None) -> dict:
    warm_up(server, api, user_ids, work, histories)
    rss_start = memory_mib(server.proc.pid)
    runs = [scenario(server, api, kind, c, user_ids, args, work, histories) for kind, c in scenarios if kind in kinds]
    return {"rss_mib_start": rss_start, "rss_mib_end": memory_mib(server.proc.pid), "runs": runs}


# ------------------------------------------------------------------------------ FastAPI baseline
def fastapi_baseline_app():
    """uvicorn factory: /recommend in FastAPI + pydantic over the same Recommender (comparison only)."""
    # Here, not at the top: FastAPI and pydantic are optional, and only the baseline's worker processes
    # (cwd = the checkout, so `serving` imports) need them and the serving stack.
    import faiss
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

    from serving.recommender import Recommender

    state: dict[str, Recommender] = {}

    class RecommendIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: StrictStr
        k: Annotated[StrictInt, Field(ge=1, le=1000)] = 10
        exclude_seen: StrictBool = True

    class RecommendOut(BaseModel):
        user_id: str
        items: list[str]
        scores: list[float]

    @asynccontextmanager
    async def lifespan(app):
        faiss.omp_set_num_threads(1)
        state["rec"] = Recommender(open_bundle(os.environ["LOADTEST_BUNDLE"], intra_op_num_threads=1, faiss_threads=1))
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    async def recommend(req):
        rec = state["rec"]
        user = rec.bundle.user_index.get(req.user_id)
        if user is None:
            raise HTTPException(404, f"unknown user id {req.user_id!r}")
        [(items, scores)] = rec.recommend(np.array([user], dtype=np.int64), req.k, req.exclude_seen)
        return RecommendOut(user_id=req.user_id, items=rec.bundle.item_ids[items].tolist(), scores=scores.tolist())

    # Real annotation objects: with `from __future__ import annotations` FastAPI could not resolve local classes.
    recommend.__annotations__ = {"req": RecommendIn, "return": RecommendOut}
    app.post("/recommend", response_model=RecommendOut)(recommend)
    return app


# ------------------------------------------------------------------------------------ reporting
def markdown(report: dict) -> str:
    m = report["machine"]
    lineage = report["bundle"].get("lineage") or {}
    what = lineage.get("source") or ", ".join(f"{k} {lineage[k]}" for k in ("model_kind", "method", "checkpoint_fingerprint")
                                             if lineage.get(k)) or "unknown lineage"
    lines = [
        f"Load test of `compress serve` on {Path(report['bundle']['path']).name} ({what}; "
        f"{report['bundle']['num_users']:,} users x {report['bundle']['num_items']:,} "
        f"items, dim {report['bundle']['dim']}, index {report['bundle']['index']}; {report['workers']} workers x 1 ORT "
        f"+ 1 FAISS thread), wrk 1 thread on the same machine over loopback, {report['duration_s']:g} s per row, "
        f"k={K}, exclude_seen. Machine: {m['cpus']} cores ({m['cpu']}), load average {m['loadavg_before']} before "
        f"the run (other work shares these cores).",
        "",
        "| server | endpoint | request | concurrency | requests/s | recommendations/s | p50 ms | p99 ms | errors "
        "| server CPU ms/request | wrk CPU ms/request | CPU-bound ceiling, recommendations/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in report["servers"].items():
        for r in res["runs"]:
            lines.append(
                f"| {name} | `{r['endpoint']}` | {r['request']} | {r['concurrency']} | "
                f"{r['requests_per_s']:,.0f} | {r['recommendations_per_s']:,.0f} | {r['latency_ms']['p50']:.2f} | "
                f"{r['latency_ms']['p99']:.2f} | {r['error_total']} | {r['server_cpu_ms_per_request']:.3f} | "
                f"{r['wrk_cpu_ms_per_request']:.3f} | {r['cpu_bound_ceiling_recommendations_per_s'] or 0:,} |"
            )
    lines.append("")
    for name, res in report["servers"].items():
        a, b = res["rss_mib_start"], res["rss_mib_end"]
        lines.append(f"- {name}: memory of all server processes after warm-up / at the end: RSS {a['total']:,.0f} / "
                     f"{b['total']:,.0f} MiB (PSS {a['pss_total']:,.0f} / {b['pss_total']:,.0f} MiB; "
                     f"{len(b['per_process'])} processes).")
    lines.append("- CPU-bound ceiling = cores / (server + wrk CPU per request) x users per request: what this "
                 "machine would give the test with no other load on it (an estimate from measured CPU time).")
    for line in report.get("comparisons", []):
        lines.append(f"- {line}")
    if report.get("history_bundle"):
        h = report["history_bundle"]
        lines.append(f"- compress-history: {Path(h['path']).name} (history user tower, max_len {h['max_len']}; "
                     f"{h['num_users']:,} users x {h['num_items']:,} items, dim {h['dim']}, index {h['index']}); "
                     "its user id rows compute each user's vector from its stored history.")
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def _find(runs: list[dict], kind_users: int, concurrency: int) -> dict | None:
    return next((r for r in runs if r["users_per_request"] == kind_users and r["concurrency"] == concurrency), None)


def comparisons(servers: dict) -> list[str]:
    out = []
    ours = servers.get("compress", {}).get("runs", [])
    history = [r for r in servers.get("compress-history", {}).get("runs", []) if r["request"].startswith("history")]
    for concurrency in (1, 32):
        a = next((r for r in history if r["concurrency"] == concurrency), None)
        b = _find([r for r in ours if r["request"] == "user id"], 1, concurrency)
        if a and b and b["requests_per_s"]:
            out.append(f"{a['request']} vs an ID-tower user id at concurrency {concurrency}: p50 "
                       f"{a['latency_ms']['p50']:.2f} vs {b['latency_ms']['p50']:.2f} ms, "
                       f"{a['requests_per_s'] / b['requests_per_s']:.2f}x the requests/s, server CPU "
                       f"{a['server_cpu_ms_per_request']:.3f} vs {b['server_cpu_ms_per_request']:.3f} ms/request")
    for other in ("mlflow", "fastapi"):
        theirs = servers.get(other, {}).get("runs", [])
        for users in (1, BATCH_USERS):
            a, b = _find(ours, users, 32), _find(theirs, users, 32)
            if a and b and b["recommendations_per_s"]:
                out.append(
                    f"{users} user(s)/request at concurrency 32: compress serve {a['recommendations_per_s'] / b['recommendations_per_s']:.1f}x "
                    f"the recommendations/s of {other} (p99 {a['latency_ms']['p99']:.1f} vs {b['latency_ms']['p99']:.1f} ms, "
                    f"server CPU {a['server_cpu_ms_per_request']:.3f} vs {b['server_cpu_ms_per_request']:.3f} ms/request)")
    return out


# ---------------------------------------------------------------------------------- stand-in bundle
def make_gowalla_bundle(out: Path, dim: int = 20, seed: int = 0) -> None:
    from export.bundle import write_bundle  # heavy (onnx, faiss) and only needed for --make-gowalla-bundle

    rows = [line.split() for line in (GOWALLA / "train.txt").read_text().splitlines() if line.strip()]
    user_ids = np.array([r[0] for r in rows])
    lens = np.array([len(r) - 1 for r in rows])
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indices = np.array([int(x) for r in rows for x in r[1:]], dtype=np.int64)
    num_items = 40_981  # Gowalla's item count (all three split files)
    rng = np.random.default_rng(seed)
    users = (rng.standard_normal((len(rows), dim)) * 0.3).astype(np.float32)
    items = (rng.standard_normal((num_items, dim)) * rng.lognormal(0, 0.5, (num_items, 1)) * 0.3).astype(np.float32)
    manifest = write_bundle(
        out, user_vectors=users, item_vectors=items, user_ids=user_ids,
        item_ids=np.array([str(i) for i in range(num_items)]), seen_indptr=indptr, seen_indices=indices,
        index_factory="auto", lineage={"source": "stand-in: random vectors, Gowalla training interactions"},
        metrics={}, package_version="loadtest", overwrite=True,
    )
    print(f"wrote {out}: {manifest['num_users']} users x {manifest['num_items']} items, index {manifest['index']['factory']}")


# -------------------------------------------------------------------------------- MLflow registry
def register_checkpoint(checkpoint: Path, name: str, tracking_uri: str) -> str:
    """Register CHECKPOINT as a new version of NAME (pyfunc model-from-code, as `--register` does); the models:/ URI.

    A checkpoint trained untracked gets a run of its own (experiment "loadtest") to hold the logged model."""
    import urllib.parse

    from compress_app.tracking.environment import import_mlflow
    from compress_app.tracking.registry import (DEFAULT_RECALL_FLOOR, export_for_registration, register_version)
    from compress_app.tracking.registry import register_checkpoint as register_tracked
    from compressor.checkpoint import read_meta
    from compressor.run_dir import MODEL_FILE

    if checkpoint.is_dir():  # a run dir: its best checkpoint, as `compress export RUN_DIR` reads it
        checkpoint = checkpoint / MODEL_FILE
    meta = read_meta(checkpoint)
    if not meta:
        raise SystemExit(f"{checkpoint}: not a compress checkpoint (no metadata)")
    if meta.get("mlflow_run_id"):
        return register_tracked(checkpoint, name, tracking_uri=tracking_uri)["model_uri"]
    experiment = "loadtest"
    client = import_mlflow().MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        parts = urllib.parse.urlsplit(tracking_uri)
        location = None
        if parts.scheme == "sqlite" and parts.path.startswith("/"):  # sqlite:///relative.db or sqlite:////abs.db
            db = Path(parts.path[1:]).resolve()
            location = (db.parent / f"{db.stem}-artifacts").as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    run = client.create_run(experiment_id, run_name=f"register-{meta.get('fingerprint', 'checkpoint')}",
                            tags={"compress.command": "benchmarks/loadtest.py --register-checkpoint",
                                  "compress.checkpoint_fingerprint": str(meta.get("fingerprint")),
                                  "compress.checkpoint_path": str(checkpoint.resolve())})
    try:
        client.log_artifact(run.info.run_id, str(checkpoint), "checkpoint")  # reachable for re-export
        bundle = export_for_registration(checkpoint)
        summary = register_version(client, run.info.run_id, bundle, meta, name, recall_floor=DEFAULT_RECALL_FLOOR)
    finally:
        client.set_terminated(run.info.run_id)
    return summary["model_uri"]


# ----------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory to serve (compress export output)")
    ap.add_argument("--history-bundle", type=Path, default=None,
                    help="also serve this history-tower bundle and load-test history requests on it")
    ap.add_argument("--history-len", type=int, default=HISTORY_LEN,
                    help="items per history request (capped at the bundle's max_len; default %(default)s)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per run (default 60)")
    ap.add_argument("--max-requests", type=int, default=2_000_000, help="per run, at most this many requests")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server workers (default: core count)")
    ap.add_argument("--mlflow-model-uri", default=None, help="also load-test `mlflow models serve` of this models:/ URI")
    ap.add_argument("--compare-fastapi", action="store_true", help="also run the FastAPI baseline (single-user runs)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench-out" / "serve")
    ap.add_argument("--make-gowalla-bundle", type=Path, default=None, metavar="OUT",
                    help="only write the Gowalla-shaped stand-in bundle to OUT and exit")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="MLflow store of --mlflow-model-uri / --register-checkpoint (default: $MLFLOW_TRACKING_URI)")
    ap.add_argument("--register-checkpoint", type=Path, default=None, metavar="CKPT",
                    help="only register CKPT (run dir or .safetensors) as a new version of --register-name, "
                         "print its models:/ URI and exit")
    ap.add_argument("--register-name", default="gowalla-student", help="registered model name (default: %(default)s)")
    args = ap.parse_args()
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # `mlflow models serve` resolves models:/ with it

    if args.make_gowalla_bundle:
        make_gowalla_bundle(args.make_gowalla_bundle)
        return 0
    if args.register_checkpoint:
        if not args.tracking_uri:
            ap.error("--register-checkpoint needs --tracking-uri (or MLFLOW_TRACKING_URI)")
        print(register_checkpoint(args.register_checkpoint, args.register_name, args.tracking_uri))
        return 0
    if args.bundle is None and args.history_bundle is None:
        ap.error("--bundle (or --history-bundle) is required")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    if args.duration <= 0 or args.max_requests < 1 or args.history_len < 1:
        ap.error("--duration, --max-requests and --history-len must be positive")
    history = None
    if args.history_bundle is not None:
        opened = open_bundle(args.history_bundle.resolve(), faiss_threads=None)
        if not opened.user_tower.is_history:
            ap.error(f"--history-bundle {args.history_bundle}: its user tower is looked up by user id (not a history "
                     "tower)")
        history = {"path": str(args.history_bundle.resolve()), "user_ids": opened.user_ids,
                   "histories": sample_histories(opened, args.history_len), "manifest": opened.manifest}
        del opened
    bundle = (args.bundle or args.history_bundle).resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    user_ids = open_bundle(bundle, faiss_threads=None).user_ids  # whatever id encoding the bundle's format uses
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = args.out_dir / "work"
    work.mkdir(exist_ok=True)

    report: dict[str, Any] = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "bundle": {"path": str(bundle), "num_users": manifest["num_users"], "num_items": manifest["num_items"],
                   "dim": manifest["dim"], "index": manifest["index"]["factory"], "lineage": manifest.get("lineage")},
        "workers": args.workers, "duration_s": args.duration, "max_requests": args.max_requests, "k": K,
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip(),
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
        "servers": {},
    }
    if history is not None:
        hm = history["manifest"]
        report["history_bundle"] = {"path": history["path"], "num_users": hm["num_users"], "num_items": hm["num_items"],
                                    "dim": hm["dim"], "index": hm["index"]["factory"],
                                    "max_len": hm["user_tower"]["max_len"], "history_len": args.history_len}
    try:
        with open("/proc/cpuinfo") as f:
            report["machine"]["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass

    if args.bundle is not None:
        print(f"compress serve ({args.workers} workers) on {bundle}", flush=True)
        port = free_port()
        server = Server("compress", [sys.executable, "-m", "compress_app", "serve", str(bundle), "--port", str(port),
                                     "--workers", str(args.workers)], port, "/readyz", args.out_dir / "compress-serve.log")
        try:
            time.sleep(1.0)  # /readyz answered from one worker: give the others their (sub-second) load
            report["servers"]["compress"] = measure(server, "compress", user_ids, args, work)
        finally:
            server.stop()

    if history is not None:
        print(f"compress serve ({args.workers} workers) on the history bundle {history['path']}", flush=True)
        port = free_port()
        server = Server("compress-history", [sys.executable, "-m", "compress_app", "serve", history["path"], "--port",
                                             str(port), "--workers", str(args.workers)],
                        port, "/readyz", args.out_dir / "compress-serve-history.log")
        try:
            time.sleep(1.0)
            report["servers"]["compress-history"] = measure(
                server, "compress", history["user_ids"], args, work, kinds=("history", "single"),
                scenarios=HISTORY_SCENARIOS, histories=history["histories"])
        finally:
            server.stop()

    if args.compare_fastapi:
        print("FastAPI baseline", flush=True)
        port = free_port()
        server = Server("fastapi", [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "benchmarks"), "--factory",
                                    "loadtest:fastapi_baseline_app", "--host", "127.0.0.1", "--port", str(port),
                                    "--workers", str(args.workers), "--no-access-log", "--log-level", "warning"],
                        port, "/readyz", args.out_dir / "fastapi.log",
                        env={"LOADTEST_BUNDLE": str(bundle), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
        try:
            time.sleep(1.0)
            report["servers"]["fastapi"] = measure(server, "compress", user_ids, args, work, kinds=("single",))
        finally:
            server.stop()

    if args.mlflow_model_uri:
        print(f"mlflow models serve {args.mlflow_model_uri}", flush=True)
        port = free_port()
        venv_bin = str(Path(sys.executable).parent)  # `mlflow models serve` execs uvicorn/gunicorn from PATH
        server = Server("mlflow", [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.mlflow_model_uri,
                                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", str(args.workers)],
                        port, "/ping", args.out_dir / "mlflow-serve.log",
                        env={"PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
                             "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
        try:
            report["servers"]["mlflow"] = measure(server, "mlflow", user_ids, args, work)
        finally:
            server.stop()
    else:
        print("mlflow models serve: skipped (no --mlflow-model-uri)", flush=True)

    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["comparisons"] = comparisons(report["servers"])
    (args.out_dir / "loadtest.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out_dir / "loadtest.md").write_text(md)
    print("\n" + md)
    bad = [r for s in report["servers"].values() for r in s["runs"] if r["error_total"]]
    if bad:
        print(f"{len(bad)} run(s) had errors", file=sys.stderr)
    return 1 if any(r["server"].startswith("compress") for r in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
