"""The numbers of docs/scaling.md: memory per rank, bytes summed per optimizer step, where the user-sharded design
stops, FAISS index sizes, and the offline recommend job, for 10M / 100M users x 1M / 10M items on W ranks.

Nothing here is measured: every number is a formula of the recipe (configs/gowalla/*.yaml: batch, K, L, M, dims),
the tensor layout of the code (compressor/kd_terms.py, kd_retrieval.py, trainer.py, distributed.py) and the
assumptions printed first. The last table checks the per-user formulas against what docs/benchmarks.md section 4
measured at 1M users. No torch needed (numpy-free too: only pyyaml, to read the recipes).

    python benchmarks/scaling_plan.py --out bench-out/scaling_plan

Prints the tables as markdown and writes them, with every component in bytes and the formulas, to
OUT/results.json (and OUT/tables.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

F32, I64, I32, BOOL = 4, 8, 4, 1
GB, MB, MIB = 1e9, 1e6, 2.0 ** 20
ONNX_PROTO_LIMIT = 2 ** 31  # bytes: protobuf's 2 GiB cap on one serialized ModelProto (the bundle embeds the table)

# Measured numbers cited from docs/benchmarks.md section 4 (raw output docs/results/kd-scale-1m-users-cpu.json,
# code 32efed2): 1M users x 200k items, student dim 20, synthetic teacher dim 64, K 100, L 50, M 100, one process.
MEASURED_1M = {"users": 1_000_000, "items": 200_000, "train_interactions": 5_985_945, "dim": 20, "teacher_dim": 64,
               "K": 100, "L": 50, "M": 100,
               "tensors_mib": {"teacher top-K [U,K] int64": 763, "student top-K [U,K] int64": 763,
                               "A [U,L] int64": 381, "[QS, A, QT] sets [U,K+L+K] int64": 1907,
                               "their teacher scores [U,K+L+K] f32": 954},
               "peak_rss_mib": 9445, "rss_after_setup_mib": 2560, "rss_after_data_generation_mib": 1086}


def recipe() -> dict:
    """Batch size, K, L, M and the dims from the Gowalla recipes (the MF300 -> MF20 RCE-KD setting)."""
    kd = yaml.safe_load((ROOT / "configs/gowalla/mf-rcekd.yaml").read_text())
    teacher = yaml.safe_load((ROOT / "configs/gowalla/mf-teacher.yaml").read_text())
    d = kd["distill"]
    return {"B": int(kd["train"]["batch_size"]), "B_teacher": int(teacher["train"]["batch_size"]),
            "K": int(d["K"]), "L": int(d["L"]), "M": int(d["M"]), "d_student": int(kd["model"]["dim"]),
            "d_teacher": int(teacher["model"]["dim"]), "source": "configs/gowalla/mf-rcekd.yaml, mf-teacher.yaml"}


# ----------------------------------------------------------------------------------------------- memory per rank

def planned_eval_block(I: float, a: dict) -> int:
    """train.eval_block this plan sets: the default, cut so that the [block, I] f32 score block stays <= the cap."""
    if I <= 0:
        return a["eval_block"]
    return max(1, min(a["eval_block"], int(a["eval_cap_gb"] * GB // (I * F32))))


def kd_bytes_per_user(K: int, L: int) -> dict:
    """RCE-KD state kept per user for the whole run / epoch (kd_terms.RCEKDTerm + losses.RCEKDSets)."""
    S = 2 * K + L  # the [QS | A | QT] columns
    return {"QT teacher top-K [K] int64": K * I64, "its teacher scores [K] f32": K * F32,
            "QS student top-K [K] int64": K * I64, "A sampled [L] int64": L * I64,
            "[QS, A, QT] sets [2K+L] int64": S * I64, "mask_t [L+K] bool": (L + K) * BOOL,
            "overlap count int64": I64, "teacher scores of the sets [2K+L] f32": S * F32}


def memory_per_rank(run: str, U: float, I: float, W: int, r: dict, a: dict) -> dict:
    """Bytes one rank holds. run: 'teacher' (MF d_teacher, BPR, `compress train`) or 'student' (MF d_student,
    RCE-KD against an MF d_teacher teacher, `compress distill`)."""
    K, L, M, dT = r["K"], r["L"], r["M"], r["d_teacher"]
    d = r["d_teacher"] if run == "teacher" else r["d_student"]
    Ur = U / W  # blocks are cut by interactions; with equal activity that is U / W users
    Nr = Ur * a["interactions_per_user"]
    host = {
        # train + valid + test as COO int64 (user, item) pairs (data.Split), valid and test 1/8 of train each (8:1:1)
        "interactions": 2 * I64 * Nr * (1 + 2 * a["valid_test_share"]) + I64 * (Ur + 1),
        # sample_negatives' sorted keys + negatives + the epoch permutation (numpy, per epoch)
        "epoch sampling arrays": 3 * I64 * Nr,
    }
    dev = {
        "user rows x4 (weights, exp_avg, exp_avg_sq, grad)": 4 * Ur * d * F32,
        "item table x4 (replicated)": 4 * I * d * F32,
        "epoch batch arrays (users, pos, neg) int64": 3 * I64 * Nr,
    }
    eval_block = planned_eval_block(I, a)
    trans = {"evaluation score block": eval_block * I * F32}
    if run == "student":
        dev["teacher user rows [U_r, dT] f32"] = Ur * dT * F32
        dev["teacher item table [I, dT] f32 (replicated)"] = I * dT * F32
        dev["KD state"] = Ur * sum(kd_bytes_per_user(K, L).values())
        dev["FAISS Flat index over student items (replicated)"] = I * d * F32
        S = 2 * K + L
        # on_epoch_start: P [U_r, M] (ids + FAISS scores) alive while the new sets are built, while the previous
        # epoch's sets and scores are still referenced (epoch >= 2), plus build_teacher_side_set's [U_r, L+K] list
        trans["epoch start (student top-M, old + new sets)"] = Ur * (M * (I64 + F32) + S * (I64 + F32) + (L + K) * BOOL
                                                                     + (L + K) * I64)
        # setup, once: a Flat index over the teacher's items (a copy) and the search result [U_r, K]
        trans["setup (teacher top-K index)"] = I * dT * F32 + Ur * K * (I64 + F32)
        # today's load: every rank reads the whole teacher and keeps its block (distill.Teacher.user_block)
        load_teacher = U * dT * F32
    else:
        load_teacher = 0.0
    steady_dev, steady_host = sum(dev.values()), sum(host.values())
    big = max(trans, key=trans.get)
    return {"run": run, "users": U, "items": I, "W": W, "dim": d, "users_per_rank": Ur, "interactions_per_rank": Nr,
            "eval_block": eval_block, "eval_block_default_bytes": a["eval_block"] * I * F32,
            "device": dev, "host": host, "transients": trans, "largest_transient": big,
            "steady_device": steady_dev, "steady_host": steady_host,
            "peak_device": steady_dev + trans[big], "peak_total": steady_dev + steady_host + trans[big],
            # one-off spikes of today's code at start-up (not in the peak above): full-table init sliced per rank,
            # the whole teacher read before slicing, the whole data file read before slicing (int64 pairs only)
            "load_spikes": {"init: full user table built then sliced": U * d * F32,
                            "teacher: all users read then sliced": load_teacher,
                            "data: all interactions read (int64 pairs, lower bound)":
                                2 * I64 * U * a["interactions_per_user"] * (1 + 2 * a["valid_test_share"])}}


# ----------------------------------------------------------------------------------------------- communication

def comm_per_step(mode: str, I: float, W: int, r: dict, a: dict) -> dict:
    """Bytes to sum the replicated item table's gradient in one optimizer step (distributed.Distributed).

    mode: 'teacher' (BPR only), 'every_batch' (RCE-KD, the spec's KD users: every distinct user of the batch, upper
    bound = every row), 'once_per_epoch' (RCE-KD, each user once per epoch: mean KD users per step)."""
    B = r["B_teacher"] if mode == "teacher" else r["B"]
    K, L = r["K"], r["L"]
    d = r["d_teacher"] if mode == "teacher" else r["d_student"]
    b = B / W  # each rank's share of the global batch
    if mode == "teacher":
        kd_users = 0.0
    elif mode == "every_batch":
        kd_users = b
    else:  # every user once per epoch, spread over ceil(N / B) steps: B / n users per step on average
        kd_users = b / a["interactions_per_user"]
    rows = min(I, 2 * b + kd_users * (2 * K + L))  # positives + negatives, + [QS, A, QT] per KD user (no dedup)
    dense_payload = I * d * F32
    sparse_payload = W * rows * (I64 + d * F32)  # what the rule compares: every rank's (row id, row) pairs
    dense_wire = 2 * (W - 1) / W * dense_payload  # ring all-reduce, sent (= received) per rank
    sparse_wire = (W - 1) * rows * (I64 + d * F32)  # ring all_gather, sent (= received) per rank
    # row-wise item sharding instead (TorchRec-style): the rank fetches the (W-1)/W of its rows that other ranks own
    # (ids out, vectors in) and returns their gradients: no replicated table, no all-reduce
    alltoall = rows * (W - 1) / W * (I64 + 2 * d * F32)
    cpu_pick = "sparse" if sparse_payload < dense_payload else "dense"
    # the catalogue below which the dense sum is the smaller payload (W x R does not depend on W: 2B + KD rows)
    crossover_items = W * (2 * b + kd_users * (2 * K + L)) * (I64 + d * F32) / (d * F32)
    return {"crossover_items": crossover_items, "mode": mode, "items": I, "W": W, "dim": d, "rows_per_rank": rows, "dense_payload": dense_payload,
            "sparse_payload": sparse_payload, "dense_wire_per_rank": dense_wire, "sparse_wire_per_rank": sparse_wire,
            "row_sharded_alltoall_per_rank": alltoall, "cpu_pick": cpu_pick, "cpu_wire_per_rank": sparse_wire if cpu_pick == "sparse" else dense_wire,
            "dense_over_sparse": dense_payload / sparse_payload}


def steps_per_epoch(U: float, r: dict, a: dict, teacher: bool) -> int:
    B = r["B_teacher"] if teacher else r["B"]
    return math.ceil(U * a["interactions_per_user"] / B)


# ----------------------------------------------------------------------------------------------- where it stops

def stop_points(r: dict, a: dict, U: float, W: int) -> list[dict]:
    """Largest catalogue whose replicated item-side state fits one device: with the user side -> 0 (W large), and
    with the user side of U users on W ranks (its steady state + its largest user-proportional transient, and an
    evaluation block at the cap)."""
    ds, dT, K = r["d_student"], r["d_teacher"], r["K"]
    Ur = U / W
    eval_cap = a["eval_cap_gb"] * GB
    st = memory_per_rank("student", U, 0, W, r, a)  # I = 0: the user-proportional part alone
    te = memory_per_rank("teacher", U, 0, W, r, a)
    student_users = st["steady_device"] + max(st["transients"]["epoch start (student top-M, old + new sets)"],
                                              eval_cap)
    scratch_users = 4 * Ur * ds * F32 + 3 * I64 * Ur * a["interactions_per_user"] + eval_cap
    per_item = [
        (f"MF{dT} teacher training (item table x4)", 4 * dT * F32, te["steady_device"] + eval_cap),
        (f"MF{ds} RCE-KD student (x4) + MF{dT} teacher items + Flat index", 4 * ds * F32 + dT * F32 + ds * F32,
         student_users),
        ("same, during setup (+ a Flat index over the teacher's items)", 4 * ds * F32 + 2 * dT * F32 + ds * F32,
         st["steady_device"] + Ur * K * (I64 + F32)),
        (f"MF{ds} BPR student / scratch (item table x4)", 4 * ds * F32, scratch_users),
    ]
    out = []
    for what, b, users_side in per_item:
        row = {"what": what, "bytes_per_item": b, "user_side_bytes": users_side, "users": U, "W": W}
        for cap in a["device_gb"]:
            row[f"max_items_{cap:g}GB"] = cap * GB / b
            row[f"max_items_{cap:g}GB_with_users"] = max(0.0, cap * GB - users_side) / b
        out.append(row)
    return out


def checkpoint_gather(U: float, I: float, d: int) -> dict:
    """What rank 0 holds to write today's single-file checkpoints (distributed.gather_user_rows)."""
    return {"users": U, "items": I, "dim": d, "best_model": (U + I) * d * F32,
            "resume_file": 3 * (U + I) * d * F32,  # weights + exp_avg + exp_avg_sq of both tables
            "resume_user_rows": 3 * U * d * F32,
            "one_tensor_gather_buffer": U * d * F32}  # gathered blocks (padded) before they are concatenated


