"""The files of a run directory (what `compress train` / `compress distill` write into ``--out``).

Every stage that reads a run directory (evaluation, export, the pipeline, MLflow tracking) uses these names.
"""

MODEL_FILE = "model.safetensors"  # the selected (best-validation) model, with test metrics once training ends
RESUME_FILE = "last.safetensors"  # the latest state, with optimizer and early-stopping state, for --resume
METRICS_FILE = "metrics.jsonl"  # one JSON line per epoch: losses, diagnostics, validation metrics, times
CONFIG_FILE = "config.yaml"  # the resolved config of the run
RESULT_FILE = "result.json"  # the final summary: best epoch, valid and test metrics
LOG_FILE = "train.log"  # the run's log
RUN_BUNDLE_DIR = "bundle"  # the serving bundle `--register` exports the model into before registering it
# Beside the run directories (in their parent), so sibling runs distilled from one teacher share its top-K.
TOPK_CACHE_DIR = ".topk-cache"
