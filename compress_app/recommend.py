"""`compress recommend`: the nightly batch job. Top-k items for every user of a model, as sharded Parquet files.

The model is read the way the server reads it: SOURCE is a serving bundle directory, a `models:/` URI (the
registered model is a verified bundle) or a checkpoint (a run directory or .safetensors), which is first exported
to DIR/_bundle. Every answer then comes from `serving.bundle.open_bundle` + `serving.recommender.Recommender`,
the code behind POST /recommend and /recommend/batch, so the job and the server agree on every user. Users go
through the recommender's batch path, as /recommend/batch sends them: many users per call, sorted by history
length (the over-fetch of an approximate index is sized per call); an exact bundle (Flat, SQ: the dense path)
answers each user identically alone or in any batch.

Output directory DIR:

    _manifest.json       written first (atomically), before any shard; rewritten only to set `complete`
    part-00000.parquet  users [0, shard_users) of the bundle's user index order, then the next block, ...
    _SUCCESS            empty; written after _manifest.json says complete (for schedulers that wait on a file)
    _bundle/            only for a checkpoint SOURCE: the bundle exported from it

Each shard has the columns user_id (string, external id), rank (int32, 1 = best), item_id (string, external
id), score (float32, the inner product the server reports), rows ordered by user then rank. A user gets
min(k, items it has not seen) rows with exclude_seen (k otherwise). The Parquet schema metadata carries the
bundle's manifest sha256 and the shard number. Read the shards as a list of files (DIR/part-*.parquet):
_manifest.json, _bundle/ and _SUCCESS start with "_", which Parquet readers skip: `pyarrow.parquet.read_table(DIR)`
reads the recommendations as one table.

_manifest.json (FORMAT_VERSION 1):

    format, format_version
    model:       bundle_manifest_sha256 (the model's identity), model_version (the server's label), source (as
                 given), source_kind (bundle | checkpoint | registry), bundle (the path read; relative for
                 DIR/_bundle), checkpoint_fingerprint (checkpoint SOURCE only)
    k, exclude_seen, shard_users, num_users, num_items, num_shards, rows (the total)
    shards:      [{file, first_user, users, rows}, ...]: the plan, fixed before the first shard is written
    complete:    false until every shard exists and checks out; then true, with completed_at (back to false,
                 and _SUCCESS removed, when a re-run finds a shard of a completed job deleted)

Resume rules. A shard is computed in memory, written to a temp file in DIR (`.part-NNNNN.parquet.*.tmp`) and
renamed into place: a shard file is whole or absent, and a finished one is never rewritten. Re-running the same
command skips every shard whose file opens as Parquet with the planned row count, schema and model sha (a file
that does not is redone, with a warning), deletes half-written temp files and computes the rest. A re-run is
the same job when the model's bundle manifest sha256, k, exclude_seen, shard_users and the format version match
what _manifest.json records; otherwise it is refused before anything is written or deleted, naming each
difference. A checkpoint SOURCE reuses DIR/_bundle when it was exported from a checkpoint with the same weights
fingerprint (and is refused when it was not). The number of ranks is not part of the job: a run killed under
torchrun may resume on one process and vice versa.

Ranks. Under torchrun (WORLD_SIZE > 1) every rank runs this same code with no process group: rank r computes the
shards s with s % WORLD_SIZE == r. Rank 0 prepares the model (export, verification) and writes _manifest.json
before any shard; the other ranks wait for it (up to `wait_s`), check it against their own arguments and
SOURCE, and open the same bundle. Rank 0 alone shows a progress bar, waits (up to `wait_s`) for the other
ranks' shards, marks the job complete and returns the summary.

Threads. Each rank answers with `threads` worker threads (default: the cores it may use // LOCAL_WORLD_SIZE, so
W ranks on one machine share its cores instead of oversubscribing them), each taking CHUNK_USERS users at a time,
while ONNX Runtime, FAISS and numpy's BLAS are pinned to one thread each: the dense path's products are small
([<= 64 users, dim] x [dim, items]) and OpenBLAS's own threads slow them down many times over. torch and FAISS
get `threads` threads for an export.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from compressor.checkpoint import read_meta
from compressor.device import available_cores, configure_threads
from compressor.distributed import launch_env
from compressor.errors import CompressError
from compressor.files import atomic_write_bytes
from serving.bundle import Bundle, open_bundle
from serving.bundle_format import MANIFEST_FILE
from serving.loaded import default_version
from serving.recommender import Recommender

from . import options
from .errors import INTERRUPTED_EXIT, user_errors
from .logs import setup_logging
from .sources import MODELS_PREFIX, resolve_registered_bundle, version_label
from .tracking.registry import resolve_model_version

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

FORMAT = "compress-recommendations"
FORMAT_VERSION = 1
MANIFEST = "_manifest.json"  # "_" names: Parquet readers skip them, so DIR reads as one data set
SUCCESS = "_SUCCESS"
BUNDLE_DIR = "_bundle"
DEFAULT_SHARD_USERS = 100_000
DEFAULT_WAIT_S = 3600.0
# Users per recommender call, the unit of work of the worker threads. The dense path scores its own blocks inside
# a call, so this only bounds the per-call bookkeeping and, for an approximate index, how many users share one
# over-fetch size.
CHUNK_USERS = 1024
POLL_S = 0.2
SLOW_ENV = "COMPRESS_RECOMMEND_SLOW_S"  # testing aid: sleep this long after each shard, so a kill lands between
IDENTITY = ("format_version", "k", "exclude_seen", "shard_users")
def _arrow():
    """pyarrow, imported when a job runs (not when the CLI starts: it is heavy, and it stays out of processes,
    such as a training rank's, that never write Parquet)."""
    import pyarrow
    import pyarrow.parquet

    return pyarrow, pyarrow.parquet


def _schema():
    pa, _ = _arrow()
    return pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                      ("score", pa.float32())])
