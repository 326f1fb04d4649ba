"""Per-block cost for placement: equal blocks count as equal; blocks of different sizes are timed.

Timing runs each distinct block size once on a synthetic 16-token prompt over a scratch KV store
(two pages per layer), best of three, on the device the weights are on now.
"""

from __future__ import annotations

import time

import torch

from offramp.model.attention import SeqSlice, build_metadata
from offramp.model.decoder import ModelWeights, decoder_layer, rope_tables
from offramp.model.kv_store import KVStore

NUM_ROWS = 16  # tokens of the synthetic prompt that times a block


def block_costs(weights: ModelWeights, block_ranges: list[tuple[int, int]], page_size: int) -> list[float]:
    """One cost per block: 1.0 each when every block has as many layers; else seconds measured."""
    sizes = [end - start for start, end in block_ranges]
    if len(set(sizes)) == 1:
        return [1.0] * len(block_ranges)
    seconds = {size: _time_layers(weights, block_ranges, size, page_size) for size in sorted(set(sizes))}
    return [seconds[size] for size in sizes]


@torch.inference_mode()
def _time_layers(weights: ModelWeights, block_ranges: list[tuple[int, int]], size: int, page_size: int) -> float:
    """Seconds of the first block with ``size`` layers on ``NUM_ROWS`` prompt tokens (best of three)."""
    shape, dtype, device = weights.shape, weights.embed.dtype, weights.embed.device
    start = next(s for s, e in block_ranges if e - s == size)
    num_pages = -(-NUM_ROWS // page_size)
    kv = KVStore(shape, num_pages, page_size, dtype, [device] * shape.num_layers, layers=range(start, start + size))
    cos, sin = rope_tables(weights.inv_freq, NUM_ROWS, weights.attention_scaling, dtype)
    meta = build_metadata([SeqSlice(0, NUM_ROWS, list(range(num_pages)))], page_size, cos.to(device), sin.to(device))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_ROWS, shape.hidden_size, generator=generator).to(device, dtype)  # [rows, hidden]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        hidden = x
        for layer in range(start, start + size):
            hidden = decoder_layer(weights.layers[layer], hidden, meta, kv.k[layer], kv.v[layer], shape)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best
