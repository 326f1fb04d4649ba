#!/usr/bin/env bash
# Fused CPU decode kernels against the eager ops, and both against llama.cpp on the same GGUF: int4 and
# bf16 on the default model at concurrency 1 (with --compare llamacpp, REPEAT times: the machine is
# noisy, so every ratio is from one command) and 16 (int4 fused also against llama.cpp's single stream
# in the same command), int8 at 1 and 16, then agreement with HF float32 (teacher-forced and along
# decode steps) for bf16, int8 and int4. On AVX2 CPUs (int16 activations by default) int4 and int8 also
# run with --no-int16-activations beside them.
# Env: THREADS (2), REPEAT (3), QUALITY (1; 0 skips the agreement runs), ISA (native; avx2 on an AVX-512
# machine: the AVX2 kernels, torch and oneDNN held to AVX2, against llama.cpp built for AVX2 only in
# .venv-tools-avx2/, built here on first use; the lines carry "kernels_isa": "avx2").
# Usage: perf/bench_fused.sh [OUT]   (default docs/bench/fused_decode.jsonl; about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench/fused_decode.jsonl}
threads=${THREADS:-2}; repeat=${REPEAT:-3}
mkdir -p "$(dirname "$out")"
if [ "${ISA:-native}" = avx2 ]; then
  export OFFRAMP_KERNELS_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
  export OFFRAMP_TOOLS_PYTHON=${OFFRAMP_TOOLS_PYTHON:-$PWD/.venv-tools-avx2/bin/python}
  [ -x .venv-tools-avx2/bin/python ] || TOOLS_DIR=.venv-tools-avx2 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" perf/tools_env.sh
fi
act16=$(.venv/bin/python -c "from offramp.model import fused; print(int(bool(fused.kernels()) and fused.int16_activations_available()))")
run() {  # weights concurrency fused-flag [extra...]
  local w=$1 c=$2 f=$3; shift 3
  .venv/bin/offramp bench --model default --weights "$w" --dtype bfloat16 --num-threads "$threads" --max-tokens 64 \
    --ignore-eos --json --concurrency "$c" --num-requests $(( c > 1 ? 32 : 8 )) "$f" "$@" | tail -1 \
    | .venv/bin/python -c "import json, sys; r = json.loads(sys.stdin.read()); r['fused_decode'] = '$f' == '--fused-decode'; print(json.dumps(r))" \
    | tee -a "$out"
}
for _ in $(seq "$repeat"); do
  run int4 1 --fused-decode --compare llamacpp
  run int4 1 --no-fused-decode --compare llamacpp
  # AVX2 CPUs: int16 activations are the default there; this is the float32-activation product beside it
  [ "$act16" = 1 ] && run int4 1 --fused-decode --no-int16-activations --compare llamacpp
done
run int4 16 --fused-decode --compare llamacpp
[ "$act16" = 1 ] && run int4 16 --fused-decode --no-int16-activations
run int4 16 --no-fused-decode
for f in --fused-decode --no-fused-decode; do
  run bf16 1 "$f"
  run bf16 16 "$f"
done
run int8 1 --fused-decode --compare llamacpp
run int8 16 --fused-decode
[ "${QUALITY:-1}" = 1 ] || exit 0
.venv/bin/python perf/weights_quality.py --formats bf16:bfloat16,int8:bfloat16,int4:bfloat16 --num-threads "$threads" \
  --fused-decode | tee -a "$out"
[ "$act16" = 1 ] && .venv/bin/python perf/weights_quality.py --formats int8:bfloat16,int4:bfloat16 \
  --num-threads "$threads" --fused-decode --no-int16-activations | tee -a "$out"
exit 0
