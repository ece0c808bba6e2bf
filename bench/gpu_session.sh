#!/usr/bin/env bash
# One device-machine session: the CUDA tests, the GPU half of merge_bench and train_bench.
# Run from the repository root on the GPU machine (python3 there holds a CUDA torch). Wheels of packages
# missing there (pydantic and its three dependencies) travel in .whl/ (see bench/README.md).
# Output goes to $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, magmax; print('torch', torch.__version__, 'magmax', magmax.__version__)" | tee -a "$OUT/gpu.txt"
MERGE_S=${MERGE_S:-330} TRAIN_S=${TRAIN_S:-0} TEST_S=${TEST_S:-150}  # TRAIN_S=150 adds train_bench
timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_buckets.py tests/test_cli_merge.py -k "cuda or bucket" 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout "$MERGE_S" python3 bench/merge_bench.py --device cuda --budget-s "${BUDGET_S:-20}" --repeats 5 --e2e-compiled ${MERGE_ARGS:---methods magmax,average,random,ties} 2>&1 | tee "$OUT/merge_bench_cuda.txt"
[ "$TRAIN_S" -gt 0 ] && timeout "$TRAIN_S" python3 bench/train_bench.py --device cuda --steps 15 --threads 16 ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_bench_cuda.txt"
# Data-parallel (2 ranks, NCCL) against one process, on machines with at least 2 GPUs.
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout "${DDP_S:-240}" python3 bench/ddp_check.py "$OUT/ddp" cuda 2>&1 | tail -20 | tee "$OUT/ddp_check.txt"
else
  echo "ddp check skipped: one GPU" | tee "$OUT/ddp_check.txt"
fi