# ----------------------------------------------------------------------------------------------- retrieval / serving

def index_bytes(I: float, d: int, a: dict) -> dict:
    nlist = a["ivf_nlist"](I)
    aug = d + 1  # ip2l2 adds one coordinate (compressor.retrieval.ip2l2_items)
    m = a["pq_bytes"](d)
    return {"items": I, "dim": d, "nlist": nlist, "pq_m": m,
            "Flat (f32)": I * d * F32,
            "SQ8 (1 B per dim, exact scan of the codes)": I * d,
            "IVF,Flat ip2l2 (+ ids)": I * (aug * F32 + I64) + nlist * aug * F32,
            f"IVF,PQ{m} ip2l2 (+ ids)": I * (m + I64) + nlist * aug * F32 + 256 * aug * F32}


def retrieval_cost(U: float, I: float, W: int, r: dict) -> dict:
    """Multiply-adds of the exact (Flat) searches per rank, and the merge traffic if items were sharded."""
    K, M, ds, dT = r["K"], r["M"], r["d_student"], r["d_teacher"]
    Ur = U / W
    return {"users": U, "items": I, "W": W,
            "teacher_topk_once_macs": Ur * I * dT, "student_topm_per_epoch_macs": Ur * I * ds,
            # item-sharded search: every rank's queries go to every shard, each shard answers its top-M
            "item_sharded_queries_out_per_rank": Ur * ds * F32 * (W - 1),
            "item_sharded_candidates_in_per_rank": Ur * M * (I64 + F32) * (W - 1)}


