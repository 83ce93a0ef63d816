#!/usr/bin/env bash
# The quality benchmark on a lent GPU machine (no network, its own torch; faiss-cpu carried as a wheel in .whl/).
# Writes summary.md/json, status.json and runs.tgz (every run's result.json, metrics.jsonl, train.log; no weights)
# to $OUT. Usage: bash benchmarks/quality_on_gpu.sh SECONDS SUITES...   (e.g. 520 main ablation hetero)
set -u
budget=${1:-520}; shift
suites=${*:-main}
out=/tmp/q
python3 -m pip install --no-deps -q .whl/faiss_cpu-*.whl >/dev/null 2>&1
python3 -c "import faiss, torch; print('faiss', faiss.__version__, 'gpu', hasattr(faiss, 'StandardGpuResources'), 'torch', torch.__version__, torch.cuda.get_device_name(0))"
nproc
export COMPRESS_NO_MLFLOW=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
timeout -k 5 "$budget" python3 benchmarks/quality.py --out "$out" --suites $suites --seeds 0 1 2 3 4 \
    --workers 15 --threads 1 --device cuda --checkpoint-every 1000 --deadline-s $((budget - 120))
pkill -f "compressor.cli" ; sleep 2
python3 - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import quality
quality.summarise(Path("/tmp/q"), [0, 1, 2, 3, 4])
PY
cp "$out"/summary.md "$out"/summary.json "${OUT:-/tmp}"/ 2>/dev/null
cp "$out"/status.json "${OUT:-/tmp}"/ 2>/dev/null
tar czf "${OUT:-/tmp}"/runs.tgz -C /tmp --exclude='*.safetensors' --exclude='.topk-cache' q
cat "$out"/summary.md
