"""Serving stage: hash-checked bundle loader -> recommender -> HTTP app.

Nothing under `serving/` may import torch, `compressor` or mlflow, not even transitively:
the serving process only ever sees the files written by `export`, whose format is
`serving.bundle_format`. This package file imports nothing on purpose.
"""