SHA_KEY = b"compress.bundle_manifest_sha256"
SHARD_KEY = b"compress.shard"
READABLE = 0o644


class RecommendError(CompressError):
    """A batch job that cannot run as asked; the message is one line."""


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


@dataclass(frozen=True)
class Ranks:
    """This process's place under torchrun (one process when the variables are absent)."""

    rank: int = 0
    world: int = 1
    local_world: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(*launch_env())


@dataclass
class Model:
    """The opened bundle that answers, and how the job's manifest names it."""

    bundle: Bundle
    sha256: str
    entry: dict[str, Any]


# --------------------------------------------------------------------------------------------- the directory
def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecommendError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RecommendError(f"{path} is not a `compress recommend` manifest; use another --out")
    return manifest


def _check_out(out: Path) -> dict[str, Any] | None:
    """The existing job manifest of DIR, or None for a new job; refuses a file or a foreign non-empty directory."""
    if out.exists() and not out.is_dir():
        raise RecommendError(f"--out {out}: exists and is not a directory")
    manifest = _read_manifest(out) if out.is_dir() else None
    if manifest is None and out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != BUNDLE_DIR)
        if foreign:
            raise RecommendError(f"--out {out}: not empty and holds no {MANIFEST} (found {', '.join(foreign[:3])}); "
                                 "use an empty or new directory")
    return manifest


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    diffs = [f"{key} {have.get(key)!r} there, {want[key]!r} now" for key in IDENTITY if have.get(key) != want[key]]
    old = (have.get("model") or {}).get("bundle_manifest_sha256")
    new = want["model"]["bundle_manifest_sha256"]
    if old != new:
        diffs.insert(0, f"model: bundle manifest sha256 {str(old)[:12]}... ({(have.get('model') or {}).get('source')}) "
                        f"there, {new[:12]}... ({want['model']['source']}) now")
    return diffs


def _refuse_other_job(out: Path, diffs: list[str]) -> RecommendError:
    return RecommendError(f"{out} holds the recommendations of another job ({'; '.join(diffs)}); nothing was "
                          "changed: use another --out, or delete it to start over")


# ----------------------------------------------------------------------------------------------- the model
def _is_bundle_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_FILE).is_file() and not (path / "model.safetensors").exists()


def _open(path: Path) -> tuple[Bundle, str]:
    # One ONNX Runtime and one FAISS thread: the job's worker threads are its parallelism (see the module docstring).
    bundle = open_bundle(path, intra_op_num_threads=1, faiss_threads=1)
    return bundle, hashlib.sha256((Path(path) / MANIFEST_FILE).read_bytes()).hexdigest()


