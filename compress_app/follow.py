"""`compress serve models:/NAME@ALIAS --follow-alias`: keep a running server on whatever version the alias names.

This process (the application: it may talk to MLflow) runs the server (`python -m serving`, which never imports
MLflow, torch or the training code) as a child and polls the registry. When the alias moves, it downloads the new
version's bundle, verifies it as the server will, and hands it over through the server's control file; every
worker then swaps it in without dropping a request (see serving's control file). A version that fails to
download or verify is not handed over: the old one keeps serving. An unreachable registry never stops serving:
polls back off, and each change of state (lost, back, refused version) is logged once.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.bundle import BundleError, verify_bundle
from serving.swap import ControlError, Target, read_control, write_control

from .sources import version_label
from .tracking import TrackingError, download_registered_bundle
from .tracking.registry import resolve_model_version

log = logging.getLogger("compress_app.follow")

MAX_BACKOFF_S = 300.0


class AliasFollower:
    def __init__(self, uri: str, control_file: Path, current: str, poll_s: float):
        self.uri, self.control_file, self.current, self.poll_s = uri, control_file, current, poll_s
        self.bundle: Path | None = None  # the bundle of ``current`` once this follower handed it over
        self.refused: str | None = None  # the version last refused, so a bad version is reported once
        self.failing = False
        self.delay = poll_s

    def poll_once(self) -> None:
        try:
            mv = resolve_model_version(self.uri)
        except TrackingError as e:
            self._failed(f"cannot resolve {self.uri} ({e}); still serving {self.current}")
            return
        label = version_label(mv)
        if self.failing:
            log.info("registry reachable again; %s names %s", self.uri, label)
        self.failing, self.delay = False, self.poll_s
        if label == self.refused:
            return
        if label == self.current:
            self._reassert()
            return
        try:
            bundle = download_registered_bundle(label)
            verify_bundle(bundle)
        except (TrackingError, BundleError) as e:
            self.refused = label
            log.error("%s moved to %s, which is not served: %s; still serving %s", self.uri, label, e, self.current)
            return
        self._hand_over(bundle, label)
        log.info("%s moved to %s: handed to the server (was %s)", self.uri, label, self.current)
        self.current, self.bundle, self.refused = label, bundle, None

    def _hand_over(self, bundle: Path, label: str) -> None:
        """Ask every worker of the server to swap to ``bundle`` (serving's control file)."""
        write_control(str(self.control_file), Target(str(Path(bundle).resolve()), label))

    def _reassert(self) -> None:
        """The server writes its initial bundle into the control file while it starts; a hand-over made before
        that is overwritten, so whenever the file names another version, ours is written again."""
        try:
            named = read_control(str(self.control_file)).version
        except ControlError:
            return  # not written yet by the starting server: the next poll looks again
        if named != self.current and self.bundle is not None:
            self._hand_over(self.bundle, self.current)

    def _failed(self, message: str) -> None:
        if not self.failing:
            log.warning("%s; retrying with backoff", message)
        self.failing = True
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


def serve_following(uri: str, argv: list[str], control_file: Path, current: str, poll_s: float) -> int:
    """Run the server ``argv`` as a child and follow ``uri``; SIGTERM/SIGINT stop both."""
    server = subprocess.Popen(argv)

    def stop(signum, frame):
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return AliasFollower(uri, control_file, current, poll_s).run(server)
