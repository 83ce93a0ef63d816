"""The library's user-facing errors: one base class, so the application maps them to one-line messages in one place.

Every error a user can cause (a bad config, unreadable data, a checkpoint that does not fit, no CUDA where
``--device cuda`` asked for it ...) derives from ``CompressError``; its message names what is wrong (file and
line, key, id). Anything else is a bug and keeps its traceback.
"""


class CompressError(Exception):
    """A mistake in the user's input or request; ``str(e)`` is a complete one-line message."""


class MismatchError(CompressError, ValueError):
    """A model (or teacher) and the data disagree on ids, counts or shapes."""


class DeviceError(CompressError, ValueError):
    """The requested device does not exist here (e.g. ``--device cuda`` without CUDA)."""


class TrainingError(CompressError, RuntimeError):
    """Training cannot go on as asked (nothing to resume, a run already there, a diverging loss ...)."""
