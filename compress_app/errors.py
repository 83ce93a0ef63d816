"""The one place where user mistakes become a one-line `Error: ...` and exit status 1, never a traceback.

The library raises ``compressor.errors.CompressError`` subclasses (config, data, checkpoint, teacher, device,
training; export's ``ExportError`` and MLflow's ``TrackingError`` derive from it too); the bundle reader, which
cannot import the library, raises ``BundleError``; a missing or unreadable file is the OS's error. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys

import click

from compressor.distributed import launch_rank, launched_world_size
from compressor.errors import CompressError
from serving.bundle import BundleError

USER_ERRORS: tuple[type[BaseException], ...] = (CompressError, BundleError, FileNotFoundError, PermissionError)
INTERRUPTED_EXIT = 130
PEER_LOST_EXIT = 3  # a torchrun rank that stopped because another one failed (compress_app.launch reads it)


def _lost_peer(exc: BaseException) -> bool:
    """A collective that failed because a peer process went away (gloo/NCCL transport errors)."""
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "Socket Timeout", "Timed out waiting"))


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
            rank = launch_rank()
            if rank != 0 and getattr(e, "every_rank_raised", False):
                sys.exit(1)  # torchrun: rank 0 says it once for the whole job
            raise click.ClickException((f"rank {rank}: " if rank else "") + one_line(e)) from None
        except RuntimeError as e:
            if launched_world_size() > 1 and _lost_peer(e):
                # another rank died (torchrun's agent names it): this rank's traceback would only hide that
                click.echo(f"rank {launch_rank()}: stopped, another rank of the job went away "
                           f"({one_line(e)[:160]})", err=True)
                sys.exit(PEER_LOST_EXIT)
            raise
        except KeyboardInterrupt:
            if launch_rank() != 0:  # torchrun: every rank got the signal; rank 0 says it
                sys.exit(INTERRUPTED_EXIT)
            click.echo("interrupted; the last completed epoch is saved (use --resume to continue)", err=True)
            sys.exit(INTERRUPTED_EXIT)

    return wrapper
