"""Implicit-feedback interaction data: readers, id maps, k-core filtering and the per-user split.

Everything downstream works on contiguous integer indices; the external ids (arbitrary strings) are kept in
`Dataset.user_ids` / `Dataset.item_ids` and saved with every model so that serving can answer in them.

Supported inputs (``DataSpec.format``):
- ``pairs``: CSV / TSV / whitespace separated ``user,item[,timestamp]``, with or without a header line;
- ``lists``: one line per user, ``user item item ...`` (the LightGCN format);
- ``users_dat``: the CiteULike ``users.dat`` format (line n = user n, ``count item item ...``);
- a directory holding ``train``/``valid``/``test`` files in ``pairs`` or ``lists`` format (already split);
- ``builtin:citeulike-t``: the bundled default data set.

Splits are stored as COO pairs sorted by user (``Split.users``, ``Split.items``, int64) with a CSR view.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CompressError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "datasets"
BUILTIN = {"citeulike-t": BUILTIN_DIR / "citeulike-t" / "users.dat"}
FORMATS = ("auto", "pairs", "lists", "users_dat")  # data.format: auto detects one of the readers below
SPLIT_ORDERS = ("file", "timestamp", "random")  # data.split.order, see split_per_user
SPLIT_FILE_NAMES = {
    "train": ("train.txt", "train.csv", "train.tsv", "train"),
    "valid": ("valid.txt", "valid.csv", "valid.tsv", "val.txt", "validation.txt", "valid"),
    "test": ("test.txt", "test.csv", "test.tsv", "test"),
}


class DataError(CompressError, ValueError):
    """A user mistake in the input data; the message names the file and line."""


@dataclass(frozen=True)
class Split:
    """Interactions of one split as (user index, item index) pairs sorted by user."""

    users: np.ndarray  # int64 [n]
    items: np.ndarray  # int64 [n]
    num_users: int

    def __len__(self) -> int:
        return int(self.users.shape[0])

    @property
    def indptr(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.bincount(self.users, minlength=self.num_users))]).astype(np.int64)

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        return self.indptr, self.items

    def users_with_items(self) -> np.ndarray:
        return np.unique(self.users)


@dataclass(frozen=True)
class ColdUsers:
    """Users held out of training entirely (``data.cold_users``): row r of each split is user ``users[r]``.
    ``history`` is what their training part would have been (split order, oldest first): the history a user
    tower is fed at evaluation; ``valid`` / ``test`` are the targets, ranked with the history excluded."""

    users: np.ndarray  # int64 [C], ascending indices into the data's users
    history: Split
    valid: Split
    test: Split


@dataclass
class Dataset:
    """A split data set with its id maps. ``train``/``valid``/``test`` share the same index space."""

    user_ids: np.ndarray  # str [U]
    item_ids: np.ndarray  # str [I]
    train: Split
    valid: Split
    test: Split
    source: str = ""
    dropped: dict = field(default_factory=dict)
    cold: ColdUsers | None = None  # users held out of train/valid/test, keeping their index (data.cold_users)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def fingerprint(self) -> str:
        """A stable hash of the ids and the three splits: two runs on the same data agree on it."""
        h = hashlib.sha256()
        for arr in (self.user_ids, self.item_ids):
            h.update("\n".join(arr.tolist()).encode())
            h.update(b"\0")
        cold = (self.cold.history, self.cold.valid, self.cold.test) if self.cold is not None else ()
        for split in (self.train, self.valid, self.test, *cold):
            h.update(split.users.astype(np.int64).tobytes())
            h.update(split.items.astype(np.int64).tobytes())
        if self.cold is not None:
            h.update(self.cold.users.astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def user_block(self, lo: int, hi: int) -> Dataset:
        """Users [lo, hi) with all their interactions and every item, renumbered from 0: what one rank of a
        torchrun job trains on (``distributed``). The fingerprint is the block's, not the data set's."""
        def cut(split: Split) -> Split:
            a, b = np.searchsorted(split.users, [lo, hi])  # splits are sorted by user
            return Split(split.users[a:b] - lo, split.items[a:b], hi - lo)
        return Dataset(self.user_ids[lo:hi], self.item_ids, cut(self.train), cut(self.valid), cut(self.test),
                       f"{self.source} users [{lo}, {hi})", self.dropped)

    def summary(self) -> str:
        cold = f"; {len(self.cold.users):,} cold users held out" if self.cold is not None else ""
        return (f"{self.num_users:,} users, {self.num_items:,} items, "
                f"{len(self.train):,} / {len(self.valid):,} / {len(self.test):,} train/valid/test interactions"
                f"{cold}")


def cold_user_mask(user_ids: np.ndarray, share: float) -> np.ndarray:
    """Which users are cold at ``share``: a hash of the id below the share, so the choice depends on the ids
    alone (teacher and student runs on the same data agree) and grows monotonically with the share."""
    digests = [hashlib.sha256(u.encode("utf-8")).digest()[:8] for u in user_ids.tolist()]
    fraction = np.array([int.from_bytes(d, "big") for d in digests], dtype=np.float64) / 2.0 ** 64
    return fraction < share


def hold_out_cold_users(data: Dataset, share: float) -> Dataset:
    """``data`` with the cold users' (``cold_user_mask``; only users with training items) interactions moved out
    of train/valid/test into ``Dataset.cold``. Users keep their indices, so ids stay aligned with any model."""
    if share <= 0:
        return data
    cold = cold_user_mask(data.user_ids, share) & (np.diff(data.train.indptr) > 0)
    users = np.flatnonzero(cold).astype(np.int64)
    if len(users) == 0:
        raise DataError(f"{data.source}: data.cold_users={share} holds out no user (of {data.num_users:,}); "
                        f"raise it")
    row_of = np.full(data.num_users, -1, dtype=np.int64)
    row_of[users] = np.arange(len(users))

    def warm(split: Split) -> Split:
        keep = ~cold[split.users]
        return Split(split.users[keep], split.items[keep], split.num_users)

    def held_out(split: Split) -> Split:
        take = cold[split.users]
        return Split(row_of[split.users[take]], split.items[take], len(users))

    held = ColdUsers(users, held_out(data.train), held_out(data.valid), held_out(data.test))
    return Dataset(data.user_ids, data.item_ids, warm(data.train), warm(data.valid), warm(data.test), data.source,
                   data.dropped, held)


# ----------------------------------------------------------------------------------------------- raw readers
# A raw record list is a list of (user, item, timestamp|None, line number) kept in file order.

def _open_text(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


_SEPARATORS = {",": ",", "\t": "\t"}


def _sniff_separator(lines: list[str]) -> str | None:
    sample = [ln for ln in lines[:50] if ln.strip()]
    for sep in (",", "\t"):
        if sample and all(sep in ln for ln in sample[1:] or sample):
            return sep
    return None  # whitespace


def read_pairs(path: Path) -> list[tuple[str, str, float | None, int]]:
    """``user,item[,timestamp]`` per line; comma, tab or whitespace separated; optional header line."""
    path = Path(path)
    lines = _open_text(path)
    sep = _sniff_separator(lines)
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = next(csv.reader([line], delimiter=sep)) if sep else line.split()
        fields = [f.strip() for f in fields]
        if len(fields) not in (2, 3) or not all(fields):
            raise DataError(f"{path}:{lineno}: expected 'user{sep or ' '}item[{sep or ' '}timestamp]', "
                            f"got {len(fields)} field(s): {line[:80]!r}")
        ts = None
        if len(fields) == 3:
            try:
                ts = float(fields[2])
            except ValueError:
                if lineno == 1 and not records:  # a header such as user,item,timestamp
                    continue
                raise DataError(f"{path}:{lineno}: timestamp {fields[2]!r} is not a number") from None
        elif lineno == 1 and not records and _looks_like_header(fields):
            continue
        records.append((fields[0], fields[1], ts, lineno))
    return records


def _looks_like_header(fields: list[str]) -> bool:
    return all(re.fullmatch(r"[A-Za-z_][A-Za-z_ ]*", f) for f in fields) and any(
        f.lower() in {"user", "user_id", "userid", "uid", "item", "item_id", "itemid", "iid"} for f in fields)


def read_lists(path: Path) -> list[tuple[str, str, None, int]]:
    """One line per user: ``user item item ...`` (a user with no items is allowed and skipped)."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(_open_text(path), start=1):
        fields = line.split()
        if not fields:
            continue
        user = fields[0]
        for item in fields[1:]:
            records.append((user, item, None, lineno))
    return records


