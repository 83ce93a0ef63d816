"""`python -m serving BUNDLE_DIR ...`: serve a bundle (see serving.app.main).

Thread pools are pinned to one thread per worker before numpy, faiss and onnxruntime are
imported: OpenMP and OpenBLAS read these variables once, at load time.
"""

import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from serving.app import main  # noqa: E402  (after the thread settings, on purpose)

sys.exit(main())
