"""Does compiling a decoder layer's elementwise work pay on this CPU? (issue "Fast weights")

One decode row through the 30 layers of the default model with int4 weights (bfloat16 activations),
the attention itself left out (it is the same call either way): eager ``decoder.py`` code against the
same two functions compiled by ``torch.compile`` (inductor, C++ on the CPU), which can fuse the
norms, RoPE, SiLU x up and the residual adds around the int4 products. Medians of ``--repeats``
timed passes. One JSON line.

Usage: .venv/bin/python perf/compiled_layer.py [--rows 1] [--repeats 50] [--num-threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from offramp.model.decoder import apply_rope, linear, rms_norm
from offramp.model.loader import default_gguf, load_weights, resolve_model


def before_attention(w, x, cos, sin, nh: int, nkv: int, hd: int, eps: float):
    """Norm, QKV product and RoPE: x [n, hidden] -> q [n, nh, hd], k [n, nkv, hd], v [n, nkv, hd]."""
    n = x.shape[0]
    h = rms_norm(x, w.input_norm, eps)
    qkv = linear(h, w.qkv, w.qkv_bias)
    qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd), cos, sin)
    q, k = qk.split((nh, nkv), dim=1)
    return q, k, qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)


def after_attention(w, x, attn, eps: float):
    """Output projection, residual, norm and the SwiGLU FFN: [n, hidden] -> [n, hidden]."""
    x = x + linear(attn, w.o_proj)
    h = rms_norm(x, w.post_norm, eps)
    gate, up = linear(h, w.gate_up).chunk(2, dim=-1)
    return x + linear(F.silu(gate) * up, w.down)


def one_pass(weights, x, cos, sin, pre, post) -> torch.Tensor:
    s = weights.shape
    for w in weights.layers:
        q, _k, _v = pre(w, x, cos, sin, s.num_heads, s.num_kv_heads, s.head_dim, s.rms_norm_eps)
        x = post(w, x, q.reshape(x.shape[0], -1), s.rms_norm_eps)  # q stands in for the attention output
    return x


def timed(weights, x, cos, sin, pre, post, repeats: int) -> float:
    for _ in range(3):
        one_pass(weights, x, cos, sin, pre, post)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass(weights, x, cos, sin, pre, post)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    weights, _ = load_weights(resolve_model("default"), torch.bfloat16, "int4", 32, default_gguf())
    s = weights.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, s.hidden_size, generator=gen).to(torch.bfloat16)  # [n, hidden]
    cos = torch.randn(args.rows, 1, s.head_dim, generator=gen).to(torch.bfloat16)  # [n, 1, hd]
    sin = torch.randn(args.rows, 1, s.head_dim, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        eager_ms = timed(weights, x, cos, sin, before_attention, after_attention, args.repeats)
        start = time.perf_counter()
        pre_c = torch.compile(before_attention, dynamic=False)
        post_c = torch.compile(after_attention, dynamic=False)
        ref = one_pass(weights, x, cos, sin, before_attention, after_attention)
        out = one_pass(weights, x, cos, sin, pre_c, post_c)
        compile_s = time.perf_counter() - start
        compiled_ms = timed(weights, x, cos, sin, pre_c, post_c, args.repeats)
        eager_again_ms = timed(weights, x, cos, sin, before_attention, after_attention, args.repeats)
    row = {
        "what": "30 decoder layers without attention, int4 weights, bfloat16 activations",
        "rows": args.rows,
        "num_threads": args.num_threads,
        "eager_ms": round(eager_ms, 3),
        "eager_again_ms": round(eager_again_ms, 3),
        "compiled_ms": round(compiled_ms, 3),
        "speedup": round(min(eager_ms, eager_again_ms) / compiled_ms, 3),
        "compile_s": round(compile_s, 1),
        "max_abs_diff": float((out.float() - ref.float()).abs().max()),
        "torch": torch.__version__,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
