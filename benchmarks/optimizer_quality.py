"""Does a row-sparse optimizer keep dense Adam's quality? CiteULike MF400 teacher and MF20 scratch student, several
seeds, each optimizer with the recipe as it is (lr 1e-3, L2 1e-5, patience 30): `compress train` / `compress
distill --method scratch` subprocesses, results read back from each run's result.json.

    python benchmarks/optimizer_quality.py --out bench-out/optq --seeds 0 1 2 --workers 2

Writes OUT/summary.json and OUT/summary.md: per model and optimizer, mean ± std over seeds of test NDCG@20 and
Recall@20, best validation NDCG@10, best epoch, the median epoch time (under the benchmark's own load: --workers
processes side by side), and whether the sparse optimizer's mean test NDCG@20 lies within one standard deviation
(of the dense runs) of dense Adam's. Finished runs are reused; an interrupted one resumes (--resume).
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

MODELS = {  # name: (subcommand + config, what it is)
    "mf400": (["train", "--config", "configs/citeulike/mf-teacher.yaml"], "teacher MF400"),
    "mf20": (["distill", "--method", "scratch", "--config", "configs/citeulike/mf-student.yaml"], "scratch MF20"),
}


def build_jobs(out: Path, seeds, optimizers, threads: int):
    jobs = []
    for model in MODELS:  # the long dense teachers first, so they do not finish last
        for opt in optimizers:
            for s in seeds:
                cmd, _ = MODELS[model]
                jobs.append(job(f"cite-{model}-{opt}-s{s}",
                                [*cmd, "--out", out / f"cite-{model}-{opt}-s{s}", "--seed", s, "--device", "cpu",
                                 "--threads", threads, "--quiet", "--no-mlflow", "--set", f"train.optimizer={opt}"]))
    return jobs


def _run_numbers(run_dir: Path) -> dict | None:
    result = run_dir / "result.json"
    if not result.exists():
        return None
    r = json.loads(result.read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"test_ndcg@20": r["test"]["ndcg@20"], "test_recall@20": r["test"]["recall@20"],
            "valid_ndcg@10": r["valid"]["ndcg@10"], "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"],
            "wall_time_s": r["wall_time_s"],
            "epoch_s_median": statistics.median(e["time_epoch_s"] for e in epochs)}


def _mean_std(vals):
    return (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else (None, None)


def summarise(out: Path, seeds, optimizers) -> dict:
    summary, lines = {"runs": {}, "groups": {}}, []
    lines += ["| model | optimizer | seeds | test N@20 | test R@20 | best valid N@10 | best epoch | epoch s (median) |",
              "|---|---|---|---|---|---|---|---|"]
    for model, (_, label) in MODELS.items():
        for opt in optimizers:
            runs = {s: _run_numbers(out / f"cite-{model}-{opt}-s{s}") for s in seeds}
            runs = {s: r for s, r in runs.items() if r}
            summary["runs"].update({f"cite-{model}-{opt}-s{s}": r for s, r in runs.items()})
            group = {k: _mean_std([r[k] for r in runs.values()]) for k in
                     ("test_ndcg@20", "test_recall@20", "valid_ndcg@10", "best_epoch", "epoch_s_median")}
            group["seeds"] = sorted(runs)
            summary["groups"][f"{model}/{opt}"] = group
            if not runs:
                continue
            f = lambda k, fmt="{:.4f}": " ± ".join(fmt.format(x) for x in group[k])  # noqa: E731
            lines.append(f"| {label} | {opt} | {len(runs)} | {f('test_ndcg@20')} | {f('test_recall@20')} | "
                         f"{f('valid_ndcg@10')} | {f('best_epoch', '{:.0f}')} | {f('epoch_s_median', '{:.2f}')} |")
    lines.append("")
    for model, (_, label) in MODELS.items():
        dense = summary["groups"].get(f"{model}/adam")
        for opt in optimizers:
            g = summary["groups"].get(f"{model}/{opt}")
            if opt == "adam" or not dense or not g or dense["test_ndcg@20"][0] is None or g["test_ndcg@20"][0] is None:
                continue
            diff = g["test_ndcg@20"][0] - dense["test_ndcg@20"][0]
            within = abs(diff) <= dense["test_ndcg@20"][1]
            speed = dense["epoch_s_median"][0] / g["epoch_s_median"][0]
            summary["groups"][f"{model}/{opt}"].update({"diff_vs_adam": diff, "within_one_std": within,
                                                        "epoch_speedup_vs_adam": speed})
            lines.append(f"- {label}, {opt} vs adam: mean test N@20 {diff:+.4f} (adam's std "
                         f"{dense['test_ndcg@20'][1]:.4f}: {'within' if within else 'outside'} one std); "
                         f"epoch {speed:.1f}x faster (medians under this run's load)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "optq")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["adam", "sparse_adam"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per run (default 1: one run per core)")
    ap.add_argument("--hours", type=float, default=24.0, help="start no new run after this long")
    ap.add_argument("--summary-only", action="store_true", help="only write the summary of finished runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        status = schedule(build_jobs(args.out, args.seeds, args.optimizers, args.threads), args.out, args.workers,
                          time.time() + args.hours * 3600)
        print(json.dumps(status, indent=1))
    summarise(args.out, args.seeds, args.optimizers)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
