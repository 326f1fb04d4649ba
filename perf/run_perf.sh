#!/usr/bin/env bash
# perf_analyzer against the served Offramp model at several concurrency levels (gRPC streaming).
# Usage: perf/run_perf.sh [CONCURRENCY...]   (default: 1 4 16). Starts and stops its own server
# unless OFFRAMP_URL (host:grpc_port) points at a running one. Every request generates exactly
# 64 tokens (ignore_eos), so tokens/s = 64 x the requests/s that perf_analyzer reports.
set -euo pipefail
cd "$(dirname "$0")/.."
levels=("${@:-1 4 16}"); read -r -a levels <<< "${levels[*]}"
tools=.venv-perf
if [ ! -x "$tools/bin/perf_analyzer" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q "tritonclient[all]==2.50.0" nvidia-cuda-runtime-cu12
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  echo "perf: installing Debian's libb64-0d (needed by perf_analyzer)" >&2
  (apt-get update -qq && apt-get install -y -qq libb64-0d) >/dev/null
fi
cudart=$("$tools/bin/python" -c "import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], 'lib'))")
export LD_LIBRARY_PATH="$cudart:${LD_LIBRARY_PATH:-}"
mkdir -p results
url=${OFFRAMP_URL:-}
if [ -z "$url" ]; then
  .venv/bin/offramp serve --http-port 18000 --grpc-port 18001 --metrics-port 18002 > results/perf_server.log 2>&1 &
  server=$!
  trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
  for _ in $(seq 600); do curl -sf localhost:18000/v2/health/ready >/dev/null && break; sleep 0.5; done
  url=localhost:18001
fi
for c in "${levels[@]}"; do
  echo "== concurrency $c =="
  "$tools/bin/perf_analyzer" -m offramp -u "$url" -i grpc --streaming \
    --input-data perf/input_data.json --concurrency-range "$c" \
    --measurement-interval 20000 --stability-percentage 50 --max-trials 3 \
    -f "results/perf_c$c.csv" 2>&1 | tee "results/perf_c$c.txt" | sed -n '/Concurrency:/,$p'
done
