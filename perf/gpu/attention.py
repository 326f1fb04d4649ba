"""Prompt-chunk attention on a GPU: which SDPA kernel runs, and what a new shape's first call costs.

On the H200 (``docs/bench/gpu.jsonl``) time to first token in bfloat16 was 3-4x float32's (92 vs 27 ms at
one request) although decode steps cost the same. One suspect: a kernel that prepares a plan per new
shape (cuDNN attention takes bfloat16, not float32), paid by every prompt of a new length. This times
``scaled_dot_product_attention`` as the engine calls it for a prompt chunk (bool mask, grouped KV heads,
the default model's 9 query and 3 KV heads of 64) for several new lengths, per dtype and per backend
allowed (torch's own choice, then each one alone): the first call's time and the median of the next ten.
One JSON line per (dtype, backend, length).

Usage: python perf/gpu/attention.py [--lengths 17 33 57 91 130]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "default": None,  # torch's own choice
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}


def _call(q, k, v, mask) -> None:
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.cuda.synchronize()


def measure(dtype: torch.dtype, backend: str, length: int, page: int = 16) -> dict:
    ctx = -(-length // page) * page
    q = torch.randn(1, 9, length, 64, device="cuda", dtype=dtype)  # [b, heads, new, head_dim]
    k = torch.randn(1, 3, ctx, 64, device="cuda", dtype=dtype)  # [b, kv_heads, ctx, head_dim]
    v = torch.randn_like(k)
    mask = (torch.arange(ctx, device="cuda")[None, :] <= torch.arange(length, device="cuda")[:, None])[None, None]
    row = {"dtype": str(dtype).removeprefix("torch."), "backend": backend, "length": length}
    try:
        allowed = BACKENDS[backend]
        with contextlib.nullcontext() if allowed is None else sdpa_kernel(allowed):
            start = time.perf_counter()
            _call(q, k, v, mask)
            row["first_call_ms"] = round((time.perf_counter() - start) * 1e3, 3)
            times = []
            for _ in range(10):
                start = time.perf_counter()
                _call(q, k, v, mask)
                times.append(time.perf_counter() - start)
        row["steady_ms"] = round(statistics.median(times) * 1e3, 3)
    except RuntimeError as exc:  # this backend does not take these inputs
        row["error"] = str(exc).strip().splitlines()[0][:120]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[17, 33, 57, 91, 130])
    args = ap.parse_args()
    _call(*(torch.randn(1, 1, 8, 64, device="cuda") for _ in range(3)), None)  # CUDA context and libraries
    for dtype in (torch.float32, torch.bfloat16):
        for j, backend in enumerate(BACKENDS):
            for length in args.lengths:  # + j: every backend meets shapes new to the process
                print(json.dumps(measure(dtype, backend, length + j)), flush=True)


if __name__ == "__main__":
    main()
