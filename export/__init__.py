"""Export stage: compressor checkpoint -> verified serving bundle.

`export.bundle` writes and verifies a bundle from plain numpy arrays (no torch);
`export.from_checkpoint` is the only module here that imports torch and `compressor`.
This package file imports nothing so that importing `export.bundle` stays light.
"""
