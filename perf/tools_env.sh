#!/usr/bin/env bash
# Build the separate tools environment .venv-tools/ with llama-cpp-python (compiled from source,
# several minutes on 2 cores). The project environment never imports it: `offramp bench --compare
# llamacpp` runs `.venv-tools/bin/python -m offramp.tools.llamacpp` as a subprocess.
# Usage: perf/tools_env.sh   (idempotent; LLAMACPP_VERSION overrides the pinned version)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.venv-tools
version=${LLAMACPP_VERSION:-0.3.36}
if "$tools/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "tools-env: llama-cpp-python already installed in $tools"
  exit 0
fi
python3 -m venv "$tools"
"$tools/bin/pip" install -q --upgrade pip
echo "tools-env: building llama-cpp-python==$version from source (several minutes)" >&2
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  nice -n "${TOOLS_NICE:-10}" "$tools/bin/pip" install -q --no-cache-dir "llama-cpp-python==$version"
"$tools/bin/python" -c "import llama_cpp; print('tools-env: llama-cpp-python', llama_cpp.__version__)"
