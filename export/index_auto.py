"""`index_factory="auto"`: measure candidate indexes on the actual item vectors, keep the smallest that serves as well.

Candidates, all storing items in the bundle's codec (`EXACT_SCAN[quantize]`: float32, SQfp16 or SQ8 codes):
- the exact scan (the baseline; served by dense numpy scoring, exact for the vectors it stores),
- ``IVF{nlist},<codec>`` with nlist a power of two near 4 sqrt(items), at least IVF_MIN_ITEMS_PER_LIST items
  per list, nprobe tuned to the recall floor,
- ``HNSW32`` (``HNSW32_<codec>`` for codes), efSearch tuned to the recall floor.
Each is measured on the seeded recall sample and through the serving path: its serialized bytes, recall@k against
exact search over the true vectors, and the single-user p50 latency of `Recommender.recommend` (`export.served`),
so the exact scan is timed on the dense path the server uses for it and the others on FAISS search with
over-fetch. A candidate is eligible when its recall reaches the floor and its p50 is no higher than the exact
scan's (the exact scan is always eligible: its codes are judged by the quantization check); the eligible one with
the fewest bytes wins, ties going to the exact scan, then to the lower p50. The manifest's ``index.auto`` records
every candidate and the reason.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import faiss
import numpy as np

from export.errors import ExportError
from export.index_build import EXACT_SCAN, ItemIndex, RecallSample, build_index, tune_recall
from export.served import LATENCY_K, LATENCY_ROUNDS, ServedProbe, latency_users, single_user_p50_us

logger = logging.getLogger(__name__)

IVF_MIN_ITEMS_PER_LIST = 39  # fewer training points per centroid than this and k-means is unreliable
IVF_LISTS_PER_SQRT = 4
HNSW_FACTORY = "HNSW32"
# Bytes per item an approximate index stores beyond the codes: IVF an int64 id; HNSW32 at least its 32 level-0
# links of 4 bytes (it keeps 2 x 32).
MIN_EXTRA_BYTES_PER_ITEM = {"IVF": 8, "HNSW": 4 * 32}
RULE = ("smallest candidate whose recall@k reaches recall_floor and whose single-user p50 is no higher than the "
        "exact scan's (the exact scan is always eligible)")


def candidate_factories(num_items: int, quantize: str) -> list[str]:
    """The exact scan first, then the approximate candidates that suit `num_items`."""
    codec = EXACT_SCAN[quantize]
    out = [codec]
    nlist = 2 ** round(math.log2(max(1.0, IVF_LISTS_PER_SQRT * math.sqrt(num_items))))
    while nlist > 1 and nlist * IVF_MIN_ITEMS_PER_LIST > num_items:
        nlist //= 2
    if nlist >= 2:
        out.append(f"IVF{nlist},{codec}")
    out.append(HNSW_FACTORY if codec == "Flat" else f"{HNSW_FACTORY}_{codec}")
    return out


def _stores_exact_codes(factory: str, codec: str) -> bool:
    """Whether an approximate factory stores every item in the exact scan's own codes (IVF...,<codec> or HNSW32 of
    that codec), so that it cannot be smaller than the exact scan."""
    if factory.startswith("IVF"):
        return factory.split(",")[-1] == codec
    return factory in (HNSW_FACTORY if codec == "Flat" else "", f"{HNSW_FACTORY}_{codec}")


def choose_index(items: np.ndarray, sample: RecallSample, recall_floor: float, quantize: str,
                 probe: ServedProbe) -> ItemIndex:
    """Build and measure every candidate; return the chosen one with `auto` and `auto_note` filled in."""
    built: list[ItemIndex] = []
    rows: list[dict[str, Any]] = []
    exact_bytes = None
    for factory in candidate_factories(items.shape[0], quantize):
        exact = factory == EXACT_SCAN[quantize]
        if exact_bytes is not None and _stores_exact_codes(factory, EXACT_SCAN[quantize]):
            # Its codes alone are the exact scan's; ids or graph links come on top, so it cannot be the smallest:
            # skip it rather than build (an HNSW graph over a large catalogue takes minutes) and throw it away.
            extra = MIN_EXTRA_BYTES_PER_ITEM["HNSW" if factory.startswith("HNSW") else "IVF"] * items.shape[0]
            rows.append({"factory": factory, "exact": False, "eligible": False,
                         "note": f"not built: at least {exact_bytes + extra} bytes (the exact scan's codes plus "
                                 f"{extra} of ids or links) > the exact scan's {exact_bytes}"})
            continue
        try:
            index, exact, max_norm = build_index(factory, items, exact_scan=exact)
        except ExportError as exc:
            if exact:
                raise
            rows.append({"factory": factory, "exact": exact, "note": f"not built: {exc}"})
            continue
        item_index = ItemIndex(index, factory, "auto", exact, max_norm, sample.k, codec=quantize)
        nbytes = int(faiss.serialize_index(index).size)  # before any probe touches the index
        if factory != "Flat":
            item_index.search_params, item_index.recall = tune_recall(index, exact, sample, recall_floor)
            item_index.sample_users = sample.users
        built.append(item_index)
        rows.append({"factory": factory, "exact": exact, "bytes": nbytes, "recall_at_k": float(item_index.recall),
                     "search_params": dict(item_index.search_params)})
        if exact:
            exact_bytes = nbytes
    measured = [row for row in rows if "bytes" in row]
    if not measured or not measured[0]["exact"]:
        raise ExportError(f"auto index: the exact scan {EXACT_SCAN[quantize]} could not be built")
    users = latency_users(probe.num_users)
    recs = [probe.recommender(b.index, b.query_transform, b.search_params) for b in built]
    for row, p50 in zip(measured, single_user_p50_us(recs, users)):
        row["p50_us"] = round(p50, 2)
    del recs
    baseline = measured[0]
    for row in measured:
        if row["exact"]:
            row["eligible"] = True
        elif row["recall_at_k"] < recall_floor:
            row["eligible"], row["note"] = False, f"recall@{sample.k} {row['recall_at_k']:.4f} < recall_floor {recall_floor}"
        elif row["p50_us"] > baseline["p50_us"]:
            row["eligible"], row["note"] = False, f"p50 {row['p50_us']:.1f} us > the exact scan's {baseline['p50_us']:.1f} us"
        else:
            row["eligible"] = True
    eligible = [i for i, row in enumerate(measured) if row["eligible"]]
    best = min(eligible, key=lambda i: (measured[i]["bytes"], not measured[i]["exact"], measured[i]["p50_us"]))
    chosen, winner = built[best], measured[best]
    for row in measured:
        if row is winner:
            row["note"] = "chosen"
        elif row["eligible"]:
            row["note"] = f"{row['bytes']} bytes > {winner['bytes']} of {winner['factory']}"
    why = (f"{winner['factory']}: {winner['bytes']} bytes, recall@{sample.k} {winner['recall_at_k']:.4f}, "
           f"p50 {winner['p50_us']:.1f} us; the {RULE}")
    chosen.auto = {
        "rule": RULE,
        "recall": {"k": sample.k, "users": sample.users, "floor": recall_floor},
        "latency": {"measured": "serving Recommender.recommend, one user per call, exclude_seen=True; median",
                    "k": min(LATENCY_K, items.shape[0]), "users": int(users.size), "rounds": LATENCY_ROUNDS},
        "candidates": rows,
        "chosen": winner["factory"],
    }
    chosen.auto_note = why
    logger.info("auto index: %s", why)
    return chosen
