"""The export's error: a refused export, with a one-line message saying why."""

from compressor.errors import CompressError


class ExportError(CompressError):
    """Export refused; the message is one line saying why."""
