"""compress: shrink large two-tower recommenders into small, fast ones (RCE-KD) and ship them to serving."""

import os

__version__ = "0.1.0"

# OpenMP threads that wait by sleeping, not spinning. torch's and FAISS's pools read this when they start (this
# package is imported before either in every process the tool starts), so it must be set here. Spinning threads
# take a busy neighbour's cores: an RCE-KD epoch beside one CPU-bound process took 2.6x its quiet time with the
# default policy and 1.6x with PASSIVE (docs/benchmarks.md section 4b). A value set by the user is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
