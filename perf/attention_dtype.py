"""CPU attention in bfloat16 against the same attention computed in float32 (upcast, then rounded back).

The default model's attention shapes (9 query heads, 3 KV heads, head_dim 64), a padding mask as the
paged store needs one, at decode (one new token per sequence) and prompt-chunk shapes. Prints one JSON
line per shape with the median microseconds of each way and their ratio; the engine upcasts on CPU
(``offramp.model.attention``) because of these figures.

Usage: .venv/bin/python perf/attention_dtype.py [--num-threads 2] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = ((1, 1, 64), (1, 1, 512), (16, 1, 128), (16, 1, 512), (1, 128, 128), (1, 256, 512))  # (seqs, new, ctx)


def _median_us(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    gen = torch.Generator().manual_seed(0)
    for b, t, ctx in SHAPES:
        q = torch.randn(b, 9, t, 64, generator=gen).bfloat16()  # [seqs, heads, new, head_dim]
        k = torch.randn(b, 3, ctx, 64, generator=gen).bfloat16()  # [seqs, kv_heads, ctx, head_dim]
        v = torch.randn(b, 3, ctx, 64, generator=gen).bfloat16()
        mask = torch.ones(b, 1, t, ctx, dtype=torch.bool).tril(ctx - t)  # [seqs, 1, new, ctx]
        mask[..., ctx - 3 :] = False  # the padded tail of the last page

        def bf16(q=q, k=k, v=v, mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        def upcast(q=q, k=k, v=v, mask=mask):
            return bf16(q.float(), k.float(), v.float(), mask).bfloat16()

        a, c = _median_us(bf16, args.repeats), _median_us(upcast, args.repeats)
        row = {"seqs": b, "new_tokens": t, "ctx": ctx, "threads": args.num_threads}
        print(json.dumps({**row, "bf16_us": round(a, 1), "upcast_us": round(c, 1), "speedup": round(a / c, 2)}))


if __name__ == "__main__":
    main()
