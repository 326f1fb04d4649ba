"""Per-block cost for placement, and the cost of the LM head that stage 0 runs besides its blocks.

Equal blocks cost their layer count (the head: its weights in layers). Blocks of different sizes are
timed: each distinct size once on a synthetic 16-token prompt over a scratch KV store (two pages per
layer), best of three, on the device the weights are on now; the head likewise.
"""

from __future__ import annotations

import time

import torch

from offramp.model.attention import SeqSlice, build_metadata
from offramp.model.decoder import ModelWeights, decoder_layer, final_logits, rope_tables
from offramp.model.kv_store import KVStore

NUM_ROWS = 16  # tokens of the synthetic prompt that times a block


def block_costs(
    weights: ModelWeights, block_ranges: list[tuple[int, int]], page_size: int
) -> tuple[list[float], float, str]:
    """(one cost per block, the cost of stage 0's LM head in the same unit, how they were found).

    Equal blocks: each costs its number of layers, the head its weights over one layer's (decode
    reads every weight once per step: the default model's head weighs about 8 of its 30 layers).
    Blocks of different sizes: seconds measured, the head's too (16 rows each)."""
    sizes = [end - start for start, end in block_ranges]
    if len(set(sizes)) == 1:
        return [float(n) for n in sizes], _head_layers(weights.shape), "block count"
    seconds = {size: _time_layers(weights, block_ranges, size, page_size) for size in sorted(set(sizes))}
    return [seconds[size] for size in sizes], _time_head(weights), "measured block cost"


def _head_layers(shape) -> float:
    """The LM head's weight count over one decoder layer's."""
    attention = shape.hidden_size * (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    attention += shape.num_heads * shape.head_dim * shape.hidden_size
    return shape.vocab_size * shape.hidden_size / (attention + 3 * shape.hidden_size * shape.intermediate_size)


@torch.inference_mode()
def _time_head(weights: ModelWeights) -> float:
    """Seconds of the final norm and LM head on ``NUM_ROWS`` rows (best of three)."""
    x = torch.randn(NUM_ROWS, weights.shape.hidden_size, generator=torch.Generator().manual_seed(0))
    x = x.to(weights.embed.device, weights.embed.dtype)  # [rows, hidden]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        final_logits(weights, x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - t0)
    return best


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