def serving_replica(U: float, I: float, r: dict, a: dict) -> dict:
    d = r["d_student"]
    n = U * a["interactions_per_user"]
    return {"users": U, "items": I, "dim": d,
            "user table fp32": U * d * F32, "user table fp16": U * d * 2, "user table int8 (+ f32 row scale)": U * (d + F32),
            "item index Flat": I * d * F32, "item index SQ8": I * d,
            "seen CSR int32 (uncompressed)": (n + U + 1) * I32}


def onnx_user_limit(d: int) -> dict:
    return {"fp32": ONNX_PROTO_LIMIT / (d * F32), "fp16": ONNX_PROTO_LIMIT / (d * 2),
            "int8": ONNX_PROTO_LIMIT / (d + F32)}


def recommend_job(U: float, I: float, W: int, r: dict, a: dict) -> dict:
    """compress_app/recommend.py: fixed shards of shard_users users, shard s on rank s % W, every rank opening the
    whole bundle (serving.bundle.open_bundle) and answering through the serving Recommender."""
    k, su = a["recommend_k"], a["recommend_shard_users"]
    shards = math.ceil(U / su)
    sv = serving_replica(U, I, r, a)
    return {"users": U, "items": I, "W": W, "k": k, "shard_users": su, "shards": shards,
            "shards_per_rank": math.ceil(shards / W), "rows": U * k,
            "fixed_width_bytes": U * k * (I32 + F32),  # rank int32 + score float32; the id strings come on top
            "bundle_per_rank": sv["user table fp32"] + sv["item index Flat"] + sv["seen CSR int32 (uncompressed)"],
            "exact_macs_per_rank": U / W * I * r["d_student"]}


