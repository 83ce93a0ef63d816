"""`python -m compress_app ...` is `compress ...` (the form torchrun and subprocesses use)."""

from compress_app.cli import entry

entry()
