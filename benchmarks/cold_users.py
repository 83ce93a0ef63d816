"""Cold-user benchmark: the history-tower student distilled with RCE-KD against its scratch twin, the ID-based
students and the history baselines, on users held out of training entirely (data.cold_users) and on warm users.

Per data set: one MF teacher, then per seed an ID student (MF20) from scratch and with RCE-KD and a history
student (model.kind history, dim 20) from scratch and with RCE-KD (distill.exclude_seen). Every run is a real
`compress` subprocess on the same data with the same cold users; finished runs are reused (the script resumes
after an interruption: rerun it). Then every run is evaluated on the cold users' test part from their history
(an ID student has no vector for them and is scored as serving answers them, by popularity) and the baselines
(popular, item-kNN, EASE where the catalogue is small) once per data set. Writes OUT/summary.json and
OUT/summary.md: mean ± std over seeds of warm and cold test metrics, and the paired 95% bootstrap CIs of the
history RCE-KD student against each other scorer on the same users (per-user metrics averaged over seeds first).

    python benchmarks/cold_users.py --out bench-out/cold --data citeulike ml-1m --seeds 0 1 2 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from quality import job, schedule  # noqa: E402  (the subprocess runner of the quality benchmark)

COLD_SHARE = 0.2
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
DATASETS = {  # data set -> (config dir, teacher recipe, extra teacher settings)
    "citeulike": ("configs/citeulike", "mf-teacher.yaml",
                  # how the teacher is trained is not what is compared: the row-sparse optimizer at lr 1e-2
                  # reaches dense Adam's validation NDCG in a quarter of the time (docs/benchmarks.md 3b)
                  ["--set", "train.optimizer=sparse_adamw", "--set", "train.lr=0.01"]),
    "ml-1m": ("configs/ml-1m", "mf-teacher.yaml", []),
}
STUDENTS = {  # row -> (recipe, needs the teacher)
    "id-scratch": ("mf-student.yaml", False),
    "id-rcekd": ("mf-rcekd.yaml", True),
    "history-scratch": ("history-student.yaml", False),
    "history-rcekd": ("history-rcekd.yaml", True),
}


def build_jobs(datasets, seeds, out: Path, threads: int, max_epochs: int | None) -> list[dict]:
    common = ["--device", "cpu", "--threads", threads, "--quiet", "--set", f"data.cold_users={COLD_SHARE}"]
    common += ["--epochs", max_epochs] if max_epochs else []
    jobs = []
    for ds in datasets:
        cdir, teacher_recipe, teacher_extra = DATASETS[ds]
        teacher = f"{ds}-teacher"
        jobs.append(job(teacher, ["train", "--config", f"{cdir}/{teacher_recipe}", "--out", out / teacher,
                                  *common, *teacher_extra]))
        for row, (recipe, kd) in STUDENTS.items():
            for s in seeds:
                name = f"{ds}-{row}-s{s}"
                if kd:
                    args = ["distill", "--teacher", out / teacher]
                else:
                    args = ["train"]
                jobs.append(job(name, [*args, "--config", f"{cdir}/{recipe}", "--out", out / name, "--seed", s,
                                       *common], deps=[teacher] if kd else []))
    return jobs


def _per_user(u, i, exclude: tuple, target, ks=(10, 20), trained_items=None) -> dict:
    """Per-user test metrics as {"users": [n], "recall@10": [n], ...} (lists, for JSON)."""
    from compressor.evaluation import CLASSIC_METRICS, per_user_metrics

    pu = per_user_metrics(u, i, exclude[0], exclude[1], target.indptr, target.items, ks, metrics=CLASSIC_METRICS)
    return {"users": pu.users.tolist(), **{k: v.tolist() for k, v in pu.values.items()}}


def _means(per_user: dict) -> dict:
    return {k: statistics.fmean(v) if v else 0.0 for k, v in per_user.items() if k != "users"}


def evaluate_runs(out: Path, datasets, seeds) -> dict:
    """Per-user warm and cold test metrics of every finished run, and of the baselines; cached per run in
    OUT/<run>/per_user_eval.json (OUT/<data>-baselines-per-user.json)."""
    import torch

    from compressor import api
    from compressor.checkpoint import load_checkpoint
    from compressor.cold import BASELINES, baseline_vectors, cold_user_vectors
    from compressor.config import from_dict

    torch.set_num_threads(1)
    results: dict = {}
    for ds in datasets:
        data = None

        def load(run: Path):
            nonlocal data
            if data is None:
                data = api.load_data(from_dict(load_checkpoint(run).meta["config"]))
            return data

        for row in ("teacher", *STUDENTS):
            for s in ([None] if row == "teacher" else seeds):
                name = f"{ds}-{row}" if s is None else f"{ds}-{row}-s{s}"
                run = out / name
                cache = run / "per_user_eval.json"
                if cache.exists():
                    results[name] = json.loads(cache.read_text())
                    continue
                if not (run / "result.json").exists():
                    continue
                d = load(run)
                model = load_checkpoint(run).build_model()
                with torch.no_grad():
                    u, i = model.vectors()
                    warm = _per_user(u, i, (d.train.indptr, d.train.items), d.test)
                    cold = _per_user(*cold_user_vectors(model, d), (d.cold.history.indptr, d.cold.history.items),
                                     d.cold.test)
                result = json.loads((run / "result.json").read_text())
                res = {"warm": warm, "cold": cold, "best_epoch": result["best_epoch"],
                       "wall_time_s": result["wall_time_s"]}
                cache.write_text(json.dumps(res))
                results[name] = res
        base_file = out / f"{ds}-baselines-per-user.json"
        if base_file.exists():
            results[f"{ds}-baselines"] = json.loads(base_file.read_text())
        elif (out / f"{ds}-teacher" / "result.json").exists():
            d = load(out / f"{ds}-teacher")
            exclude = (d.cold.history.indptr, d.cold.history.items)
            base = {}
            for baseline in BASELINES:
                made = baseline_vectors(baseline, d)  # EASE: lambda chosen on the cold users' validation part
                if made is not None:
                    u, i, settings = made
                    base[baseline] = {"cold": _per_user(u, i, exclude, d.cold.test), **settings}
            base_file.write_text(json.dumps(base))
            results[f"{ds}-baselines"] = base
    return results


def _fmt(vals) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def _pooled(runs: list[dict], side: str) -> tuple[list, dict]:
    """Each user's metric averaged over the runs (seeds) that evaluated it: (users, {metric: [n]})."""
    users = runs[0][side]["users"]
    for r in runs[1:]:
        if r[side]["users"] != users:
            raise ValueError("runs evaluated different users; they are not paired")
    keys = [k for k in runs[0][side] if k != "users"]
    return users, {k: [statistics.fmean(vals) for vals in zip(*(r[side][k] for r in runs))] for k in keys}


