"""`compress recommend` throughput (users/s) against the library's blocked exact top-k, over the same vectors.

Cases (dim 20, seeded random vectors saved as a real MF checkpoint, exported once with `compress export --index
Flat`, the bundle `compress recommend` builds for a checkpoint):
  gowalla       29,858 users x 40,979 items (those with training interactions), the lists of ../shared/data/gowalla
  synthetic-1m  1,000,000 users x 200,000 items, ~20 training items per user drawn by Zipf popularity
Item vectors are Gaussian times a log-normal norm (a trained model's items differ in norm; the serving path's
norm-ordered pruning depends on it). `--gowalla-checkpoint` uses a trained checkpoint (e.g. a 1-epoch student)
instead of random vectors for the gowalla case.

Methods:
  recommend        `compress recommend BUNDLE --out DIR --k K --quiet` in a subprocess, one fresh DIR per repeat;
                   users/s from its summary (job seconds: bundle open and checks, scoring, Parquet writes)
  topk_excluding   compressor.evaluation.topk_excluding over blocks of 256 users, training items masked (the
                   blocked exact path of export's reference and of evaluation), torch on CPU
  blocked_torch    compressor.retrieval.blocked_torch_topk, blocks of 1024 users, nothing masked
The baselines compute item indices only (no ids, no files), on a seeded sample of --baseline-users users;
their users/s is that sample's. Each measurement's median over --repeats goes to --out as soon as it is done
(other cases' entries are kept); --resume skips the measurements already there. `agreement` compares the job's
answers for the sampled users with topk_excluding's: same_topk (the share with the same items in the same order;
float32 near-ties may swap two) and overlap (mean shared items / k).

    python benchmarks/recommend_throughput.py --threads 2                  # both cases, 3 repeats
    python benchmarks/recommend_throughput.py --threads 2 --resume         # after a kill: only what is missing
    python benchmarks/recommend_throughput.py --quick                      # small versions of both, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOWALLA = ROOT.parent / "shared" / "data" / "gowalla"
DIM = 20
# name: (users, items) of the synthetic cases; gowalla takes its sizes from the data.
CASES = {"gowalla": None, "synthetic-1m": (1_000_000, 200_000)}
QUICK = {"gowalla": 3_000, "synthetic-1m": (20_000, 50_000)}  # --quick: gowalla's first users / smaller synthetic


def git_commit() -> str | None:
    """HEAD's commit, read from .git (no git process)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------- the models
def random_vectors(rng, users: int, items: int) -> tuple[np.ndarray, np.ndarray]:
    u = (rng.standard_normal((users, DIM)) / np.sqrt(DIM)).astype(np.float32)
    i = (rng.standard_normal((items, DIM)) / np.sqrt(DIM) * rng.lognormal(0.0, 0.5, (items, 1))).astype(np.float32)
    return u, i


def synthetic_seen(rng, users: int, items: int) -> tuple[np.ndarray, np.ndarray]:
    """~20 distinct items per user (geometric lengths), items by Zipf(1.1) popularity over a shuffled catalogue."""
    lens = np.minimum(rng.geometric(1 / 20, users), items // 2)
    total = int(lens.sum())
    pop = 1.0 / np.arange(1, items + 1) ** 1.1
    picks = rng.permutation(items)[rng.choice(items, total, p=pop / pop.sum())]
    keys = np.unique(np.repeat(np.arange(users, dtype=np.int64), lens) * items + picks)
    rows = keys // items
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=users))]).astype(np.int64)
    return indptr, (keys - rows * items).astype(np.int64)


