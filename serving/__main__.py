"""`python -m serving BUNDLE_DIR ...`: serve a bundle (see serving.server.main).

Thread pools are pinned to one thread per worker before numpy, faiss and onnxruntime are
imported: OpenMP and OpenBLAS read these variables once, at load time.
"""

import sys

from serving.config import pin_threads_to_one

pin_threads_to_one()

from serving.server import main  # noqa: E402  (after the thread settings, on purpose)

sys.exit(main())
