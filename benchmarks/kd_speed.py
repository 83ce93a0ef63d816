"""RCE-KD speed and scale benchmark (issue 3, "Speed" and "Scale").

Three parts, each bounded by flags, all results in OUT/results.json and OUT/results.md:

refresh  Gowalla size (29,858 users x 40,981 items), real trained vectors: the per-epoch student top-M refresh
         (M = 100, configs/gowalla/mf-rcekd.yaml) with exact FAISS Flat, approximate indexes (IVF{nlist},Flat at a
         few nprobe, HNSW32 at a few efSearch) and blocked torch.topk over matmul scores, all in ONE process,
         interleaved per repeat, medians of the repeats. Every FAISS index goes through
         ``compressor.retrieval.TopKSearcher`` (so the inner-product -> L2 reduction applies). Index build/train time
         is reported apart from search time. Two IVF life cycles are measured: "rebuilt" (k-means + add every
         epoch: what ``KDRetrieval.student_topm`` does on its first epoch or when recall fell below its floor) and "kept"
         (``TopKSearcher(..., trained_like=previous)``: the coarse quantizer trained on the previous epoch's
         vectors is kept and the new vectors added; what ``KDRetrieval.student_topm`` does on the other epochs).
         Recall@M is against exact search over ALL users.
epoch    One full RCE-KD epoch (Trainer._run_epoch with the rcekd objective of compressor.objectives.build_objective)
         against one scratch epoch (Scratch), interleaved in one process, both students starting from the same
         trained student; breakdown: refresh (retrieval, recall check, KD sampling + teacher scoring), negative
         sampling, batches. Then the peak RSS of a real `compress distill` Gowalla process (1 epoch + evaluation),
         read from the child's rusage (ru_maxrss).
scale    Synthetic power-law data (Zipf-like item popularity and user activity, clustered tastes), U users x
         200k items, dim-20 MF student, synthetic dim-64 teacher, approximate index for the refresh; one RCE-KD epoch
         (and optionally one scratch epoch) per size, each size in its own subprocess: epoch time with breakdown,
         peak RSS, and the size of each per-epoch tensor.

The Gowalla student/teacher are trained first with the real CLI (reused when present):
    compress distill --method scratch --config configs/gowalla/mf-student.yaml --epochs E-1 ...   (student, then
    --resume --epochs E: the epoch E-1 vectors are kept for the "kept IVF" experiment)
    compress train --config configs/gowalla/mf-teacher.yaml --epochs TE ...                        (teacher)

    python benchmarks/kd_speed.py --out bench-out/kd_speed                       # everything (about an hour)
    python benchmarks/kd_speed.py --out bench-out/kd_speed --parts refresh epoch # Gowalla parts only
    python benchmarks/kd_speed.py --out bench-out/kd_speed --parts scale --scale-users 100000 300000 1000000
    python benchmarks/kd_speed.py --quick --out bench-out/kd_speed-quick         # smoke run (a few minutes)

Timings on a shared machine are noisy: compare methods only within one run (ratios), never across runs.

torch, faiss and compressor are imported inside the part functions on purpose: only the child processes that
measure need them, and the parent that orchestrates them (and `--report`, `--help`) stays small beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compressor.run_dir import METRICS_FILE, RESULT_FILE, RESUME_FILE  # noqa: E402  (constants only)
from compressor.config import spec_form, spec_form_sets  # noqa: E402

GOWALLA = ROOT.parent / "shared" / "data" / "gowalla"
KD_CONFIG = ROOT / "configs" / "gowalla" / "mf-rcekd.yaml"
STUDENT_CONFIG = ROOT / "configs" / "gowalla" / "mf-student.yaml"
TEACHER_CONFIG = ROOT / "configs" / "gowalla" / "mf-teacher.yaml"
MB = 1 << 20


# ------------------------------------------------------------------------------------------------ small helpers
def load_note() -> dict:
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"uptime": out, "loadavg": Path("/proc/loadavg").read_text().split()[:3], "time": time.strftime("%H:%M:%S")}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def med(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_measured(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None,
                 rss_cap_mb: float | None = None) -> dict:
    """Run a child process; return its exit code, wall time and peak RSS (its own ru_maxrss, via wait4).

    ``rss_cap_mb``: kill the child when its resident memory passes this (protects the shared machine)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COMPRESS_NO_MLFLOW="1", **(env or {}))
    t0 = time.perf_counter()
    killed = None
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                killed = f"timeout after {timeout:.0f} s"
            elif rss_cap_mb and _rss_mb(p.pid) > rss_cap_mb:
                killed = f"RSS above the {rss_cap_mb:.0f} MB cap"
            if killed:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.1)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_mb": ru.ru_maxrss / 1024,
            "killed": killed, "cmd": " ".join(map(str, cmd)), "log": str(log)}


def child(part: str, spec: dict, out: Path, name: str, timeout: float | None = None,
          rss_cap_mb: float | None = None) -> dict:
    """Run ``kd_speed.py _child PART SPEC`` in a subprocess; its JSON result plus its peak RSS and wall time."""
    spec_path = out / f"{name}.spec.json"
    res_path = out / f"{name}.json"
    res_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(res_path)}))
    r = run_measured([sys.executable, str(Path(__file__).resolve()), "_child", part, str(spec_path)],
                     out / f"{name}.log", timeout=timeout, rss_cap_mb=rss_cap_mb)
    result = json.loads(res_path.read_text()) if res_path.exists() else {}
    result["process"] = r
    if r["rc"] != 0:
        result["error"] = f"child exited {r['rc']}{' (' + r['killed'] + ')' if r['killed'] else ''} (see {r['log']})"
        print(f"  {name}: FAILED rc={r['rc']}, log {r['log']}", flush=True)
    return result


def vectors_of(ckpt_path) -> tuple:
    import numpy as np
    import torch

    from compressor.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    with torch.no_grad():
        u, i = ckpt.build_model().vectors()
    return (np.ascontiguousarray(u.detach().numpy(), dtype=np.float32),
            np.ascontiguousarray(i.detach().numpy(), dtype=np.float32),
            ckpt)


def norm_stats(vecs, popularity=None) -> dict:
    import numpy as np

    n = np.linalg.norm(vecs, axis=1)
    p1, p50, p99 = np.percentile(n, [1, 50, 99])
    out = {"p1": float(p1), "p50": float(p50), "p99": float(p99), "max": float(n.max()),
           "p99_over_p50": float(p99 / p50), "max_over_p50": float(n.max() / p50), "cv": float(n.std() / n.mean())}
    if popularity is not None:
        out["corr_log_popularity"] = float(np.corrcoef(np.log1p(popularity), n)[0, 1])
    return out


# ------------------------------------------------------------------------------------------------ Gowalla models
def prepare_gowalla(work: Path, a) -> dict:
    """Train (or reuse) the Gowalla MF20 student and MF300 teacher with the real CLI."""
    py = [sys.executable, "-m", "compress_app"]
    common = ["--threads", str(a.threads), "--quiet", "--no-mlflow", "--set", "train.eval_every=100000"]
    src = Path(a.reuse_models) if a.reuse_models else work
    student, teacher = src / "gowalla-mf20", src / "gowalla-mf300"
    prev = src / f"student-e{a.student_epochs - 1}.safetensors"
    info: dict = {"student_dir": str(student), "teacher_dir": str(teacher)}
    if not ((student / RESULT_FILE).exists() and prev.exists()):
        shutil.rmtree(student, ignore_errors=True)
        print(f"training Gowalla MF20 student for {a.student_epochs} epochs ...", flush=True)
        base = [*py, "distill", "--method", "scratch", "--config", str(STUDENT_CONFIG), "--out", str(student), *common]
        r1 = run_measured([*base, "--epochs", str(a.student_epochs - 1)], work / "student-train-1.log")
        if r1["rc"]:
            raise SystemExit(f"student training failed: {r1['log']}")
        shutil.copy(student / RESUME_FILE, prev)
        r2 = run_measured([*base, "--epochs", str(a.student_epochs), "--resume"], work / "student-train-2.log")
        if r2["rc"]:
            raise SystemExit(f"student training failed: {r2['log']}")
    if not (teacher / RESULT_FILE).exists():
        shutil.rmtree(teacher, ignore_errors=True)
        print(f"training Gowalla MF300 teacher for {a.teacher_epochs} epochs ...", flush=True)
        r = run_measured([*py, "train", "--config", str(TEACHER_CONFIG), "--out", str(teacher), "--epochs",
                          str(a.teacher_epochs), *common, "--set", f"model.dim={a.teacher_dim}"],
                         work / "teacher-train.log")
        if r["rc"]:
            raise SystemExit(f"teacher training failed: {r['log']}")
    for name, d in (("student", student), ("teacher", teacher)):
        res = json.loads((d / RESULT_FILE).read_text())
        hist = [json.loads(x) for x in (d / METRICS_FILE).read_text().splitlines() if x.strip()]
        info[name] = {"epochs": res["epochs_run"], "test": res["test"],
                      "epoch_s": [round(h["time_epoch_s"], 2) for h in hist]}
    return info


