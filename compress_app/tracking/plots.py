"""Figures logged with a run: a metric's curve over epochs (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .environment import is_number


def plot_curve(history: list[dict], key: str, path: Path, title: str = "") -> Path | None:
    """PNG of `key` per epoch (matplotlib's Agg canvas, no pyplot state). None when no row has `key`."""
    pts = [(r["epoch"], r[key]) for r in history if is_number(r.get(key))]
    if not pts:
        return None
    xs, ys = zip(*pts)
    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o", markersize=3)
    best = max(range(len(ys)), key=ys.__getitem__)
    ax.scatter([xs[best]], [ys[best]], color="tab:red", zorder=3, label=f"best {ys[best]:.4g} @ epoch {xs[best]}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
