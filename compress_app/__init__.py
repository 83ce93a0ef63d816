"""The compress application: the `compress` command line, the pipeline, MLflow tracking and the report.

The only package that uses the library (``compressor``), the exporter (``export``) and the server (``serving``)
together, and the only one that imports click, mlflow or matplotlib. ``python -m compress_app`` is ``compress``.
"""

from compressor import __version__

__all__ = ["__version__"]
