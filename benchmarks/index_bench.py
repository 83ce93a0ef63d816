"""Serving index benchmark (issue 5): recall@100 and single-query latency of Flat vs HNSW vs IVF vs a quantised
index for the Gowalla 20-dim student, and bundle size vs checkpoint size for a CiteULike and a Gowalla student.

Each index is a real bundle written by ``export.from_checkpoint.export_checkpoint`` (so it is exactly what serving
loads: the ip2l2 reduction, codec padding, the nprobe/efSearch that export tuned to its recall floor) and opened with
``serving.bundle.open_bundle``. Then, in ONE process and interleaved per query (query q is run on every index
before query q+1, so load drift hits all indexes alike):
  - FAISS search time for one query (batch 1, 1 FAISS thread, k = 100, no exclude-seen over-fetch), exactly as
    ``serving.recommender.Recommender._search`` issues it (zeros appended for ip2l2; HNSW efSearch per call);
  - end-to-end ``Recommender.recommend([user], 100, exclude_seen=False)`` time (ONNX user tower + search +
    re-scoring), interleaved the same way (all indexes' searches of query q, then all their recommend() calls);
  - recall@100 against exact inner-product search on the true vectors (exclude-seen off), over the same queries.
For IVF indexes a side column gives the recall the same index reaches when the query is first scaled to the items'
norm R (what ``compressor.retrieval.TopKSearcher`` does for the training-time refresh; the bundle/serving path does
not).

Checkpoints: the Gowalla student is the `compress distill --method scratch` run written by kd_speed.py
(bench-out/kd_speed/gowalla-mf20; trained here with the same command when missing); the CiteULike student is a
`compress distill --method scratch` run of a few epochs (sizes do not depend on training length).

    python benchmarks/index_bench.py --out bench-out/index_bench
    python benchmarks/index_bench.py --quick --out bench-out/index_bench-quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.device import configure_threads  # noqa: E402  (the checkout on sys.path first)
from compressor.retrieval import recall_at_k  # noqa: E402
from compressor.run_dir import MODEL_FILE, RESULT_FILE, RESUME_FILE  # noqa: E402
from export.from_checkpoint import export_checkpoint  # noqa: E402
from serving.bundle import open_bundle  # noqa: E402
from serving.bundle_format import ip2l2_queries  # noqa: E402
from serving.recommender import Recommender  # noqa: E402

CONFIGS = {"citeulike": ROOT / "configs" / "citeulike" / "mf-student.yaml",
           "gowalla": ROOT / "configs" / "gowalla" / "mf-student.yaml"}


def load_note() -> dict:
    return {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "time": time.strftime("%H:%M:%S")}


def train_student(name: str, out: Path, epochs: int, threads: int) -> Path:
    run = out
    if (run / MODEL_FILE).exists() and (run / RESULT_FILE).exists():
        return run
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "compress_app", "distill", "--method", "scratch", "--config", str(CONFIGS[name]),
           "--out", str(run), "--epochs", str(epochs), "--threads", str(threads), "--quiet", "--no-mlflow",
           "--set", "train.eval_every=100000"]
    print("training:", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), COMPRESS_NO_MLFLOW="1"),
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"training {name} failed:\n{p.stderr[-3000:]}")
    return run


def checkpoint_breakdown(path: Path) -> dict:
    """Bytes of each tensor group in a safetensors checkpoint (+ header)."""
    groups: dict[str, int] = {}
    with safe_open(str(path), framework="np") as f:
        for k in f.keys():
            arr = f.get_tensor(k)
            parts = k.split(".")
            g = ".".join(parts[:2]) if k.startswith(("model.", "ids.", "train.")) else parts[0]
            groups[g] = groups.get(g, 0) + arr.nbytes
    total = path.stat().st_size
    groups["header+metadata"] = total - sum(groups.values())
    return {"total": total, "parts": groups}


def bundle_breakdown(bundle: Path) -> dict:
    parts = {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.is_file()}
    return {"total": sum(parts.values()), "parts": parts}


def export(ckpt: Path, out: Path, factory: str, force: bool, k: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    manifest = export_checkpoint(ckpt, out, index_factory=factory, k_max=k, force=force, overwrite=True)
    return manifest, time.perf_counter() - t0


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="default bench-out/index_bench (quick: ...-quick)")
    ap.add_argument("--gowalla-ckpt", type=Path, default=ROOT / "bench-out" / "kd_speed" / "gowalla-mf20",
                    help="Gowalla MF20 run dir (from kd_speed.py); trained here when missing")
    ap.add_argument("--gowalla-epochs", type=int, default=5)
    ap.add_argument("--citeulike-epochs", type=int, default=5)
    ap.add_argument("--indexes", nargs="+",
                    default=["Flat", "HNSW32", "IVF256,Flat", "IVF1024,Flat", "IVF256,SQ8", "IVF1024,SQ8",
                             "IVF256,PQ11"],
                    help="FAISS factories exported for the Gowalla student (export tunes nprobe/efSearch to 0.95)")
    ap.add_argument("--queries", type=int, default=3000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2, help="threads for training/export (search uses 1)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.queries, a.indexes = 300, ["Flat", "HNSW32", "IVF256,Flat", "IVF256,SQ8"]
        a.citeulike_epochs = 1
    out = a.out or ROOT / ("bench-out/index_bench-quick" if a.quick else "bench-out/index_bench")
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"started": load_note(), "args": {k: str(v) for k, v in vars(a).items()}}
    print("load at start:", res["started"]["uptime"], flush=True)

    configure_threads(a.threads)
    gow = a.gowalla_ckpt if a.gowalla_ckpt.is_absolute() else ROOT / a.gowalla_ckpt
    gow = train_student("gowalla", gow, a.gowalla_epochs, a.threads)
    cite = train_student("citeulike", out / "citeulike-mf20", a.citeulike_epochs, a.threads)

    # ---------------------------------------------------------------- sizes (default export: --index auto)
    sizes = {}
    for name, run in (("citeulike", cite), ("gowalla", gow)):
        b = out / "bundles" / f"{name}-auto"
        manifest, secs = export(run, b, "auto", False, a.k)
        sizes[name] = {"checkpoint": checkpoint_breakdown(run / MODEL_FILE), "bundle": bundle_breakdown(b),
                       "index": manifest["index"]["factory"], "users": manifest["num_users"],
                       "items": manifest["num_items"], "dim": manifest["dim"], "export_s": secs,
                       "resume_checkpoint_bytes": (run / RESUME_FILE).stat().st_size
                       if (run / RESUME_FILE).exists() else None}
        print(f"{name}: checkpoint {sizes[name]['checkpoint']['total']:,} B, bundle "
              f"{sizes[name]['bundle']['total']:,} B", flush=True)
    res["sizes"] = sizes

    # ---------------------------------------------------------------- Gowalla: one bundle per index
    bundles = {}
    for fac in a.indexes:
        b = out / "bundles" / ("gowalla-" + fac.replace(",", "_"))
        try:
            manifest, secs = export(gow, b, fac, force=True, k=a.k)  # force: record recall even below the floor
        except Exception as exc:  # an unusable factory is reported, not fatal
            print(f"export {fac} failed: {exc}", flush=True)
            res.setdefault("export_errors", {})[fac] = str(exc)
            continue
        bundles[fac] = {"path": b, "manifest": manifest, "export_s": secs}
        print(f"exported {fac}: {manifest['index']['search_params']} recall@{a.k} "
              f"{manifest['index']['recall_at_k']:.4f} ({secs:.0f}s)", flush=True)

    faiss.omp_set_num_threads(1)
    opened = {fac: open_bundle(info["path"], intra_op_num_threads=1, faiss_threads=1) for fac, info in bundles.items()}
    recs = {fac: Recommender(bd) for fac, bd in opened.items()}
    ref = opened["Flat"] if "Flat" in opened else next(iter(opened.values()))
    users_all = np.arange(ref.num_users)
    rng = np.random.default_rng(0)
    qusers = np.sort(rng.choice(users_all, size=min(a.queries, ref.num_users), replace=False))
    uvec = ref.session.run([ref.output_name], {ref.input_name: qusers.astype(np.int64)})[0]
    # exact truth on the true vectors (the Flat bundle's items are exact)
    exact = faiss.IndexFlatIP(ref.dim)
    exact.add(ref.item_vectors)
    _, truth = exact.search(np.ascontiguousarray(uvec), a.k)

    search_t = {fac: [] for fac in recs}
    e2e_t = {fac: [] for fac in recs}
    found = {fac: np.empty((len(qusers), a.k), np.int64) for fac in recs}
    order = list(recs)
    for rep in range(2):  # warm-up pass over a few queries, untimed
        for fac in order:
            recs[fac]._search(uvec[:1], a.k)
            recs[fac].recommend(qusers[:1], a.k, exclude_seen=False)
    for qi in range(len(qusers)):
        q, u = uvec[qi : qi + 1], qusers[qi : qi + 1]
        seq = order if qi % 2 == 0 else order[::-1]
        # all searches of this query, then all recommend() calls: between two timed calls on one index the
        # other indexes run, so no call finds its index's data still hot in cache from the call just before
        for fac in seq:
            t0 = time.perf_counter()
            ids = recs[fac]._search(q, a.k)
            search_t[fac].append(time.perf_counter() - t0)
            found[fac][qi] = ids[0]
        for fac in seq:
            t0 = time.perf_counter()
            recs[fac].recommend(u, a.k, exclude_seen=False)
            e2e_t[fac].append(time.perf_counter() - t0)
    rows = []
    for fac in recs:
        bd, man = opened[fac], bundles[fac]["manifest"]
        row = {"factory": fac, "search_params": man["index"]["search_params"],
               "recall_at_100": recall_at_k(found[fac], truth),
               "export_recall_at_100": man["index"]["recall_at_k"],
               "search_ms_p50": 1e3 * statistics.median(search_t[fac]), "search_ms_p90": 1e3 * pct(search_t[fac], 90),
               "recommend_path": "dense numpy top-k (Recommender.dense)" if getattr(recs[fac], "dense", False)
               else "FAISS search + re-score",
               "recommend_ms_p50": 1e3 * statistics.median(e2e_t[fac]),
               "recommend_ms_p90": 1e3 * pct(e2e_t[fac], 90),
               "items_faiss_bytes": man["files"]["items.faiss"]["bytes"],
               "bundle_bytes": bundle_breakdown(bundles[fac]["path"])["total"], "export_s": bundles[fac]["export_s"]}
        if man["index"]["query_transform"] == "ip2l2":
            try:
                ivf = faiss.extract_index_ivf(bd.index)
            except Exception:
                ivf = None
            if ivf is not None:  # recall when queries are scaled onto the items' sphere (TopKSearcher's transform)
                scale = man["index"]["max_norm"] / np.maximum(np.linalg.norm(uvec, axis=1, keepdims=True), 1e-30)
                _, ids = bd.index.search(ip2l2_queries(uvec * scale, bd.index.d), a.k)
                row["recall_at_100_query_scaled"] = recall_at_k(ids, truth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    flat = next((r for r in rows if r["factory"] == "Flat"), None)
    for r in rows:
        r["search_speedup_vs_flat"] = flat["search_ms_p50"] / r["search_ms_p50"] if flat else None
    res["search"] = {"users": int(ref.num_users), "items": int(ref.num_items), "dim": int(ref.dim), "k": a.k,
                     "queries": int(len(qusers)), "faiss_threads": 1, "rows": rows}
    res["ended"] = load_note()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    (out / "results.md").write_text(md)
    print(md)


def markdown(res: dict) -> str:
    L = [f"# Index / bundle benchmark ({res['started']['time']} - {res['ended']['time']})\n",
         f"Shared machine: load at start `{res['started']['uptime']}`, at end `{res['ended']['uptime']}`. "
         "Latencies are medians over the queries of ONE run, indexes interleaved per query.\n"]
    s = res["search"]
    L.append(f"## Gowalla 20-dim student: {s['users']:,} users x {s['items']:,} items, k = {s['k']}, "
             f"{s['queries']:,} queries, batch 1, {s['faiss_threads']} FAISS thread, exclude-seen off\n")
    L.append("| index (bundle) | search params (tuned by export) | recall@100 | recall@100, query scaled | FAISS search "
             "ms p50 | p90 | x vs Flat | recommend() path | recommend() ms p50 | p90 | items.faiss bytes | "
             "bundle bytes |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in s["rows"]:
        L.append(f"| {r['factory']} | {r['search_params'] or '-'} | {r['recall_at_100']:.4f} | "
                 + (f"{r['recall_at_100_query_scaled']:.4f}" if "recall_at_100_query_scaled" in r else "-") + " | "
                 + f"{r['search_ms_p50']:.3f} | "
                 f"{r['search_ms_p90']:.3f} | {r['search_speedup_vs_flat']:.2f} | {r.get('recommend_path', '')} | "
                 f"{r['recommend_ms_p50']:.3f} | "
                 f"{r['recommend_ms_p90']:.3f} | {r['items_faiss_bytes']:,} | {r['bundle_bytes']:,} |")
    L.append("\n## Bundle size vs checkpoint size (default export, `--index auto`)\n")
    L.append("| student | users x items, dim | index | model.safetensors bytes | bundle bytes | bundle / checkpoint | "
             "checkpoint parts | bundle files |")
    L.append("|---|---|---|---|---|---|---|---|")
    for name, z in res["sizes"].items():
        c, b = z["checkpoint"], z["bundle"]
        L.append(f"| {name} MF20 | {z['users']:,} x {z['items']:,}, {z['dim']} | {z['index']} | {c['total']:,} | "
                 f"{b['total']:,} | {b['total'] / c['total']:.2f} | "
                 + ", ".join(f"{k} {v:,}" for k, v in c["parts"].items()) + " | "
                 + ", ".join(f"{k} {v:,}" for k, v in b["parts"].items()) + " |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
