"""User-facing error types, gathered so the CLI can print each as one line without a traceback."""

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError


class MismatchError(ValueError):
    """A model (or teacher) and the data disagree on ids, counts or shapes."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .trainer import TrainingError
    errs: list[type[BaseException]] = [CheckpointError, ConfigError, DataError, MismatchError, TrainingError]
    try:
        from .tracking import TrackingError
        errs.append(TrackingError)
    except ImportError:
        pass
    try:
        from .distill import TeacherError
        errs.append(TeacherError)
    except ImportError:
        pass
    return tuple(errs)


USER_ERRORS = _user_errors() + (FileNotFoundError, PermissionError)
