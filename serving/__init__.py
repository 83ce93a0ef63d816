"""Serving stage: hash-checked bundle loader -> recommender -> HTTP app.

Nothing under `serving/` may import torch or `compressor`, not even transitively:
the serving process only ever sees the files written by `export`.
This package file imports nothing on purpose.
"""
