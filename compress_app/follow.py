"""`compress serve models:/NAME@ALIAS --follow-alias`: keep a running server on whatever version the alias names.

This process (the application: it may talk to MLflow) runs the server (`python -m serving`, which never imports
MLflow, torch or the training code) as a child and polls the registry. When the alias moves, it downloads the new
version's bundle, verifies it (every file against the manifest, the manifest against the sha256 registered with
the version) and hands it over through the server's control file, pinned to that manifest; every worker then
swaps it in without dropping a request (serving.swap). A version that cannot be served (no bundle, or a bundle
that fails verification twice) is refused once and not retried until the alias moves again; a download that
fails for any other reason, or an unreachable registry, is retried with backoff while the old version serves.
Each change of state is logged once. The server dies with this process (Linux: the parent-death signal), and
POST /admin/swap is off on it: the alias alone chooses what it serves.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.bundle import BundleError
from serving.swap import ControlError, Target, read_control, write_control

from .sources import version_label
from .tracking import TrackingError
from .tracking.registry import NoBundleError, fetch_verified_bundle, resolve_model_version

log = logging.getLogger("compress_app.follow")

MAX_BACKOFF_S = 300.0
PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 30.0


class AliasFollower:
    def __init__(self, uri: str, control_file: Path, current: str, bundle: Path, digest: str, poll_s: float):
        self.uri, self.control_file, self.poll_s = uri, control_file, poll_s
        self.current, self.target = current, Target(str(Path(bundle).resolve()), current, digest)
        self.refused: str | None = None  # a version that cannot be served, reported once
        self.problem: str | None = None  # the transient failure last logged (registry, download), if any
        self.delay = poll_s

    def poll_once(self) -> None:
        try:
            label = version_label(resolve_model_version(self.uri))
            if label == self.refused:
                self._ok()
                return
            if label == self.current:
                self._ok()
                self._reassert()
                return
            bundle, digest = fetch_verified_bundle(label)
        except (NoBundleError, BundleError) as e:
            self.refused = label
            self._ok()
            log.error("%s moved to %s, which cannot be served: %s; still serving %s", self.uri, label, e,
                      self.current)
            return
        except TrackingError as e:
            self._failed(f"{e}; still serving {self.current}")
            return
        except Exception as e:  # noqa: BLE001 - a cache or disk problem must not stop following (or serving)
            self._failed(f"following {self.uri} failed ({type(e).__name__}: {e}); still serving {self.current}")
            return
        self._ok()
        self.target = Target(str(Path(bundle).resolve()), label, digest)
        self._hand_over()
        log.info("%s moved to %s: handed to the server (was %s)", self.uri, label, self.current)
        self.current, self.refused = label, None

    def _hand_over(self) -> None:
        """Ask every worker of the server to swap to the target (serving's control file)."""
        write_control(str(self.control_file), self.target)

    def _reassert(self) -> None:
        """The server writes its initial bundle into the control file while it starts; a hand-over made before
        that is overwritten, so whenever the file names another version, ours is written again."""
        try:
            named = read_control(str(self.control_file)).version
        except ControlError:
            return  # not written yet by the starting server: the next poll looks again
        if named != self.current:
            self._hand_over()

    def _ok(self) -> None:
        if self.problem is not None:
            log.info("following %s again (%s names %s)", self.uri, self.uri, self.current)
        self.problem, self.delay = None, self.poll_s

    def _failed(self, message: str) -> None:
        if message != self.problem:
            log.warning("%s; retrying with backoff", message)
        self.problem = message
        self.delay = min(MAX_BACKOFF_S, self.delay * 2)

    def run(self, server: subprocess.Popen) -> int:
        """Poll until the server exits; returns its exit status."""
        while True:
            deadline = time.monotonic() + self.delay
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    return server.returncode
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            self.poll_once()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the finally below still stops the server
        pass


def serve_following(uri: str, argv: list[str], control_file: Path, current: str, bundle: Path, digest: str,
                    poll_s: float) -> int:
    """Run the server ``argv`` as a child and follow ``uri``; SIGTERM and Ctrl-C stop both, gracefully."""
    follower = AliasFollower(uri, control_file, current, bundle, digest, poll_s)
    stopping: list[int] = []

    def stop(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server = subprocess.Popen([*argv, "--admin-swap-owner", f"compress serve --follow-alias {uri}"],
                              preexec_fn=_die_with_parent)
    try:
        return follower.run(server)
    except KeyboardInterrupt:
        return 128 + (stopping[0] if stopping else signal.SIGINT)
    finally:
        if server.poll() is None:
            # Ctrl-C in a terminal already reached the server (same process group): a second signal would force
            # uvicorn out mid-request, so give it the grace period first.
            if not stopping or stopping[0] != signal.SIGINT:
                server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