def build_checkpoint(case: str, size, path: Path, seed: int = 0) -> dict:
    import torch

    from compressor.checkpoint import save_checkpoint
    from compressor.models import build_model

    rng = np.random.default_rng(seed)
    if case == "gowalla":
        from compressor.data import load_dataset

        data = load_dataset(str(GOWALLA))
        indptr, indices = data.train.csr()
        user_ids, item_ids = data.user_ids, data.item_ids
        if size is not None:  # --quick: the first `size` users, every item
            indptr, indices = indptr[: size + 1], indices[: indptr[size]]
            user_ids = user_ids[:size]
    else:
        n_users, n_items = size
        indptr, indices = synthetic_seen(rng, n_users, n_items)
        user_ids = np.char.add("u", np.arange(n_users).astype(str))
        item_ids = np.char.add("i", np.arange(n_items).astype(str))
    users, items = random_vectors(rng, len(user_ids), len(item_ids))
    model = build_model("mf", num_users=len(user_ids), num_items=len(item_ids), dim=DIM, init_std=0.01)
    with torch.no_grad():
        model.user_emb.weight.copy_(torch.from_numpy(users))
        model.item_emb.weight.copy_(torch.from_numpy(items))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model=model, meta={"metrics": {}, "config": {}, "benchmark": case}, user_ids=user_ids,
                    item_ids=item_ids, train_indptr=indptr, train_indices=indices)
    return {"users": len(user_ids), "items": len(item_ids), "train_interactions": int(indices.size)}