def _entry(source: str, kind: str, bundle: Bundle, sha: str, path: str, fingerprint: str | None = None,
           label: str | None = None) -> dict[str, Any]:
    return {"bundle_manifest_sha256": sha, "model_version": label or default_version(bundle.manifest, sha),
            "source": source, "source_kind": kind, "bundle": path, "checkpoint_fingerprint": fingerprint}


def _check_k(k: int, num_items: int) -> None:
    if k > num_items:
        raise RecommendError(f"--k {k} exceeds the model's {num_items} items")


def _checkpoint_meta(source: str) -> dict[str, Any]:
    """The metadata of a checkpoint SOURCE (without its tensors); a missing one is the user's error."""
    meta = read_meta(source)
    if not meta.get("fingerprint"):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such bundle directory, checkpoint or run directory")
        raise RecommendError(f"{source}: neither a serving bundle (no {MANIFEST_FILE}) nor a compress checkpoint")
    return meta


def _exported_from(bundle_dir: Path) -> tuple[str | None, str | None]:
    """(checkpoint fingerprint, requested index factory) recorded in an exported bundle's manifest."""
    try:
        manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, None
    return (manifest.get("lineage") or {}).get("checkpoint_fingerprint"), (manifest.get("index") or {}).get("requested")


def _prepare_model(source: str, out: Path, existing: dict[str, Any] | None, k: int, index_factory: str) -> Model:
    """Rank 0: the bundle that answers (exporting a checkpoint to DIR/_bundle first), opened and verified."""
    if source.startswith(MODELS_PREFIX):
        label, path, _ = resolve_registered_bundle(source)
        bundle, sha = _open(path)
        return Model(bundle, sha, _entry(source, "registry", bundle, sha, str(path), label=label))
    if _is_bundle_dir(Path(source)):
        bundle, sha = _open(Path(source))
        return Model(bundle, sha, _entry(source, "bundle", bundle, sha, str(Path(source).resolve())))
    meta = _checkpoint_meta(source)
    fingerprint = str(meta["fingerprint"])
    if isinstance((meta.get("model") or {}).get("num_items"), int):
        _check_k(k, meta["model"]["num_items"])  # before an export, which would write into DIR
    target = out / BUNDLE_DIR
    if target.exists():
        exported, factory = _exported_from(target)
        if exported != fingerprint:
            raise RecommendError(f"{target} was exported from a checkpoint with weights fingerprint {exported}, "
                                 f"{source} has {fingerprint}; nothing was changed: use another --out")
        if factory != index_factory:
            raise RecommendError(f"{target} was exported with --index {factory}, not {index_factory}; nothing was "
                                 "changed: use another --out (or the same --index)")
        logger.info("reusing %s (exported from checkpoint %s)", target, fingerprint)
    elif existing is not None:  # a fresh export has a new manifest sha: it can never continue the recorded job
        raise _refuse_other_job(out, [f"model: {existing['model'].get('source')} there, checkpoint {source} (not "
                                      f"exported in {out}) now"])
    else:
        from export.from_checkpoint import export_checkpoint  # torch and the exporter: only a checkpoint needs them

        for tmp in out.glob(f".{BUNDLE_DIR}.tmp-*") if out.is_dir() else ():  # an export killed half-way
            shutil.rmtree(tmp, ignore_errors=True)
        export_checkpoint(source, target, index_factory=index_factory, lineage_extra={"recommend_out": str(out)})
    bundle, sha = _open(target)
    return Model(bundle, sha, _entry(source, "checkpoint", bundle, sha, BUNDLE_DIR, fingerprint=fingerprint))


def _join_model(source: str, out: Path, manifest: dict[str, Any]) -> Model:
    """Ranks > 0: the bundle rank 0 recorded, after checking that this rank's SOURCE names the same model."""
    entry = manifest["model"]
    want = entry["bundle_manifest_sha256"]
    if source.startswith(MODELS_PREFIX):
        label = version_label(resolve_model_version(source))
        if label != entry.get("model_version"):
            raise _refuse_other_job(out, [f"model: {entry.get('model_version')} there, {label} now"])
        path = Path(entry["bundle"])
        if not path.is_dir():  # another machine's cache: fetch this one's own copy
            _, path, _ = resolve_registered_bundle(label)
    elif _is_bundle_dir(Path(source)):
        path = Path(source)
    else:
        fingerprint = str(_checkpoint_meta(source)["fingerprint"])
        if fingerprint != entry.get("checkpoint_fingerprint"):
            raise _refuse_other_job(out, [f"model: checkpoint fingerprint {entry.get('checkpoint_fingerprint')} "
                                          f"there, {fingerprint} now"])
        path = out / BUNDLE_DIR
    bundle, sha = _open(path)
    if sha != want:
        raise _refuse_other_job(out, [f"model: bundle manifest sha256 {want[:12]}... there, {sha[:12]}... "
                                      f"({source}) now"])
    return Model(bundle, sha, entry)


