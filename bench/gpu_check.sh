#!/usr/bin/env bash
# One prepared device check: the real 4.15B Phi-3-V (random weights), ZeRO-3 bf16, packed rows at
# 8K / 32K / 128K on ONE GPU; prints tokens/s, TFLOP/s, MFU and peak memory per length (< 8 min on
# an H100/H200). Details and options: bench/gpu_check.py (--help).
#
#   bash bench/gpu_check.sh                  # GPU, real model
#   bash bench/gpu_check.sh --tiny           # CPU (or GPU), tiny model, 256/512/1024 tokens: CI mode
#   bash bench/gpu_check.sh --json out.jsonl # also one JSON line per length
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# DeepSpeed picks the CPU accelerator when no GPU is visible (no compiled ops are needed here).
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
export TOKENIZERS_PARALLELISM=false      # no tokenizer is used; silences the fork warning
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"   # CPU threads of the torch AdamW step (offloaded optimizer)
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # less fragmentation at 128K
export TRANSFORMERS_VERBOSITY=error
# Whole check bounded: 8 minutes, then killed (the script itself skips lengths past --budget-s).
exec timeout --signal=TERM 480 "$PY" bench/gpu_check.py "$@"
