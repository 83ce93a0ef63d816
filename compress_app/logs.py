"""Logging of the `compress` commands: the terminal (stderr; stdout carries the JSON result) and a run's log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
PIPELINE_LOGGER = "compress_app.pipeline"
# Libraries whose INFO lines are noise on a terminal (connection pools, migrations, font lookups).
NOISY_LOGGERS = ("urllib3", "mlflow", "alembic", "httpx", "matplotlib", "PIL", "faiss.loader")


class _LazyFileHandler(logging.FileHandler):
    """Appends to its file, which (with its directory) is created only when the first line is logged: a command
    refused before it logs anything leaves no empty run directory behind."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def log_file_handler(path: Path) -> logging.FileHandler:
    handler = _LazyFileHandler(path)
    handler.setFormatter(LOG_FORMAT)
    return handler


def setup_logging(quiet: bool = False, logfile: Path | None = None) -> None:
    """INFO to stderr (WARNING with ``quiet``) and, with ``logfile``, everything to that file."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(LOG_FORMAT)
    terminal.setLevel(logging.WARNING if quiet else logging.INFO)
    root.addHandler(terminal)
    if logfile is not None:
        root.addHandler(log_file_handler(logfile))
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_pipeline_logging(stage_lines_only: bool, logfile: Path | None) -> None:
    """The pipeline's logging: everything to its log file; with ``stage_lines_only`` (--quiet, and the scratch
    process beside the teacher, whose terminal the teacher's progress bar owns) only stage lines and problems on
    the terminal."""
    setup_logging(stage_lines_only, logfile)
    if stage_lines_only:
        logging.getLogger(PIPELINE_LOGGER).setLevel(logging.INFO)
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.addFilter(lambda r: r.name == PIPELINE_LOGGER or r.levelno >= logging.WARNING)
                h.setLevel(logging.INFO)
