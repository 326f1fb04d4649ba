"""Micro-benchmark of the sparse FFN against the dense one at the default model's shapes (30 layers,
hidden 576, FFN 1536), one decode row (or --rows), random weights: time per step of the 30 FFNs.

    python perf/sparsity_kernels.py --dtype bfloat16 --threads 2 --group-size 64

Prints one JSON line per (density, pattern): ``contiguous`` keeps one run of groups (the best case
of the layout), ``random`` keeps random groups (the worst case: many short runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from offramp.model.decoder import LayerWeights
from offramp.sparsity.execute import _sparse_ffn
from offramp.sparsity.layout import SparseLayerWeights
from offramp.sparsity.selection import RowSet, runs

LAYERS, HIDDEN, FFN = 30, 576, 1536


def _layers(dtype, group_size):
    out = []
    for _ in range(LAYERS):
        gate_up = torch.randn(2 * FFN, HIDDEN).to(dtype) * 0.02
        down = torch.randn(HIDDEN, FFN).to(dtype) * 0.02
        ng = FFN // group_size
        gu = torch.stack((gate_up[:FFN].view(ng, group_size, HIDDEN), gate_up[FFN:].view(ng, group_size, HIDDEN)), 1)
        sw = SparseLayerWeights(
            None, None, None, None, None, gu.reshape(2 * FFN, HIDDEN).contiguous(), down.t().contiguous()
        )
        w = LayerWeights(None, None, None, None, None, gate_up, down)
        out.append((w, sw))
    return out


def _time(fn, repeats=30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    layers = _layers(dtype, args.group_size)
    ng = FFN // args.group_size
    h = torch.randn(args.rows, HIDDEN).to(dtype)

    def dense():
        for w, _ in layers:
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
            F.linear(F.silu(gate) * up, w.down)

    with torch.inference_mode():
        base = _time(dense)
        print(json.dumps({"density": 1.0, "pattern": "dense", "ms": round(base, 3)}))
        gen = torch.Generator().manual_seed(0)
        for density in (0.8, 0.6, 0.5, 0.4, 0.3):
            k = max(1, round(density * ng))
            for pattern in ("contiguous", "random"):
                keep = [i < k for i in range(ng)]
                if pattern == "random":
                    chosen = set(torch.randperm(ng, generator=gen)[:k].tolist())
                    keep = [i in chosen for i in range(ng)]
                s = RowSet(torch.arange(args.rows), [], runs(keep))
                ms = _time(lambda s=s: [_sparse_ffn(w, sw, h, s, args.group_size) for w, sw in layers])
                row = {"density": density, "pattern": pattern, "runs": len(s.group_runs), "ms": round(ms, 3)}
                print(json.dumps(row | {"speedup": round(base / ms, 3)}))


if __name__ == "__main__":
    main()
