"""Quality benchmark: teachers, students and distillation methods on real data, several seeds, in parallel.

Each job is a real `compress train` / `compress distill` subprocess; results are read back from each run's
result.json. Writes OUT/summary.json and OUT/summary.md (tables: mean ± std over seeds, the share of the
scratch -> teacher NDCG@20 gap recovered, paired per-seed comparisons). Finished runs are reused, so the script
can be rerun after an interruption or with more suites.

Then a post-step (off with --bootstrap 0) ranks the test split with each finished run's best checkpoint
(run_dir/model.safetensors) and keeps every user's metrics, cached in OUT/per-user/RUN.npz under the checkpoint's
weights fingerprint (a rerun evaluates only new runs). A method's seeds are pooled per user: each user's metric is
the mean over the method's seeds of that user's metric, so the paired bootstrap over users (compressor.bootstrap;
definitions in docs/evaluation.md) gives 95% CIs of each method's NDCG@20, of its share of the scratch -> teacher
gap and of its difference to every other method, all on the same users. Those CIs hold the users fixed-seed-
averaged: they measure how much the numbers move with the sample of users, not with the seed (the mean ± std over
seeds shows that).

    python benchmarks/quality.py --out bench-out/quality --suites main --seeds 0 1 2 3 4 --workers 2
    suites: main (CiteULike MF400 -> MF20: scratch, ce, rrd, rcekd), ablation (3 seeds: full, w/o S, w/o T,
            const alpha), hetero (CiteULike LightGCN2000 -> MF20), gowalla (every seed, MF300 -> MF20: scratch,
            the spec's rcekd, and the cheap form: kd_users once_per_epoch with an IVF refresh), once (every seed:
            CiteULike rcekd with kd_users once_per_epoch, beside the spec's every_batch form and scratch on the
            same seeds)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.run_dir import MODEL_FILE, RESULT_FILE, RESUME_FILE  # noqa: E402  (constants only)
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
# The cheap form's refresh on Gowalla: recall@100 0.96 against the exact top-100 (docs/benchmarks.md section 4c).
GOWALLA_CHEAP_INDEX, GOWALLA_CHEAP_INDEX_PARAMS = "IVF256,Flat", "{nprobe: 8}"
BOOT_METRIC = "ndcg@20"  # the headline metric of the bootstrap tables (summary.json has every one of METRICS)
PER_USER_DIR = "per-user"


def job(name, args, deps=()):
    return {"name": name, "args": [str(a) for a in args], "deps": list(deps)}


def build_jobs(suites, seeds, out: Path, device: str, threads: int, max_epochs: int | None, ckpt_every: int = 1,
               student_device: str | None = None, teacher_set: list[str] = (), student_set: list[str] = ()):
    common = ["--device", student_device or device, "--threads", threads, "--quiet", "--set",
              f"train.checkpoint_every={ckpt_every}"]
    common += ["--epochs", max_epochs] if max_epochs else []
    # Students may run elsewhere than teachers: many small CPU processes beat many processes time-slicing one GPU.
    teacher_common = ["--device", device, *common[2:]]
    for kv in teacher_set:  # e.g. train.optimizer=lazy_adam: how a teacher is trained is not what is compared
        teacher_common += ["--set", kv]
    for kv in student_set:  # e.g. train.eval_every=2 with train.patience=15: same protocol for every student
        common += ["--set", kv]
    jobs = []
    cite_t = out / "cite-mf400-teacher"
    need_cite_t = bool({"main", "ablation", "once"} & set(suites))
    if need_cite_t:
        jobs.append(job("cite-mf400-teacher", ["train", "--config", "configs/citeulike/mf-teacher.yaml", "--out",
                                                cite_t, "--seed", 0, *teacher_common]))
    if "main" in suites:
        for s in seeds:
            scratch = job(f"cite-scratch-s{s}", ["distill", "--method", "scratch", "--config",
                                                 "configs/citeulike/mf-student.yaml", "--out",
                                                 out / f"cite-scratch-s{s}", "--seed", s, *common])
            for m in ("rcekd", "ce", "rrd"):
                jobs.append(job(f"cite-{m}-s{s}", ["distill", "--teacher", cite_t, "--config",
                                                   f"configs/citeulike/mf-{m}.yaml", "--out", out / f"cite-{m}-s{s}",
                                                   "--seed", s, *common], deps=["cite-mf400-teacher"]))
                if m == "rcekd":
                    jobs.append(scratch)  # per seed: the method first, then its baseline, then the other KDs
    if "ablation" in suites:
        variants = {"full": [], "wo_S": ["--set", "distill.use_loss_s=false"],
                    "wo_T": ["--set", "distill.use_loss_t=false"],
                    "const_alpha": ["--set", "distill.constant_alpha=0.5"]}
        for s in seeds[:3]:
            for v, extra in variants.items():
                name = f"cite-rcekd-s{s}" if v == "full" and "main" in suites else f"abl-{v}-s{s}"
                if any(j["name"] == name for j in jobs):
                    continue
                jobs.append(job(name, ["distill", "--teacher", cite_t, "--config", "configs/citeulike/mf-rcekd.yaml",
                                       "--out", out / name, "--seed", s, *extra, *common],
                                deps=["cite-mf400-teacher"]))
    if "hetero" in suites:
        lt = out / "cite-lgcn2000-teacher"
        jobs.append(job("cite-lgcn2000-teacher", ["train", "--config", "configs/citeulike/lightgcn-teacher.yaml",
                                                   "--out", lt, "--seed", 0, *teacher_common]))
        jobs.append(job("hetero-rcekd-s0", ["distill", "--teacher", lt, "--config",
                                            "configs/citeulike/lightgcn-mf-rcekd.yaml", "--out",
                                            out / "hetero-rcekd-s0", "--seed", 0, *common],
                        deps=["cite-lgcn2000-teacher"]))
        if "main" not in suites:
            jobs.append(job("cite-scratch-s0", ["distill", "--method", "scratch", "--config",
                                                "configs/citeulike/mf-student.yaml", "--out", out / "cite-scratch-s0",
                                                "--seed", 0, *common]))
    if "once" in suites:  # distill.kd_users once_per_epoch: each user's KD terms once per epoch, not per batch
        for s in seeds:
            jobs.append(job(f"cite-rcekd-once-s{s}", ["distill", "--teacher", cite_t, "--config",
                                                      "configs/citeulike/mf-rcekd.yaml", "--out",
                                                      out / f"cite-rcekd-once-s{s}", "--seed", s, "--set",
                                                      "distill.kd_users=once_per_epoch", *common],
                            deps=["cite-mf400-teacher"]))
            if "main" not in suites:  # the spec's form and the scratch baseline on the same seeds, to pair with
                jobs.append(job(f"cite-rcekd-s{s}", ["distill", "--teacher", cite_t, "--config",
                                                     "configs/citeulike/mf-rcekd.yaml", "--out",
                                                     out / f"cite-rcekd-s{s}", "--seed", s, "--set",
                                                     "distill.kd_users=every_batch", *common],
                                deps=["cite-mf400-teacher"]))
                jobs.append(job(f"cite-scratch-s{s}", ["distill", "--method", "scratch", "--config",
                                                       "configs/citeulike/mf-student.yaml", "--out",
                                                       out / f"cite-scratch-s{s}", "--seed", s, *common]))
    if "gowalla" in suites:  # every seed: scratch, the spec's form and the cheap form, all on the seed-0 teacher
        gt = out / "gow-mf300-teacher"
        jobs.append(job("gow-mf300-teacher", ["train", "--config", "configs/gowalla/mf-teacher.yaml", "--out", gt,
                                               "--seed", 0, *teacher_common]))
        # Both forms spelled out, so that the pairing does not depend on what the recipe's defaults are.
        spec = ["--set", "distill.kd_users=every_batch", "--set", "distill.index=Flat",
                "--set", "distill.index_params={}"]
        cheap = ["--set", "distill.kd_users=once_per_epoch", "--set", f"distill.index={GOWALLA_CHEAP_INDEX}",
                 "--set", f"distill.index_params={GOWALLA_CHEAP_INDEX_PARAMS}"]
        for s in seeds:
            jobs.append(job(f"gow-scratch-s{s}", ["distill", "--method", "scratch", "--config",
                                                  "configs/gowalla/mf-student.yaml", "--out", out / f"gow-scratch-s{s}",
                                                  "--seed", s, *common]))
            for name, extra in ((f"gow-rcekd-s{s}", spec), (f"gow-rcekd-once-s{s}", cheap)):
                jobs.append(job(name, ["distill", "--teacher", gt, "--config", "configs/gowalla/mf-rcekd.yaml",
                                       "--out", out / name, "--seed", s, *extra, *common],
                                deps=["gow-mf300-teacher"]))
    # Longest chains first: teachers (everything else waits on them), then the rest in order.
    jobs.sort(key=lambda j: (not j["name"].endswith("teacher"), not j["name"].startswith("gow")))
    return jobs


def run_job(j, out: Path, env):
    run_dir = Path(j["args"][j["args"].index("--out") + 1])
    if (run_dir / RESULT_FILE).exists():
        return j["name"], "reused", 0.0
    args = list(j["args"])
    if (run_dir / RESUME_FILE).exists():
        args.append("--resume")  # an interrupted earlier attempt: continue it
    t0 = time.time()
    with open(out / "logs" / f"{j['name']}.log", "w") as log:
        p = subprocess.run([sys.executable, "-m", "compress_app", *args], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    return j["name"], "ok" if p.returncode == 0 else f"failed ({p.returncode})", time.time() - t0


def schedule(jobs, out: Path, workers: int, deadline: float):
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", COMPRESS_NO_MLFLOW=os.environ.get("COMPRESS_NO_MLFLOW", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    done, failed, status = set(), set(), {}
    pending = list(jobs)
    running = {}
    with cf.ThreadPoolExecutor(workers) as pool:
        while pending or running:
            for j in list(pending):
                if len(running) >= workers or time.time() > deadline:
                    break
                if any(d in failed for d in j["deps"]):
                    pending.remove(j)
                    failed.add(j["name"])
                    status[j["name"]] = "skipped (dependency failed)"
                elif all(d in done for d in j["deps"]):
                    pending.remove(j)
                    running[pool.submit(run_job, j, out, env)] = j
            if not running:
                if time.time() > deadline:
                    for j in pending:
                        status[j["name"]] = "not started (deadline)"
                    break
                time.sleep(1)
                continue
            finished, _ = cf.wait(list(running), timeout=5, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                j = running.pop(f)
                name, st, secs = f.result()
                status[name] = f"{st} {secs:.0f}s"
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {status[name]}", flush=True)
                (done if st in ("ok", "reused") else failed).add(name)
    return status


def _load(out: Path, name: str):
    p = out / name / RESULT_FILE
    return json.loads(p.read_text()) if p.exists() else None


def _fmt(vals):
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def per_user_test(out: Path, names, device: str = "auto") -> dict:
    """{run name: {"users": int [n], "ndcg@20": float [n], ...}}: per-user test metrics of each finished run's best
    checkpoint; runs on the same data are evaluated on one load of it. Cached in OUT/per-user/NAME.npz."""
    import io

    import numpy as np

    from compressor import api  # torch and the data: only for this post-step
    from compressor.checkpoint import read_meta
    from compressor.files import atomic_write_bytes

    found, todo = {}, {}
    for name in names:
        ckpt = out / name / MODEL_FILE
        meta = read_meta(ckpt)
        if not (out / name / RESULT_FILE).exists() or not meta:
            continue
        cached = out / PER_USER_DIR / f"{name}.npz"
        if cached.exists():
            with np.load(cached, allow_pickle=False) as z:
                if str(z["fingerprint"]) == meta["fingerprint"]:
                    found[name] = {k: z[k] for k in z.files if k != "fingerprint"}
                    continue
        todo.setdefault(meta.get("data_fingerprint"), []).append((name, ckpt, meta["fingerprint"]))
    for group in todo.values():
        t0 = time.time()
        evals = api.evaluate_per_user([c for _, c, _ in group], "test", ks=(10, 20), device=device)
        for (name, _, fingerprint), ev in zip(group, evals):
            arrays = {"users": ev.all.users, **{m: ev.all.values[m] for m in METRICS}}
            buf = io.BytesIO()
            np.savez(buf, fingerprint=np.array(fingerprint), **arrays)
            atomic_write_bytes(out / PER_USER_DIR / f"{name}.npz", buf.getvalue())
            found[name] = arrays
        print(f"per-user test metrics of {len(group)} runs: {time.time() - t0:.0f}s", flush=True)
    return found


def pooled(per_user: dict, names) -> dict | None:
    """{metric: float [n_users]}: each user's mean over the given runs (a method's seeds); None if none finished.
    Every run must have been evaluated on the same users."""
    runs = [per_user[n] for n in names if n in per_user]
    if not runs:
        return None
    for r in runs[1:]:
        if len(r["users"]) != len(runs[0]["users"]) or (r["users"] != runs[0]["users"]).any():
            raise SystemExit(f"per-user metrics of {', '.join(names)} are not on the same users")
    return {m: sum(r[m] for r in runs) / len(runs) for m in METRICS}


def _ci(e, fmt="{:.4f}"):
    if e["value"] is None:
        return "undefined"
    return fmt.format(e["value"]) + (f" [{fmt.format(e['lo'])}, {fmt.format(e['hi'])}]" if e["lo"] is not None
                                     else " [CI undefined]")


def bootstrap_table(title, rows, per_user, teacher, scratch, n_resamples, seed, lines, summary):
    """Per method: NDCG@20 and its share of the gap with 95% CIs, and its paired difference to each other method.
    rows: [(label, run names)]; teacher, scratch: run names (pooled like a method's seeds)."""
    from compressor import bootstrap

    pools = {label: pooled(per_user, names) for label, names in rows}
    pools = {label: p for label, p in pools.items() if p is not None}
    t_pool, s_pool = pooled(per_user, teacher), pooled(per_user, scratch)
    if not pools:
        return
    gap = (s_pool, t_pool) if t_pool is not None and s_pool is not None else None
    labels = list(pools)
    stats = {}
    for label in labels:
        res = bootstrap.summary(pools[label], None, gap, n_resamples, seed)
        diffs = bootstrap.paired_bootstrap({f"{o}:{m}": pools[label][m] - pools[o][m] for o in labels if o != label
                                            for m in METRICS}, n_resamples, seed)
        stats[label] = {"metrics": res["metrics"], "gap_share": res.get("gap_share"),
                        "difference": {o: {m: diffs[f"{o}:{m}"] for m in METRICS} for o in labels if o != label}}
    lines.append(f"\n#### {title}: per-user paired bootstrap, test {BOOT_METRIC} "
                 f"(95% CIs, {n_resamples:,} resamples of the users, seed {seed}; seeds pooled per user)\n")
    lines.append("| run | N@20 | gap recovered | " + " | ".join(f"minus {o}" for o in labels) + " |")
    lines.append("|" + "---|" * (3 + len(labels)))
    for label in labels:
        st = stats[label]
        share = _ci(st["gap_share"][BOOT_METRIC], "{:.0%}") if st["gap_share"] else "—"
        cells = [_ci(st["difference"][o][BOOT_METRIC], "{:+.4f}") if o != label else "—" for o in labels]
        lines.append(f"| {label} | {_ci(st['metrics'][BOOT_METRIC])} | {share} | " + " | ".join(cells) + " |")
    summary.setdefault("bootstrap", {})[title] = {"resamples": n_resamples, "seed": seed, "runs": stats}


def summarise(out: Path, seeds, n_resamples: int = 0, boot_seed: int = 0, device: str = "auto") -> dict:
    """The tables from every run's result.json; with n_resamples > 0 also the per-user bootstrap tables."""
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}
    lines = []
    summary = {"runs": results, "tables": {}}
    per_user = per_user_test(out, sorted(results), device) if n_resamples else {}

    def boot(title, rows, teacher, scratch):
        if per_user:
            bootstrap_table(title, rows, per_user, teacher, scratch, n_resamples, boot_seed, lines, summary)

    def group(prefix_by_row):
        rows = []
        for label, names in prefix_by_row:
            res = [results[n] for n in names if n in results]
            vals = {m: [r["test"][m] for r in res] for m in METRICS}
            epochs = [r["best_epoch"] for r in res]
            walls = [r["wall_time_s"] for r in res]
            rows.append((label, len(res), vals, epochs, walls))
        return rows

    def table(title, rows, teacher_ndcg=None, scratch_ndcg=None):
        lines.append(f"\n### {title}\n")
        head = "| run | n | R@10 | N@10 | R@20 | N@20 | gap recovered (N@20) | best epoch | wall s |"
        lines.extend([head, "|" + "---|" * 9])
        for label, n, vals, epochs, walls in rows:
            gap = "—"
            if teacher_ndcg and scratch_ndcg is not None and vals["ndcg@20"] and teacher_ndcg != scratch_ndcg:
                gap = f"{100 * (statistics.mean(vals['ndcg@20']) - scratch_ndcg) / (teacher_ndcg - scratch_ndcg):.0f}%"
            ep = f"{statistics.median(epochs):.0f}" if epochs else "—"
            wall = f"{statistics.median(walls):.0f}" if walls else "—"
            lines.append(f"| {label} | {n} | " + " | ".join(_fmt(vals[m]) for m in METRICS) + f" | {gap} | {ep} | {wall} |")
            summary["tables"].setdefault(title, []).append(
                {"run": label, "n": n, **{m: vals[m] for m in METRICS}, "gap_recovered": gap})

    def paired(run, base, run_label, base_label, key):
        """Per-seed differences of test NDCG@20, run minus base, on the seeds both finished."""
        diffs = [results[f"{run}-s{s}"]["test"]["ndcg@20"] - results[f"{base}-s{s}"]["test"]["ndcg@20"]
                 for s in seeds if f"{run}-s{s}" in results and f"{base}-s{s}" in results]
        if diffs:
            spread = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
            lines.append(f"\nPaired per seed ({run_label} minus {base_label}, test NDCG@20): "
                         f"{', '.join(f'{d:+.4f}' for d in diffs)}; mean {statistics.mean(diffs):+.4f}{spread}, "
                         f"{run_label} ahead on {sum(d > 0 for d in diffs)}/{len(diffs)} seeds\n")
            summary.setdefault("paired", {})[key] = diffs

    t = results.get("cite-mf400-teacher")
    if t:
        named = [("teacher MF400", ["cite-mf400-teacher"])] + [(m, [f"cite-{m}-s{s}" for s in seeds])
                                                               for m in ("scratch", "ce", "rrd", "rcekd")]
        rows = group(named)
        sc = rows[1][2]["ndcg@20"]
        table("CiteULike MF400 -> MF20", rows, t["test"]["ndcg@20"], statistics.mean(sc) if sc else None)
        cite_ts = (["cite-mf400-teacher"], named[1][1])
        # paired comparison across seeds
        lines.append("\nPaired per seed (RCE-KD minus baseline, test NDCG@20):\n")
        for base in ("scratch", "ce", "rrd"):
            diffs = [results[f"cite-rcekd-s{s}"]["test"]["ndcg@20"] - results[f"cite-{base}-s{s}"]["test"]["ndcg@20"]
                     for s in seeds if f"cite-rcekd-s{s}" in results and f"cite-{base}-s{s}" in results]
            if diffs:
                wins = sum(d > 0 for d in diffs)
                lines.append(f"- vs {base}: RCE-KD ahead on {wins}/{len(diffs)} seeds, mean difference "
                             f"{statistics.mean(diffs):+.4f}")
                summary.setdefault("paired", {})[base] = diffs
        boot("CiteULike MF400 -> MF20", named, *cite_ts)
        if any(f"cite-rcekd-once-s{s}" in results for s in seeds):
            once_named = [("RCE-KD, kd_users every_batch (the spec's)", [f"cite-rcekd-s{s}" for s in seeds]),
                          ("RCE-KD, kd_users once_per_epoch", [f"cite-rcekd-once-s{s}" for s in seeds])]
            title = "CiteULike MF400 -> MF20, KD users per batch vs once per epoch"
            table(title, group(once_named), t["test"]["ndcg@20"], statistics.mean(sc) if sc else None)
            paired("cite-rcekd-once", "cite-rcekd", "once_per_epoch", "every_batch", "once_minus_every_batch")
            boot(title, once_named, *cite_ts)
        abl = [("full", [f"cite-rcekd-s{s}" if f"cite-rcekd-s{s}" in results else f"abl-full-s{s}"
                         for s in seeds[:3]])]
        abl += [(v, [f"abl-{v}-s{s}" for s in seeds[:3]]) for v in ("wo_S", "wo_T", "const_alpha")]
        if any(f"abl-{v}-s{s}" in results for v in ("wo_S", "wo_T", "const_alpha") for s in seeds[:3]):
            table("Ablation, CiteULike MF400 -> MF20 (3 seeds)", group(abl), t["test"]["ndcg@20"],
                  statistics.mean(sc) if sc else None)
            boot("Ablation, CiteULike MF400 -> MF20 (3 seeds)", abl, *cite_ts)
    lt = results.get("cite-lgcn2000-teacher")
    if lt:
        named = [("teacher LightGCN2000", ["cite-lgcn2000-teacher"]), ("scratch MF20", ["cite-scratch-s0"]),
                 ("RCE-KD MF20", ["hetero-rcekd-s0"])]
        sc = results.get("cite-scratch-s0")
        table("CiteULike LightGCN2000 -> MF20 (seed 0)", group(named), lt["test"]["ndcg@20"],
              sc["test"]["ndcg@20"] if sc else None)
        boot("CiteULike LightGCN2000 -> MF20 (seed 0)", named, named[0][1], named[1][1])
    gt = results.get("gow-mf300-teacher")
    if gt:
        named = [("teacher MF300", ["gow-mf300-teacher"]), ("scratch MF20", [f"gow-scratch-s{s}" for s in seeds]),
                 ("RCE-KD MF20 (the spec's: every_batch, exact refresh)", [f"gow-rcekd-s{s}" for s in seeds]),
                 (f"RCE-KD MF20, cheap form (once_per_epoch, {GOWALLA_CHEAP_INDEX} {GOWALLA_CHEAP_INDEX_PARAMS})",
                  [f"gow-rcekd-once-s{s}" for s in seeds])]
        rows = group(named)
        sc = rows[1][2]["ndcg@20"]
        table("Gowalla MF300 -> MF20", rows, gt["test"]["ndcg@20"], statistics.mean(sc) if sc else None)
        paired("gow-rcekd-once", "gow-rcekd", "cheap form", "the spec's", "gowalla_cheap_minus_spec")
        boot("Gowalla MF300 -> MF20", named, named[0][1], named[1][1])
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    ap.add_argument("--suites", nargs="+", default=["main"], choices=["main", "ablation", "hetero", "gowalla", "once"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    ap.add_argument("--device", default="auto", help="device of the teachers (and of the students, by default)")
    ap.add_argument("--student-device", default=None, help="device of the students, when not --device")
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the teacher runs only (repeatable), e.g. train.optimizer=lazy_adam")
    ap.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the student runs only (repeatable), e.g. train.eval_every=2")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="train.checkpoint_every of every run")
    ap.add_argument("--only", nargs="+", default=None, metavar="JOB",
                    help="run only these jobs of the suites (their dependencies must have finished already), "
                         "e.g. gow-rcekd-s0")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no new run after this many seconds")
    ap.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="resamples of the per-user bootstrap tables (0 = no per-user post-step)")
    ap.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(a.suites, a.seeds, a.out.resolve(), a.device, a.threads, a.max_epochs, a.checkpoint_every,
                      a.student_device, a.teacher_set, a.student_set)
    if a.only:
        by_name = {j["name"]: j for j in jobs}
        unknown = set(a.only) - set(by_name)
        if unknown:
            ap.error(f"--only: no job named {', '.join(sorted(unknown))} in suites {' '.join(a.suites)}")
        for name in a.only:
            for d in by_name[name]["deps"]:
                if not (a.out / d / RESULT_FILE).exists():
                    ap.error(f"--only {name}: its dependency {d} has not finished ({a.out / d}/result.json)")
        jobs = [dict(by_name[n], deps=[]) for n in a.only]
    t0 = time.time()
    status = schedule(jobs, a.out, a.workers, t0 + a.deadline_s)
    (a.out / "status.json").write_text(json.dumps(status, indent=1))
    summarise(a.out, a.seeds, a.bootstrap, a.bootstrap_seed, a.student_device or a.device)
    print((a.out / "summary.md").read_text())
    print(f"total {time.time() - t0:.0f}s; command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
