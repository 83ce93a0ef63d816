"""Which bundle a worker serves, and zero-downtime swaps to another one.

The control file (`--control-file`, default `control.json` in the server's state directory) says what every
worker should serve:

    {"bundle": "/absolute/bundle/dir", "version": "label", "manifest_sha256": "hex"}

("version" optional or null: the default label; "manifest_sha256" optional: when given, a bundle whose
manifest.json hashes differently is refused, so a directory rewritten after the writer verified it is not served
under the old label.)

Whoever wants a swap writes it atomically (`write_control`: temp file in the same directory + rename);
`serve()` writes the initial bundle there before the workers start, so a worker that uvicorn restarts
serves what the others serve. Each worker's `BundleSlot` polls the file's content (it is tiny: comparing
bytes cannot miss a rewrite that kept inode, size and timestamp) every `swap_poll_s` seconds on a background thread; on a change it opens and verifies the named bundle on
that thread, builds its recommender and replaces its reference in one assignment. Requests hold the
`LoadedBundle` they started with until they finish, so each answer comes from exactly one version.
A bundle that fails is not swapped in: the old one keeps serving, and the failure is logged and counted
once per change of the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from serving.bundle import BundleError
from serving.config import ServeConfig
from serving.loaded import LoadedBundle, load
from serving.metrics import Metrics
from serving.schema import BUNDLE_PATH_PATTERN, SWAP_FIELDS, version_problem

logger = logging.getLogger(__name__)

Stamp = bytes
CONTROL_FIELDS = (*SWAP_FIELDS, "manifest_sha256")


class ControlError(ValueError):
    """The control file cannot be read or says something invalid; one line."""


@dataclass(frozen=True)
class Target:
    bundle: str
    version: str | None = None
    manifest_sha256: str | None = None  # the manifest the writer verified; None: whatever the directory holds


def write_control(path: str, target: Target) -> None:
    """Replace the control file atomically: readers see the old content or the new, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".control-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"bundle": target.bundle, "version": target.version,
                       "manifest_sha256": target.manifest_sha256}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def stamp(path: str) -> Stamp | None:
    """The control file's content (at most 64 KiB), or None when it is missing or unreadable."""
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 16)
    except OSError:
        return None