# ------------------------------------------------------------------------------------------------ the plan
def answer_sizes(bundle: Bundle, k: int, exclude_seen: bool) -> np.ndarray:
    """Rows per user: min(k, items the recommender may return), as `Recommender.recommend` answers."""
    n = bundle.num_items
    if not exclude_seen:
        return np.full(bundle.num_users, min(k, n), dtype=np.int64)
    lens = np.diff(bundle.seen_indptr)
    rows = np.repeat(np.arange(bundle.num_users, dtype=np.int64), lens)
    keys = np.sort(rows * n + bundle.seen_indices)  # a CSR may repeat an item: count distinct (user, item) keys
    distinct = keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else keys
    seen = np.bincount(distinct // n, minlength=bundle.num_users)
    return np.minimum(k, n - seen).astype(np.int64)


def _plan(sizes: np.ndarray, shard_users: int) -> list[dict[str, Any]]:
    num_users = sizes.size
    shards = []
    for s in range(math.ceil(num_users / shard_users)):
        lo, hi = s * shard_users, min(num_users, (s + 1) * shard_users)
        shards.append({"file": part_name(s), "first_user": lo, "users": hi - lo, "rows": int(sizes[lo:hi].sum())})
    return shards


def _new_manifest(model: Model, k: int, exclude_seen: bool, shard_users: int, sizes: np.ndarray) -> dict[str, Any]:
    shards = _plan(sizes, shard_users)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.entry, "k": k,
            "exclude_seen": exclude_seen, "shard_users": shard_users, "num_users": model.bundle.num_users,
            "num_items": model.bundle.num_items, "num_shards": len(shards), "rows": int(sizes.sum()),
            "shards": shards, "complete": False, "completed_at": None,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _publish(path: Path, data: bytes) -> None:
    """Atomically write an output file, readable by the jobs downstream (the temp file is private, 0600)."""
    atomic_write_bytes(path, data)
    os.chmod(path, READABLE)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    _publish(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------- the shards
def shard_problem(path: Path, rows: int, sha: str) -> str | None:
    """Why the shard file at `path` is not a finished shard of this job (None: it is). Reads the footer only."""
    pa, pq = _arrow()
    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        return f"not readable Parquet ({' '.join(str(e).split())[:200]})"
    if not schema.remove_metadata().equals(_schema()):
        return f"schema {schema.names} is not {_schema().names}"
    if (schema.metadata or {}).get(SHA_KEY, b"").decode() != sha:
        return "written from another model"
    if meta.num_rows != rows:
        return f"{meta.num_rows} rows, {rows} planned"
    return None


def _remove_temps(out: Path, shard: int) -> None:
    for tmp in out.glob(f".{part_name(shard)}.*.tmp"):
        logger.info("removing %s (a shard write that did not finish)", tmp.name)
        tmp.unlink(missing_ok=True)


def compute_shard(rec: Recommender, lo: int, hi: int, k: int, exclude_seen: bool, item_ids: pa.Array | None = None,
                  pool: ThreadPoolExecutor | None = None, progress=None) -> pa.Table:
    """The answers of users [lo, hi) as one table, rows by user then rank (`item_ids`: the bundle's, as Arrow).

    With `pool`, its threads answer CHUNK_USERS users each (the recommender only reads the bundle, and numpy,
    ONNX Runtime and FAISS release the GIL while they compute); the answers do not depend on who computed them.
    """
    pa, pq = _arrow()
    bundle = rec.bundle
    users = np.arange(lo, hi, dtype=np.int64)
    # As /recommend/batch does: similar history lengths per call, so an approximate index's over-fetch fits them.
    order = np.argsort(np.diff(bundle.seen_indptr)[lo:hi], kind="stable") if exclude_seen else np.arange(users.size)
    parts = [order[start : start + CHUNK_USERS] for start in range(0, order.size, CHUNK_USERS)]
    answer = lambda part: rec.recommend(users[part], k, exclude_seen)  # noqa: E731
    items: list[np.ndarray] = [None] * users.size  # type: ignore[list-item]
    scores: list[np.ndarray] = [None] * users.size  # type: ignore[list-item]
    for part, answers in zip(parts, pool.map(answer, parts) if pool is not None else map(answer, parts)):
        for pos, (got, val) in zip(part.tolist(), answers):
            items[pos], scores[pos] = got, val
        if progress is not None:
            progress.update(part.size)
    lens = np.fromiter((a.size for a in items), dtype=np.int64, count=users.size)
    total = int(lens.sum())
    item_idx = np.concatenate(items) if total else np.empty(0, dtype=np.int64)
    score = np.concatenate(scores).astype(np.float32, copy=False) if total else np.empty(0, dtype=np.float32)
    row_user = np.repeat(np.arange(users.size, dtype=np.int64), lens)
    rank = (np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens) + 1).astype(np.int32)
    user_ids = pa.array(bundle.user_ids[lo:hi], type=pa.string()).take(pa.array(row_user))
    if item_ids is None:
        item_ids = pa.array(bundle.item_ids, type=pa.string())
    return pa.Table.from_arrays([user_ids, pa.array(rank), item_ids.take(pa.array(item_idx)), pa.array(score)],
                                schema=_schema())


def _write_shard(path: Path, table: pa.Table, sha: str, shard: int) -> None:
    pa, pq = _arrow()
    table = table.replace_schema_metadata({SHA_KEY: sha.encode(), SHARD_KEY: str(shard).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _publish(path, sink.getvalue().to_pybytes())


def _wait_for(what: str, ready, wait_s: float):
    deadline = time.monotonic() + wait_s
    while True:
        got = ready()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RecommendError(f"waited {wait_s:g} s for {what}")
        time.sleep(POLL_S)


# ------------------------------------------------------------------------------------------------- the job
def _lead(source: str, out: Path, k: int, shard_users: int, exclude_seen: bool,
          index_factory: str) -> tuple[Model, dict[str, Any], set[int]]:
    """Rank 0: the model, the job's manifest (written now for a new job) and the shards finished before this run."""
    existing = _check_out(out)
    done_before = {s for s, e in enumerate((existing or {}).get("shards") or []) if (out / e["file"]).is_file()}
    model = _prepare_model(source, out, existing, k, index_factory)
    _check_k(k, model.bundle.num_items)
    manifest = _new_manifest(model, k, exclude_seen, shard_users, answer_sizes(model.bundle, k, exclude_seen))
    if existing is None:
        out.mkdir(parents=True, exist_ok=True)
        _write_manifest(out, manifest)
        return model, manifest, done_before
    diffs = _differences(existing, manifest)
    if diffs:
        raise _refuse_other_job(out, diffs)
    if existing.get("complete") and len(done_before) < len(existing["shards"]):  # a shard was deleted since
        (out / SUCCESS).unlink(missing_ok=True)
        existing = {**existing, "complete": False, "completed_at": None}
        _write_manifest(out, existing)
    return model, existing, done_before


def _follow(source: str, out: Path, k: int, shard_users: int, exclude_seen: bool,
            wait_s: float) -> tuple[Model, dict[str, Any]]:
    """Ranks > 0: rank 0's manifest, once it is there, checked against this rank's arguments; the same model."""
    if out.exists() and not out.is_dir():
        raise RecommendError(f"--out {out}: exists and is not a directory")
    manifest = _wait_for(f"{out / MANIFEST} from rank 0", lambda: _read_manifest(out), wait_s)
    wanted = {"format_version": FORMAT_VERSION, "k": k, "exclude_seen": exclude_seen, "shard_users": shard_users}
    diffs = [f"{key} {manifest.get(key)!r} there, {wanted[key]!r} now" for key in IDENTITY
             if manifest.get(key) != wanted[key]]
    if diffs:
        raise _refuse_other_job(out, diffs)
    return _join_model(source, out, manifest), manifest


def _compute(model: Model, manifest: dict[str, Any], out: Path, ranks: Ranks, threads: int, progress: bool,
             done_before: set[int]) -> None:
    """Write this rank's shards that are not finished yet (a shard that fails its check leaves `done_before`)."""
    pa, pq = _arrow()
    shards, k, exclude_seen = manifest["shards"], manifest["k"], manifest["exclude_seen"]
    todo = []
    for s in range(ranks.rank, len(shards), ranks.world):
        _remove_temps(out, s)
        path = out / shards[s]["file"]
        if path.exists():
            problem = shard_problem(path, shards[s]["rows"], model.sha256)
            if problem is None:
                continue
            logger.warning("%s: %s; computing it again", path, problem)
            done_before.discard(s)
        todo.append(s)
    if not todo:
        return
    # numpy's BLAS at one thread (see the module docstring); `threads` worker threads answer chunks instead.
    rec = Recommender(model.bundle, blas_threads=1)
    item_ids = pa.array(model.bundle.item_ids, type=pa.string())
    slow_s = float(os.environ.get(SLOW_ENV) or 0)
    from tqdm.auto import tqdm

    pool = ThreadPoolExecutor(threads, thread_name_prefix="recommend") if threads > 1 else None
    try:
        with tqdm(total=sum(shards[s]["users"] for s in todo), unit="user", desc="recommend", file=sys.stderr,
                  disable=not progress or ranks.rank != 0 or None, dynamic_ncols=True) as bar:
            for s in todo:
                lo, entry = shards[s]["first_user"], shards[s]
                table = compute_shard(rec, lo, lo + entry["users"], k, exclude_seen, item_ids, pool, bar)
                if table.num_rows != entry["rows"]:  # the plan and the recommender disagree: a bug, not a user error
                    raise RuntimeError(f"shard {s}: {table.num_rows} rows computed, {entry['rows']} planned")
                _write_shard(out / entry["file"], table, model.sha256, s)
                if slow_s:
                    time.sleep(slow_s)
    finally:
        if pool is not None:  # on Ctrl-C or an error, drop the chunks not started yet
            pool.shutdown(wait=True, cancel_futures=True)


def _complete(out: Path, manifest: dict[str, Any], model: Model, ranks: Ranks, wait_s: float) -> dict[str, Any]:
    """Rank 0: once every shard is there and checks out, mark the job complete (_manifest.json, then _SUCCESS)."""
    shards = manifest["shards"]
    _wait_for(f"the shards of the other {ranks.world - 1} rank(s) in {out}",
              lambda: all((out / e["file"]).is_file() for e in shards), wait_s)
    for entry in shards:
        problem = shard_problem(out / entry["file"], entry["rows"], model.sha256)
        if problem is not None:
            raise RecommendError(f"{out / entry['file']}: {problem}; re-run the command to redo it")
    if not manifest.get("complete"):
        manifest = {**manifest, "complete": True,
                    "completed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        _write_manifest(out, manifest)
    if not (out / SUCCESS).exists():
        _publish(out / SUCCESS, b"")
    return manifest


def run_recommend(source: str, out: str | Path, *, k: int = 10, shard_users: int = DEFAULT_SHARD_USERS,
                  exclude_seen: bool = True, index_factory: str = "Flat", threads: int = 0, progress: bool = True,
                  wait_s: float = DEFAULT_WAIT_S, ranks: Ranks | None = None) -> dict[str, Any] | None:
    """Write (or finish) the top-k of every user of SOURCE into `out` (see the module docstring).

    Returns the summary on rank 0 ({"out", "users", "shards", "skipped_shards", "rows", "seconds",
    "users_per_s"}; users_per_s counts the users computed by this run), None on other ranks. Raises
    RecommendError (and the bundle's, checkpoint's and registry's own errors) for what the user must change.
    """
    t0 = time.perf_counter()
    out = Path(out)
    ranks = ranks or Ranks.from_env()
    if isinstance(k, bool) or k < 1:
        raise RecommendError(f"--k must be at least 1, got {k}")
    if shard_users < 1:
        raise RecommendError(f"--shard-users must be at least 1, got {shard_users}")
    threads = threads or max(1, available_cores() // ranks.local_world)
    configure_threads(threads)  # torch and FAISS for an export; the bundle is then read with one thread per pool
    if ranks.rank == 0:
        model, manifest, done_before = _lead(source, out, k, shard_users, exclude_seen, index_factory)
    else:
        (model, manifest), done_before = _follow(source, out, k, shard_users, exclude_seen, wait_s), set()
    _compute(model, manifest, out, ranks, threads, progress, done_before)
    if ranks.rank != 0:
        return None
    manifest = _complete(out, manifest, model, ranks, wait_s)
    seconds = time.perf_counter() - t0
    computed = sum(e["users"] for s, e in enumerate(manifest["shards"]) if s not in done_before)
    return {"out": str(out), "users": manifest["num_users"], "shards": len(manifest["shards"]),
            "skipped_shards": len(done_before), "rows": manifest["rows"], "seconds": round(seconds, 3),
            "users_per_s": round(computed / seconds, 1) if seconds > 0 else None}


# ------------------------------------------------------------------------------------------------- the CLI
@click.command("recommend")
@click.argument("source")
@click.option("--out", required=True, metavar="DIR",
              help="Output directory: _manifest.json, part-NNNNN.parquet shards, _SUCCESS when complete (and bundle/ "
                   "for a checkpoint SOURCE).")
@click.option("--k", type=int, default=10, show_default=True, help="Items per user (at most the model's item count).")
@click.option("--shard-users", type=int, default=DEFAULT_SHARD_USERS, show_default=True,
              help="Users per Parquet shard (a contiguous block of the model's user order); the unit of resume and "
                   "of the split over ranks.")
@click.option("--exclude-seen/--no-exclude-seen", default=True, show_default=True,
              help="Leave out each user's training items (as the server's exclude_seen does).")
@click.option("--index", "index_factory", default="Flat", show_default=True, metavar="FACTORY",
              help="For a checkpoint SOURCE: the FAISS index of the bundle exported to DIR/_bundle (see compress "
                   "export --index). Flat scores every item exactly.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker threads answering users in each process (ONNX Runtime, FAISS and numpy's BLAS keep one "
                   "thread each); 0 = the usable cores divided by the processes torchrun starts on this machine "
                   "(LOCAL_WORLD_SIZE).")
@click.option("--wait-s", type=click.FloatRange(min=0), default=DEFAULT_WAIT_S, show_default=True,
              help="Under torchrun: how long the other ranks wait for rank 0's _manifest.json, and rank 0 for the "
                   "other ranks' shards.")
@options.QUIET
@options.tracking_uri("MLflow server that resolves a models:/ SOURCE.", expose=False)
@user_errors
def recommend_command(source, out, k, shard_users, exclude_seen, index_factory, threads, wait_s, quiet):
    """Top-k items for every user of SOURCE into Parquet shards: the offline (nightly) counterpart of the server.

    SOURCE is a serving bundle directory, a models:/NAME/VERSION or models:/NAME@ALIAS URI, or a checkpoint (a
    `compress train`/`distill` run directory or .safetensors), which is first exported to DIR/_bundle. Answers come
    from the server's own bundle reader and recommender: the same items, order and scores as POST /recommend.
    DIR gets part-NNNNN.parquet shards (user_id, rank 1 = best, item_id, score; --shard-users users each, in the
    model's user order), _manifest.json (the model's bundle sha256, k, the shard plan; complete: true at the end)
    and _SUCCESS when every shard is there. Prints a one-line JSON summary.

    Resume: kill it at any point and re-run the same command. Finished shards are kept, never rewritten; a
    half-written one is redone. Into a DIR that holds another model's recommendations, or another --k,
    --shard-users or --exclude-seen, it refuses and changes nothing.

    Ranks: under torchrun each process computes every WORLD_SIZE-th shard with no process group; rank 0 writes
    _manifest.json first, shows the progress bar, waits for the other ranks' shards and prints the summary. A job
    killed under torchrun may resume on one process, and the other way round.

    \b
      compress recommend runs/student --out recs/ --k 20
      torchrun --standalone --nproc-per-node 4 -m compress_app recommend bundles/student --out recs/
    """
    ranks = Ranks.from_env()
    setup_logging(quiet or ranks.rank != 0)
    try:
        summary = run_recommend(source, out, k=k, shard_users=shard_users, exclude_seen=exclude_seen,
                                index_factory=index_factory, threads=threads, progress=not quiet,
                                wait_s=wait_s, ranks=ranks)
    except KeyboardInterrupt:
        click.echo("interrupted; finished shards are kept: re-run the same command to continue", err=True)
        sys.exit(INTERRUPTED_EXIT)
    if summary is not None:
        click.echo(json.dumps(summary))
