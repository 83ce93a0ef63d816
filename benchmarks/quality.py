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

    python benchmarks/quality.py --out bench-out/quality --suites main ml1m --seeds 0 1 2 3 4 --workers 2
    suites, one per data set (each: its teacher on seed 0, then scratch, CE, RRD and RCE-KD on every seed, from the
    data set's recipes in configs/; a table per data set with mean ± std over seeds of R@10/20, N@10/20, MRR@20,
    the gap share, the bootstrap CIs and RCE-KD's paired differences to scratch, CE and RRD):
            main (CiteULike MF400 -> MF20), ml1m (ML-1M MF200 -> MF20), gowalla (MF300 -> MF20; RCE-KD in the
            spec's form and in the cheap form: kd_users once_per_epoch with an IVF refresh)
    CiteULike's extra suites: ablation (3 seeds: full, w/o S, w/o T, const alpha, A sampled uniformly), hetero (LightGCN2000 -> MF20),
            once (every seed: rcekd with kd_users once_per_epoch, beside the spec's every_batch and scratch)
    user_batches: with the data-set suites chosen, RCE-KD with kd_users user_batches on every seed (run names
            PREFIX-rcekd-ub-sS; Gowalla's with the cheap form's UserClusters refresh)
    --levers (beyond the paper): RCE-KD with one change to its recipe (LEVERS below), on every seed of every
            data-set suite chosen; the table pairs each with the recipe on validation NDCG@10, the split a lever
            may be chosen on
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.run_dir import MODEL_FILE, RESULT_FILE, RESUME_FILE  # noqa: E402  (constants only)
from compressor.config import spec_form_sets  # noqa: E402
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
# The cheap form's refresh on Gowalla: user clusters sized to the data (256 / 1,000), recall@100 0.96 against the
# exact top-100 at half IVF256's search time on a trained student (docs/benchmarks.md section 4i).
GOWALLA_CHEAP_INDEX, GOWALLA_CHEAP_INDEX_PARAMS = "UserClusters", "{}"
# RCE-KD as specified, spelled out (config.spec_form): the CiteULike and Gowalla recipes distil in user_batches
# (docs/benchmarks.md 4o), and their spec-form runs must not change with that default
SPEC = spec_form_sets()
GOWALLA_CHEAP = ["--set", "distill.kd_users=once_per_epoch", "--set", f"distill.index={GOWALLA_CHEAP_INDEX}",
                 "--set", f"distill.index_params={GOWALLA_CHEAP_INDEX_PARAMS}"]
# suite user_batches: each user's KD terms once per epoch in KD batches of their own (docs/benchmarks.md 4m), with
# the data set's cheap-form refresh (CiteULike: the recipe's exact one, as its once_per_epoch runs)
USER_BATCHES = ["--set", "distill.kd_users=user_batches"]
GOWALLA_USER_BATCHES = [*USER_BATCHES, *GOWALLA_CHEAP[2:]]
BOOT_METRIC = "ndcg@20"  # the headline metric of the bootstrap tables (summary.json has every one of METRICS)
PER_USER_DIR = "per-user"
MRR = "mrr@20"  # from the per-user post-step only (result.json keeps recall and NDCG)
PER_USER_METRICS = (*METRICS, MRR)
VALID_METRIC = "ndcg@10"  # the protocol's model-selection metric, and the one a lever is chosen on


def job(name, args, deps=()):
    return {"name": name, "args": [str(a) for a in args], "deps": list(deps)}


@dataclass(frozen=True)
class DataSuite:
    """One data set's quality suite: its recipes (DIR/mf-teacher.yaml, mf-student.yaml, mf-ce.yaml, mf-rrd.yaml,
    mf-rcekd.yaml), the prefix of its run names and its teacher's run name."""

    title: str
    recipes: str
    prefix: str
    teacher: str
    teacher_label: str

    def run(self, method: str, seed: int, lever: str | None = None) -> str:
        return f"{self.prefix}-{method}{'-' + lever if lever else ''}-s{seed}"


# Every data set gets teacher, scratch, CE, RRD and RCE-KD on every seed (suite "main" is CiteULike's).
DATA_SUITES = {
    "main": DataSuite("CiteULike MF400 -> MF20", "configs/citeulike", "cite", "cite-mf400-teacher", "teacher MF400"),
    "ml1m": DataSuite("ML-1M MF200 -> MF20", "configs/ml-1m", "ml1m", "ml1m-mf200-teacher", "teacher MF200"),
    "gowalla": DataSuite("Gowalla MF300 -> MF20", "configs/gowalla", "gow", "gow-mf300-teacher", "teacher MF300"),
}
KD_METHODS = ("ce", "rrd", "rcekd")
ABLATIONS = ("wo_S", "wo_T", "const_alpha", "uniform_A")
UNIFORM_T = 1e9  # log closure weights (c + 1) / T, c <= 50: at most 5e-8 apart, nothing beside the Gumbel noise


def _recipe_distill(recipe: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / recipe).read_text())["distill"]


def _klm2(recipe: str) -> list[str]:
    d = _recipe_distill(recipe)
    return [f"distill.K={2 * d['K']}", f"distill.L={2 * d['L']}", f"distill.M={2 * d['M']}"]


# Beyond the paper: each lever is a set of overrides of a data set's RCE-KD recipe (`--levers`), compared with the
# recipe on validation (the only split a lever may be chosen on). Values: a list, or a function of the recipe path.
LEVERS = {
    "exclude_seen": ["distill.exclude_seen=true"],   # training positives out of QT and the student's top-M
    "tau2": ["distill.tau=2.0"],                     # a softer teacher and student softmax
    "tau2_anneal": ["distill.tau=2.0", "distill.tau_anneal_epochs=50"],  # soft early, the spec's tau 1 from epoch 51
    "klm2": _klm2,                                   # K, L and M doubled
    "lr_decay": ["train.lr_decay=0.5", "train.lr_decay_patience=5"],  # a longer schedule, lr halved on plateaus
}


def build_jobs(suites, seeds, out: Path, device: str, threads: int, max_epochs: int | None, ckpt_every: int = 1,
               student_device: str | None = None, teacher_set: list[str] = (), student_set: list[str] = (),
               levers: list[str] = (), lever_seeds=None):
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

    def add(j):
        if not any(x["name"] == j["name"] for x in jobs):
            jobs.append(j)

    def teacher(ds: DataSuite):
        add(job(ds.teacher, ["train", "--config", f"{ds.recipes}/mf-teacher.yaml", "--out", out / ds.teacher,
                             "--seed", 0, *teacher_common]))

    def scratch(ds: DataSuite, s):
        add(job(ds.run("scratch", s), ["distill", "--method", "scratch", "--config", f"{ds.recipes}/mf-student.yaml",
                                       "--out", out / ds.run("scratch", s), "--seed", s, *common]))

    def student(ds: DataSuite, name, recipe, s, extra=()):
        add(job(name, ["distill", "--teacher", out / ds.teacher, "--config", f"{ds.recipes}/{recipe}", "--out",
                       out / name, "--seed", s, *extra, *common], deps=[ds.teacher]))

    cite = DATA_SUITES["main"]
    chosen = [ds for suite, ds in DATA_SUITES.items() if suite in suites]
    for ds in chosen:
        teacher(ds)
    # Seed by seed across the data sets (a run cut off by a deadline leaves whole seeds): RCE-KD, its scratch
    # baseline, the other KDs, then the levers.
    for s in seeds:
        for ds in chosen:
            if ds.prefix == "gow":  # both RCE-KD forms spelled out, so the pairing does not depend on the defaults
                student(ds, ds.run("rcekd", s), "mf-rcekd.yaml", s, SPEC)
                scratch(ds, s)
                student(ds, ds.run("rcekd-once", s), "mf-rcekd.yaml", s, GOWALLA_CHEAP)
            else:
                student(ds, ds.run("rcekd", s), "mf-rcekd.yaml", s, SPEC)
                scratch(ds, s)
            for m in ("ce", "rrd"):
                student(ds, ds.run(m, s), f"mf-{m}.yaml", s)
            if "user_batches" in suites:
                student(ds, ds.run("rcekd-ub", s), "mf-rcekd.yaml", s,
                        GOWALLA_USER_BATCHES if ds.prefix == "gow" else USER_BATCHES)
            for lever in levers if lever_seeds is None or s in lever_seeds else ():
                overrides = LEVERS[lever]
                overrides = overrides(f"{ds.recipes}/mf-rcekd.yaml") if callable(overrides) else overrides
                student(ds, ds.run("rcekd", s, lever), "mf-rcekd.yaml", s,  # paired with its seed's spec-form run
                        [*(a for kv in overrides for a in ("--set", kv)), *SPEC])
    if {"ablation", "once"} & set(suites):
        teacher(cite)
    if "ablation" in suites:
        variants = {"full": [], "wo_S": ["--set", "distill.use_loss_s=false"],
                    "wo_T": ["--set", "distill.use_loss_t=false"],
                    "const_alpha": ["--set", "distill.constant_alpha=0.5"],
                    # the sampling without its closure weights (T so large that exp((c + 1) / T) is 1 for every
                    # position: A uniform over P), the adaptive alpha kept: with const_alpha, this separates what
                    # the sampling and the adaptive weight each contribute
                    "uniform_A": ["--set", f"distill.T={UNIFORM_T:g}"]}
        for s in seeds[:3]:
            for v, extra in variants.items():
                name = f"cite-rcekd-s{s}" if v == "full" and "main" in suites else f"abl-{v}-s{s}"
                student(cite, name, "mf-rcekd.yaml", s, [*extra, *SPEC])
    if "hetero" in suites:
        lgcn = DataSuite("CiteULike LightGCN2000 -> MF20", "configs/citeulike", "cite", "cite-lgcn2000-teacher",
                         "teacher LightGCN2000")
        add(job(lgcn.teacher, ["train", "--config", "configs/citeulike/lightgcn-teacher.yaml", "--out",
                               out / lgcn.teacher, "--seed", 0, *teacher_common]))
        student(lgcn, "hetero-rcekd-s0", "lightgcn-mf-rcekd.yaml", 0)
        scratch(cite, 0)
    if "once" in suites:  # distill.kd_users once_per_epoch: each user's KD terms once per epoch, not per batch
        for s in seeds:
            student(cite, f"cite-rcekd-once-s{s}", "mf-rcekd.yaml", s, ["--set", "distill.kd_users=once_per_epoch"])
            # the spec's form and the scratch baseline on the same seeds, to pair with
            student(cite, f"cite-rcekd-s{s}", "mf-rcekd.yaml", s, ["--set", "distill.kd_users=every_batch"])
            scratch(cite, s)
    # Teachers first (everything else waits on them), then Gowalla's long runs, then the rest in order.
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
    """{run name: {"users": int [n], "ndcg@20": float [n], ...}}: per-user test metrics (METRICS and MRR@20) of
    each finished run's best checkpoint; runs on the same data are evaluated on one load of it. Cached in
    OUT/per-user/NAME.npz under the checkpoint's weights fingerprint."""
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
                if str(z["fingerprint"]) == meta["fingerprint"] and set(PER_USER_METRICS) <= set(z.files):
                    found[name] = {k: z[k] for k in z.files if k != "fingerprint"}
                    continue
        todo.setdefault(meta.get("data_fingerprint"), []).append((name, ckpt, meta["fingerprint"]))
    for group in todo.values():
        t0 = time.time()
        evals = api.evaluate_per_user([c for _, c, _ in group], "test", ks=(10, 20), device=device)
        for (name, _, fingerprint), ev in zip(group, evals):
            arrays = {"users": ev.all.users, **{m: ev.all.values[m] for m in PER_USER_METRICS}}
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
    return {m: sum(r[m] for r in runs) / len(runs) for m in PER_USER_METRICS}


def _ci(e, fmt="{:.4f}"):
    if e["value"] is None:
        return "undefined"
    return fmt.format(e["value"]) + (f" [{fmt.format(e['lo'])}, {fmt.format(e['hi'])}]" if e["lo"] is not None
                                     else " [CI undefined]")


def bootstrap_table(title, rows, per_user, teacher, scratch, n_resamples, seed, lines, summary, against=None):
    """Per method: NDCG@20 and its share of the gap with 95% CIs, and its paired difference to the methods named in
    ``against`` (default: every other row). rows: [(label, run names)]; teacher, scratch: run names (pooled like a
    method's seeds)."""
    from compressor import bootstrap

    pools = {label: pooled(per_user, names) for label, names in rows}
    pools = {label: p for label, p in pools.items() if p is not None}
    t_pool, s_pool = pooled(per_user, teacher), pooled(per_user, scratch)
    if not pools:
        return
    gap = (s_pool, t_pool) if t_pool is not None and s_pool is not None else None
    labels = list(pools)
    others = [o for o in (against or labels) if o in pools]
    stats = {}
    for label in labels:
        res = bootstrap.summary(pools[label], None, gap, n_resamples, seed)
        diffs = bootstrap.paired_bootstrap({f"{o}:{m}": pools[label][m] - pools[o][m] for o in others if o != label
                                            for m in PER_USER_METRICS}, n_resamples, seed)
        stats[label] = {"metrics": res["metrics"], "gap_share": res.get("gap_share"),
                        "difference": {o: {m: diffs[f"{o}:{m}"] for m in PER_USER_METRICS} for o in others
                                       if o != label}}
    lines.append(f"\n#### {title}: per-user paired bootstrap, test {BOOT_METRIC} "
                 f"(95% CIs, {n_resamples:,} resamples of the users, seed {seed}; seeds pooled per user)\n")
    lines.append("| run | N@20 | gap recovered | " + " | ".join(f"minus {o}" for o in others) + " |")
    lines.append("|" + "---|" * (3 + len(others)))
    for label in labels:
        st = stats[label]
        share = _ci(st["gap_share"][BOOT_METRIC], "{:.0%}") if st["gap_share"] else "—"
        cells = [_ci(st["difference"][o][BOOT_METRIC], "{:+.4f}") if o != label else "—" for o in others]
        lines.append(f"| {label} | {_ci(st['metrics'][BOOT_METRIC])} | {share} | " + " | ".join(cells) + " |")
    summary.setdefault("bootstrap", {})[title] = {"resamples": n_resamples, "seed": seed, "runs": stats}


def summarise(out: Path, seeds, n_resamples: int = 0, boot_seed: int = 0, device: str = "auto") -> dict:
    """The tables from every run's result.json; with n_resamples > 0 also MRR@20 (from the per-user metrics) and the
    per-user bootstrap tables."""
    results = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}
    lines = []
    summary = {"runs": results, "tables": {}}
    per_user = per_user_test(out, sorted(results), device) if n_resamples else {}

    def boot(title, rows, teacher, scratch, against=None):
        if per_user:
            bootstrap_table(title, rows, per_user, teacher, scratch, n_resamples, boot_seed, lines, summary, against)

    def group(prefix_by_row):
        rows = []
        for label, names in prefix_by_row:
            done = [n for n in names if n in results]
            res = [results[n] for n in done]
            vals = {m: [r["test"][m] for r in res] for m in METRICS}
            vals[MRR] = [float(per_user[n][MRR].mean()) for n in done if n in per_user]
            vals["valid"] = [r["valid"][VALID_METRIC] for r in res if VALID_METRIC in r.get("valid", {})]
            epochs = [r["best_epoch"] for r in res]
            walls = [r["wall_time_s"] for r in res]
            rows.append((label, len(res), vals, epochs, walls))
        return rows

    def table(title, rows, teacher_ndcg=None, scratch_ndcg=None):
        lines.append(f"\n### {title}\n")
        head = ("| run | n | R@10 | N@10 | R@20 | N@20 | MRR@20 | gap recovered (N@20) | valid N@10 | best epoch "
                "| wall s |")
        lines.extend([head, "|" + "---|" * 11])
        for label, n, vals, epochs, walls in rows:
            gap = "—"
            if teacher_ndcg and scratch_ndcg is not None and vals["ndcg@20"] and teacher_ndcg != scratch_ndcg:
                gap = f"{100 * (statistics.mean(vals['ndcg@20']) - scratch_ndcg) / (teacher_ndcg - scratch_ndcg):.0f}%"
            ep = f"{statistics.median(epochs):.0f}" if epochs else "—"
            wall = f"{statistics.median(walls):.0f}" if walls else "—"
            lines.append(f"| {label} | {n} | " + " | ".join(_fmt(vals[m]) for m in (*METRICS, MRR))
                         + f" | {gap} | {_fmt(vals['valid'])} | {ep} | {wall} |")
            summary["tables"].setdefault(title, []).append(
                {"run": label, "n": n, **{m: vals[m] for m in (*METRICS, MRR)}, f"valid_{VALID_METRIC}":
                 vals["valid"], "gap_recovered": gap})

    def paired(run, base, run_label, base_label, key, split="test", metric="ndcg@20"):
        """Per-seed differences of a metric, run minus base, on the seeds both finished."""
        diffs = [results[f"{run}-s{s}"][split][metric] - results[f"{base}-s{s}"][split][metric]
                 for s in seeds if f"{run}-s{s}" in results and f"{base}-s{s}" in results]
        if diffs:
            spread = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
            lines.append(f"\nPaired per seed ({run_label} minus {base_label}, {split} {metric}): "
                         f"{', '.join(f'{d:+.4f}' for d in diffs)}; mean {statistics.mean(diffs):+.4f}{spread}, "
                         f"{run_label} ahead on {sum(d > 0 for d in diffs)}/{len(diffs)} seeds\n")
            summary.setdefault("paired", {})[key] = diffs

    def seeds_of(name_of):
        return [name_of(s) for s in seeds]

    for ds in DATA_SUITES.values():
        t = results.get(ds.teacher)
        if not t:
            continue
        named = [(ds.teacher_label, [ds.teacher])] + [(m, seeds_of(lambda s, m=m: ds.run(m, s)))
                                                       for m in ("scratch", *KD_METHODS)]
        if ds.prefix == "gow":
            named[-1] = ("rcekd (the spec's: every_batch, exact refresh)", named[-1][1])
            named.append((f"rcekd, cheap form (once_per_epoch, {GOWALLA_CHEAP_INDEX} {GOWALLA_CHEAP_INDEX_PARAMS})",
                          seeds_of(lambda s: ds.run("rcekd-once", s))))
        user_batches = any(ds.run("rcekd-ub", s) in results for s in seeds)
        if user_batches:
            refresh = f", {GOWALLA_CHEAP_INDEX} {GOWALLA_CHEAP_INDEX_PARAMS}" if ds.prefix == "gow" else ""
            named.append((f"rcekd, kd_users user_batches{refresh}", seeds_of(lambda s: ds.run("rcekd-ub", s))))
        lever_names = [lv for lv in LEVERS if any(ds.run("rcekd", s, lv) in results for s in seeds)]
        levers = [(f"rcekd + {lv}", seeds_of(lambda s, lv=lv: ds.run("rcekd", s, lv))) for lv in lever_names]
        rows = group(named + levers)
        sc = rows[1][2]["ndcg@20"]
        table(ds.title, rows, t["test"]["ndcg@20"], statistics.mean(sc) if sc else None)
        rcekd = f"{ds.prefix}-rcekd"  # the run-name stem ``paired`` adds "-s{seed}" to
        for base in ("scratch", "ce", "rrd"):
            paired(rcekd, f"{ds.prefix}-{base}", "rcekd", base, f"{ds.prefix}:rcekd_minus_{base}")
        if ds.prefix == "gow":
            paired(f"{rcekd}-once", rcekd, "cheap form", "the spec's", "gowalla_cheap_minus_spec")
            for base in ("scratch", "ce", "rrd"):  # the cheap form against the baselines too, seed by seed
                paired(f"{rcekd}-once", f"{ds.prefix}-{base}", "cheap form", base, f"gowalla_cheap_minus_{base}")
        if user_batches:  # a cheap form against the spec's (issue 13's condition for a default), then the rest
            stem = f"{rcekd}-ub"
            for base, label, key in ((rcekd, "the spec's", "spec"), (f"{rcekd}-once", "once_per_epoch", "once"),
                                     *((f"{ds.prefix}-{b}", b, b) for b in ("scratch", "ce", "rrd"))):
                paired(stem, base, "user_batches", label, f"{ds.prefix}:user_batches_minus_{key}")
            paired(stem, rcekd, "user_batches", "the spec's", f"{ds.prefix}:user_batches_minus_spec_valid", "valid",
                   VALID_METRIC)
        for lv in lever_names:  # the levers are chosen on validation: this is the line that decides
            paired(f"{rcekd}-{lv}", rcekd, f"rcekd + {lv}", "rcekd", f"{ds.prefix}:{lv}_minus_rcekd", "valid",
                   VALID_METRIC)
        boot(ds.title, named[1:], named[0][1], named[1][1])
        for lv in lever_names:  # each lever against the recipe on the seeds both finished: pooling other seeds
            # would mix the seeds' spread into a difference the users' resampling is meant to show
            both = [s for s in seeds if ds.run("rcekd", s, lv) in results and ds.run("rcekd", s) in results]
            if both:
                recipe = (f"rcekd, seeds {' '.join(map(str, both))}", [ds.run("rcekd", s) for s in both])
                lever = (f"rcekd + {lv}", [ds.run("rcekd", s, lv) for s in both])
                boot(f"{ds.title}, {lever[0]} against the recipe on the same seeds", [recipe, lever], named[0][1],
                     named[1][1], against=[recipe[0]])
    t = results.get("cite-mf400-teacher")
    cite = DATA_SUITES["main"]
    if t:
        sc = [results[n]["test"]["ndcg@20"] for n in seeds_of(lambda s: cite.run("scratch", s)) if n in results]
        ends = (t["test"]["ndcg@20"], statistics.mean(sc) if sc else None)
        cite_ts = (["cite-mf400-teacher"], seeds_of(lambda s: cite.run("scratch", s)))
        if any(f"cite-rcekd-once-s{s}" in results for s in seeds):
            once_named = [("RCE-KD, kd_users every_batch (the spec's)", seeds_of(lambda s: f"cite-rcekd-s{s}")),
                          ("RCE-KD, kd_users once_per_epoch", seeds_of(lambda s: f"cite-rcekd-once-s{s}"))]
            title = "CiteULike MF400 -> MF20, KD users per batch vs once per epoch"
            table(title, group(once_named), *ends)
            paired("cite-rcekd-once", "cite-rcekd", "once_per_epoch", "every_batch", "once_minus_every_batch")
            boot(title, once_named, *cite_ts)
        # every variant that ran, and the full method, on the seeds all of them finished (a seed only some
        # finished would add its spread to their comparison)
        def full(s):
            return f"cite-rcekd-s{s}" if f"cite-rcekd-s{s}" in results else f"abl-full-s{s}"

        ran = [v for v in ABLATIONS if any(f"abl-{v}-s{s}" in results for s in seeds[:3])]
        abl_seeds = [s for s in seeds[:3] if full(s) in results and all(f"abl-{v}-s{s}" in results for v in ran)]
        abl = [("full", [full(s) for s in abl_seeds])] + [(v, [f"abl-{v}-s{s}" for s in abl_seeds]) for v in ran]
        if ran and abl_seeds:
            title = f"Ablation, CiteULike MF400 -> MF20 (seeds {' '.join(map(str, abl_seeds))})"
            table(title, group(abl), *ends)
            boot(title, abl, *cite_ts, against=["full"])
    lt = results.get("cite-lgcn2000-teacher")
    if lt:
        named = [("teacher LightGCN2000", ["cite-lgcn2000-teacher"]), ("scratch MF20", ["cite-scratch-s0"]),
                 ("RCE-KD MF20", ["hetero-rcekd-s0"])]
        sc = results.get("cite-scratch-s0")
        table("CiteULike LightGCN2000 -> MF20 (seed 0)", group(named), lt["test"]["ndcg@20"],
              sc["test"]["ndcg@20"] if sc else None)
        boot("CiteULike LightGCN2000 -> MF20 (seed 0)", named, named[0][1], named[1][1])
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/quality"))
    ap.add_argument("--suites", nargs="+", default=["main"], choices=[*DATA_SUITES, "ablation", "hetero", "once",
                                                                       "user_batches"],
                    help="main (CiteULike), ml1m, gowalla: teacher, scratch, CE, RRD and RCE-KD per data set; "
                         "ablation, hetero, once: CiteULike's extra comparisons (see above)")
    ap.add_argument("--levers", nargs="+", default=[], choices=list(LEVERS),
                    help="beyond the paper: RCE-KD with each of these overrides of the recipe, on every seed (or "
                         "--lever-seeds) of every data-set suite chosen, compared with the recipe on validation")
    ap.add_argument("--lever-seeds", nargs="+", type=int, default=None,
                    help="the seeds of the lever runs (default: every --seeds)")
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
    if a.levers and not set(a.suites) & set(DATA_SUITES):
        ap.error(f"--levers runs on the data-set suites ({', '.join(DATA_SUITES)}); none is in --suites")
    if a.lever_seeds is not None and not set(a.lever_seeds) <= set(a.seeds):
        ap.error(f"--lever-seeds {a.lever_seeds}: every lever seed must be one of --seeds {a.seeds}")
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(a.suites, a.seeds, a.out.resolve(), a.device, a.threads, a.max_epochs, a.checkpoint_every,
                      a.student_device, a.teacher_set, a.student_set, a.levers,
                      a.lever_seeds)
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
