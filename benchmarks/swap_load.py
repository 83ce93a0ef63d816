"""Zero-downtime model swap under load, and the cost of authentication.

1. Swap: two small students are trained and registered as versions of one model (MLflow, SQLite store under
   --out), alias `live` on the first. `compress serve models:/NAME@live --follow-alias` runs with 2 workers and a
   token while CONCURRENCY clients send /recommend for DURATION seconds; the alias is moved to the second version
   and back. Every answer is checked against the answer of the version its X-Model-Version header names
   (computed in-process from that version's bundle): 0 failed requests and 0 mixed answers is the target.
   Latency is reported overall and in the 5 s after each swap was seen.
2. Auth: the same bundle served with and without a token, side by side in one run, each for --auth-s seconds.

    python benchmarks/swap_load.py --out bench-out/swap [--duration 60] [--concurrency 32] [--resume]

Results: <out>/swap.json and <out>/auth.json (--resume reuses the trained, registered versions and any finished
part). The load generator runs on the same 2 cores as the server: absolute throughput is pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from serving.bundle import open_bundle  # noqa: E402
from serving.recommender import Recommender  # noqa: E402

NAME = "bench-swap"
K = 10


def sh(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "compress_app", *map(str, args)], cwd=ROOT, env=env, text=True,
                       capture_output=True)
    if check and p.returncode != 0:
        raise SystemExit(f"compress {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return p


def load_note() -> dict:
    return {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def percentile(values, q):
    return float(np.percentile(values, q)) if values else None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_versions(out: Path, env: dict) -> list[str]:
    """Two 20-dim students on the bundled CiteULike-t (different seeds), registered as versions 1 and 2."""
    for seed in (0, 1):
        run = out / f"student-s{seed}"
        if not (run / "result.json").exists():
            sh("train", "--out", run, "--set", "model.dim=20", "--epochs", 3, "--seed", seed, "--threads", 1,
               "--quiet", "--register", NAME, "--experiment", "swap-bench", env=env)
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = sorted(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    return [v.version for v in versions[:2]]


def set_alias(env: dict, version: str) -> None:
    import mlflow

    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).set_registered_model_alias(NAME, "live", version)


class Expected:
    """The answer each version gives a user, computed in-process from that version's bundle."""

    def __init__(self, bundles: dict[str, Path]):
        self.recs = {label: Recommender(open_bundle(path, faiss_threads=None)) for label, path in bundles.items()}
        self.cache: dict[tuple[str, str], list[str]] = {}

    def items(self, label: str, user: str) -> list[str] | None:
        if label not in self.recs:
            return None
        key = (label, user)
        if key not in self.cache:
            rec = self.recs[label]
            items, _ = rec.recommend(rec.user_indices([user]), K)[0]
            self.cache[key] = rec.item_external_ids(items).tolist()
        return self.cache[key]


async def client_loop(url, headers, users, deadline, records):
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        while time.monotonic() < deadline:
            user = random.choice(users)
            t0 = time.monotonic()
            try:
                r = await http.post("/recommend", json={"user_id": user, "k": K})
                records.append((t0, time.monotonic() - t0, r.status_code, r.headers.get("x-model-version"), user,
                                r.json().get("items") if r.status_code == 200 else None))
            except httpx.HTTPError as e:
                records.append((t0, time.monotonic() - t0, -1, None, user, repr(e)))


async def run_load(url, headers, users, seconds, concurrency, events=()):
    """CONCURRENCY clients for SECONDS; ``events`` are (at_s, callable) run in a thread meanwhile."""
    records: list = []
    start = time.monotonic()
    deadline = start + seconds

    async def fire():
        for at, fn in events:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            await asyncio.to_thread(fn)

    await asyncio.gather(fire(), *(client_loop(url, headers, users, deadline, records) for _ in range(concurrency)))
    return start, records