def read_control(path: str) -> Target:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(1 << 16)
        doc: Any = json.loads(raw)
    except OSError as exc:
        raise ControlError(f"control file {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ControlError(f"control file {path}: not JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(doc, dict) or set(doc) - set(CONTROL_FIELDS) or not isinstance(doc.get("bundle"), str):
        raise ControlError(f'control file {path}: expected {{"bundle": "/absolute/dir", "version": "label", '
                           f'"manifest_sha256": "hex"}}')
    bundle, version, digest = doc["bundle"], doc.get("version"), doc.get("manifest_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise ControlError(f"control file {path}: manifest_sha256 must be 64 lowercase hex digits")
    if not os.path.isabs(bundle) or "\x00" in bundle:
        raise ControlError(f"control file {path}: bundle must be an absolute path (pattern {BUNDLE_PATH_PATTERN})")
    if version is not None and (problem := version_problem(version)):
        raise ControlError(f"control file {path}: version {problem}")
    return Target(os.path.normpath(bundle), version, digest)


class BundleSlot:
    """The bundle this worker serves now (`current`), loading it, and swapping it for another."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.current: LoadedBundle | None = None
        self.load_error: str | None = None
        self._lock = threading.Lock()  # one install at a time; also guards the swap counters
        self._stop = threading.Event()
        self._initial_done = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ loading
    def start(self) -> None:
        """Load the initial bundle, then watch the control file, on one background thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bundle-slot", daemon=True)
            self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait for the initial load to finish (or fail); whether a bundle is being served."""
        if self._thread is not None:
            self._initial_done.wait(timeout)
        return self.current is not None

    def stop(self) -> None:
        self._stop.set()

    def open(self, target: Target) -> LoadedBundle:
        """Open, verify and prepare a bundle (blocking); raises BundleError or OSError."""
        loaded = load(target.bundle, target.version, self.config)
        if target.manifest_sha256 and loaded.manifest_sha256 != target.manifest_sha256:
            raise BundleError(f"{target.bundle}: manifest.json sha256 {loaded.manifest_sha256[:12]}... is not the "
                              f"{target.manifest_sha256[:12]}... the swap named (the directory changed after it "
                              "was verified)")
        return loaded

    def install(self, loaded: LoadedBundle, *, swap: bool, unless: Target | None = None) -> bool:
        """Serve `loaded` from now on; with `unless`, only if this worker does not serve that target already
        (a watcher that loaded what a POST /admin/swap in this worker installed meanwhile)."""
        with self._lock:
            current = self.current
            if unless is not None and current is not None and current.serves(unless.bundle, unless.version):
                return False
            self.current = loaded
            self.load_error = None
            if swap:
                self.metrics.swapped()
            self.metrics.set_version(loaded.version)
            self.metrics.set_ready(True)
            return True

    def failed(self, message: str) -> None:
        with self._lock:
            self.metrics.swap_failed()
        logger.error("swap refused, still serving %s: %s", self.current.version if self.current else "nothing", message)

    def _run(self) -> None:
        control = self.config.control_file
        baseline = stamp(control) if control else None
        try:
            self._load_initial(control)
        finally:
            self._initial_done.set()
        if control:
            self._watch(control, baseline)

    def _load_initial(self, control: str | None) -> None:
        if self.config.load_delay_s:
            time.sleep(self.config.load_delay_s)
        started = time.perf_counter()
        target = Target(os.path.normpath(self.config.bundle_path), self.config.model_version)
        if control:
            try:
                target = read_control(control)
            except ControlError as exc:
                logger.warning("%s; serving %s", exc, target.bundle)
        try:
            loaded = self.open(target)
        except Exception as exc:
            if target.bundle != os.path.normpath(self.config.bundle_path):
                logger.error("bundle %s named by the control file failed (%s); serving %s", target.bundle,
                             _one_line(exc), self.config.bundle_path)
                return self._load_initial_fallback()
            self._record_load_error(target.bundle, exc)
            return
        self.install(loaded, swap=False)
        logger.info("worker %d ready in %.2f s: version %s, %d users, %d items", os.getpid(),
                    time.perf_counter() - started, loaded.version, len(loaded.user_index), len(loaded.item_ids))

    def _load_initial_fallback(self) -> None:
        target = Target(os.path.normpath(self.config.bundle_path), self.config.model_version)
        try:
            loaded = self.open(target)
        except Exception as exc:
            self._record_load_error(target.bundle, exc)
            return
        self.install(loaded, swap=False)

    def _record_load_error(self, bundle: str, exc: BaseException) -> None:
        self.load_error = _one_line(exc) if isinstance(exc, (BundleError, OSError)) else f"{type(exc).__name__}: {_one_line(exc)}"
        if isinstance(exc, BundleError):
            logger.error("bundle %s failed verification: %s", bundle, exc)
        else:
            logger.error("loading bundle %s failed", bundle, exc_info=exc)

    # ----------------------------------------------------------------- watching
    def _watch(self, control: str, last: Stamp | None) -> None:
        while not self._stop.wait(self.config.swap_poll_s):
            now = stamp(control)
            if now is None or now == last:
                continue
            last = now
            try:
                self._follow(control, now)
            except Exception:  # a bug here must not end the watching; the old bundle keeps serving
                logger.exception("handling a change of control file %s failed", control)

    def _follow(self, control: str, seen: Stamp) -> None:
        """Swap to what the control file (as of `seen`) names, unless this worker serves it already."""
        try:
            target = read_control(control)
        except ControlError as exc:
            self.failed(str(exc))
            return
        current = self.current
        if current is not None and current.serves(target.bundle, target.version):
            return
        try:
            loaded = self.open(target)
        except Exception as exc:  # a bad bundle must never stop the watcher or the old bundle
            message = _one_line(exc)
            self.failed(message if message.startswith(target.bundle) else f"{target.bundle}: {message}")
            return
        if stamp(control) != seen:
            return  # the file changed again while loading: the next poll swaps to its new content
        if self.install(loaded, swap=True, unless=target):
            logger.info("worker %d swapped to version %s (%s)", os.getpid(), loaded.version, loaded.path)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