# ------------------------------------------------------------------------------------------------ part: refresh
def _set_param(searcher, name, value):
    import faiss

    faiss.ParameterSpace().set_index_parameter(searcher.index, name, value)


def part_refresh(spec: dict) -> dict:
    import faiss
    import numpy as np
    import torch

    from compressor.device import configure_threads
    from compressor import retrieval
    from compressor.retrieval import TopKSearcher, blocked_torch_topk, measure_recall, recall_at_k

    threads = configure_threads(spec["threads"])
    m, repeats = spec["M"], spec["repeats"]
    u, i, ckpt = vectors_of(spec["student"])
    u_prev, i_prev, _ = vectors_of(spec["student_prev"])
    pop = np.bincount(ckpt.train_indices, minlength=len(i))
    out: dict = {"threads": threads, "torch_threads": torch.get_num_threads(), "M": m, "repeats": repeats,
                 "users": len(u), "items": len(i), "dim": u.shape[1], "student_epoch": ckpt.meta.get("epoch"),
                 "norms": {"item": norm_stats(i, pop), "user": norm_stats(u)},
                 "faiss": faiss.__version__, "torch": torch.__version__}
    print(f"refresh: {len(u)} users x {len(i)} items, dim {u.shape[1]}, M={m}, {threads} threads", flush=True)

    # exact truth, once (also warms up BLAS)
    _, truth = TopKSearcher(i, "Flat").search(u, m)
    t_torch = {1024: [], 4096: []}
    t_flat = []
    # approximate candidates: factory -> (param name, values)
    cands = []
    for nl in spec["ivf_nlist"]:
        cands.append((f"IVF{nl},Flat", "nprobe", [p for p in spec["nprobe"] if p <= nl]))
    for hf in spec["hnsw"]:
        cands.append((hf, "efSearch", spec["ef_search"]))
    build = {f: [] for f, _, _ in cands}
    search = {(f, v): [] for f, n, vals in cands for v in vals}
    recall = {}
    kept = [(f"IVF{nl},Flat", [p for p in spec["nprobe"] if p <= nl]) for nl in spec["kept_nlist"]]
    kept_build = {f: [] for f, _ in kept}
    kept_search = {(f, v): [] for f, vals in kept for v in vals}
    kept_recall = {}
    # IVF rebuilt every epoch with a cheaper k-means (fewer iterations): same TopKSearcher, whose
    # _try_extract_ivf hook is wrapped here to set cp.niter as well as the seed it already sets.
    fast = [(f"IVF{nl},Flat", it, [p for p in spec["nprobe"] if p <= nl]) for nl in spec["fast_nlist"]
            for it in spec["fast_niter"]]
    fast_build = {(f, it): [] for f, it, _ in fast}
    fast_search = {(f, it, v): [] for f, it, vals in fast for v in vals}
    fast_recall = {}
    raw_ip_recall = {}
    t_check, check = [], None

    def with_niter(niter):
        orig = retrieval._try_extract_ivf

        def patched(index):
            ivf = orig(index)
            if ivf is not None:
                ivf.cp.niter = int(niter)
            return ivf
        return orig, patched

    for r in range(repeats):
        print(f"  repeat {r + 1}/{repeats}", flush=True)
        # exact: FAISS Flat through TopKSearcher (build included: it is only an add)
        t0 = time.perf_counter()
        _, ids = TopKSearcher(i, "Flat").search(u, m)
        t_flat.append(time.perf_counter() - t0)
        assert (ids == truth).mean() > 0.999
        # blocked torch.topk over matmul scores
        for blk in t_torch:
            t0 = time.perf_counter()
            _, ids = blocked_torch_topk(u, i, m, block=blk)
            t_torch[blk].append(time.perf_counter() - t0)
        # approximate indexes, rebuilt from scratch (what the trainer does every epoch)
        for fac, pname, vals in cands:
            t0 = time.perf_counter()
            s = TopKSearcher(i, fac)
            build[fac].append(time.perf_counter() - t0)
            for v in vals:
                _set_param(s, pname, v)
                t0 = time.perf_counter()
                _, ids = s.search(u, m)
                search[(fac, v)].append(time.perf_counter() - t0)
                if r == 0:
                    recall[(fac, v)] = recall_at_k(ids, truth)
            if r == 0 and fac.startswith("IVF"):
                # the trainer's own per-epoch recall check (measure_recall: 500 users vs a fresh Flat)
                t0 = time.perf_counter()
                check = measure_recall(s, u, i, m, sample_users=500)
                t_check.append(time.perf_counter() - t0)
            del s
        # IVF rebuilt with fewer k-means iterations
        for fac, it, vals in fast:
            orig, patched = with_niter(it)
            retrieval._try_extract_ivf = patched
            try:
                t0 = time.perf_counter()
                s = TopKSearcher(i, fac)
                fast_build[(fac, it)].append(time.perf_counter() - t0)
            finally:
                retrieval._try_extract_ivf = orig
            for v in vals:
                _set_param(s, "nprobe", v)
                t0 = time.perf_counter()
                _, ids = s.search(u, m)
                fast_search[(fac, it, v)].append(time.perf_counter() - t0)
                if r == 0:
                    fast_recall[(fac, it, v)] = recall_at_k(ids, truth)
            del s
        # IVF kept from the previous epoch's vectors, the shipped path (TopKSearcher(trained_like=...), what
        # RCEKD.student_topm does while recall holds): the trained quantizer is cloned, this epoch's vectors added
        for fac, vals in kept:
            prev = TopKSearcher(i_prev, fac)
            t0 = time.perf_counter()
            s = TopKSearcher(i, fac, trained_like=prev.trained)
            kept_build[fac].append(time.perf_counter() - t0)
            assert s.reused_training
            del prev
            for v in vals:
                _set_param(s, "nprobe", v)
                t0 = time.perf_counter()
                _, ids = s.search(u, m)
                kept_search[(fac, v)].append(time.perf_counter() - t0)
                if r == 0:
                    kept_recall[(fac, v)] = recall_at_k(ids, truth)
            del s
    # raw inner-product IVF (no reduction) at the same nlist/nprobe, recall only: shows why ip2l2 is needed
    for nl in spec["ivf_nlist"]:
        q = faiss.index_factory(u.shape[1], f"IVF{nl},Flat", faiss.METRIC_INNER_PRODUCT)
        q.cp.seed = 0
        q.train(i)
        q.add(i)
        for v in [p for p in spec["nprobe"] if p <= nl]:
            q.nprobe = v
            _, ids = q.search(u, m)
            raw_ip_recall[(f"IVF{nl},Flat", v)] = recall_at_k(ids, truth)

    torch_best_blk = min(t_torch, key=lambda b: med(t_torch[b]))
    base = med(t_torch[torch_best_blk])
    rows = [{"method": "torch.topk (blocked matmul)", "block": b, "build_s": 0.0, "search_s": med(t_torch[b]),
             "total_s": med(t_torch[b]), "recall": 1.0, "times": t_torch[b]} for b in t_torch]
    rows.append({"method": "FAISS Flat (exact)", "build_s": None, "search_s": med(t_flat), "total_s": med(t_flat),
                 "recall": 1.0, "times": t_flat})
    for fac, pname, vals in cands:
        for v in vals:
            rows.append({"method": f"{fac} ip2l2, rebuilt per epoch", "factory": fac, "param": f"{pname}={v}",
                         "build_s": med(build[fac]), "search_s": med(search[(fac, v)]),
                         "total_s": med(build[fac]) + med(search[(fac, v)]), "recall": recall[(fac, v)],
                         "raw_ip_recall": raw_ip_recall.get((fac, v)), "times": search[(fac, v)],
                         "build_times": build[fac]})
    for fac, it, vals in fast:
        for v in vals:
            rows.append({"method": f"{fac} ip2l2, rebuilt per epoch, k-means niter={it}", "factory": fac,
                         "param": f"nprobe={v}", "build_s": med(fast_build[(fac, it)]),
                         "search_s": med(fast_search[(fac, it, v)]),
                         "total_s": med(fast_build[(fac, it)]) + med(fast_search[(fac, it, v)]),
                         "recall": fast_recall[(fac, it, v)], "times": fast_search[(fac, it, v)],
                         "build_times": fast_build[(fac, it)]})
    prev_epoch = (ckpt.meta.get("epoch") or 1) - 1
    for fac, vals in kept:
        for v in vals:
            rows.append({"method": f"{fac} ip2l2, quantizer kept from epoch {prev_epoch}, lists re-added",
                         "factory": fac, "param": f"nprobe={v}", "build_s": med(kept_build[fac]),
                         "search_s": med(kept_search[(fac, v)]),
                         "total_s": med(kept_build[fac]) + med(kept_search[(fac, v)]),
                         "recall": kept_recall[(fac, v)], "times": kept_search[(fac, v)],
                         "build_times": kept_build[fac]})
    for row in rows:
        row["speedup_total_vs_torch"] = base / row["total_s"]
        row["speedup_search_vs_torch"] = base / row["search_s"]
    out["rows"] = rows
    out["torch_baseline_block"] = torch_best_blk
    out["torch_baseline_s"] = base
    out["recall_check_s"] = med(t_check)
    out["recall_check_value"] = check
    ok = [r for r in rows if r["recall"] >= spec["recall_floor"] and "ip2l2" in r["method"]]
    for key in ("total", "search"):
        best = max(ok, key=lambda r: r[f"speedup_{key}_vs_torch"]) if ok else None
        out[f"best_{key}"] = None if best is None else {k: best[k] for k in ("method", "param", "recall", "build_s",
                                                                             "search_s", "total_s",
                                                                             f"speedup_{key}_vs_torch")}
    return out


