"""The one place where user mistakes become a one-line `Error: ...` and exit status 1, never a traceback.

The library raises ``compressor.errors.CompressError`` subclasses (config, data, checkpoint, teacher, device,
training; export's ``ExportError`` and MLflow's ``TrackingError`` derive from it too); the bundle reader, which
cannot import the library, raises ``BundleError``; a missing or unreadable file is the OS's error. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys

import click

from compressor.errors import CompressError
from serving.bundle import BundleError

USER_ERRORS: tuple[type[BaseException], ...] = (CompressError, BundleError, FileNotFoundError, PermissionError)
INTERRUPTED_EXIT = 130


def one_line(exc: BaseException) -> str:
    """The message of a user error on one line (library messages are one line; OS errors get their path)."""
    return " ".join(str(exc).split())


def user_errors(fn):
    """Decorate a click command: user errors -> `Error: <one line>` and exit 1; Ctrl-C -> a note and exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(one_line(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; the last completed epoch is saved (use --resume to continue)", err=True)
            sys.exit(INTERRUPTED_EXIT)

    return wrapper