def summarise(out: Path, datasets, seeds, results: dict, resamples: int = 1000) -> str:
    import numpy as np

    from compressor.bootstrap import paired_bootstrap

    lines = [f"# Cold-user benchmark ({COLD_SHARE:.0%} of users held out of training)\n",
             "Test split. Cold: users never seen in training, ranked from their training part (history items "
             "excluded). Mean ± std over seeds; paired 95% CIs from a bootstrap over users (each user's metric "
             f"averaged over seeds first, {resamples} resamples, seed 0).\n"]
    summary: dict = {}
    for ds in datasets:
        lines.append(f"\n## {ds}\n")
        lines.append("| scorer | n | warm N@20 | cold R@10 | cold N@10 | cold R@20 | cold N@20 | best epoch | wall s |")
        lines.append("|" + "---|" * 9)
        pooled: dict = {}
        for row in ("teacher", *STUDENTS):
            names = [f"{ds}-teacher"] if row == "teacher" else [f"{ds}-{row}-s{s}" for s in seeds]
            res = [results[n] for n in names if n in results]
            if not res:
                continue
            pooled[row] = {side: _pooled(res, side) for side in ("warm", "cold")}
            warm = [_means(r["warm"])["ndcg@20"] for r in res]
            cold = {m: [_means(r["cold"])[m] for r in res] for m in METRICS}
            ep = statistics.median(r["best_epoch"] for r in res)
            wall = statistics.median(r["wall_time_s"] for r in res)
            label = row + (" (cold: popular)" if row.startswith("id-") or row == "teacher" else "")
            lines.append(f"| {label} | {len(res)} | {_fmt(warm)} | " + " | ".join(_fmt(cold[m]) for m in METRICS)
                         + f" | {ep:.0f} | {wall:.0f} |")
            summary.setdefault(ds, {})[row] = {"n": len(res), "warm_ndcg@20": warm, **{f"cold_{m}": cold[m]
                                                                                       for m in METRICS}}
        for name, r in results.get(f"{ds}-baselines", {}).items():
            pooled[name] = {"cold": _pooled([r], "cold")}
            m = _means(r["cold"])
            extra = f" (lambda {r['lambda']:g}, chosen on validation)" if "lambda" in r else ""
            lines.append(f"| {name}{extra} | — | — | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " | — | — |")
            summary.setdefault(ds, {})[name] = {f"cold_{k}": m[k] for k in METRICS}
        ours = pooled.get("history-rcekd")
        if ours:
            lines.append("\nPaired differences of history-rcekd (NDCG@20, 95% CI):\n")
            for side, others in (("cold", ("history-scratch", "item_knn", "ease", "popular")),
                                 ("warm", ("id-rcekd", "history-scratch", "id-scratch"))):
                for other in others:
                    if other not in pooled or side not in pooled[other]:
                        continue
                    a, b = np.array(ours[side][1]["ndcg@20"]), np.array(pooled[other][side][1]["ndcg@20"])
                    ci = paired_bootstrap({"d": a - b}, resamples)["d"]
                    rel = f"{100 * ci['value'] / b.mean():+.1f}%" if b.mean() else "—"
                    lines.append(f"- {side}: minus {other}: {ci['value']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}] "
                                 f"({rel} of {other}'s {b.mean():.4f})")
                    summary[ds].setdefault("paired", {})[f"{side}:{other}"] = ci
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/cold"))
    ap.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-epochs", type=int, default=None)
    ap.add_argument("--hours", type=float, default=24.0, help="Stop scheduling new runs after this long.")
    ap.add_argument("--summary-only", action="store_true", help="Evaluate and summarise the finished runs only.")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.summary_only:
        jobs = build_jobs(a.data, a.seeds, a.out, a.threads, a.max_epochs)
        schedule(jobs, a.out, a.workers, time.time() + a.hours * 3600)
    print(summarise(a.out, a.data, a.seeds, evaluate_runs(a.out, a.data, a.seeds)))


if __name__ == "__main__":
    main()
