"""Full-ranking evaluation and exact top-k alone: `compressor.evaluation.evaluate` and
`compressor.retrieval.exact_topk_on_device` of this code against another commit's, in one process, on a real data
set's validation split and users.

Every training run evaluates its validation split every epoch (`train.eval_every: 1` in every recipe); on Gowalla
a 20-dim student's evaluation took about as long as its training epoch. This times that call alone: the same
vectors through each implementation, the implementations alternated, medians and per-repeat ratios, and whether
their metrics agree. The exact top-M (M = 100 by default) of every user is what UserClusters falls back to and
what its candidate lists and the recall check compute; timed the same way, with whether the ids agree.
Vectors are random (scaled like a trained model's, which does not change the cost) or a checkpoint's
(``--checkpoint``, a run directory or model file trained on ``--data``).

``--parts refresh`` times the exact refresh of a distillation run (`distill.index: Flat`, every user's top-M over
all items, training items kept) as this code computes it on the CPU (`exact_topk_on_device`) against FAISS's
IndexFlatIP, which computed it before docs/benchmarks.md 4l; no baseline checkout needed.

    python benchmarks/evaluate_speed.py --out bench-out/evaluate_speed --baseline /tmp/old  # a checkout of another commit

The baseline's modules resolve their relative imports against this checkout's package: a baseline whose
evaluation.py imports ``.retrieval`` times this checkout's retrieval there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results.json (created)")
    ap.add_argument("--baseline", type=Path, help="a checkout of another commit: its compressor/evaluation.py and "
                    "compressor/retrieval.py are timed beside this one's")
    ap.add_argument("--parts", nargs="+", default=["evaluate", "exact_topk"],
                    choices=["evaluate", "exact_topk", "refresh"])
    ap.add_argument("--topk", type=int, default=100, help="M of the exact top-M part")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gowalla"))
    ap.add_argument("--min-user-interactions", type=int, default=0, help="as data.min_user_interactions (CiteULike's "
                    "recipes: 5)")
    ap.add_argument("--dims", type=int, nargs="*", default=[20, 300], help="random vectors of these sizes (none: only --checkpoint)")
    ap.add_argument("--checkpoint", nargs="*", default=[], help="run directories or model files to evaluate too")
    ap.add_argument("--block", type=int, default=1024, help="users per block (train.eval_block)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    a = ap.parse_args()

    import torch

    from compressor import evaluation, retrieval
    from compressor.checkpoint import load_checkpoint
    from compressor.data import load_dataset
    from compressor.device import configure_threads
    from kd_speed import load_note
    from optimizer_step import load_module

    impls = {"this code": (evaluation, retrieval)}
    if a.baseline:
        impls["baseline"] = (load_module(a.baseline / "compressor" / "evaluation.py", "baseline_evaluation"),
                             load_module(a.baseline / "compressor" / "retrieval.py", "baseline_retrieval"))
    data = load_dataset(a.data, min_user_interactions=a.min_user_interactions)
    tr, va = data.train, data.valid
    gen = torch.Generator().manual_seed(0)
    models = {}
    for dim in a.dims:  # init-sized vectors have scores of a trained model's spread after scaling
        models[f"random dim {dim}"] = (torch.randn(data.num_users, dim, generator=gen) / dim ** 0.25,
                                       torch.randn(data.num_items, dim, generator=gen) / dim ** 0.25)
    for path in a.checkpoint:
        with torch.no_grad():
            models[f"checkpoint {path}"] = load_checkpoint(path).build_model("cpu").vectors()
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"command": sys.argv, "data": a.data, "block": a.block, "valid_users": int((va.indptr[1:] > va.indptr[:-1]).sum()),
           "items": data.num_items, "load_at_start": load_note(), "runs": []}
    for threads in a.threads:
        configure_threads(threads)
        for label, (u, i) in models.items():
            for part in a.parts:
                calls = _calls(part, impls, u, i, tr, va, a)
                times = {name: [] for name in calls}
                answers = {}
                for r in range(a.repeats):
                    names = list(calls) if r % 2 == 0 else list(calls)[::-1]  # alternated against drifting load
                    for name in names:
                        t0 = time.perf_counter()
                        answers[name] = calls[name]()
                        times[name].append(time.perf_counter() - t0)
                row = {"part": part, "model": label, "threads": threads, "topk": a.topk, "seconds": times,
                       "median_s": {n: statistics.median(t) for n, t in times.items()}}
                if part == "evaluate":
                    row["metrics"] = answers
                if "baseline" in calls:
                    row["paired_ratios_baseline_over_this"] = [b / t for b, t in zip(times["baseline"],
                                                                                     times["this code"])]
                    if part == "evaluate":
                        agree = max(abs(answers["baseline"][k] - answers["this code"][k])
                                    for k in answers["this code"] if k != "users")
                        row["max_metric_difference"] = agree
                        agreement = f"largest metric difference {agree:.2e}"
                    else:
                        agree = float((torch.as_tensor(answers["baseline"]) == answers["this code"]).float().mean())
                        row["share_of_equal_ids"] = agree
                        agreement = f"equal ids {agree:.6f}"
                res["runs"].append(row)
                print(f"{part}, {label}, {threads} thread(s): "
                      + ", ".join(f"{n} {s:.2f} s" for n, s in row["median_s"].items())
                      + (f", paired ratios {', '.join(f'{x:.2f}' for x in row['paired_ratios_baseline_over_this'])}"
                         f", {agreement}" if "baseline" in calls else ""), flush=True)
    res["load_at_end"] = load_note()
    (a.out / "results.json").write_text(json.dumps(res, indent=1))


def _calls(part: str, impls: dict, u, i, tr, va, a) -> dict:
    """{name: () -> answer} of the implementations one part times: "this code" and, where there is one, the
    "baseline" (another checkout's, or for ``refresh`` FAISS's IndexFlatIP on the same vectors)."""
    if part == "refresh":
        from compressor.retrieval import TopKSearcher, exact_topk_on_device

        u, i = u.detach(), i.detach()
        un, itn = u.numpy(), i.numpy()
        return {"this code": lambda: exact_topk_on_device(u, i, a.topk)[1],
                "baseline": lambda: TopKSearcher(itn, "Flat").search(un, a.topk)[1]}
    if part == "evaluate":
        return {name: (lambda ev=ev: ev.evaluate(u, i, tr.indptr, tr.items, va.indptr, va.items, block=a.block))
                for name, (ev, _) in impls.items()}
    return {name: (lambda rt=rt: rt.exact_topk_on_device(u, i, a.topk)[1]) for name, (_, rt) in impls.items()}


if __name__ == "__main__":
    main()