# ------------------------------------------------------------------------------------------------ part: epoch
def _epoch_breakdown(row: dict) -> dict:
    refresh, neg, total = row["time_refresh_s"], row["time_sampling_s"], row["time_epoch_s"]
    retr = row.get("time_retrieval_s", 0.0)
    kds = row.get("time_kd_sampling_s", 0.0)
    return {"epoch_s": total, "refresh_s": refresh, "retrieval_s": retr, "kd_sampling_scoring_s": kds,
            # the rest of on_epoch_start: the recall check (approximate index only) + the topk_overlap diagnostic
            "recall_check_s": max(refresh - retr - kds, 0.0), "neg_sampling_s": neg,
            "batches_s": total - refresh - neg, "retrieval_recall": row.get("diag_retrieval_recall"),
            "retrieval_candidates": row.get("diag_retrieval_candidates"),
            "topk_overlap": row.get("diag_topk_overlap")}


def part_epoch(spec: dict) -> dict:
    import torch

    from compressor.checkpoint import load_checkpoint
    from compressor.config import load_config
    from compressor.data import load_dataset
    from compressor.device import configure_threads
    from compressor.distill import load_teacher
    from compressor.objectives import Scratch, SetupContext, build_objective
    from compressor.trainer import Trainer

    threads = configure_threads(spec["threads"])
    dev = torch.device("cpu")
    work = Path(spec["work"])
    data = load_dataset(str(GOWALLA))
    teacher = load_teacher(spec["teacher"], data)
    state = load_checkpoint(spec["student"]).model_state
    trainers = {}
    cfg = load_config(STUDENT_CONFIG)
    cfg.train.threads = threads
    trainers["scratch"] = Trainer(cfg, data, Scratch(), work / "epoch-scratch", dev, progress=False)
    setup_s = {}
    for name, (factory, params, *extra) in spec["kd_indexes"].items():
        cfg = load_config(KD_CONFIG)
        cfg.train.threads = threads
        # every objective starts from the recipe as specified (it distils in user_batches with a UserClusters refresh
        # since docs/benchmarks.md 4o) and sets its own index and kd_users, so the rows mean what they did
        for key, value in {**spec_form(), "index": factory, "index_params": params}.items():
            setattr(cfg.distill, key, value)
        for key, value in (extra[0] if extra else {}).items():  # e.g. {"kd_users": "once_per_epoch"}
            setattr(cfg.distill, key, value)
        obj = build_objective(cfg, teacher, dev, work / f"epoch-{name}")
        tr = Trainer(cfg, data, obj, work / f"epoch-{name}", dev, progress=False)
        t0 = time.perf_counter()
        obj.setup(SetupContext(data, tr.sparse_grads))  # teacher top-K (cached on disk beside the run after the first time)
        setup_s[name] = time.perf_counter() - t0
        trainers[name] = tr
    for tr in trainers.values():
        tr.model.load_state_dict(state, strict=False)  # every student starts from the same trained vectors
    rows = {n: [] for n in trainers}
    names = list(trainers)
    warmup = spec.get("warmup", 0)
    for r in range(warmup):
        for n in names:
            trainers[n]._run_epoch(r + 1)
        print(f"  warm-up epoch {r + 1} done", flush=True)
    for r in range(spec["repeats"]):
        order = names if r % 2 == 0 else names[::-1]  # alternate the order against drifting load
        for n in order:
            t0 = time.perf_counter()
            row = trainers[n]._run_epoch(warmup + r + 1)
            rows[n].append(_epoch_breakdown(row))
            print(f"  repeat {r + 1} {n}: {row['time_epoch_s']:.1f}s", flush=True)
    summary = {}
    for n, rs in rows.items():
        summary[n] = {k: med([x[k] for x in rs if x[k] is not None]) if any(x[k] is not None for x in rs) else None
                      for k in rs[0]}
    scratch = summary["scratch"]["epoch_s"]
    for n in spec["kd_indexes"]:
        s = summary[n]
        s["overhead_s"] = s["epoch_s"] - scratch
        s["overhead_over_scratch"] = s["overhead_s"] / scratch
        s["extra_batch_s"] = s["batches_s"] - summary["scratch"]["batches_s"]
        # paired per repeat (same load conditions)
        s["overhead_paired_median_s"] = med([a["epoch_s"] - b["epoch_s"] for a, b in zip(rows[n], rows["scratch"])])
        s["ratio_paired_median"] = med([a["epoch_s"] / b["epoch_s"] for a, b in zip(rows[n], rows["scratch"])])
        s["setup_teacher_topk_s"] = setup_s[n]
    return {"threads": threads, "repeats": spec["repeats"], "warmup": warmup, "kd_indexes": spec["kd_indexes"],
            "summary": summary, "per_repeat": rows, "train_interactions": len(data.train),
            "batch_size": cfg.train.batch_size}


