"""Thread collapse on a busy box: one RCE-KD (and one scratch) CiteULike epoch quiet and beside a CPU burner.

    python benchmarks/contention.py --out bench-out/contention [--epochs 2] [--resume]
    python benchmarks/contention.py --out bench-out/spin --methods rcekd --spincounts 300 100000   # + GOMP_SPINCOUNT

Trains a 1-epoch MF400 teacher once, then runs `compress distill` (RCE-KD in the spec's form, and --method
scratch) for --epochs epochs with train.threads=0 (every core this process may use), in four conditions, each in a fresh process:
quiet / beside one busy single-threaded process, each with the tool's default (OMP_WAIT_POLICY=PASSIVE, which
the compressor package sets unless the environment has a value) and with libgomp's own default (spinning a while
before sleeping: OMP_WAIT_POLICY set to an empty value, which libgomp rejects with one warning line and ignores;
that is what every run did before the tool set PASSIVE). Reports the median epoch time (time_epoch_s of metrics.jsonl, first epoch dropped when
there are more) and the busy/quiet ratio. One JSON file per run under --out, results in <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from compressor.config import spec_form_sets  # noqa: E402

BURNER = "while True: pass"
# the environment of each policy: the tool's default (nothing set: PASSIVE), libgomp's default (set but empty)
POLICIES = {"tool-PASSIVE": {}, "libgomp-default": {"OMP_WAIT_POLICY": ""}}


def cli(args, env):
    p = subprocess.run([sys.executable, "-m", "compress_app", *map(str, args)], cwd=ROOT, env=env, text=True,
                       capture_output=True)
    if p.returncode != 0:
        raise SystemExit(f"compress {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")


def epoch_times(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["time_epoch_s"] for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "contention")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep finished runs")
    ap.add_argument("--spincounts", type=int, nargs="*", default=[],
                    help="also time the tool's default with GOMP_SPINCOUNT=N (libgomp: spins before a waiting thread "
                         "sleeps, ~100,000 per ms; it overrides the wait policy's own count), one condition per N")
    ap.add_argument("--methods", nargs="+", default=["rcekd", "scratch"], choices=["rcekd", "scratch"])
    a = ap.parse_args()
    policies = {**POLICIES, **{f"spin-{n}": {"GOMP_SPINCOUNT": str(n)} for n in a.spincounts}}
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base.update(COMPRESS_NO_MLFLOW="1")
    teacher = out / "teacher"
    if not (teacher / "result.json").exists():
        cli(["train", "--config", "configs/citeulike/mf-teacher.yaml", "--out", teacher, "--epochs", 1, "--quiet"], base)
    results = {}
    for method in a.methods:
        for policy in policies:
            for load in ("quiet", "busy"):
                name = f"{method}-{policy}-{load}"
                run = out / name
                if not (a.resume and (run / "result.json").exists()):
                    subprocess.run(["rm", "-rf", str(run)], check=True)
                    env = dict(base, **policies[policy])
                    burner = subprocess.Popen([sys.executable, "-c", BURNER]) if load == "busy" else None
                    try:
                        # the RCE-KD epoch is the spec's form (every_batch, exact refresh), what section 4b
                        # timed before the recipe moved to user_batches: its numbers keep their meaning
                        form = spec_form_sets() if method == "rcekd" else []
                        cli(["distill", "--teacher", teacher, "--method", method, "--config",
                             "configs/citeulike/mf-rcekd.yaml", "--out", run, "--epochs", a.epochs, "--threads", 0,
                             "--set", "train.patience=1000", *form, "--quiet"], env)
                    finally:
                        if burner is not None:
                            burner.kill()
                            burner.wait()
                times = epoch_times(run)
                kept = times[1:] if len(times) > 1 else times
                results[name] = {"epoch_s": times, "median_s": statistics.median(kept)}
                print(name, results[name], flush=True)
    for method in a.methods:
        for policy in policies:
            q, b = results[f"{method}-{policy}-quiet"]["median_s"], results[f"{method}-{policy}-busy"]["median_s"]
            results[f"{method}-{policy}-ratio"] = round(b / q, 2)
    results["load"] = {"loadavg": Path("/proc/loadavg").read_text().split()[:3], "cores": len(os.sched_getaffinity(0)),
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k.endswith("ratio")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
