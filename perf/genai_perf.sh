#!/usr/bin/env bash
# genai-perf against the served Offramp model, both ways in, at fixed input/output lengths:
#   triton: the Triton model `offramp` over gRPC streaming with the vLLM-backend tensors
#           (--endpoint-type kserve --backend vllm, driven by perf_analyzer);
#   openai: the OpenAI-compatible gateway's /v1/completions, streaming (server-sent events): the same
#           prompt text, hence the same input tokens, as the Triton target;
#   openai-chat: the gateway's /v1/chat/completions: the model's chat template wraps the prompt (for
#           SmolLM2 a default system message and role markers, about 25 more input tokens each).
# Every request asks for exactly OSL tokens: through Triton, --output-tokens-mean-deterministic sends
# min_tokens == max_tokens (Offramp serves it as ignore_eos); through the gateway (where genai-perf
# refuses that flag), --extra-inputs ignore_eos:true. Results (TTFT, inter-token latency,
# output tokens/s, request latency percentiles) go to docs/bench/serving/ (summary) and
# results/genai/ (genai-perf's own artifacts).
#
# Usage: perf/genai_perf.sh [CONCURRENCY...]        (default: 1 4 16)
# Environment: TARGETS="triton openai openai-chat", ISL=128, OSL=64, REQUESTS (per level; default 8 x concurrency,
# at least 16), WARMUP=2 (requests per target at concurrency 1 first, not measured: perf_analyzer
# 2.50 never ends a run that has --warmup-request-count at a concurrency above 1), MODEL=default
# (the tokenizer genai-perf counts with), OUT=docs/bench/serving.
# Starts and stops its own `offramp serve --openai-port` unless OFFRAMP_GRPC (host:port) and
# OFFRAMP_OPENAI (http://host:port) point at running ones.
#
# Tools: genai-perf 0.0.16 in its own environment .venv-genai/ (with tritonclient[all] 2.50's
# perf_analyzer, which genai-perf runs, and pandas<3 for that wheel's numpy<2). AIPerf 0.13 installs
# cleanly too but speaks HTTP only, so it cannot drive the Triton gRPC model; genai-perf does both.
set -euo pipefail
cd "$(dirname "$0")/.."
levels=("${@:-1 4 16}"); read -r -a levels <<< "${levels[*]}"
targets=${TARGETS:-triton openai openai-chat}
isl=${ISL:-128}
osl=${OSL:-64}
out=${OUT:-docs/bench/serving}
tools=.venv-genai

if [ ! -x "$tools/bin/genai-perf" ] || [ ! -x "$tools/bin/perf_analyzer" ]; then
  echo "perf-genai: installing genai-perf into $tools (about a minute)" >&2
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q --upgrade pip
  "$tools/bin/pip" install -q genai-perf==0.0.16 "tritonclient[all]==2.50.0" nvidia-cuda-runtime-cu12 "pandas<3"
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  echo "perf-genai: installing Debian's libb64-0d (needed by perf_analyzer)" >&2
  (apt-get update -qq && apt-get install -y -qq libb64-0d) >/dev/null
fi
cudart=$("$tools/bin/python" -c "import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], 'lib'))")
export LD_LIBRARY_PATH="$cudart:${LD_LIBRARY_PATH:-}"
export PATH="$PWD/$tools/bin:$PATH"  # genai-perf runs `perf_analyzer` from PATH
tokenizer=$(.venv/bin/python -c "from offramp.model.loader import resolve_model; print(resolve_model('${MODEL:-default}'))")

mkdir -p results/genai "$out"
grpc=${OFFRAMP_GRPC:-}
openai=${OFFRAMP_OPENAI:-}
if [ -z "$grpc" ] || [ -z "$openai" ]; then
  .venv/bin/offramp serve --model "${MODEL:-default}" --http-port 18000 --grpc-port 18001 --metrics-port 18002 \
    --openai-port 18009 > results/genai/server.log 2>&1 &
  server=$!
  trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
  for _ in $(seq 600); do curl -sf localhost:18009/health >/dev/null && break; sleep 0.5; done
  curl -sf localhost:18009/health >/dev/null || { echo "perf-genai: server not ready" >&2; exit 1; }
  grpc=localhost:18001
  openai=http://localhost:18009
fi

common=(-m offramp --tokenizer "$tokenizer" --streaming --random-seed 0
  --synthetic-input-tokens-mean "$isl" --synthetic-input-tokens-stddev 0
  --output-tokens-mean "$osl" --output-tokens-stddev 0)
target_args() {
  case $1 in
    triton) where=(--endpoint-type kserve --backend vllm -u "$grpc" --output-tokens-mean-deterministic) ;;
    openai) where=(--endpoint-type completions -u "$openai" --extra-inputs ignore_eos:true) ;;
    openai-chat) where=(--endpoint-type chat -u "$openai" --extra-inputs ignore_eos:true) ;;
    *) echo "perf-genai: unknown target $1 (triton, openai or openai-chat)" >&2; exit 2 ;;
  esac
}
profile() {  # TARGET CONCURRENCY REQUESTS DIR
  target_args "$1"
  rm -rf "$4"
  genai-perf profile "${common[@]}" "${where[@]}" --concurrency "$2" --request-count "$3" \
    --artifact-dir "$4" > "$4.log" 2>&1 || { tail -20 "$4.log" >&2; exit 1; }
}
if [ "${WARMUP:-2}" -gt 0 ]; then
  for target in $targets; do
    echo "== $target: warm-up, ${WARMUP:-2} requests ==" >&2
    profile "$target" 1 "${WARMUP:-2}" "results/genai/warmup-$target"
  done
fi
runs=()
for c in "${levels[@]}"; do
  n=${REQUESTS:-$(( c * 8 > 16 ? c * 8 : 16 ))}
  for target in $targets; do
    echo "== $target, concurrency $c, $n requests ==" >&2
    profile "$target" "$c" "$n" "results/genai/$target-c$c"
    runs+=("$target=$c=results/genai/$target-c$c")
  done
done
.venv/bin/python perf/genai_summary.py --isl "$isl" --osl "$osl" --out "$out" "${runs[@]}"
