"""How much RCE-KD's sampled loss moves with the draw of A, for teacher-student pairs of different similarity.

RCE-KD's only random part is step 4: A, L positions of the student's top-M drawn with weights exp((c+1)/T)
(rcekd.md), which sets loss_T's items, its B mask and the adaptive alpha; loss_S (over QS) does not depend on it.
For each teacher and each student state this script fixes the student, draws the epoch's sets ``--draws`` times
(generator seeds 0..draws-1, as ``RCEKDTerm.on_epoch_start`` does at an epoch start) and computes on every draw
the KD loss summed over all users and its gradient with respect to the student's two tables. It reports:

- the loss: mean, std and coefficient of variation over draws (and loss_T's);
- the loss summed over each block of USER_BLOCK users (a BPR batch of 2,048 interactions holds at most that many
  distinct users): the mean over blocks of its coefficient of variation over draws;
- the gradient: noise / signal = sum_d ||g_d - g_mean||^2 / (draws - 1) / ||g_mean||^2 (g_mean's own square holds
  1/draws of the noise too: with 32 draws that bias is small beside the ratios reported) and the mean cosine of g_d
  with g_mean (1 = every draw pushes the student the same way). An epoch's sets come from one draw, so this is how
  much the draw alone turns the KD direction the student follows over an epoch (not the noise of a batch's
  subset of users, which this does not measure);
- how alike the two models rank: |QS ∩ QT| / K (the student's top-K inside the teacher's) and the mean alpha.

    python benchmarks/kd_loss_variance.py --out bench-out/q15-var/variance.json \\
        --teacher mf400=bench-out/q15/cite-mf400-teacher \\
        --teacher lightgcn128=bench-out/q15-var/cite-lightgcn128-teacher \\
        --student fresh --student scratch=bench-out/q15/cite-scratch-s0 --draws 32

Every teacher is used with the same KD recipe (``--config``, default the CiteULike MF->MF one), so only the
teacher changes between rows; ``--kd-set distill.T=1e9`` draws A uniformly (quality.py's ``uniform_A``). The
student's top-M is searched exactly (``distill.index: Flat``, checked): an approximate refresh carries state from
one search to the next, and the spread would no longer come from the draw of A alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.api import load_data, make_config, model_on_data  # noqa: E402
from compressor.config import model_numbers  # noqa: E402
from compressor.checkpoint import load_checkpoint  # noqa: E402
from compressor.device import configure_threads  # noqa: E402
from compressor.distill import load_teacher  # noqa: E402
from compressor.kd_retrieval import KDRetrieval  # noqa: E402
from compressor.kd_terms import RCEKDTerm  # noqa: E402
from compressor.models import build_model  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "citeulike" / "mf-rcekd.yaml"
USER_BLOCK = 2048  # users per loss call (at most a 2,048-interaction BPR batch's users): bounds the score blocks


def draw_statistics(term: RCEKDTerm, model: torch.nn.Module, draws: int) -> dict:
    """Statistics over ``draws`` draws of the epoch's sets for one fixed ``model`` (see the module docstring).
    ``term`` must have been set up (``setup``) for the model's data."""
    params = [p for p in model.parameters() if p.requires_grad]
    n_users = term.retrieval.num_users
    losses, losses_t, grads, overlaps, alphas = [], [], [], [], []
    block_losses: list[list[float]] = []  # [draw][block]: the loss of each block of USER_BLOCK users
    for d in range(draws):
        diag = term.on_epoch_start(model, 1, torch.Generator().manual_seed(d))
        model.zero_grad(set_to_none=True)
        user_all, item_all = model.vectors()
        total = total_t = alpha_sum = 0.0
        block_losses.append([])
        for s in range(0, n_users, USER_BLOCK):
            users = torch.arange(s, min(s + USER_BLOCK, n_users))
            kd, parts = term.loss(user_all[users], item_all, users)
            kd.backward(retain_graph=True)  # the blocks share the graph of vectors() (LightGCN propagates once)
            total += float(kd.detach())
            block_losses[-1].append(float(kd.detach()))
            total_t += float(parts["kd_loss_t"]) * len(users)  # the parts are batch means
            alpha_sum += float(parts["kd_alpha"]) * len(users)
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
        losses.append(total)
        losses_t.append(total_t)
        alphas.append(alpha_sum / n_users)
        overlaps.append(diag["topk_overlap"])
    g = torch.stack(grads)
    g_mean = g.mean(dim=0)
    signal = float(g_mean.pow(2).sum())
    noise = float((g - g_mean).pow(2).sum(dim=1).sum()) / (draws - 1)
    cos = torch.nn.functional.cosine_similarity(g, g_mean.expand_as(g), dim=1)
    return {
        "draws": draws,
        **_spread("loss", losses), **_spread("loss_t", losses_t),
        "block_loss_cv_mean": statistics.fmean(_spread("b", list(col))["b_cv"] for col in zip(*block_losses)),
        "grad_noise_over_signal": noise / signal if signal > 0 else float("inf"),
        "grad_cosine_to_mean": float(cos.mean()), "grad_cosine_min": float(cos.min()),
        "alpha_mean": statistics.fmean(alphas),
        "student_topk_in_teacher_topk": statistics.fmean(overlaps),
    }


