#!/usr/bin/env bash
# The standing GPU check: run it whenever a session is lent a GPU (about 7 minutes on one H200; at most 8).
#
# Prepare on the CPU machine first:
#   bash bench/fetch_gpu_wheels.sh       # .gpu_wheels/: packages the GPU image lacks
#   make tiny-models                     # artifacts/tiny/: tokenizer, prompts, reward model
# Then, with the device tool: run `bash bench/gpu_check.sh` with carry [".gpu_wheels", "artifacts"] and a
# timeout of 540 s. It writes $OUT/gpu_check.md (the figures for bench/RESULTS.md, the device named) and a log
# per run; copy the table into bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-deps --no-index .gpu_wheels/*.whl 2>&1 | tail -3
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" bench/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-470}" 2>&1 | tee "$OUT/gpu_check.log"