def read_users_dat(path: Path) -> list[tuple[str, str, None, int]]:
    """CiteULike ``users.dat``: line n (0-based) is user n: ``count item item ...``; the count is checked."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(_open_text(path), start=1):
        fields = line.split()
        if not fields:
            raise DataError(f"{path}:{lineno}: empty line (users.dat needs 'count item ...' on every line)")
        try:
            count = int(fields[0])
        except ValueError:
            raise DataError(f"{path}:{lineno}: count {fields[0]!r} is not an integer") from None
        if count < 0:
            raise DataError(f"{path}:{lineno}: negative count {count}")
        if count != len(fields) - 1:
            raise DataError(f"{path}:{lineno}: count says {count} items but the line has {len(fields) - 1}")
        user = str(lineno - 1)
        for item in fields[1:]:
            records.append((user, item, None, lineno))
    return records


def detect_format(path: Path) -> str:
    lines = [ln for ln in _open_text(path)[:200] if ln.strip()]
    if not lines:
        raise DataError(f"{path}: file is empty")
    if any(c in lines[0] for c in ",\t") and _sniff_separator(lines):
        return "pairs"
    fields = [ln.split() for ln in lines]
    if all(len(f) >= 1 and f[0].isdigit() and int(f[0]) == len(f) - 1 for f in fields):
        return "users_dat"
    if all(len(f) in (2, 3) for f in fields) and len({f[0] for f in fields}) < len(fields):
        return "pairs"  # users repeat across lines: one interaction per line
    return "lists"


READERS = {"pairs": read_pairs, "lists": read_lists, "users_dat": read_users_dat}


def read_records(path: Path, fmt: str = "auto"):
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise DataError(f"{path}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    return READERS[fmt](path)


# ----------------------------------------------------------------------------------------------- id maps

def _sorted_ids(ids) -> np.ndarray:
    """Numeric ids in numeric order, anything else lexicographically: deterministic across runs."""
    uniq = set(ids)
    if all(s.lstrip("-").isdigit() for s in uniq):
        ordered = sorted(uniq, key=int)
    else:
        ordered = sorted(uniq)
    return np.array(ordered, dtype=str)


def _index(ids: np.ndarray) -> dict[str, int]:
    return {s: i for i, s in enumerate(ids.tolist())}


# ----------------------------------------------------------------------------------------------- filtering + split

def kcore(records: list, min_user: int, min_item: int, path: str) -> list:
    """Iteratively drop users with < min_user and items with < min_item interactions (k-core)."""
    if min_user <= 1 and min_item <= 1:
        return records
    while True:
        ucount: dict[str, int] = {}
        icount: dict[str, int] = {}
        for u, i, *_ in records:
            ucount[u] = ucount.get(u, 0) + 1
            icount[i] = icount.get(i, 0) + 1
        kept = [r for r in records if ucount[r[0]] >= min_user and icount[r[1]] >= min_item]
        if len(kept) == len(records):
            break
        records = kept
    if not records:
        raise DataError(f"{path}: no interactions left after filtering "
                        f"(min_user_interactions={min_user}, min_item_interactions={min_item})")
    return records


def _dedupe(records: list) -> list:
    seen = set()
    out = []
    for r in records:
        key = (r[0], r[1])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def split_per_user(records: list, ratios=(0.8, 0.1, 0.1), order: str = "file", seed: int = 0):
    """Split each user's interactions into train/valid/test.

    order ``file`` keeps file order (the paper's CiteULike protocol), ``timestamp`` sorts by time (stable, so ties
    keep file order), ``random`` shuffles with ``seed``. The cut points are ``int(n*r0)`` and ``int(n*(r0+r1))``,
    which reproduces the paper's CiteULike counts exactly.
    """
    by_user: dict[str, list] = {}
    for r in records:
        by_user.setdefault(r[0], []).append(r)
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for user in by_user:  # dict order = first appearance: deterministic
        rows = by_user[user]
        if order == "timestamp":
            missing = [r for r in rows if r[2] is None]
            if missing:
                raise DataError(f"line {missing[0][3]}: split.order is 'timestamp' but the line has no timestamp")
            rows = sorted(rows, key=lambda r: r[2])
        elif order == "random":
            rows = [rows[i] for i in rng.permutation(len(rows))]
        n = len(rows)
        c1 = int(n * ratios[0])
        c2 = int(n * (ratios[0] + ratios[1]))
        parts[0].extend(rows[:c1])
        parts[1].extend(rows[c1:c2])
        parts[2].extend(rows[c2:])
    return parts


def _to_split(records, uindex, iindex, num_users, name, path, dropped) -> Split:
    users, items = [], []
    unknown_u = unknown_i = 0
    for u, i, *_ in records:
        ui = uindex.get(u)
        ii = iindex.get(i)
        if ui is None:
            unknown_u += 1
            continue
        if ii is None:
            unknown_i += 1
            continue
        users.append(ui)
        items.append(ii)
    if unknown_u or unknown_i:
        dropped[name] = {"unknown_users": unknown_u, "unknown_items": unknown_i}
        log.warning("%s: dropped %d %s interaction(s) of users and %d of items never seen in training",
                    path, unknown_u, name, unknown_i)
    users_a = np.asarray(users, dtype=np.int64)
    items_a = np.asarray(items, dtype=np.int64)
    order = np.argsort(users_a, kind="stable")
    return Split(users_a[order], items_a[order], num_users)


def _build(train_recs, valid_recs, test_recs, source: str, id_records=None) -> Dataset:
    """Map ids and build the splits. Ids come from ``id_records`` (default: the training records); held-out
    interactions whose user or item has no id are dropped with a counted warning."""
    if not train_recs:
        raise DataError(f"{source}: no training interactions")
    id_records = train_recs if id_records is None else id_records
    user_ids = _sorted_ids(r[0] for r in id_records)
    item_ids = _sorted_ids(r[1] for r in id_records)
    uindex, iindex = _index(user_ids), _index(item_ids)
    dropped: dict = {}
    train = _to_split(train_recs, uindex, iindex, len(user_ids), "train", source, dropped)
    valid = _to_split(valid_recs, uindex, iindex, len(user_ids), "valid", source, dropped)
    test = _to_split(test_recs, uindex, iindex, len(user_ids), "test", source, dropped)
    return Dataset(user_ids, item_ids, train, valid, test, source=source, dropped=dropped)


def _find_split_file(directory: Path, split: str) -> Path | None:
    for name in SPLIT_FILE_NAMES[split]:
        p = directory / name
        if p.is_file():
            return p
    return None


def load_dataset(path: str, fmt: str = "auto", min_user_interactions: int = 0, min_item_interactions: int = 0,
                 split_order: str = "file", split_ratios=(0.8, 0.1, 0.1), seed: int = 0,
                 cold_users: float = 0.0) -> Dataset:
    """Load a data set from a file, a train/valid/test directory, or ``builtin:NAME``; ``cold_users``: the
    share of users held out of training (``hold_out_cold_users``)."""
    return hold_out_cold_users(_load_split(path, fmt, min_user_interactions, min_item_interactions, split_order,
                                           split_ratios, seed), cold_users)


def _load_split(path: str, fmt: str, min_user_interactions: int, min_item_interactions: int, split_order: str,
                split_ratios, seed: int) -> Dataset:
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN:
            raise DataError(f"{path}: unknown built-in data set (available: {', '.join(BUILTIN)})")
        file = BUILTIN[name]
        fmt = "users_dat"
    else:
        file = Path(path).expanduser()
    if file.is_dir():
        found = {s: _find_split_file(file, s) for s in SPLIT_FILE_NAMES}
        if found["train"] is None:
            raise DataError(f"{file}: directory has no train file (looked for {', '.join(SPLIT_FILE_NAMES['train'])})")
        recs = {s: (read_records(p, fmt) if p else []) for s, p in found.items()}
        train = _dedupe(recs["train"])
        if min_user_interactions > 1 or min_item_interactions > 1:
            train = kcore(train, min_user_interactions, min_item_interactions, str(found["train"]))
        if not train:
            raise DataError(f"{found['train']}: no interactions")
        return _build(train, recs["valid"], recs["test"], str(file))
    if not file.exists():
        raise DataError(f"{file}: file not found")
    records = _dedupe(read_records(file, fmt))
    if not records:
        raise DataError(f"{file}: no interactions in file")
    records = kcore(records, max(min_user_interactions, 1), max(min_item_interactions, 1), str(file))
    train, valid, test = split_per_user(records, split_ratios, split_order, seed)
    # One file split per user: every user keeps an index, and an item seen only in a user's held-out part
    # stays in the catalogue (the paper's CiteULike protocol: 25,181 items, not only those in train).
    return _build(train, valid, test, str(file), id_records=records)
