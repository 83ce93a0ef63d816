"""Export stage: compressor checkpoint -> verified serving bundle.

`export.bundle` writes and verifies a bundle from plain numpy arrays (no torch; of the
library only `compressor.retrieval`'s ip2l2 and recall helpers, numpy and faiss: the module imports torch only
inside the searches that use it); `export.from_checkpoint`
is the only module here that imports torch and the rest of `compressor`.
This package file imports nothing so that importing `export.bundle` stays light.
"""
