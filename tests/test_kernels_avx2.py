"""The extension's AVX2 kernels on a CPU that runs its AVX-512 ones natively.

On an AVX-512 machine the rest of the suite tests the AVX-512 BF16 kernels and skips the AVX2 ones (int16
activations, the float32-FMA int4 product, AVX2 attention). Here a child pytest builds the extension for
AVX2 (``OFFRAMP_KERNELS_ISA=avx2``) and makes torch pack int4 as on an AVX2 CPU
(``ATEN_CPU_CAPABILITY=avx2``; ``ONEDNN_MAX_CPU_ISA=AVX2`` keeps oneDNN off AVX-512/AMX too), then runs the kernel and fused-decode tests as an AVX2 CPU would: the same
tests, none of them skipped for the CPU kind. On an AVX2 machine the suite already runs them natively.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offramp.model.device import cpu_vector_isa

TESTS = Path(__file__).parent


def _flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


pytestmark = [
    pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on this machine"),
    pytest.mark.skipif(
        not ({"avx512f", "avx2", "fma"} <= _flags()) or os.environ.get("OFFRAMP_KERNELS_ISA") == "avx2",
        reason="not an AVX-512 CPU (an AVX2 CPU runs the AVX2 kernels in the rest of the suite)",
    ),
]


def test_avx2_kernels_pass_the_kernel_tests_with_none_skipped_for_the_cpu():
    assert cpu_vector_isa() != "avx2"
    env = dict(os.environ, OFFRAMP_KERNELS_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-x",
        str(TESTS / "test_fused_decode.py"),
        str(TESTS / "test_quant.py") + "::test_quantized_engine_computes_its_weights_in_bfloat16",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=TESTS.parent)
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    # the AVX2 build is what ran: no test skipped for the CPU kind, and the AVX2-only tests counted
    assert not re.search(r"SKIPPED.*(AVX2 kernels'|does not run here|this CPU)", run.stdout), tail
    assert re.search(r"(\d+) passed", run.stdout) and int(re.search(r"(\d+) passed", run.stdout).group(1)) >= 40, tail