def prepare(case: str, size, work: Path, gowalla_checkpoint: str | None) -> tuple[Path, Path]:
    """(checkpoint, bundle) of a case, built once and kept under `work`."""
    ckpt = Path(gowalla_checkpoint) if case == "gowalla" and gowalla_checkpoint else work / "model.safetensors"
    if not ckpt.exists():
        t0 = time.perf_counter()
        info = build_checkpoint(case, size, ckpt)
        print(f"[{case}] checkpoint {info} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    bundle = work / "bundle"
    if not (bundle / "manifest.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "compress_app", "export", str(ckpt), "--out", str(bundle), "--index",
                        "Flat", "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"[{case}] bundle in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return ckpt, bundle


# --------------------------------------------------------------------------------------------- measuring
def measure_recommend(bundle: Path, work: Path, k: int, threads: int, repeats: int, shard_users: int,
                      sample: np.ndarray) -> tuple[dict, dict[int, list[int]]]:
    runs, answers = [], {}
    for rep in range(repeats):
        out = work / f"recs-{rep}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "compress_app", "recommend", str(bundle), "--out", str(out),
                               "--k", str(k), "--shard-users", str(shard_users), "--threads", str(threads), "--quiet"],
                              cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"compress recommend failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append({"job_s": summary["seconds"], "process_s": round(wall, 2), "users_per_s": summary["users_per_s"]})
        if rep == repeats - 1:
            answers = sampled_answers(out, bundle, sample)
        shutil.rmtree(out, ignore_errors=True)
    row = {"users_per_s": statistics.median(r["users_per_s"] for r in runs),
           "job_s": statistics.median(r["job_s"] for r in runs),
           "process_s": statistics.median(r["process_s"] for r in runs), "runs": runs}
    return row, answers


def sampled_answers(out: Path, bundle: Path, sample: np.ndarray) -> dict[int, list[int]]:
    """The job's item indices for the sampled users (to compare with the baseline's)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from serving.bundle_format import decode_ids

    manifest = json.loads((bundle / "manifest.json").read_text())
    ids = {role: decode_ids((bundle / manifest["ids"][role]["file"]).read_bytes(), manifest["ids"][role]["encoding"],
                            manifest[f"num_{role}s"]) for role in ("user", "item")}
    item_index = {iid: i for i, iid in enumerate(ids["item"].tolist())}
    wanted = ids["user"][sample].tolist()
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("part-*.parquet")))
    table = table.filter(pc.is_in(table["user_id"], value_set=pa.array(wanted)))
    got: dict[str, list[int]] = {}
    for uid, iid in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist()):
        got.setdefault(uid, []).append(item_index[iid])
    return {int(u): got.get(uid, []) for u, uid in zip(sample.tolist(), wanted)}


def load_vectors(ckpt: Path, threads: int):
    import torch

    from compressor.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    ck = load_checkpoint(ckpt)
    with torch.no_grad():
        users, items = (t.detach().float().contiguous() for t in ck.build_model().vectors())
    return users, items, np.asarray(ck.train_indptr), np.asarray(ck.train_indices)


def excluding_topk(vectors, sample: np.ndarray, k: int) -> np.ndarray:
    """compressor.evaluation.topk_excluding over blocks of 256 sampled users: item indices [sample, k]."""
    import torch

    from compressor.evaluation import topk_excluding

    users, items, indptr, indices = vectors
    with torch.no_grad():
        return np.concatenate([topk_excluding(users, items, sample[s : s + 256], k, indptr, indices).numpy()
                               for s in range(0, sample.size, 256)])


def measure_baselines(vectors, k: int, repeats: int, sample: np.ndarray) -> tuple[dict, np.ndarray]:
    import torch

    from compressor.retrieval import blocked_torch_topk

    users, items = vectors[0], vectors[1]
    rows, top = {}, None
    for name in ("topk_excluding", "blocked_torch"):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if name == "topk_excluding":
                top = excluding_topk(vectors, sample, k)
            else:
                with torch.no_grad():
                    blocked_torch_topk(users[torch.as_tensor(sample)].numpy(), items.numpy(), k, block=1024)
            times.append(time.perf_counter() - t0)
        rows[name] = {"users_per_s": round(sample.size / statistics.median(times), 1), "sample_users": int(sample.size),
                      "seconds": [round(t, 3) for t in times]}
    return rows, top


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-users", type=int, default=100_000)
    ap.add_argument("--baseline-users", type=int, default=20_000, help="users the baselines score (a seeded sample)")
    ap.add_argument("--gowalla-checkpoint", default=None, help="a trained Gowalla checkpoint instead of random vectors")
    ap.add_argument("--quick", action="store_true", help="small versions of the cases, 1 repeat")
    ap.add_argument("--resume", action="store_true",
                    help="keep the measurements already in --out (without it, the chosen cases are measured again)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "recommend")
    ap.add_argument("--out", type=Path, default=None, help="results JSON [default: WORK/results.json]")
    args = ap.parse_args(argv)
    out = args.out or args.work / "results.json"
    repeats = 1 if args.quick else args.repeats
    baseline_users = min(args.baseline_users, 2_000) if args.quick else args.baseline_users
    results = json.loads(out.read_text()) if out.exists() else {}  # other cases' measurements are kept
    results["meta"] = {"commit": git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    measured = results.setdefault("measurements", {})

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, out)

    for case in args.cases:
        size = QUICK[case] if args.quick else CASES[case]
        name = f"{case}-quick" if args.quick else case
        keys = {m: f"{name}/{m}/k{args.k}/t{args.threads}" for m in ("recommend", "topk_excluding", "blocked_torch")}
        if not args.resume:
            for key in keys.values():
                measured.pop(key, None)
        if all(key in measured for key in keys.values()):
            print(f"[{name}] measured already (--resume)", file=sys.stderr)
            continue
        work = args.work / name
        ckpt, bundle = prepare(case, size, work, args.gowalla_checkpoint)
        manifest = json.loads((bundle / "manifest.json").read_text())
        n_users = manifest["num_users"]
        sample = np.sort(np.random.default_rng(0).choice(n_users, min(baseline_users, n_users), replace=False))
        shape = {"users": n_users, "items": manifest["num_items"], "dim": manifest["dim"]}
        vectors = load_vectors(ckpt, args.threads)
        top = None
        if not all(keys[m] in measured for m in ("topk_excluding", "blocked_torch")):
            base_rows, top = measure_baselines(vectors, args.k, repeats, sample)
            for method, row in base_rows.items():
                measured[keys[method]] = {**shape, **row}
            save()
        if keys["recommend"] not in measured:
            if top is None:
                top = excluding_topk(vectors, sample, args.k)
            del vectors  # the job runs in its own process: leave it the memory
            row, answers = measure_recommend(bundle, work, args.k, args.threads, repeats, args.shard_users, sample)
            same = [answers[u] == top[j].tolist() for j, u in enumerate(sample.tolist())]
            overlap = [len(set(answers[u]) & set(top[j].tolist())) / args.k for j, u in enumerate(sample.tolist())]
            row["agreement"] = {"same_topk": round(float(np.mean(same)), 4),
                                "overlap": round(float(np.mean(overlap)), 4), "sample_users": int(sample.size)}
            measured[keys["recommend"]] = {**shape, **row}
            save()
        for method, key in keys.items():
            print(f"[{name}] {method:<15} {measured[key]['users_per_s']:>12,.0f} users/s", file=sys.stderr)
    print(json.dumps(results["measurements"], indent=2))


if __name__ == "__main__":
    main()
