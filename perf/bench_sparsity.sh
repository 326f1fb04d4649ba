#!/usr/bin/env bash
# Contextual sparsity (issue 15) on a quiet machine: calibrate (importance, layout, 4 predictors),
# the eval report (docs/eval/sparsity.json + sparsity.png: agreement/perplexity vs density, random and
# oracle, c1/c16 speed vs dense in bfloat16 in the same run), the kernels alone, and bench lines with
# gap filling. Usage: perf/bench_sparsity.sh [MODEL]. Env: THREADS (2), OUT (results/sparsity).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-default}
threads=${THREADS:-2}; out=${OUT:-results/sparsity}
mkdir -p "$out"
.venv/bin/offramp calibrate --sparsity --model "$model" --out "$out/cal" --max-tokens 64 --num-threads "$threads" \
  | tee "$out/calibrate.json"
.venv/bin/offramp eval --sparsity --calibration "$out/cal" --output docs/eval --max-tokens 64 --repeats 3 \
  --num-threads "$threads" | tee "$out/eval_summary.json"
.venv/bin/python perf/sparsity_kernels.py --threads "$threads" | tee "$out/kernels.jsonl"
pred="$out/cal/predictor_magnitude_unified.safetensors"
for c in 1 16; do  # the dense baseline, same format
  .venv/bin/offramp bench --model "$model" --dtype bfloat16 --num-threads "$threads" --concurrency "$c" \
    --num-requests $((c == 1 ? 8 : 32)) --max-tokens 64 --ignore-eos --json | tee -a "$out/bench.jsonl"
done
for gap in 0 2 4; do
  for c in 1 16; do
    .venv/bin/offramp bench --model "$model" --dtype bfloat16 --num-threads "$threads" --sparsity 0.5 \
      --sparsity-predictor "$pred" --sparsity-max-gap "$gap" --concurrency "$c" --num-requests $((c == 1 ? 8 : 32)) \
      --max-tokens 64 --ignore-eos --json | tee -a "$out/bench.jsonl"
  done
done