def wait_ready(url, headers, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready")


def summarize(records, start):
    ok = [r for r in records if r[2] == 200]
    lat = [r[1] * 1000 for r in ok]
    span = (max(r[0] + r[1] for r in records) - start) if records else 0
    return {"requests": len(records), "failed": len(records) - len(ok), "req_per_s": round(len(ok) / span, 1) if span else None,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}


def swap_part(a, out: Path, env: dict, versions: list[str]) -> dict:
    from compress_app.tracking import download_registered_bundle

    set_alias(env, versions[0])
    labels = {f"models:/{NAME}/{v}": v for v in versions}
    expected = Expected({label: download_registered_bundle(label) for label in labels})
    users = expected.recs[next(iter(labels))].bundle.user_ids.tolist()
    token = out / "token"
    token.write_text("bench-" + os.urandom(8).hex())
    headers = {"Authorization": f"Bearer {token.read_text()}"}
    port = free_port()
    log = open(out / "serve-follow.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "compress_app", "serve", f"models:/{NAME}@live", "--follow-alias",
                             "--poll-s", "1", "--workers", "2", "--port", str(port), "--token-file", str(token)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, headers, proc)
        moves = [(a.duration * 0.3, lambda: set_alias(env, versions[1])), (a.duration * 0.65, lambda: set_alias(env, versions[0]))]
        before = load_note()
        start, records = asyncio.run(run_load(url, headers, users, a.duration, a.concurrency, moves))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
    mixed = [r for r in records if r[2] == 200 and r[5] != expected.items(r[3], r[4])]
    seen = sorted({r[3] for r in records if r[3]})
    # when each version was first seen answering after each move, and latency in the 5 s after it
    windows = []
    for at, _ in moves:
        after = [r for r in records if r[0] >= start + at and r[2] == 200]
        windows.append([r[1] * 1000 for r in after if r[0] <= start + at + 5])
    result = {"summary": summarize(records, start), "mixed_answers": len(mixed), "versions_seen": seen,
              "versions_per_second": _versions_timeline(records, start),
              "p99_ms_5s_after_each_move": [percentile(w, 99) for w in windows],
              "p50_ms_5s_after_each_move": [percentile(w, 50) for w in windows],
              "moves_at_s": [m[0] for m in moves], "concurrency": a.concurrency, "duration_s": a.duration,
              "workers": 2, "load_before": before, "load_after": load_note(),
              "command": " ".join(sys.argv)}
    return result


def _versions_timeline(records, start):
    timeline: dict[int, dict[str, int]] = {}
    for r in records:
        if r[2] == 200:
            sec = int(r[0] - start)
            timeline.setdefault(sec, {}).setdefault(r[3], 0)
            timeline[sec][r[3]] += 1
    return {str(k): v for k, v in sorted(timeline.items())}


def auth_part(a, out: Path, env: dict, versions: list[str]) -> dict:
    from compress_app.tracking import download_registered_bundle

    bundle = download_registered_bundle(f"models:/{NAME}/{versions[0]}")
    users = open_bundle(bundle, faiss_threads=None).user_ids.tolist()
    token = out / "token"
    results = {}
    for mode in ("off", "on", "off", "on"):  # interleaved, two rounds each
        port = free_port()
        argv = [sys.executable, "-m", "serving", str(bundle), "--port", str(port), "--workers", "2"]
        headers = {}
        if mode == "on":
            argv += ["--token-file", str(token)]
            headers = {"Authorization": f"Bearer {token.read_text()}"}
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, headers, proc)
            start, records = asyncio.run(run_load(url, headers, users, a.auth_s, a.concurrency))
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
        results.setdefault(mode, []).append(summarize(records, start))
    return {"runs": results, "median_req_per_s": {m: statistics.median(r["req_per_s"] for r in v) for m, v in results.items()},
            "median_p99_ms": {m: statistics.median(r["p99_ms"] for r in v) for m, v in results.items()},
            "concurrency": a.concurrency, "seconds_each": a.auth_s, "load": load_note(), "command": " ".join(sys.argv)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "swap")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load in the swap part")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--auth-s", type=float, default=20.0, help="seconds of load per auth run (4 runs)")
    ap.add_argument("--parts", nargs="+", default=["swap", "auth"], choices=["swap", "auth"])
    ap.add_argument("--resume", action="store_true", help="skip parts whose result file exists")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlflow.db'}", COMPRESS_NO_MLFLOW="0",
               COMPRESS_CACHE_DIR=str(out / "cache"), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "COMPRESS_CACHE_DIR", "MLFLOW_DISABLE_TELEMETRY")})
    versions = prepare_versions(out, env)
    for part, fn in (("swap", swap_part), ("auth", auth_part)):
        path = out / f"{part}.json"
        if part not in a.parts or (a.resume and path.exists()):
            continue
        result = fn(a, out, env, versions)
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps({part: {k: v for k, v in result.items() if k not in ("versions_per_second", "runs")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