# ------------------------------------------------------------------------------------------------ part: batch
def part_batch(spec: dict) -> dict:
    """Where an RCE-KD batch spends its time, and what candidate changes would save (benchmark-local variants).

    Real Gowalla sets (on_epoch_start with the trained student, exact refresh), then the same ``n_batches`` BPR
    batches of 2,048 interactions through each variant (forward + backward + Adam step), interleaved per batch."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from compressor import kd_sets, kd_terms, losses
    from compressor.checkpoint import load_checkpoint
    from compressor.config import load_config
    from compressor.data import load_dataset
    from compressor.device import configure_threads
    from compressor.distill import load_teacher
    from compressor.objectives import Scratch, SetupContext, bpr_base_loss, build_objective
    from compressor.objectives import sample_negatives
    from compressor.trainer import Trainer

    threads = configure_threads(spec["threads"])
    dev = torch.device("cpu")
    data = load_dataset(str(GOWALLA))
    teacher = load_teacher(spec["teacher"], data)
    cfg = load_config(KD_CONFIG)
    cfg.train.threads = threads
    for key, value in spec_form().items():
        setattr(cfg.distill, key, value)
    d = cfg.distill
    obj = build_objective(cfg, teacher, dev, Path(spec["work"]) / "batch-kd")
    tr = Trainer(cfg, data, obj, Path(spec["work"]) / "batch-kd", dev, progress=False)
    tr.model.load_state_dict(load_checkpoint(spec["student"]).model_state, strict=False)
    obj.setup(SetupContext(data, tr.sparse_grads))
    obj.on_epoch_start(tr.model, 1, np.random.default_rng(0), torch.Generator().manual_seed(0))
    term = obj.term  # the rcekd term: the epoch's sets
    score = term.retrieval.teacher_scores
    all_sets = term.batch_sets(torch.arange(data.num_users))[0]
    qt, qs, a = term.qt.long(), all_sets.items[:, :d.K], all_sets.items[:, d.K:d.K + d.L]
    # the steps of on_epoch_start after retrieval, timed one by one (median of 3), plus cheaper alternatives
    p_ids = qs  # M == K in the Gowalla recipe, so P = QS
    steps = {
        "sample_interesting_positions (step 4)": lambda: kd_sets.sample_interesting_positions(
            p_ids, qt, d.L, d.T, generator=torch.Generator().manual_seed(0)),
        "rcekd_sets [U, K+L+K]": lambda: losses.rcekd_sets(qt, qs, a),
        "teacher scores of [QS|A|QT] (every column per epoch)": lambda: score(all_sets.items),
        "teacher scores of [QS|A] only": lambda: score(torch.cat([qs, a], 1)),
        "teacher scores of QS only (A is a subset of P = QS when M == K: as implemented)": lambda: score(qs),
        "topk_overlap diagnostic ([U,K,K] bool)": lambda: float(
            (qs.unsqueeze(2) == qt.unsqueeze(1)).any(2).float().mean()),
        "topk_overlap via losses.rowwise_isin (as implemented)": lambda: float(
            losses.rowwise_isin(qs, qt).float().mean()),
    }
    step_s = {}
    for n, f in steps.items():
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        step_s[n] = med(ts)
    overlap_same = steps["topk_overlap diagnostic ([U,K,K] bool)"]() == \
        steps["topk_overlap via losses.rowwise_isin (as implemented)"]()
    rng = np.random.default_rng(1)
    neg = sample_negatives(data.train.users, data.train.items, data.num_items, rng)
    order = rng.permutation(len(neg))
    bs = cfg.train.batch_size
    batches = [tuple(torch.as_tensor(x[order[b * bs:(b + 1) * bs]]) for x in (data.train.users, data.train.items, neg))
               for b in range(spec["n_batches"])]
    scratch = Scratch()
    orig_pair = losses.pair_scores

    def pair_bmm(user, item_table, idx):  # what pair_scores was before its CPU path (a CSR pattern)
        return torch.bmm(item_table[idx], user.unsqueeze(-1)).squeeze(-1)

    def pair_mulsum(user, item_table, idx):
        return (item_table[idx] * user.unsqueeze(1)).sum(-1)

    def pair_embedding(user, item_table, idx):
        return torch.einsum("bkd,bd->bk", F.embedding(idx, item_table), user)

    def kd_subsample(n):
        def loss(model, users, pos, neg):
            base, user_vectors_of, i = bpr_base_loss(model, users, pos, neg)
            bu = torch.unique(users)
            sub = bu[torch.randperm(len(bu))[:n]]
            sets, t_scores = term.batch_sets(sub)
            kd, _ = losses.rcekd_loss_on_sets(user_vectors_of(sub), i, sets, t_scores, tau=d.tau, beta=d.beta)
            return base + d.lambda_kd * kd * (len(bu) / len(sub)), {}
        return loss

    variants = {
        "scratch (BPR only)": (scratch.batch_loss, None),
        "RCE-KD as implemented": (obj.batch_loss, None),
        "RCE-KD, pair_scores = gather + bmm": (obj.batch_loss, pair_bmm),
        "RCE-KD, pair_scores = gather * user, sum": (obj.batch_loss, pair_mulsum),
        "RCE-KD, pair_scores = F.embedding + einsum": (obj.batch_loss, pair_embedding),
        "RCE-KD, KD on 256 of the batch's users (rescaled)": (kd_subsample(256), None),
        "RCE-KD, KD on 85 of the batch's users (~each user once per epoch)": (kd_subsample(85), None),
    }
    times = {n: [] for n in variants}
    model, opt = tr.model, tr.optimizer
    uniq = []
    for bi, (users, pos, negs) in enumerate(batches):
        uniq.append(len(torch.unique(users)))
        names = list(variants) if bi % 2 == 0 else list(variants)[::-1]
        for n in names:
            fn, pair = variants[n]
            losses.pair_scores = kd_terms.pair_scores = pair or orig_pair  # kd_terms holds its own name
            try:
                t0 = time.perf_counter()
                loss, _ = fn(model, users, pos, negs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times[n].append(time.perf_counter() - t0)
            finally:
                losses.pair_scores = kd_terms.pair_scores = orig_pair
    # where the implemented batch spends its time (torch profiler, 2 batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for users, pos, negs in batches[:2]:
            loss, _ = obj.batch_loss(model, users, pos, negs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    n_batches_epoch = math.ceil(len(data.train) / bs)
    rows = []
    base = med(times["scratch (BPR only)"])
    for n, ts in times.items():
        rows.append({"variant": n, "batch_ms": 1e3 * med(ts), "x_scratch_batch": med(ts) / base,
                     "epoch_batches_s_est": med(ts) * n_batches_epoch})
    return {"epoch_start_steps_s": step_s, "overlap_values_equal": overlap_same,
            "threads": threads, "n_batches": len(batches), "unique_users_per_batch": med(uniq),
            "batches_per_epoch": n_batches_epoch, "rows": rows,
            "profile_top_self_cpu_ms": {e.key: e.self_cpu_time_total / 1e3 / 2 for e in top}}


# ------------------------------------------------------------------------------------------------ part: scale
def synthetic(users: int, items: int, mean_per_user: float, teacher_dim: int, student_dim: int, seed: int = 0,
              clusters: int = 512):
    """Power-law implicit data in memory, vectorised, no users x items anything.

    Item popularity ~ 1 / (rank + 10)^0.9 (Zipf-like); user activity ~ 2 + Pareto(1.5) scaled to the requested mean
    (capped at 2,000); every user has a home cluster of items (512 clusters, assigned by popularity mass) and takes
    70% of its interactions from it, 30% from the global popularity. Teacher vectors (dim 64): the cluster embedding
    plus noise, items scaled by 1 + log popularity (skewed norms like a trained MF); student vectors (dim 20): a
    random projection of the teacher's plus noise (a "trained-like" starting point, so the approximate index meets
    realistic structure rather than random init vectors). Returns (Dataset, teacher_u, teacher_i, student_u,
    student_i, stats)."""
    import numpy as np

    from compressor.data import Dataset, Split

    rng = np.random.default_rng(seed)
    ranks = rng.permutation(items)
    pop_w = 1.0 / (ranks + 10.0) ** 0.9
    item_cluster = rng.integers(0, clusters, items)
    order = np.argsort(item_cluster, kind="stable")  # items grouped by cluster
    cum = np.cumsum(pop_w[order])
    bounds = np.searchsorted(item_cluster[order], np.arange(clusters + 1))
    c_start = np.where(bounds[:-1] > 0, cum[np.maximum(bounds[:-1] - 1, 0)], 0.0)
    c_mass = cum[np.maximum(bounds[1:] - 1, 0)] - c_start
    c_mass = np.where(bounds[1:] > bounds[:-1], c_mass, 0.0)
    home = rng.choice(clusters, size=users, p=c_mass / c_mass.sum())
    excess = rng.pareto(1.5, users)  # Lomax(1.5): heavy tail, mean 2
    act = np.minimum(2 + np.round(excess * (mean_per_user - 2.0) / excess.mean()), 2000).astype(np.int64)
    n = int(act.sum())
    u = np.repeat(np.arange(users, dtype=np.int64), act)
    r = rng.random(n)
    local = rng.random(n) < 0.7
    target = np.where(local, c_start[home[u]] + r * c_mass[home[u]], r * cum[-1])
    pos = np.minimum(np.searchsorted(cum, target), items - 1)
    it = order[pos].astype(np.int64)
    keys = np.unique(u * items + it)  # dedupe and sort by user
    del u, it, r, local, target, pos
    tu = (keys // items).astype(np.int64)
    ti = (keys % items).astype(np.int64)
    del keys
    empty = np.empty(0, np.int64)
    data = Dataset(np.arange(users).astype(str), np.arange(items).astype(str), Split(tu, ti, users),
                   Split(empty, empty, users), Split(empty, empty, users), source=f"synthetic:{users}x{items}")
    sd = float(np.sqrt(teacher_dim))
    emb = rng.standard_normal((clusters, teacher_dim)).astype(np.float32) / sd
    t_i = emb[item_cluster] + 0.5 * rng.standard_normal((items, teacher_dim)).astype(np.float32) / sd
    counts = np.bincount(ti, minlength=items)
    t_i *= (1.0 + np.log1p(counts)).astype(np.float32)[:, None]
    t_u = np.empty((users, teacher_dim), np.float32)
    for s in range(0, users, 1 << 18):  # blocks: bound the temporaries
        e = min(s + (1 << 18), users)
        t_u[s:e] = emb[home[s:e]] + 0.5 * rng.standard_normal((e - s, teacher_dim), dtype=np.float32) / sd
    proj = rng.standard_normal((teacher_dim, student_dim)).astype(np.float32) / float(np.sqrt(student_dim))
    s_i = t_i @ proj + 0.1 * rng.standard_normal((items, student_dim), dtype=np.float32)
    s_u = t_u @ proj + 0.1 * rng.standard_normal((users, student_dim), dtype=np.float32)
    t_i, s_u, s_i = (np.ascontiguousarray(x, dtype=np.float32) for x in (t_i, s_u, s_i))
    per_user = np.bincount(tu, minlength=users)
    stats = {"users": users, "items": items, "interactions": int(len(tu)), "mean_per_user": float(per_user.mean()),
             "max_per_user": int(per_user.max()), "items_with_interactions": int((counts > 0).sum()),
             "top1pct_items_share": float(np.sort(counts)[::-1][: max(items // 100, 1)].sum() / len(tu))}
    return data, t_u, t_i, s_u, s_i, stats


def _nbytes(t) -> float:
    return t.element_size() * t.nelement() / MB


def part_scale(spec: dict) -> dict:
    import numpy as np
    import torch

    from compressor.config import from_dict
    from compressor.device import configure_threads
    from compressor.distill import Teacher
    from compressor.kd_retrieval import KDRetrieval
    from compressor.kd_terms import RCEKDTerm
    from compressor.objectives import Distillation, KDUsers, Scratch, SetupContext
    from compressor.retrieval import TopKSearcher
    from compressor.run_dir import TOPK_CACHE_DIR
    from compressor.trainer import Trainer

    class ApproxTeacherTopK(KDRetrieval):
        """The teacher's top-K from an approximate index: a one-off setup cost, not part of the epoch."""

        def teacher_topk(self, k: int) -> torch.Tensor:
            ts = TopKSearcher(self.teacher.item_vectors, spec["teacher_index"], params=spec["teacher_index_params"])
            return torch.from_numpy(ts.search(self.teacher.user_vectors, k)[1])

    class PeakAfterEpochStart:
        """The objective, with the peak RSS recorded right after its epoch-start hook alone."""

        def __init__(self, inner, marks: dict):
            self.inner, self.marks, self.name = inner, marks, inner.name

        def setup(self, ctx):
            self.inner.setup(ctx)

        def on_epoch_start(self, *args):
            diag = self.inner.on_epoch_start(*args)
            self.marks["after_refresh"] = peak_rss_mb()
            return diag

        def batch_loss(self, *args):
            return self.inner.batch_loss(*args)

        def run_state(self):
            return self.inner.run_state()

        def load_run_state(self, *args):
            self.inner.load_run_state(*args)

    threads = configure_threads(spec["threads"])
    dev = torch.device("cpu")
    res: dict = {"threads": threads, "rss_mb": {}}
    t0 = time.perf_counter()
    data, t_u, t_i, s_u, s_i, stats = synthetic(spec["users"], spec["items"], spec["mean_per_user"],
                                                spec["teacher_dim"], spec["dim"], seed=spec["seed"])
    res["generate_s"] = time.perf_counter() - t0
    res["data"] = stats
    res["rss_mb"]["after_generate"] = peak_rss_mb()
    print(f"scale {spec['users']}: {stats['interactions']:,} interactions generated in {res['generate_s']:.1f}s",
          flush=True)
    teacher = Teacher(t_u, t_i, f"synthetic-{spec['users']}-{spec['items']}-{spec['seed']}", "synthetic",
                      {"kind": "synthetic", "dim": spec["teacher_dim"]})
    cfg = from_dict({"model": {"kind": "mf", "dim": spec["dim"], "init_std": 0.01},
                     "train": {"batch_size": 2048, "lr": 0.001, "weight_decay": 1e-5, "threads": threads,
                               "optimizer": spec.get("optimizer", "adam")},
                     "distill": {"method": "rcekd", "tau": 1.0, "K": spec["K"], "L": spec["L"], "T": 10.0,
                                 "kd_users": spec.get("kd_users", "every_batch"),
                                 "M": spec["M"], "beta": 5.0, "lambda_kd": 10.0, "index": spec["index"],
                                 "index_params": spec["index_params"]}})
    work = Path(spec["work"])
    # the trainer's own path (exact teacher top-K, cached on disk) for Flat, else an approximate teacher top-K
    retrieval_cls = KDRetrieval if spec["teacher_index"] == "Flat" else ApproxTeacherTopK
    retrieval = retrieval_cls(teacher, dev, work.resolve() / TOPK_CACHE_DIR, cfg.distill.index,
                              cfg.distill.index_params)
    term = RCEKDTerm.from_config(cfg.distill, retrieval)
    marks = {}
    obj = PeakAfterEpochStart(Distillation(term, KDUsers(cfg.distill.kd_users, retrieval.num_users, dev,
                                                         cfg.distill.kd_batch_users),
                                           cfg.distill.lambda_kd, retrieval), marks)
    tr = Trainer(cfg, data, obj, work / f"scale-{spec['users']}", dev, progress=False)
    with torch.no_grad():
        tr.model.user_emb.weight.copy_(torch.from_numpy(s_u))
        tr.model.item_emb.weight.copy_(torch.from_numpy(s_i))
    del s_u, s_i
    res["rss_mb"]["after_trainer"] = peak_rss_mb()
    t0 = time.perf_counter()
    obj.setup(SetupContext(data, tr.sparse_grads))  # teacher top-K [U, K] and its teacher scores
    res["setup_teacher_topk_s"] = time.perf_counter() - t0
    res["teacher_index"] = f"{spec['teacher_index']} {spec['teacher_index_params'] or ''}".strip()
    # what the trainer's exact teacher top-K (Flat) would cost: time 2,000 users, extrapolate linearly
    n_probe_users = min(2000, spec["users"])
    t0 = time.perf_counter()
    TopKSearcher(t_i, "Flat").search(t_u[:n_probe_users], spec["K"])
    res["teacher_flat_topk_extrapolated_s"] = (time.perf_counter() - t0) * spec["users"] / n_probe_users
    res["rss_mb"]["after_setup"] = peak_rss_mb()
    cpu0 = cpu_s()
    row = tr._run_epoch(1)
    res["rss_mb"].update(marks)
    res["rss_mb"]["after_kd_epoch"] = peak_rss_mb()
    res["kd_epoch"] = _epoch_breakdown(row)
    res["kd_epoch"]["cpu_s"] = cpu_s() - cpu0  # CPU time of the process: unaffected by a SIGSTOP / time-slicing
    res["kd_epoch"]["retrieval_recall"] = row.get("diag_retrieval_recall")
    res["per_epoch_tensors_mb"] = {
        "qt [U,K] teacher top-K": _nbytes(term.qt), "its teacher scores [U,K]": _nbytes(term.t_scores_qt),
        "scored lists [U,W] (P, or [QS|A])": _nbytes(term.lists), "their teacher scores [U,W]": _nbytes(term.scores),
        "columns of A [U,L]": _nbytes(term.a_cols),
        "P [U,M] ids + scores in retrieval (transient)": spec["users"] * spec["M"] * (8 + 4) / MB,
        "teacher vectors": (t_u.nbytes + t_i.nbytes) / MB,
        "train pairs (users+items int64)": (data.train.users.nbytes + data.train.items.nbytes) / MB}
    print(f"  RCE-KD epoch {row['time_epoch_s']:.1f}s (refresh {row['time_refresh_s']:.1f}s), "
          f"peak RSS {peak_rss_mb():.0f} MB", flush=True)
    if spec["scratch"]:
        # same process, after the KD epoch (its RSS adds nothing; the KD peak was recorded above)
        state = tr.model.state_dict()
        del tr, obj, term, retrieval  # the KD sets go with them
        trs = Trainer(cfg, data, Scratch(), work / f"scale-{spec['users']}-scratch", dev, progress=False)
        trs.model.load_state_dict(state)
        trs.objective.setup(SetupContext(data, trs.sparse_grads))  # as fit() does: sparse gradients for sparse_adam
        cpu0 = cpu_s()
        res["scratch_epoch"] = _epoch_breakdown(trs._run_epoch(1))
        res["scratch_epoch"]["cpu_s"] = cpu_s() - cpu0
        print(f"  scratch epoch {res['scratch_epoch']['epoch_s']:.1f}s", flush=True)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


