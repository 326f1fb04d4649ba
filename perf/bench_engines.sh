#!/usr/bin/env bash
# torch vs onnxruntime block engines, back to back in one run: concurrency 1 and 16, exits off and
# on (softmax 0.5 from layer 20, as in the early-exit sweep). Appends one JSON line per run to OUT (default
# docs/bench/engines.jsonl) and draws a PNG beside it. Run it on an otherwise idle machine.
set -euo pipefail
OUT=${1:-docs/bench/engines.jsonl}
BIN=${OFFRAMP_BIN:-.venv/bin/offramp}
EXPORT=model_repository/offramp/1/export
"$BIN" export --model default --output "$EXPORT" >/dev/null  # the first onnxruntime run then reuses it
for c in 16 1; do
  n=$([ "$c" = 1 ] && echo 16 || echo 32)
  for exits in "--exit-policy none" "--exit-policy softmax --exit-threshold 0.5 --min-exit-layer 20"; do
    for engine in torch onnxruntime; do
      # shellcheck disable=SC2086
      "$BIN" bench --backend "$engine" --export-dir "$EXPORT" --num-threads 2 --concurrency "$c" --num-requests "$n" \
        --max-tokens 64 $exits --json --output "$OUT" | tail -1
    done
  done
done
