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


_NO_VBMI_CHILD = """
import sys, torch
from offramp.model import fused
ops = fused.kernels()
assert ops is not None and ops.int4_mm_available(), "the no-VBMI build did not load"
torch.save([ops.int4_mm(x, p, sz, 32, n, 0, False) for x, p, sz, n in torch.load(sys.argv[1])], sys.argv[2])
"""


@pytest.mark.skipif(
    not ({"avx512_bf16", "avx512vbmi"} <= _flags()), reason="the native int4 unpacking is the lookup one on this CPU"
)
def test_int4_unpacking_without_vbmi_gives_the_native_bits(tmp_path):
    """AVX-512 BF16 CPUs without VBMI unpack int4 codes by a vpermw lookup instead of vpermb: the same
    bfloat16 codes (16 + q), so the same sums to the bit, at one row and at several (the unpacked-group path)."""
    import torch

    from offramp.model import fused

    ops = fused.kernels()
    assert ops is not None and ops.int4_mm_available() and ops.int4_block_rows() == 64
    gen = torch.Generator().manual_seed(0)
    cases, refs = [], []
    for m, n, k in ((1, 192, 576), (3, 64, 128), (7, 128, 256), (16, 576, 1536)):
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)  # [n, k / 2] uint8
        scale_zero = (torch.rand(k // 32, n, 2, generator=gen) * 0.1 - 0.02).to(torch.bfloat16)
        cases.append((torch.randn(m, k, generator=gen).to(torch.bfloat16), packed, scale_zero, n))
        refs.append(codes)
    torch.save(cases, tmp_path / "in.pt")
    env = dict(os.environ, OFFRAMP_KERNELS_ISA="avx512_no_vbmi")
    cmd = [sys.executable, "-c", _NO_VBMI_CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    theirs = torch.load(tmp_path / "out.pt")
    for (x, packed, scale_zero, n), codes, other in zip(cases, refs, theirs):
        ours = ops.int4_mm(x, packed, scale_zero, 32, n, 0, False)
        assert ours.shape == (x.shape[0], n)
        assert torch.equal(ours, other), f"rows {x.shape[0]}: the no-VBMI unpacking differs"
        # and both are the product they stand for: w = (q - 8) s + z per group of 32 columns, in float64
        sz = scale_zero.double().repeat_interleave(32, 0)  # [k, n, 2]
        w = (codes.double() - 8) * sz[..., 0].T + sz[..., 1].T  # [n, k]
        want = x.double() @ w.T
        assert (ours.double() - want).abs().max() <= 1e-2 * want.abs().max(), f"rows {x.shape[0]}"