# ------------------------------------------------------------------------------------------------ report
def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    L = []
    L.append("# RCE-KD speed benchmark\n")
    L.append(f"Machine: {res['machine']}, shared with other engineers' jobs (a 2-process quality benchmark and more). "
             "All times are medians of repeats measured in one process; compare them only as ratios within a "
             "table. Invocations and the load (`uptime`) at their start and end:\n")
    for run in res.get("runs", []):
        L.append(f"- parts {' '.join(run['parts'])}: start `{run['started']['uptime']}`; end "
                 f"`{run.get('ended', {}).get('uptime', 'not recorded')}`")
    L.append("")
    g = res.get("gowalla")
    if g:
        st = {k: round(v, 4) for k, v in g["student"]["test"].items() if k != "users"}
        te = {k: round(v, 4) for k, v in g["teacher"]["test"].items() if k != "users"}
        L.append(f"Student: Gowalla MF20 after {g['student']['epochs']} epochs (test {json.dumps(st)}); teacher: MF300 "
                 f"after {g['teacher']['epochs']} epochs only (a quick teacher; test {json.dumps(te)}).\n")
    if res.get("args", {}).get("epoch_student"):
        L.append(f"The epoch part starts every objective from `{res['args']['epoch_student']}` instead.\n")
    r = res.get("refresh")
    if r and "rows" in r:
        n = r["norms"]["item"]
        L.append(f"## Student top-M refresh (M={r['M']}, {r['users']:,} users x {r['items']:,} items, dim {r['dim']}, "
                 f"{r['threads']} threads, {r['repeats']} repeats)\n")
        L.append(f"Item-norm spread of the student: p1 {n['p1']:.3f}, p50 {n['p50']:.3f}, p99 {n['p99']:.3f}, "
                 f"max {n['max']:.3f} (p99/p50 {n['p99_over_p50']:.2f}, max/p50 {n['max_over_p50']:.2f}, CV "
                 f"{n['cv']:.2f}, corr with log popularity {n['corr_log_popularity']:.2f}); user norms p99/p50 "
                 f"{r['norms']['user']['p99_over_p50']:.2f}.\n")
        L.append("| method | param | build s | search s | build+search s | recall@M (all users) | raw-IP IVF recall | "
                 "x vs torch (total) | x vs torch (search only) |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            name = row["method"] + (f" (block {row['block']})" if "block" in row else "")
            L.append(f"| {name} | {row.get('param', '')} | {fmt(row['build_s'])} | {fmt(row['search_s'])} | "
                     f"{fmt(row['total_s'])} | {fmt(row['recall'], 4)} | {fmt(row.get('raw_ip_recall'), 4)} | "
                     f"{fmt(row['speedup_total_vs_torch'])} | {fmt(row['speedup_search_vs_torch'])} |")
        L.append(f"\nBaseline: blocked torch.topk, block {r['torch_baseline_block']}, {r['torch_baseline_s']:.2f} s. "
                 f"The trainer's per-epoch recall check (measure_recall, 500 users) costs {fmt(r['recall_check_s'])} s "
                 f"on top of an approximate refresh.")
        floor = res["args"]["recall_floor"]
        chk = r.get("recall_check_s") or 0.0
        groups = (("rebuilt per epoch", lambda m: m.endswith("rebuilt per epoch"),
                   "what RCEKD.student_topm does on its first epoch and after recall fell below its floor "
                   "(its recall check added)"),
                  ("fewer k-means iterations", lambda m: "niter=" in m,
                   "needs a k-means iteration knob in TopKSearcher"),
                  ("quantizer kept", lambda m: "kept" in m,
                   "what RCEKD.student_topm does on the other epochs (TopKSearcher(trained_like=...))"))
        L.append("")
        for gname, pick, note in groups:
            ok = [x for x in r["rows"] if pick(x["method"]) and x["recall"] >= floor]
            if not ok:
                L.append(f"- {gname}: nothing reaches recall {floor}.")
                continue
            b = max(ok, key=lambda x: x["speedup_total_vs_torch"])
            with_chk = r["torch_baseline_s"] / (b["total_s"] + chk)
            L.append(f"- best {gname} at recall@M >= {floor}: {b['method']} {b.get('param', '')}: recall "
                     f"{b['recall']:.4f}, build {b['build_s']:.2f} s + search {b['search_s']:.2f} s = "
                     f"**{b['speedup_total_vs_torch']:.2f}x** faster than blocked torch.topk "
                     f"({with_chk:.2f}x with the {chk:.2f} s recall check; search alone "
                     f"{b['speedup_search_vs_torch']:.2f}x) - {note}.")
        L.append("")
    for key in sorted(k for k in res if k.startswith("epoch")):
        e = res[key]
        if not (e and "summary" in e):
            continue
        L.append(f"## One epoch on Gowalla ({e['train_interactions']:,} training interactions, batch "
                 f"{e['batch_size']}, {e['threads']} threads, median of {e['repeats']} interleaved repeats"
                 + (f" after {e['warmup']} untimed epochs of each" if e.get("warmup") else "") + ")\n")
        L.append("| objective | epoch s | refresh s | of which retrieval (candidates) | recall check + overlap "
                 "diagnostic | KD sampling + teacher scoring | "
                 "negatives s | batches s | overhead vs scratch s | overhead / scratch epoch | paired overhead s | "
                 "KD epoch / scratch epoch, paired per repeat (median) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, s in e["summary"].items():
            idx = e["kd_indexes"].get(name, ["", ""])
            label = name if name == "scratch" else f"RCE-KD, {idx[0]} {idx[1] or ''}"
            if len(idx) > 2 and idx[2]:
                label += ", " + ", ".join(f"{k} {v}" for k, v in idx[2].items())
            cands = f" ({s['retrieval_candidates']:,.0f})" if s.get("retrieval_candidates") else ""
            L.append(f"| {label} | {fmt(s['epoch_s'])} | {fmt(s['refresh_s'])} | {fmt(s['retrieval_s'])}{cands} | "
                     f"{fmt(s['recall_check_s'])} | {fmt(s['kd_sampling_scoring_s'])} | {fmt(s['neg_sampling_s'])} | "
                     f"{fmt(s['batches_s'])} | {fmt(s.get('overhead_s'))} | {fmt(s.get('overhead_over_scratch'))} | "
                     f"{fmt(s.get('overhead_paired_median_s'))} | {fmt(s.get('ratio_paired_median'))} |")
        L.append("")
    for key in sorted(k for k in res if k.startswith("batch_threads")):
        b = res[key]
        if "rows" not in b:
            continue
        L.append(f"## One training batch on Gowalla ({b['threads']} threads; batch 2,048 interactions = "
                 f"{b['unique_users_per_batch']:.0f} distinct KD users; median of {b['n_batches']} batches, variants "
                 f"interleaved; {b['batches_per_epoch']} batches per epoch)\n")
        L.append("| variant | ms per batch (fwd+bwd+Adam) | x scratch batch | batches per epoch, estimated s |")
        L.append("|---|---|---|---|")
        for r in b["rows"]:
            L.append(f"| {r['variant']} | {r['batch_ms']:.1f} | {r['x_scratch_batch']:.1f} | "
                     f"{r['epoch_batches_s_est']:.1f} |")
        L.append("\nTop ops of the implemented RCE-KD batch (self CPU ms per batch): "
                 + ", ".join(f"{k} {v:.1f}" for k, v in b["profile_top_self_cpu_ms"].items()) + "\n")
        if "epoch_start_steps_s" in b:
            L.append("Per-epoch steps after retrieval (s, median of 3; overlap values identical: "
                     f"{b['overlap_values_equal']}):\n")
            L.append("| step | s |\n|---|---|")
            for k, v in b["epoch_start_steps_s"].items():
                L.append(f"| {k} | {v:.2f} |")
            L.append("")
    rss = res.get("rss")
    if rss:
        L.append(f"Peak RSS of `compress distill` on Gowalla (RCE-KD, 1 epoch + validation + test, "
                 f"{rss.get('index', 'Flat')}): **{rss['peak_rss_mb']:.0f} MB** (wall {rss['wall_s']:.0f} s, rc "
                 f"{rss['rc']}). Command: `{rss['cmd']}`\n")
    sc = res.get("scale")
    if sc:
        L.append("## Scale: synthetic power-law data, one RCE-KD epoch per size (own subprocess each)\n")
        L.append("| users | variant | items | interactions | generate s | teacher top-K (setup) s | KD epoch s | "
                 "refresh s | retrieval s | recall@M | KD sampling+scoring s | recall check + overlap diag s | "
                 "negatives s | batches s | KD epoch CPU s | "
                 "scratch epoch s | scratch CPU s | "
                 "peak RSS MB | RSS after refresh MB |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s in sc:
            # session 1 also stored "what-if" rows with the overlap diagnostic fixed; the fix is now the code itself
            variant = "overlap diag fixed (what-if)" if s.get("spec", {}).get("overlap_fix") else "as implemented"
            variant += f", {s.get('spec', {}).get('optimizer', 'adam')}, {s.get('spec', {}).get('kd_users', 'every_batch')}"
            if "kd_epoch" not in s:
                L.append(f"| {s.get('spec', {}).get('users')} | {variant} | | | | | FAILED: {s.get('error')} "
                         "| | | | | | | | | | | "
                         f"{fmt(s['process']['peak_rss_mb'], 0)} | |")
                continue
            k = s["kd_epoch"]
            L.append(f"| {s['data']['users']:,} | {variant} | {s['data']['items']:,} | {s['data']['interactions']:,} | "
                     f"{fmt(s['generate_s'], 1)} | {fmt(s['setup_teacher_topk_s'], 1)} ({s['teacher_index']}; exact "
                     f"Flat ~{fmt(s.get('teacher_flat_topk_extrapolated_s'), 0)}) | "
                     f"{fmt(k['epoch_s'], 1)} | {fmt(k['refresh_s'], 1)} | {fmt(k['retrieval_s'], 1)} | "
                     f"{fmt(k['retrieval_recall'], 3)} | {fmt(k['kd_sampling_scoring_s'], 1)} | "
                     f"{fmt(k['recall_check_s'], 1)} | "
                     f"{fmt(k['neg_sampling_s'], 1)} | {fmt(k['batches_s'], 1)} | {fmt(k.get('cpu_s'), 1)} | "
                     f"{fmt(s.get('scratch_epoch', {}).get('epoch_s'), 1)} | "
                     f"{fmt(s.get('scratch_epoch', {}).get('cpu_s'), 1)} | {fmt(s['process']['peak_rss_mb'], 0)} | "
                     f"{fmt(s['rss_mb'].get('after_refresh'), 0)} |")
        last = [s for s in sc if "per_epoch_tensors_mb" in s]
        if last:
            s = last[-1]
            L.append(f"\nPer-epoch tensors at {s['data']['users']:,} users (MB): "
                     + ", ".join(f"{k} {v:,.0f}" for k, v in s["per_epoch_tensors_mb"].items()))
        L.append(f"\nIndex for the refresh: {sc[0].get('spec', {}).get('index')} "
                 f"{sc[0].get('spec', {}).get('index_params')}.")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------ main
def parse_params(items):
    out = {}
    for s in items or []:
        k, v = s.split("=")
        out[k] = int(v)
    return out


def main():
    from compressor.objectives import KD_USERS_MODES  # (torch in this parent too; every part runs in a child)

    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        part, spec_path = sys.argv[2], sys.argv[3]
        spec = json.loads(Path(spec_path).read_text())
        fn = {"refresh": part_refresh, "epoch": part_epoch, "batch": part_batch, "scale": part_scale}[part]
        res = fn(spec)
        res["spec"] = {k: v for k, v in spec.items() if k != "result"}
        res["child_peak_rss_mb"] = peak_rss_mb()
        Path(spec["result"]).write_text(json.dumps(res, indent=1, default=str))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench-out/kd_speed (quick: bench-out/kd_speed-quick)")
    ap.add_argument("--parts", nargs="+", default=["refresh", "epoch", "batch", "rss", "scale"],
                    choices=["refresh", "epoch", "batch", "rss", "scale"])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny scale sizes, 1 repeat, few candidates")
    ap.add_argument("--report", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student-epochs", type=int, default=5, help="epochs of the Gowalla MF20 student (recipe lr)")
    ap.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the quick Gowalla MF300 teacher")
    ap.add_argument("--teacher-dim", type=int, default=300)
    ap.add_argument("--reuse-models", default=None,
                    help="take gowalla-mf20/, gowalla-mf300/ and student-e*.safetensors from this directory "
                         "(e.g. a previous full run's OUT) instead of training them")
    ap.add_argument("--recall-floor", type=float, default=0.95)
    ap.add_argument("--ivf-nlist", type=int, nargs="*", default=[256, 512, 1024])
    ap.add_argument("--nprobe", type=int, nargs="*", default=[4, 8, 16, 32])
    ap.add_argument("--hnsw", nargs="*", default=["HNSW32"])
    ap.add_argument("--ef-search", type=int, nargs="*", default=[128, 256, 512])
    ap.add_argument("--kept-nlist", type=int, nargs="*", default=[256, 512, 1024],
                    help="nlists of the 'quantizer kept from the previous epoch' IVF variant")
    ap.add_argument("--fast-nlist", type=int, nargs="*", default=[256, 512],
                    help="nlists of the 'rebuilt with fewer k-means iterations' IVF variant")
    ap.add_argument("--fast-niter", type=int, nargs="*", default=[5, 10], help="k-means iterations (FAISS default 25)")
    ap.add_argument("--epoch-repeats", type=int, default=3)
    ap.add_argument("--epoch-warmup", type=int, default=0,
                    help="untimed epochs of every objective before the timed repeats: what a refresh carries from "
                         "epoch to epoch (raised candidates, UserClusters' last lists) settles as in a long run")
    ap.add_argument("--epoch-index", default="IVF256,Flat", help="approximate index for the RCE-KD epoch too")
    ap.add_argument("--epoch-index-params", nargs="*", default=["nprobe=8"])
    ap.add_argument("--epoch-once", action=argparse.BooleanOptionalAction, default=True,
                    help="also time RCE-KD with distill.kd_users once_per_epoch (with the approximate index)")
    ap.add_argument("--epoch-student", default=None,
                    help="student checkpoint the epoch part starts every objective from (e.g. a KD run's "
                         "last.safetensors part-way through training: the refresh's recall and cost depend on the "
                         "student's geometry) instead of the 5-epoch scratch student")
    ap.add_argument("--epoch-only-once", action="store_true",
                    help="time only scratch and the cheap forms of --epoch-kd-users (more repeats in the same time, "
                         "for their ratios)")
    ap.add_argument("--epoch-kd-users", nargs="+", default=["once_per_epoch"],
                    choices=[m for m in KD_USERS_MODES if m != "every_batch"],
                    help="the cheap forms timed with --epoch-once (distill.kd_users modes other than every_batch)")
    ap.add_argument("--epoch-threads", type=int, nargs="*", default=[2],
                    help="thread counts for the epoch part; counts after the first run scratch vs Flat RCE-KD only")
    ap.add_argument("--batch-threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--batch-count", type=int, default=12, help="BPR batches timed per variant in the batch part")
    ap.add_argument("--scale-users", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--scale-items", type=int, default=200_000)
    ap.add_argument("--scale-mean", type=float, default=7.5, help="mean interactions per user")
    ap.add_argument("--scale-index", default="IVF1024,Flat")
    ap.add_argument("--scale-index-params", nargs="*", default=["nprobe=64"])
    ap.add_argument("--scale-teacher-index", default="IVF1024,Flat",
                    help="teacher top-K (one-off setup, not part of the epoch): Flat = the trainer's own exact path "
                         "(hours at 1M users here); the exact cost is extrapolated from 2,000 users either way")
    ap.add_argument("--scale-teacher-index-params", nargs="*", default=["nprobe=64"])
    ap.add_argument("--scale-scratch", action="store_true", help="also time one scratch epoch per size")
    ap.add_argument("--scale-optimizer", default="adam", help="train.optimizer of the scale runs")
    ap.add_argument("--scale-kd-users", default="every_batch", help="distill.kd_users of the scale runs")
    ap.add_argument("--scale-timeout", type=float, default=3600.0, help="seconds per size before it is killed")
    ap.add_argument("--scale-rss-cap-gb", type=float, default=20.0,
                    help="kill a size's process above this resident memory (the machine is shared)")
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.epoch_repeats = 1, 1
        if not a.reuse_models:
            a.student_epochs, a.teacher_epochs, a.teacher_dim = 2, 1, 64
        a.ivf_nlist, a.nprobe, a.ef_search, a.kept_nlist, a.fast_nlist, a.fast_niter = [256], [8, 16], [128], [256], \
            [256], [5]
        a.scale_users, a.scale_items = [20_000, 50_000], 20_000
        a.scale_index, a.scale_index_params = "IVF256,Flat", ["nprobe=32"]
    out = a.out or ROOT / ("bench-out/kd_speed-quick" if a.quick else "bench-out/kd_speed")
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    if a.report:
        (out / "results.md").write_text(markdown(res))
        print((out / "results.md").read_text())
        return
    res.update({"started": load_note(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                "machine": f"{os.cpu_count()} cores, "
                           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"})
    res.pop("ended", None)
    res.setdefault("runs", []).append({"parts": a.parts, "started": res["started"]})
    print(f"load at start: {res['started']['uptime']}", flush=True)

    def save():
        res_path.write_text(json.dumps(res, indent=1, default=str))
        (out / "results.md").write_text(markdown(res))

    if {"refresh", "epoch", "batch", "rss"} & set(a.parts):
        res["gowalla"] = prepare_gowalla(out, a)
        src = Path(res["gowalla"]["student_dir"]).parent
        student = str(src / "gowalla-mf20" / RESUME_FILE)
        student_prev = str(src / f"student-e{a.student_epochs - 1}.safetensors")
        teacher = str(src / "gowalla-mf300")
        save()
    if "refresh" in a.parts:
        spec = {"threads": a.threads, "M": 100, "repeats": a.repeats, "student": student,
                "student_prev": student_prev, "ivf_nlist": a.ivf_nlist, "nprobe": a.nprobe, "hnsw": a.hnsw,
                "ef_search": a.ef_search, "kept_nlist": a.kept_nlist, "fast_nlist": a.fast_nlist,
                "fast_niter": a.fast_niter, "recall_floor": a.recall_floor}
        res["refresh"] = child("refresh", spec, out, "refresh")
        save()
    if "epoch" in a.parts:
        for n, threads in enumerate(a.epoch_threads):
            kd_indexes = {"rcekd-flat": ["Flat", {}]}
            if n == 0 and a.epoch_index and a.epoch_index != "Flat":
                kd_indexes["rcekd-approx"] = [a.epoch_index, parse_params(a.epoch_index_params)]
                if a.epoch_once:  # the same approximate refresh, each user's KD terms once per epoch
                    for mode in a.epoch_kd_users:
                        name = "rcekd-approx-once" if mode == "once_per_epoch" else f"rcekd-approx-{mode}"
                        kd_indexes[name] = [a.epoch_index, parse_params(a.epoch_index_params), {"kd_users": mode}]
            if a.epoch_only_once and n == 0:
                cheap = {k: v for k, v in kd_indexes.items() if len(v) > 2}
                if not cheap:
                    raise SystemExit("--epoch-only-once needs --epoch-once and an approximate --epoch-index")
                kd_indexes = cheap
            spec = {"threads": threads, "repeats": a.epoch_repeats, "student": a.epoch_student or student,
                    "teacher": teacher, "work": str(out), "kd_indexes": kd_indexes, "warmup": a.epoch_warmup}
            key = "epoch" if n == 0 else f"epoch_threads{threads}"
            res[key] = child("epoch", spec, out, key)
            save()
    if "batch" in a.parts:
        for threads in a.batch_threads:
            spec = {"threads": threads, "student": student, "teacher": teacher, "work": str(out),
                    "n_batches": a.batch_count}
            res[f"batch_threads{threads}"] = child("batch", spec, out, f"batch_threads{threads}")
            save()
    if "rss" in a.parts:
        run_dir = out / "rss-distill"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "compress_app", "distill", "--teacher", teacher, "--config", str(KD_CONFIG),
               "--out", str(run_dir), "--epochs", "1", "--threads", str(a.threads), "--quiet", "--no-mlflow",
               *spec_form_sets()]
        print("peak RSS of a Gowalla distillation ...", flush=True)
        res["rss"] = {**run_measured(cmd, out / "rss-distill.log"), "index": "Flat (the spec's form)"}
        save()
    if "scale" in a.parts:
        # sizes measured by earlier invocations are kept (each size is its own process anyway)
        res["scale"] = [x for x in res.get("scale", []) if (x.get("spec", {}).get("users"),
                        bool(x.get("spec", {}).get("overlap_fix"))) not in {(u, False) for u in a.scale_users}]
        for users in a.scale_users:
            spec = {"threads": a.threads, "users": users, "items": a.scale_items, "mean_per_user": a.scale_mean,
                    "teacher_dim": 64, "dim": 20, "K": 100, "L": 50, "M": 100, "seed": 0, "index": a.scale_index,
                    "index_params": parse_params(a.scale_index_params), "teacher_index": a.scale_teacher_index,
                    "teacher_index_params": parse_params(a.scale_teacher_index_params), "work": str(out),
                    "scratch": a.scale_scratch, "optimizer": a.scale_optimizer, "kd_users": a.scale_kd_users}
            name = f"scale-{users}"
            r = child("scale", spec, out, name, timeout=a.scale_timeout,
                      rss_cap_mb=a.scale_rss_cap_gb * 1024)
            r.setdefault("spec", spec)
            res["scale"].append(r)
            res["scale"].sort(key=lambda x: (bool(x.get("spec", {}).get("overlap_fix")),
                                             x.get("spec", {}).get("users", 0)))
            save()
    res["ended"] = load_note()
    res["runs"][-1]["ended"] = res["ended"]
    save()
    print(f"load at end: {res['ended']['uptime']}", flush=True)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
