"""The compression report: a Markdown table and PNG figures from finished runs (plain numbers in, files out).

The caller (the pipeline) gathers each entry's numbers — test metrics, parameter count, bundle bytes,
in-process serving latency — and this module only lays them out, so it never touches export or serving.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compressor.run_dir import METRICS_FILE

from .tracking.gate import GATE_METRIC as GAP_METRIC  # the gap-recovered column compares what the gate compares


def _figure(width: float = 7, height: float = 4):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def report_metrics(*tests: dict) -> list[str]:
    """The Recall@K / NDCG@K columns every entry has: recalls then NDCGs, each by K."""
    common = set.intersection(*(set(t) for t in tests)) if tests else set()
    keys = [k for k in common if k.partition("@")[0] in ("recall", "ndcg") and k.partition("@")[2].isdigit()]
    return sorted(keys, key=lambda k: (k.partition("@")[0] != "recall", int(k.partition("@")[2])))


@dataclass
class ReportEntry:
    label: str  # "teacher", "scratch student", "RCE-KD student"
    run_dir: Path
    params: int  # embedding parameters (users + items) x dim
    dim: int
    test: dict
    bundle_bytes: int | None = None
    latency_ms: dict = field(default_factory=dict)  # {"p50": .., "p99": ..} single-user, in-process
    history: list = field(default_factory=list)  # metrics.jsonl rows
    test_ci: dict = field(default_factory=dict)  # {metric: (lo, hi)}: paired bootstrap 95% CIs over the test users
    gap_ci: dict | None = None  # {"value", "lo", "hi"} of the share of the gap recovered (None: not computed)


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gap_recovered(student: float, scratch: float, teacher: float) -> float | None:
    """Share of the scratch -> teacher gap that the student closes (1.0 = matches the teacher)."""
    if teacher == scratch:
        return None
    return (student - scratch) / (teacher - scratch)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f} MB"


def _metric_cell(e: ReportEntry, metric: str) -> str:
    lo_hi = e.test_ci.get(metric)
    return f"{e.test[metric]:.4f}" + (f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else "")


def _gap_cell(e: ReportEntry, point: float | None) -> str:
    """The gap share of the student: the bootstrap's when computed (with its CI, or why there is none), else the
    point estimate from the test metrics."""
    g = e.gap_ci
    if g is None:
        return "—" if point is None else f"{100 * point:.0f}%"
    if g.get("value") is None:
        return "undefined (teacher = scratch)"
    ci = f" [{100 * g['lo']:.0f}%, {100 * g['hi']:.0f}%]" if g.get("lo") is not None else " [CI undefined]"
    return f"{100 * g['value']:.0f}%{ci}"


def write_report(out_dir: Path, teacher: ReportEntry, scratch: ReportEntry, student: ReportEntry,
                 title: str = "Compression report", notes: list[str] | None = None) -> Path:
    """Write report.md, valid_ndcg10.png and metrics.png into out_dir; returns the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [teacher, scratch, student]
    metrics = report_metrics(*(e.test for e in entries))
    names = [m.upper().replace("RECALL", "R").replace("NDCG", "N") for m in metrics]
    rows = ["| model | dim | parameters | bundle | p50 / p99 latency | " + " | ".join(names)
            + f" | gap recovered ({GAP_METRIC.upper().replace('NDCG', 'N')}) |",
            "|---|---|---|---|---|" + "---|" * (len(metrics) + 1)]
    for e in entries:
        gap = gap_recovered(e.test[GAP_METRIC], scratch.test[GAP_METRIC], teacher.test[GAP_METRIC])
        gap_s = "—" if e is teacher or e is scratch else _gap_cell(e, gap)
        lat = (f"{e.latency_ms['p50']:.2f} / {e.latency_ms['p99']:.2f} ms" if e.latency_ms else "—")
        rows.append(f"| {e.label} | {e.dim} | {e.params:,} | {_mb(e.bundle_bytes)} | {lat} | "
                    + " | ".join(_metric_cell(e, m) for m in metrics) + f" | {gap_s} |")
    shrink = teacher.params / max(student.params, 1)
    size = ""
    if teacher.bundle_bytes and student.bundle_bytes:
        ratio = teacher.bundle_bytes / student.bundle_bytes
        size = (f"Its bundle is {ratio:.1f}x smaller ({_mb(student.bundle_bytes)} against {_mb(teacher.bundle_bytes)}): "
                f"{ratio / shrink:.2f} of the parameter ratio (ids and seen items cost the same in both bundles). ")
    lines = [f"# {title}", "", "\n".join(rows), "",
             f"The RCE-KD student has {shrink:.1f}x fewer embedding parameters than its teacher. {size}"
             "Metrics: full ranking over all items, training items excluded, test split, best validation epoch. "
             "Latency: one user per call, in-process (ONNX Runtime user tower -> FAISS search -> seen items "
             "removed), 1 thread.", "", "![validation NDCG@10](valid_ndcg10.png)", "",
             "![test metrics](metrics.png)", ""]
    for n in notes or []:
        lines.append(f"- {n}")
    md = out_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")

    fig, ax = _figure()
    for e in entries:
        pts = [(h["epoch"], h["valid_ndcg@10"]) for h in e.history if "valid_ndcg@10" in h]
        if pts:
            ax.plot(*zip(*pts), label=f"{e.label} (dim {e.dim})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "valid_ndcg10.png", dpi=110)

    fig, ax = _figure()
    width = 0.25
    for j, e in enumerate(entries):
        ax.bar([i + (j - 1) * width for i in range(len(metrics))], [e.test[m] for m in metrics], width,
               label=e.label)
    ax.set_xticks(range(len(metrics)), [m.upper() for m in metrics])
    ax.set_ylabel("test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "metrics.png", dpi=110)
    return md
