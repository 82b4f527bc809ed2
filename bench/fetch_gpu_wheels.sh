#!/usr/bin/env bash
# Run here (the CPU machine, with `make setup` done) before a session's GPU check: the packages the GPU machine's
# image lacks or has in another version, as wheels in .gpu_wheels/ (git-ignored, ~62 MB) for the device tool to
# carry. The image has Python 3.12, torch, accelerate, tokenizers, safetensors and the rest (see bench/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .gpu_wheels
# The tested versions (constraints.txt) where the image differs (transformers 5.17 there), datasets and its small
# dependencies, trl and the tyro and rich it imports (the reference of bench/ppo_vs_trl.py), bitsandbytes for the
# 4-bit base; binary wheels for the GPU machine's Python 3.12 on x86-64.
pinned() { grep -E "^($1)==" constraints.txt; }
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu_wheels \
    $(pinned 'transformers|peft|datasets|dill|multiprocess|xxhash|hjson') \
    $(pinned 'trl|tyro|docstring_parser|typeguard|rich|markdown-it-py|mdurl|Pygments') \
    'bitsandbytes>=0.50.2,<0.51'
# DeepSpeed is published as source only: build its pure-Python wheel here (no compiled ops; the PPO and SFT loops
# use torch's Adam, so none are needed).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation $(pinned deepspeed) -w .gpu_wheels
ls -la .gpu_wheels
du -sh .gpu_wheels