def lightgcn_cost(U: float, I: float, d: int, layers: int, a: dict) -> dict:
    """What LightGCN under torchrun would need: the normalised bipartite graph and a full propagation per step."""
    n = U * a["interactions_per_user"]
    nnz = 2 * n  # user->item and item->user
    return {"users": U, "items": I, "dim": d, "layers": layers,
            "graph_csr_bytes": nnz * (I64 + F32) + (U + I + 1) * I64,
            "propagation_macs_per_step": layers * nnz * d,
            "layer_activations_bytes": (layers + 1) * (U + I) * d * F32}


# ----------------------------------------------------------------------------------------------- formatting

def g(x: float) -> str:
    """Bytes as decimal GB."""
    v = x / GB
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 0.1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def t(x: float) -> str:
    """Bytes as decimal TB."""
    v = x / 1e12
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}" if v >= 0.01 else f"{v:.3f}"


def m(x: float) -> str:
    """Bytes as decimal MB."""
    v = x / MB
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def n(x: float) -> str:
    """A count: 10M, 1.6M, 156k."""
    for unit, div in (("tn", 1e12), ("bn", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            v = x / div
            return f"{v:.0f}{unit}" if v >= 100 or v == int(v) else f"{v:.1f}{unit}" if v >= 10 else f"{v:.2f}{unit}"
    return f"{x:.0f}"


def sci(x: float) -> str:
    return f"{x:.1e}"


def table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


SHORT = {"evaluation score block": "eval block", "epoch start (student top-M, old + new sets)": "epoch start",
         "setup (teacher top-K index)": "setup"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out/scaling_plan")
    ap.add_argument("--users", type=float, nargs="+", default=[10e6, 100e6])
    ap.add_argument("--items", type=float, nargs="+", default=[1e6, 10e6])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--interactions-per-user", type=float, default=719_081 / 29_858,
                    help="training interactions per user (default: Gowalla's train split, 719,081 / 29,858)")
    ap.add_argument("--eval-block", type=int, default=1024, help="train.eval_block (compressor/config.py default)")
    ap.add_argument("--eval-cap-gb", type=float, default=2.0,
                    help="the plan lowers train.eval_block so that one [block, items] f32 score block stays under this")
    ap.add_argument("--device-gb", type=float, nargs="+", default=[80, 141])
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--recommend-k", type=int, default=10, help="`compress recommend --k` (its default)")
    ap.add_argument("--recommend-shard-users", type=int, default=100_000,
                    help="users per Parquet shard of `compress recommend` (its default)")
    args = ap.parse_args(argv)

    r = recipe()
    a = {"interactions_per_user": args.interactions_per_user, "valid_test_share": 0.125,
         "eval_block": args.eval_block, "eval_cap_gb": args.eval_cap_gb, "device_gb": args.device_gb, "ranks_per_node": args.ranks_per_node,
         "recommend_k": args.recommend_k, "recommend_shard_users": args.recommend_shard_users,
         # a common FAISS rule of thumb: nlist ~ 4 sqrt(I), rounded to a power of two
         "ivf_nlist": lambda I: 2 ** round(math.log2(4 * math.sqrt(I))),
         # PQ code bytes (8-bit codes): 20-dim -> 21 ip2l2 dims padded to 24, PQ8; 300 -> 301 padded to 320, PQ40
         "pq_bytes": lambda d: 8 if d <= 32 else 40}
    assumptions = {
        "recipe": r, "interactions_per_user": round(a["interactions_per_user"], 2),
        "valid_and_test_each_share_of_train": a["valid_test_share"], "eval_block": a["eval_block"],
        "device_capacity_GB (decimal, nominal)": a["device_gb"], "ranks_per_node": a["ranks_per_node"],
        "units": "GB = 1e9 bytes, MB = 1e6 bytes (the calibration table uses MiB, as docs/benchmarks.md does)",
        "users_per_rank": "U / W (equal-interaction blocks; equal activity assumed)",
        "touched_rows_bound": "2 B/W + KD users x (2K + L), no deduplication",
        "eval_block_planned": f"min({args.eval_block}, floor({args.eval_cap_gb:g} GB / (4 B x items)))",
    }
    md = []

    def emit(title: str, body: str, note: str = "") -> None:
        md.append(f"### {title}\n\n{body}\n" + (f"\n{note}\n" if note else ""))

    emit("Assumptions", table(["assumption", "value"], [
        ["recipe (Gowalla MF300 -> MF20 RCE-KD)", f"batch B {r['B']}, K {r['K']}, L {r['L']}, M {r['M']}, "
                                                 f"student dim {r['d_student']}, teacher dim {r['d_teacher']}"],
        ["training interactions per user", f"{a['interactions_per_user']:.2f} (Gowalla train)"],
        ["valid / test interactions", "1/8 of train each (8:1:1)"],
        ["users per rank", "U / W"],
        ["train.eval_block", f"default {a['eval_block']}; the plan lowers it to keep one [block, items] f32 score "
                             f"block <= {a['eval_cap_gb']:g} GB: " + ", ".join(
                                 f"{planned_eval_block(I, a)} at {n(I)} items" for I in args.items)],
        ["device capacities", " / ".join(f"{c:g} GB" for c in a["device_gb"]) + " (nominal, decimal)"],
        ["units", "GB = 10^9 B, MB = 10^6 B"]]))

    # --- memory per rank
    mem = []
    for run in ("student", "teacher"):
        for U in args.users:
            for I in args.items:
                for W in args.ranks:
                    mem.append(memory_per_rank(run, U, I, W, r, a))
    rows = []
    for x in mem:
        dv = x["device"]
        label = (f"MF{r['d_student']} RCE-KD" if x["run"] == "student" else f"MF{r['d_teacher']} BPR")
        teacher = dv.get("teacher user rows [U_r, dT] f32", 0) + dv.get("teacher item table [I, dT] f32 (replicated)", 0)
        fits = ["yes" if x["peak_device"] <= 0.9 * c * GB else "tight" if x["peak_device"] <= c * GB else "**no**"
                for c in a["device_gb"]]
        rows.append([label, n(x["users"]), n(x["items"]), x["W"], n(x["users_per_rank"]),
                     g(dv["user rows x4 (weights, exp_avg, exp_avg_sq, grad)"]), g(dv["item table x4 (replicated)"]),
                     g(teacher), g(dv.get("KD state", 0)), g(dv.get("FAISS Flat index over student items (replicated)", 0)),
                     g(dv["epoch batch arrays (users, pos, neg) int64"]), g(x["steady_device"]),
                     f"{g(x['transients'][x['largest_transient']])} ({SHORT[x['largest_transient']]})",
                     g(x["peak_device"]), g(x["steady_host"]), g(a["ranks_per_node"] * x["peak_total"]), *fits])
    cap_head = [f"fits {c:g} GB" for c in a["device_gb"]]
    emit("Memory per rank (GB)", table(
        ["model", "users", "items", "W", "users/rank", "user rows x4", "item table x4", "teacher vectors",
         "KD state", "FAISS index", "batch arrays", "steady", "largest transient", "peak (device)",
         "host (data)", f"CPU node of {a['ranks_per_node']} ranks (RAM)", *cap_head], rows),
        f"x4 = weights, two Adam moments, gradient. Teacher vectors: its users' rows + the replicated item table "
        f"(dT {r['d_teacher']}). Peak = steady + the largest transient (eval block = the planned train.eval_block x "
        f"items x 4 B; epoch start = student top-M plus old and new sets; setup = a Flat index over the teacher's "
        f"items). Host = interactions and per-epoch sampling arrays (host RAM, not device); a CPU (gloo) rank holds "
        f"peak + host in RAM, {a['ranks_per_node']} such ranks per node. Fits: yes = peak <= 90% of the device, tight = "
        f"within the last 10%. At the default train.eval_block "
        f"{a['eval_block']} the eval block alone is " + ", ".join(
            f"{g(a['eval_block'] * I * F32)} GB at {n(I)} items" for I in args.items) + ".")

    # KD state per user, and the int32 saving
    per_user = kd_bytes_per_user(r["K"], r["L"])
    int64_parts = sum(v for k, v in per_user.items() if "int64" in k)
    emit("KD state per user (bytes)", table(["tensor", "bytes/user"], [[k, v] for k, v in per_user.items()]
                                             + [["total", sum(per_user.values())],
                                                ["saved by int32 item ids", int64_parts // 2]]))

    # --- load-time spikes
    spikes = []
    seen = set()
    for x in mem:
        key = (x["run"], x["users"])
        if key in seen:
            continue
        seen.add(key)
        s = x["load_spikes"]
        spikes.append([f"MF{x['dim']}" + (" RCE-KD" if x["run"] == "student" else " BPR"), n(x["users"]),
                       g(s["init: full user table built then sliced"]), g(s["teacher: all users read then sliced"]),
                       g(s["data: all interactions read (int64 pairs, lower bound)"]),
                       g(a["ranks_per_node"] * sum(s.values()))])
    emit("Start-up spikes per rank of today's code (GB)", table(
        ["model", "users", "init: full user table, then sliced", "teacher: all users read, then sliced",
         "data: whole file as int64 pairs (lower bound)", f"all three x {a['ranks_per_node']} ranks on a node"], spikes))

    # --- communication
    comm = []
    for mode in ("teacher", "every_batch", "once_per_epoch"):
        for I in args.items:
            for W in args.ranks:
                comm.append(comm_per_step(mode, I, W, r, a))
    label = {"teacher": f"MF{r['d_teacher']} BPR", "every_batch": f"MF{r['d_student']} RCE-KD every_batch (bound)",
             "once_per_epoch": f"MF{r['d_student']} RCE-KD once_per_epoch (mean)"}
    rows = []
    for c in comm:
        st = {U: steps_per_epoch(U, r, a, c["mode"] == "teacher") for U in args.users}
        rows.append([label[c["mode"]], n(c["items"]), c["W"], n(c["rows_per_rank"]), m(c["dense_payload"]),
                     m(c["dense_wire_per_rank"]), m(c["sparse_payload"]), m(c["sparse_wire_per_rank"]),
                     f"**{c['cpu_pick']}** ({c['dense_over_sparse']:.1f}x)", m(c["row_sharded_alltoall_per_rank"]),
                     *[f"{t(c['cpu_wire_per_rank'] * st[U])} / {t(c['dense_wire_per_rank'] * st[U])}"
                       for U in args.users]])
        c["steps_per_epoch"] = st
    emit("Item-gradient sum per optimizer step (MB) and per epoch (TB)", table(
        ["model", "items", "W", "touched rows/rank", "dense payload I·d·4", "dense on wire/rank",
         "sparse payload W·R·(8+4d)", "sparse on wire/rank", "CPU rule picks (dense/sparse payload)",
         "row-sharded items: all-to-all/rank",
         *[f"per epoch on wire/rank, {n(U)} users: CPU pick / dense (CUDA today)" for U in args.users]], rows),
        "Steps per epoch = ceil(U x interactions per user / B): "
        + ", ".join(f"{n(U)} users {steps_per_epoch(U, r, a, False):,}" for U in args.users)
        + ". Ring all-reduce moves 2(W-1)/W of the payload per rank, ring all_gather (W-1)/W. The user table needs "
          "no communication (each rank owns its rows). Row-sharded: R(W-1)/W x (8 + 2·4d) per rank (ids out, "
          "vectors in, gradients back). Dense is the smaller payload only below "
        + ", ".join(f"{n(c['crossover_items'])} items ({label[c['mode']]})" for c in comm
                    if c["items"] == args.items[0] and c["W"] == args.ranks[0]) + ".")

    # Adam's work on the replicated item table per step (every rank applies the same update to its replica)
    adam = []
    for c in comm:
        if c["W"] != max(args.ranks):
            continue
        union = min(c["items"], c["W"] * c["rows_per_rank"])  # the summed gradient's nonzero rows (bound)
        adam.append({"mode": c["mode"], "items": c["items"], "dim": c["dim"], "dense_adam_elems": c["items"] * c["dim"],
                     "lazy_adam_elems": union * c["dim"]})
    emit("Adam on the replicated item table, elements updated per step on every rank", table(
        ["model", "items", "train.optimizer adam (all rows)", "lazy_adam (touched rows, bound)", "ratio"],
        [[label[x["mode"]], n(x["items"]), sci(x["dense_adam_elems"]), sci(x["lazy_adam_elems"]),
          f"{x['dense_adam_elems'] / x['lazy_adam_elems']:.0f}x"] for x in adam]),
        "Independent of W: the replica is updated whole on every rank whichever way the gradient was summed.")

    # --- stop points
    Uref, Wref = max(args.users), max(args.ranks)
    stops = stop_points(r, a, Uref, Wref)
    emit("Where the replicated item table stops (largest catalogue that fits one device)", table(
        ["replicated per item", "bytes/item", *[f"max items, {c:g} GB (no users)" for c in a["device_gb"]],
         f"user side/rank, {n(Uref)} users on {Wref} ranks (GB)",
         *[f"max items, {c:g} GB, with that user side" for c in a["device_gb"]]],
        [[s["what"], s["bytes_per_item"], *[n(s[f"max_items_{c:g}GB"]) for c in a["device_gb"]],
          g(s["user_side_bytes"]), *[n(s[f"max_items_{c:g}GB_with_users"]) for c in a["device_gb"]]]
         for s in stops]),
        f"User side = the rank's user-proportional state plus its largest user-proportional transient and a "
        f"{a['eval_cap_gb']:g} GB evaluation block.")
    ck = [checkpoint_gather(U, I, d) for d in (r["d_student"], r["d_teacher"]) for U in args.users
          for I in args.items[-1:]]
    emit("Rank 0 at save time (today's single-file checkpoints, GB)", table(
        ["dim", "users", "items", "best model (user+item weights)", "resume file (weights + 2 moments)",
         "of it user rows", "gather buffer of one user tensor"],
        [[c["dim"], n(c["users"]), n(c["items"]), g(c["best_model"]), g(c["resume_file"]), g(c["resume_user_rows"]),
          g(c["one_tensor_gather_buffer"])] for c in ck]))

    # --- retrieval
    idx = [index_bytes(I, d, a) for d in (r["d_student"], r["d_teacher"]) for I in args.items]
    keys = [k for k in idx[0] if k not in ("items", "dim", "nlist", "pq_m")]
    rows = []
    for x in idx:
        vals = [g(v) for k, v in x.items() if k not in ("items", "dim", "nlist", "pq_m")]
        rows.append([x["dim"], n(x["items"]), x["nlist"], x["pq_m"], *vals])
    emit("FAISS index over the items, per copy (GB)", table(
        ["dim", "items", "nlist", "PQ bytes", "Flat", "SQ8", "IVF,Flat ip2l2", "IVF,PQ ip2l2"], rows),
        "nlist = 4·sqrt(items) rounded to a power of two (a rule of thumb, to be tuned like docs/benchmarks.md "
        "section 4). PQ: 8 B codes for the 20-dim student, 40 B for the 300-dim teacher (one byte per ~8 dims).")
    rc = [retrieval_cost(U, I, W, r) for U in args.users for I in args.items for W in args.ranks]
    emit("Exact top-K searches per rank (multiply-adds) and item-sharded merge traffic (GB per refresh)", table(
        ["users", "items", "W", "teacher top-K, once", "student top-M, every epoch",
         "item-sharded: queries out/rank", "item-sharded: candidates in/rank"],
        [[n(x["users"]), n(x["items"]), x["W"], sci(x["teacher_topk_once_macs"]), sci(x["student_topm_per_epoch_macs"]),
          g(x["item_sharded_queries_out_per_rank"]), g(x["item_sharded_candidates_in_per_rank"])] for x in rc]))

    # --- serving and the offline job
    sv = [serving_replica(U, I, r, a) for U in args.users for I in args.items]
    emit("Serving: one replica of the bundle (GB)", table(
        ["users", "items", "user table fp32 / fp16 / int8", "item index Flat / SQ8", "seen CSR int32"],
        [[n(x["users"]), n(x["items"]),
          f"{g(x['user table fp32'])} / {g(x['user table fp16'])} / {g(x['user table int8 (+ f32 row scale)'])}",
          f"{g(x['item index Flat'])} / {g(x['item index SQ8'])}", g(x["seen CSR int32 (uncompressed)"])] for x in sv]),
        "ONNX embeds the user table in one protobuf (limit 2 GiB): at dim "
        f"{r['d_student']} that is at most " + ", ".join(f"{n(v)} users {k}" for k, v in
                                                           onnx_user_limit(r["d_student"]).items()) + ".")
    rec = [recommend_job(U, I, W, r, a) for U in args.users for I in args.items[-1:] for W in args.ranks]
    emit(f"Offline `compress recommend` (k {a['recommend_k']}, {n(a['recommend_shard_users'])} users per shard)",
         table(["users", "items", "W", "shards", "shards/rank (max)", "rows", "rank + score columns",
                "bundle opened per rank (fp32 users + Flat + seen)", "exact multiply-adds/rank"],
               [[n(x["users"]), n(x["items"]), x["W"], f"{x['shards']:,}", x["shards_per_rank"], n(x["rows"]),
                 f"{g(x['fixed_width_bytes'])} GB", f"{g(x['bundle_per_rank'])} GB", sci(x["exact_macs_per_rank"])]
                for x in rec]),
         "Defaults of compress_app/recommend.py (k 10, shard_users 100,000). Each row also carries its user_id "
         "and item_id strings (Parquet-encoded; their size depends on the ids).")
    lg = [lightgcn_cost(U, I, r["d_student"], 3, a) for U in args.users for I in args.items[:1]]
    emit("LightGCN under torchrun (not supported): what a replicated graph would cost", table(
        ["users", "items", "dim", "graph CSR per rank (GB)", "propagation multiply-adds per step",
         "layer activations per step (GB)"],
        [[n(x["users"]), n(x["items"]), x["dim"], g(x["graph_csr_bytes"]), sci(x["propagation_macs_per_step"]),
          g(x["layer_activations_bytes"])] for x in lg]))

    # --- calibration against docs/benchmarks.md section 4
    c = MEASURED_1M
    per = kd_bytes_per_user(c["K"], c["L"])
    U = c["users"]
    comp = {"teacher top-K [U,K] int64": per["QT teacher top-K [K] int64"] * U,
            "student top-K [U,K] int64": per["QS student top-K [K] int64"] * U,
            "A [U,L] int64": per["A sampled [L] int64"] * U,
            "[QS, A, QT] sets [U,K+L+K] int64": per["[QS, A, QT] sets [2K+L] int64"] * U,
            "their teacher scores [U,K+L+K] f32": per["teacher scores of the sets [2K+L] f32"] * U}
    cal_rows = [[k, f"{v / MIB:,.0f}", f"{c['tensors_mib'][k]:,}"] for k, v in comp.items()]
    # the whole epoch-1 peak (after the student's first top-M; no Adam state or gradient yet, no previous sets)
    S, K, L, M = 2 * c["K"] + c["L"], c["K"], c["L"], c["M"]
    kd_total = sum(per.values()) * U
    first_epoch_start = U * (M * (I64 + F32) + (L + K) * I64)  # P with its scores, build_teacher_side_set's list
    weights = (U + c["items"]) * c["dim"] * F32
    teacher = (U + c["items"]) * c["teacher_dim"] * F32
    data = 2 * I64 * c["train_interactions"]
    formula_peak = kd_total + first_epoch_start + weights + teacher + data
    cal_rows.append(["peak RSS of the process (formula: KD state + epoch-1 start transient + weights + teacher + "
                     "train pairs; no interpreter/torch baseline)", f"{formula_peak / MIB:,.0f}",
                     f"{c['peak_rss_mib']:,}"])
    emit("Check: the formulas at docs/benchmarks.md section 4's 1M-user run (MiB)", table(
        ["tensor", "formula", "measured / reported (section 4)"], cal_rows),
        f"The process had {c['rss_after_data_generation_mib']:,} MiB peak RSS after generating its data, before "
        f"any KD state (docs/results/kd-scale-1m-users-cpu.json); formula + that baseline = "
        f"{formula_peak / MIB + c['rss_after_data_generation_mib']:,.0f} MiB, "
        f"{(formula_peak / MIB + c['rss_after_data_generation_mib']) / c['peak_rss_mib']:.0%} of the measured peak.")

    text = "\n".join(md)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text, encoding="utf-8")
    for k in ("ivf_nlist", "pq_bytes"):
        a.pop(k)
    result = {
        "command": "python benchmarks/scaling_plan.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(), "assumptions": assumptions,
        "formulas": {
            "user_rows": "4 x (U/W) x d x 4 B (weights, exp_avg, exp_avg_sq, grad)",
            "item_table": "4 x I x d x 4 B, on every rank",
            "kd_state_per_user": "K*8 + K*4 + K*8 + L*8 + (2K+L)*8 + (L+K)*1 + 8 + (2K+L)*4 B",
            "teacher_vectors": "(U/W) x dT x 4 + I x dT x 4 B",
            "dense_payload": "I x d x 4 B per step; ring wire per rank 2(W-1)/W of it",
            "sparse_payload": "W x R x (8 + 4d) B, R = min(I, 2B/W + kd_users_per_rank x (2K+L)); wire (W-1) x R x (8+4d)",
            "steps_per_epoch": "ceil(U x interactions_per_user / B)",
            "eval_block": "eval_block x I x 4 B",
            "max_items": "capacity / replicated bytes per item",
        },
        "memory_per_rank": mem, "kd_bytes_per_user": per_user, "comm_per_step": comm, "adam_per_step": adam,
        "stop_points": stops,
        "checkpoint_gather": ck, "index_bytes": idx, "retrieval_cost": rc, "serving_replica": sv,
        "onnx_user_limit": onnx_user_limit(r["d_student"]), "recommend_job": rec, "lightgcn": lg,
        "calibration_1m": {"measured": c, "formula_mib": {k: v / MIB for k, v in comp.items()},
                           "formula_peak_mib": formula_peak / MIB},
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {out / 'results.json'} and {out / 'tables.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
