"""Row-sparse optimizer steps alone: `train.optimizer` sparse_adam on a 200k-item table, at the row counts of an
RCE-KD epoch's item-table steps, this code against another commit's `compressor/optim.py` in one process.

A KD batch under `distill.kd_users: once_per_epoch` hands the item table a gradient over 2k-55k distinct rows (the
first batches, whose users are all new, the most); at 1M users those steps are a third of the KD batches' time
(docs/benchmarks.md 4h). Whole epochs at that size move 2x with the box's pace, so this times the step alone:
the same gradients replayed through each implementation, the implementations alternated, per-step medians and
their ratio. Each gradient: that many distinct item rows plus a BPR batch's 2 x 2,048 uniformly drawn rows.

    python benchmarks/optimizer_step.py --out bench-out/optimizer_step --baseline /tmp/old/compressor/optim.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# distinct item rows of the KD steps, first to last, as a 300k-user epoch's were (every 100th step of 885)
ROW_COUNTS = (55_000, 45_000, 37_000, 30_000, 24_000, 18_000, 14_000, 10_000, 7_500, 2_000)


def load_module(path: Path, name: str):
    """Another commit's module of the ``compressor`` package (e.g. its optim.py) as a module of its own; its
    relative imports (optim.py's ``compressor.sparse_rows``) resolve against this checkout's package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "compressor"  # its relative imports resolve against this checkout's package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json (created)")
    ap.add_argument("--baseline", type=Path, help="another commit's compressor/optim.py, timed beside this one")
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="passes over the row counts per implementation")
    ap.add_argument("--rounds", type=int, default=4, help="times each row count is stepped per pass")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()

    import torch

    from compressor import optim
    from compressor.device import configure_threads
    from kd_speed import load_note

    impls = {"this code": optim}
    if a.baseline:
        impls["baseline"] = load_module(a.baseline, "baseline_optim")
    a.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def gradient(rows: int) -> torch.Tensor:
        kd = torch.randperm(a.items, generator=gen)[:rows].sort().values  # a KD term's distinct rows, sorted
        bpr = torch.randint(0, a.items, (4096,), generator=gen)  # the BPR batch's positives and negatives
        ids = torch.cat([bpr[:2048], kd, bpr[2048:]])
        return torch.sparse_coo_tensor(ids[None], torch.randn(len(ids), a.dim, generator=gen) * 1e-2,
                                       (a.items, a.dim))

    grads = [gradient(r) for r in ROW_COUNTS for _ in range(a.rounds)]
    start = torch.randn(a.items, a.dim, generator=gen) * 0.1
    res: dict = {"command": " ".join(sys.argv), "load_at_start": load_note(), "items": a.items, "dim": a.dim,
                 "row_counts": ROW_COUNTS, "rounds": a.rounds, "torch": torch.__version__, "threads": {}}
    for threads in a.threads:
        configure_threads(threads)
        per_step: dict[str, list[float]] = {name: [] for name in impls}
        weights = {}
        for rep in range(a.repeats):
            for name, module in (impls.items() if rep % 2 == 0 else reversed(impls.items())):
                table = torch.nn.Parameter(start.clone())
                opt = module.SparseAdam([table], lr=1e-3, weight_decay=1e-5)
                t0 = time.perf_counter()
                for g in grads:
                    table.grad = g
                    opt.step()
                per_step[name].append((time.perf_counter() - t0) / len(grads) * 1e3)
                opt.catch_up()
                weights[name] = table.detach().clone()
        row = {name: {"ms_per_step": v, "median_ms": statistics.median(v)} for name, v in per_step.items()}
        if "baseline" in impls:
            row["paired_ratios_baseline_over_this"] = [b / t for b, t in zip(per_step["baseline"],
                                                                             per_step["this code"])]
            row["same_weights"] = bool(torch.equal(weights["baseline"], weights["this code"]))
            row["max_abs_weight_difference"] = float((weights["baseline"] - weights["this code"]).abs().max())
        res["threads"][str(threads)] = row
        print(f"{threads} thread(s): " + ", ".join(f"{n} {r['median_ms']:.2f} ms/step" for n, r in row.items()
                                                    if isinstance(r, dict))
              + (f", paired ratios {', '.join(f'{x:.2f}' for x in row['paired_ratios_baseline_over_this'])}"
                 f", same weights: {row['same_weights']}" if "baseline" in impls else ""), flush=True)
    res["load_at_end"] = load_note()
    (a.out / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
