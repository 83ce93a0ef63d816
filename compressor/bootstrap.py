"""Paired bootstrap over users: percentile confidence intervals of mean metrics, their differences and gap shares.

Every function takes per-user values (float [n_users], or [n_series, n_users]); a resample draws n_users users with
replacement and takes each series' mean over them. Every series of a call sees the same resampled users, and the
resamples depend only on (seed, n_users, n_resamples), so separate calls with the same seed on the same users are
paired too. The interval at ``level`` is the percentile interval of the resampled statistic (numpy's linear
quantiles at (1 - level) / 2 and (1 + level) / 2).

The gap share of a student is (student - scratch) / (teacher - scratch), each resample computing the ratio of its
resampled means. It is undefined (None) when the point gap |teacher - scratch| is at most ``min_gap``; its interval
is undefined when the gap's own interval holds 0, as a ratio whose denominator may be 0 has no bounded interval.

Memory is bounded: the [n_resamples, n_users] index matrix is drawn in chunks of at most ``max_cells`` entries.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

LEVEL = 0.95
DEFAULT_RESAMPLES = 1000
MIN_GAP = 1e-9  # metrics lie in [0, 1]: a smaller teacher - scratch gap is rounding, not a gap
MAX_CELLS = 1 << 22  # entries of one chunk of the index matrix (32 MiB of int64)


def resampled_means(values: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                    max_cells: int = MAX_CELLS) -> np.ndarray:
    """values float [n_series, n_users] (or [n_users]) -> float64 [n_resamples, n_series] (or [n_resamples]): the mean
    of each series over each resample's users. NaN when there are no users."""
    v = np.asarray(values, dtype=np.float64)
    flat = v.ndim == 1
    v = v[None] if flat else v
    n_series, n = v.shape
    out = np.full((n_resamples, n_series), np.nan)
    if n and n_resamples:
        rng = np.random.default_rng(seed)
        chunk = max(1, min(n_resamples, max_cells // n))
        for start in range(0, n_resamples, chunk):
            c = min(chunk, n_resamples - start)
            idx = rng.integers(0, n, size=(c, n))
            # how often each user was drawn in each resample: the means are then one matrix product
            counts = np.bincount((idx + (np.arange(c) * n)[:, None]).ravel(), minlength=c * n).reshape(c, n)
            out[start:start + c] = (counts.astype(np.float64) @ v.T) / n
    return out[:, 0] if flat else out


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float | None, float | None]:
    """The percentile interval of resampled statistics [n_resamples]; (None, None) if any is not finite or none."""
    s = np.asarray(samples, dtype=np.float64)
    if not len(s) or not np.isfinite(s).all():
        return None, None
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def estimate(value: float | None, samples: np.ndarray | None, level: float = LEVEL) -> dict:
    """{"value", "lo", "hi"} (JSON-ready); lo and hi are None without samples."""
    ok = value is not None and np.isfinite(value)
    lo, hi = interval(samples, level) if ok and samples is not None else (None, None)
    return {"value": float(value) if ok else None, "lo": lo, "hi": hi}


def share_estimate(num: float, den: float, num_samples: np.ndarray | None, den_samples: np.ndarray | None,
                   level: float = LEVEL, min_gap: float = MIN_GAP) -> dict:
    """The ratio num / den of two means with its interval from their paired resamples (see the module docstring)."""
    if not np.isfinite(den) or abs(den) <= min_gap:
        return {"value": None, "lo": None, "hi": None}
    if den_samples is None:
        return estimate(num / den, None, level)
    lo, hi = interval(den_samples, level)
    if lo is None or lo <= 0 <= hi:
        return {"value": float(num / den), "lo": None, "hi": None}
    with np.errstate(divide="ignore", invalid="ignore"):
        return estimate(num / den, num_samples / den_samples, level)


def paired_bootstrap(series: Mapping[str, np.ndarray], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict[str, dict]:
    """{name: per-user values [n_users]} -> {name: {"value": mean, "lo", "hi"}}, every series on the same resamples.

    For a difference between two models pass their per-user difference (a - b) as a series."""
    names = list(series)
    values = np.stack([np.asarray(series[k], dtype=np.float64) for k in names]) if names else np.zeros((0, 0))
    means = values.mean(1) if values.shape[1] else np.full(len(names), np.nan)
    samples = resampled_means(values, n_resamples, seed) if n_resamples else None
    return {k: estimate(means[j], samples[:, j] if samples is not None else None, level) for j, k in enumerate(names)}


def gap_share(student: np.ndarray, scratch: np.ndarray, teacher: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0, level: float = LEVEL, min_gap: float = MIN_GAP) -> dict:
    """Share of the scratch -> teacher gap the student recovers, from per-user values [n_users] of the three models
    on the same users: {"value", "lo", "hi"}, each None when undefined."""
    num, den = np.asarray(student) - scratch, np.asarray(teacher) - scratch
    if not len(num):
        return {"value": None, "lo": None, "hi": None}
    samples = resampled_means(np.stack([num, den]), n_resamples, seed) if n_resamples else None
    return share_estimate(float(num.mean()), float(den.mean()), None if samples is None else samples[:, 0],
                          None if samples is None else samples[:, 1], level, min_gap)


def summary(model: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray] | None = None,
            gap: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None,
            n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = LEVEL,
            min_gap: float = MIN_GAP) -> dict:
    """Per-user metrics {"ndcg@20": [n_users], ...} of a model (and of ``other``, and of ``gap`` = (scratch,
    teacher), all on the same users) -> {"metrics": {name: estimate}} plus, with ``other``, "other" and "difference"
    (model - other), and with ``gap``, "scratch", "teacher" and "gap_share" (model's share of the gap). One
    resampling pass for everything, so all intervals are paired."""
    series = {f"model:{m}": v for m, v in model.items()}
    if other is not None:
        series |= {f"other:{m}": other[m] for m in model}
        series |= {f"difference:{m}": np.asarray(model[m]) - other[m] for m in model}
    if gap is not None:
        scratch, teacher = gap
        series |= {f"scratch:{m}": scratch[m] for m in model} | {f"teacher:{m}": teacher[m] for m in model}
        series |= {f"share_num:{m}": np.asarray(model[m]) - scratch[m] for m in model}
        series |= {f"share_den:{m}": np.asarray(teacher[m]) - scratch[m] for m in model}
    names = list(series)
    values = np.stack([np.asarray(series[k], dtype=np.float64) for k in names])
    n_users = values.shape[1]
    means = values.mean(1) if n_users else np.full(len(names), np.nan)
    samples = resampled_means(values, n_resamples, seed) if n_resamples else None
    col = {k: j for j, k in enumerate(names)}

    def draws(key):
        return None if samples is None else samples[:, col[key]]

    res: dict = {}
    for key in names:
        part, metric = key.split(":", 1)
        if part.startswith("share_"):
            continue
        res.setdefault("metrics" if part == "model" else part, {})[metric] = estimate(means[col[key]], draws(key),
                                                                                       level)
    if gap is not None:
        res["gap_share"] = {}
        for m in model:
            num, den = f"share_num:{m}", f"share_den:{m}"
            res["gap_share"][m] = (share_estimate(means[col[num]], means[col[den]], draws(num), draws(den), level,
                                                  min_gap) if n_users else estimate(None, None))
    return res
