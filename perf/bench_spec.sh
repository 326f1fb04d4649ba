#!/usr/bin/env bash
# Lossless speculation against plain decoding in the same command, on the default model with the fastest
# CPU format (int4, bfloat16 activations, fused decode steps): prompt lookup on the copy-heavy prompts at
# concurrency 1 (to EOS and with --ignore-eos) and 16, then every draft source on the bundled prompts at
# concurrency 1 and 16 (exit and easyspec draft from depth DEPTH with the identity head; EXIT_HEAD=FILE
# adds a trained head). Each line carries `speedup`, `acceptance_rate`, `sequence_match` (against plain
# greedy of the same command) and a `prompts` tag.
# Lossless and plain decoding run ROUNDS times each, interleaved, and the medians are reported (`--rounds`):
# single runs on this machine scatter by +-8 %.
# Env: THREADS (2), WEIGHTS (int4), DEPTH (24), GROUP (2), EXIT_HEAD (none), ROUNDS (3).
# Usage: perf/bench_spec.sh [OUT]   (default docs/bench/spec_speed.jsonl; about 25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench/spec_speed.jsonl}
threads=${THREADS:-2}; weights=${WEIGHTS:-int4}; depth=${DEPTH:-24}; group=${GROUP:-2}; rounds=${ROUNDS:-3}
copy=backend/offramp/data/copy_prompts.jsonl
mkdir -p "$(dirname "$out")"
run() {  # tag concurrency [extra...]
  local tag=$1 c=$2; shift 2
  .venv/bin/offramp bench --model default --weights "$weights" --dtype bfloat16 --num-threads "$threads" \
    --max-tokens 64 --json --rounds "$rounds" --concurrency "$c" --num-requests $(( c > 1 ? 32 : 8 )) "$@" | tail -1 \
    | .venv/bin/python -c "import json, sys; r = json.loads(sys.stdin.read()); r['prompts'] = '$tag'; print(json.dumps(r))" \
    | tee -a "$out"
}
run copy 1 --spec ngram --prompts-file "$copy"
run copy-ignore-eos 1 --spec ngram --prompts-file "$copy" --ignore-eos
run copy-ignore-eos 16 --spec ngram --prompts-file "$copy" --ignore-eos
heads=(identity)
[ -n "${EXIT_HEAD:-}" ] && heads+=("$EXIT_HEAD")
for c in 1 16; do
  run bundled-ignore-eos "$c" --spec ngram --ignore-eos
  for head in "${heads[@]}"; do
    flag=(); [ "$head" = identity ] || flag=(--exit-head "$head")
    run bundled-ignore-eos "$c" --spec exit --spec-exit-depth "$depth" "${flag[@]}" --ignore-eos
    run bundled-ignore-eos "$c" --spec easyspec --spec-exit-depth "$depth" --spec-group-size "$group" "${flag[@]}" \
      --ignore-eos
  done
done