def _spread(name: str, xs: list[float]) -> dict:
    mean, std = statistics.fmean(xs), statistics.stdev(xs)
    return {f"{name}_mean": mean, f"{name}_std": std, f"{name}_cv": std / abs(mean) if mean else float("inf")}


def named(spec: str) -> tuple[str, str]:
    """NAME=PATH -> (NAME, PATH); a bare value names itself ("fresh")."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (spec, spec)


def student_model(source: str, data, cfg, seed: int) -> torch.nn.Module:
    """``fresh``: an untrained student of the recipe's model as a distillation starts from it (seeded); else a
    checkpoint's model, its ids checked against the data's."""
    if source == "fresh":
        torch.manual_seed(seed)
        model = build_model(cfg.model.kind, num_users=data.num_users, num_items=data.num_items,
                            **model_numbers(cfg.model))
        if model.needs_graph:  # LightGCN propagates over the training graph
            model.set_graph(data.train.users, data.train.items)
    else:
        model = model_on_data(load_checkpoint(source), data, torch.device("cpu"))
    model.train()
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="result JSON (rows already in it are kept and skipped)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="the RCE-KD recipe every teacher is used with")
    ap.add_argument("--kd-set", action="append", default=[], metavar="KEY=VALUE", help="override of --config")
    ap.add_argument("--teacher", action="append", required=True, metavar="NAME=RUN_DIR")
    ap.add_argument("--student", action="append", required=True, metavar="NAME=RUN_DIR|fresh")
    ap.add_argument("--draws", type=int, default=32, help="draws of the epoch's sets per (teacher, student)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed of a fresh student")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.draws < 2:
        ap.error("--draws must be at least 2 (a spread needs two draws)")
    configure_threads(a.threads)
    cfg = make_config(a.config, a.kd_set)
    if cfg.distill.method != "rcekd":
        ap.error(f"{a.config}: distill.method is {cfg.distill.method!r}; this script measures rcekd's draws")
    if cfg.distill.index != "Flat":
        ap.error(f"distill.index is {cfg.distill.index!r}: the student's top-M must be exact (Flat), or the spread "
                 f"would not come from the draw of A alone")
    data = load_data(cfg)
    setting = {"config": a.config, "kd_set": a.kd_set, "draws": a.draws, "seed": a.seed}
    rows = []
    if a.out.exists():  # rows of the same setting are kept; another setting's file is not added to
        kept = json.loads(a.out.read_text())
        if {k: kept.get(k) for k in setting} != setting:
            ap.error(f"{a.out} holds rows of another setting ({ {k: kept.get(k) for k in setting} }); "
                     f"use another --out")
        rows = kept["rows"]
    done = {(r["teacher"], r["student"]) for r in rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    d = cfg.distill
    for t_name, t_path in map(named, a.teacher):
        teacher = load_teacher(t_path, data)
        for s_name, s_path in map(named, a.student):
            if (t_name, s_name) in done:
                print(f"{t_name} -> {s_name}: kept from {a.out}")
                continue
            retrieval = KDRetrieval(teacher, torch.device("cpu"), a.out.parent / ".topk-cache", d.index,
                                    d.index_params, exclude_seen=d.exclude_seen)
            retrieval.setup(data)
            term = RCEKDTerm.from_config(d, retrieval)
            term.setup(data)
            model = student_model(s_path, data, cfg, a.seed)
            t0 = time.perf_counter()
            row = {"teacher": t_name, "teacher_path": t_path, "student": s_name, "student_path": s_path,
                   **draw_statistics(term, model, a.draws), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            a.out.write_text(json.dumps({**setting, "rows": rows}, indent=1))
            print(f"{t_name} -> {s_name}: loss cv {row['loss_cv']:.4f}, grad noise/signal "
                  f"{row['grad_noise_over_signal']:.4f}, overlap {row['student_topk_in_teacher_topk']:.3f} "
                  f"({row['seconds']} s)", flush=True)
    print(markdown(rows))
    return 0


def markdown(rows: list[dict]) -> str:
    head = ("| teacher -> student state | student top-K in teacher's | mean alpha | epoch loss CV | loss_T CV "
            f"| {USER_BLOCK:,}-user block loss CV | grad noise / signal | grad cosine to mean (min) |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['teacher']} -> {r['student']} | {r['student_topk_in_teacher_topk']:.3f} | {r['alpha_mean']:.3f} "
             f"| {r['loss_cv']:.5f} | {r['loss_t_cv']:.5f} | {r['block_loss_cv_mean']:.5f} "
             f"| {r['grad_noise_over_signal']:.4f} | {r['grad_cosine_to_mean']:.4f} ({r['grad_cosine_min']:.4f}) |"
             for r in rows]
    return "\n".join([head, *lines])


if __name__ == "__main__":
    sys.exit(main())
