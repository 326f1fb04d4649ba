#!/usr/bin/env bash
# Build the separate tools environment .venv-tools/ with llama-cpp-python (compiled from source,
# several minutes on 2 cores). The project environment never imports it: `offramp bench --compare
# llamacpp` runs `.venv-tools/bin/python -m offramp.tools.llamacpp` as a subprocess.
# Usage: perf/tools_env.sh   (idempotent; LLAMACPP_VERSION overrides the pinned version)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${TOOLS_DIR:-.venv-tools}  # TOOLS_DIR + CMAKE_ARGS: a second build (e.g. AVX2 only; docs/weights.md)
version=${LLAMACPP_VERSION:-0.3.36}
# GGML_NATIVE turns on AMX where the CPU has it; its tile kernels crashed llama.cpp on its first decode on
# such a machine here (a segfault: the tile state needs the kernel's permission, which a sandbox may not
# give), so there the build names the CPU's vector features one by one and leaves AMX off.
if [ -z "${CMAKE_ARGS:-}" ] && grep -q ' amx_int8' /proc/cpuinfo 2>/dev/null; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    case " $flags " in *" ${pair%%:*} "*) args="$args -DGGML_${pair##*:}=ON" ;; esac
  done
  export CMAKE_ARGS=$args
  echo "tools-env: AMX CPU: building llama.cpp without AMX ($CMAKE_ARGS)" >&2
fi
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
