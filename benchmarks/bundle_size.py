"""Bundle size and serving latency of a synthetic catalogue of the shape of the "export that keeps the compression"
issue: 52,000 users x 57,000 items, string ids like real ones, power-law interactions, 16-dim vectors with a
low-rank structure.

Exports it with ``export.bundle.write_bundle`` (the writer ``compress export`` uses) at ``--index auto`` and
quantize fp32 / fp16 / int8, plus today's layout for comparison: format version 1 (fixed-width unicode ids, int64
uncompressed seen items) with the HNSW32 index the item-count rule picked above 50,000 items. Reports each file's
bytes, the total, and the single-user latency of ``serving.recommender.Recommender.recommend([user], k=10,
exclude_seen=True)`` over 2,000 seeded users on every bundle opened with ``serving.bundle.open_bundle`` (one FAISS
and one BLAS thread, as a server worker runs; users interleaved across bundles, in rotating order, so load drift
and cache effects hit all alike), and
the targets of the issue (fp32 total <= 1.5 x 4 bytes x parameters, int8 <= half of that, p50 <= today's).

    python benchmarks/bundle_size.py --out bench-out/bundle_size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from export.bundle import write_bundle  # noqa: E402
from serving.bundle import open_bundle  # noqa: E402
from serving.recommender import Recommender  # noqa: E402
from tests.test_bundle_compact import to_v1_layout  # noqa: E402  (the one rewrite into the version-1 layout)

USERS, ITEMS, DIM, RANK = 52_000, 57_000, 16, 6
MEAN_SEEN = 6.3  # draws per user; ~300k distinct (user, item) pairs, as the seen.npz held
LATENCY_USERS, K, SEED = 2_000, 10, 0
ALPHABET = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def random_ids(rng: np.random.Generator, n: int, prefix: str, length: int, lower: bool) -> np.ndarray:
    """n distinct ids like ASINs ("B0" + 7 characters) or 6-character account hashes."""
    out: set[str] = set()
    while len(out) < n:
        chars = rng.choice(ALPHABET, (n, length))
        out.update(prefix + "".join(row) for row in chars)
    ids = np.array(sorted(out)[:n])
    rng.shuffle(ids)
    return np.char.lower(ids) if lower else ids


def catalogue(seed: int = SEED) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """write_bundle's arrays and a held-out test CSR (one item for a third of the users, drawn from their best)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((RANK, DIM))
    users = (rng.standard_normal((USERS, RANK)) @ basis + 0.15 * rng.standard_normal((USERS, DIM))).astype(np.float32)
    popularity = 1.0 / np.arange(1, ITEMS + 1) ** 0.9  # Zipf-like: a few items most users have seen
    popularity /= popularity.sum()
    items = rng.standard_normal((ITEMS, RANK)) @ basis + 0.15 * rng.standard_normal((ITEMS, DIM))
    items *= (1.0 + 3.0 * (popularity / popularity.max()) ** 0.3)[:, None]  # popular items have longer vectors
    items = items.astype(np.float32)
    # Power-law activity: most users have a handful of items, a few have hundreds.
    lens = np.minimum(rng.zipf(1.8, USERS), 2_000).astype(np.float64)
    lens = np.maximum(1, np.round(lens * MEAN_SEEN / lens.mean())).astype(np.int64)
    draws = rng.choice(ITEMS, int(lens.sum()), p=popularity)
    keys = np.unique(np.repeat(np.arange(USERS, dtype=np.int64), lens) * ITEMS + draws)  # a user's repeats once
    indptr = np.concatenate([[0], np.cumsum(np.bincount(keys // ITEMS, minlength=USERS))]).astype(np.int64)
    # Rows in no particular order, as training data lists them (sorted rows would flatter the compression).
    order = np.lexsort((rng.random(keys.size), keys // ITEMS))
    indices = (keys[order] % ITEMS).astype(np.int64)
    test_users = np.sort(rng.choice(USERS, USERS // 3, replace=False))
    test_items = np.empty(test_users.size, dtype=np.int64)
    for start in range(0, test_users.size, 1024):
        block = test_users[start : start + 1024]
        scores = users[block] @ items.T
        for row, u in enumerate(block.tolist()):
            scores[row, indices[indptr[u] : indptr[u + 1]]] = -np.inf
        best = np.argpartition(-scores, 50, axis=1)[:, :50]
        test_items[start : start + block.size] = best[np.arange(block.size), rng.integers(0, 50, block.size)]
    test_lens = np.zeros(USERS, dtype=np.int64)
    test_lens[test_users] = 1
    data = {
        "user_vectors": users,
        "item_vectors": items,
        "user_ids": random_ids(rng, USERS, "", 6, lower=True),
        "item_ids": random_ids(rng, ITEMS, "B0", 7, lower=False),
        "seen_indptr": indptr,
        "seen_indices": indices,
    }
    return data, (np.concatenate([[0], np.cumsum(test_lens)]).astype(np.int64), test_items)


def latencies(bundles: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Single-user recommend() percentiles (microseconds) per bundle, users interleaved across bundles."""
    recs = {name: Recommender(open_bundle(path, faiss_threads=1)) for name, path in bundles.items()}
    users = np.random.default_rng(SEED).choice(USERS, LATENCY_USERS, replace=False).astype(np.int64)
    for rec in recs.values():
        for u in users[:200]:
            rec.recommend(u[None], K, exclude_seen=True)
    times: dict[str, list[int]] = {name: [] for name in recs}
    order = list(recs.items())
    for i, u in enumerate(users):
        one = u[None]
        # Rotate which bundle goes first: the one after a large index would otherwise always start cache-cold.
        for name, rec in order[i % len(order):] + order[: i % len(order)]:
            start = time.perf_counter_ns()
            rec.recommend(one, K, exclude_seen=True)
            times[name].append(time.perf_counter_ns() - start)
    return {name: {f"p{q}_us": round(float(np.percentile(t, q)) / 1e3, 2) for q in (50, 90, 99)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "bundle_size")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    data, (test_indptr, test_indices) = catalogue()
    params = (USERS + ITEMS) * DIM
    common = {"lineage": {"source": "benchmarks/bundle_size.py"}, "metrics": {}, "package_version": "bench",
              "overwrite": True, "index_factory": "auto"}
    bundles: dict[str, Path] = {}
    report: dict = {"shape": {"users": USERS, "items": ITEMS, "dim": DIM, "seen_entries": int(data["seen_indices"].size),
                              "test_users": int(np.diff(test_indptr).astype(bool).sum())},
                    "params": params, "bundles": {}}
    for quantize in ("fp32", "fp16", "int8"):
        out = args.out / quantize
        start = time.perf_counter()
        manifest = write_bundle(out, **data, **common, quantize=quantize, test_indptr=test_indptr,
                                test_indices=test_indices)
        bundles[quantize] = out
        report["bundles"][quantize] = {"export_s": round(time.perf_counter() - start, 1), "manifest": manifest}
        print(f"{quantize}: exported in {report['bundles'][quantize]['export_s']}s, index {manifest['index']['factory']}",
              flush=True)
    old = args.out / "v1-today"
    start = time.perf_counter()
    write_bundle(old, **data, **{**common, "index_factory": "HNSW32"})
    to_v1_layout(old)
    bundles["v1-today"] = old
    report["bundles"]["v1-today"] = {"export_s": round(time.perf_counter() - start, 1),
                                     "manifest": json.loads((old / "manifest.json").read_text())}
    lat = latencies(bundles)
    for name, path in bundles.items():
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.name != "manifest.json"}
        entry = report["bundles"][name]
        entry.update(files=files, total_bytes=sum(files.values()), latency=lat[name],
                     manifest_bytes=(path / "manifest.json").stat().st_size)
    budget = 1.5 * 4 * params
    fp32, int8, today = (report["bundles"][n] for n in ("fp32", "int8", "v1-today"))
    report["targets"] = {
        "fp32_total_bytes": fp32["total_bytes"], "fp32_budget_bytes": budget, "fp32_ok": fp32["total_bytes"] <= budget,
        "int8_total_bytes": int8["total_bytes"], "int8_budget_bytes": budget / 2, "int8_ok": int8["total_bytes"] <= budget / 2,
        "p50_today_us": today["latency"]["p50_us"],
        "p50_ok": {n: report["bundles"][n]["latency"]["p50_us"] <= today["latency"]["p50_us"] for n in ("fp32", "fp16", "int8")},
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    report["env"] = {"commit": commit, "command": "python benchmarks/bundle_size.py --out " + str(args.out),
                     "python": platform.python_version(), "faiss": faiss.__version__, "cpus": os.cpu_count(),
                     "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for name in bundles:
        entry = report["bundles"][name]
        print(f"{name:9s} total {entry['total_bytes']:>10,} B  p50 {entry['latency']['p50_us']:7.1f} us  "
              + "  ".join(f"{f} {b:,}" for f, b in entry["files"].items()))
    print(json.dumps(report["targets"], indent=1))


if __name__ == "__main__":
    main()
