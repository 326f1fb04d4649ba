#!/usr/bin/env bash
# Weight formats on one model: tokens/s at concurrency 1 (against llama.cpp on the same GGUF, same run)
# and 16, resident and per-token weight bytes, and teacher-forced agreement with HF float32 greedy.
# Usage: perf/bench_weights.sh [MODEL]   (default: the default model). Appends to results/weights.jsonl.
# Env: THREADS (2), REQUESTS (8), TOKENS (64), FORMATS ("none:float32 bf16:bfloat16 int8:bfloat16 int4:bfloat16").
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-default}
threads=${THREADS:-2}; requests=${REQUESTS:-8}; tokens=${TOKENS:-64}
formats=${FORMATS:-"none:float32 bf16:bfloat16 int8:bfloat16 int4:bfloat16"}
[ -x .venv-tools/bin/python ] || echo "bench-weights: no .venv-tools (make tools-env): llama.cpp is skipped" >&2
mkdir -p results
out=results/weights.jsonl
for f in $formats; do
  w=${f%%:*}; d=${f##*:}
  common=(--model "$model" --weights "$w" --dtype "$d" --num-threads "$threads" --max-tokens "$tokens" --ignore-eos --json)
  .venv/bin/offramp bench "${common[@]}" --concurrency 1 --num-requests "$requests" --compare llamacpp | tee -a "$out"
  .venv/bin/offramp bench "${common[@]}" --concurrency 16 --num-requests 32 | tee -a "$out"
done
.venv/bin/python perf/weights_quality.py --model "$model" --num-threads "$threads" | tee -a "$out"
