"""How many bytes of weights a model holds, and how many one full-depth token reads.

Decode on a CPU is bound by weight bytes streamed per step, so the bench reports both:

* ``resident``: every weight in memory (embedding table, norms, linears, LM head, biases; a tied
  LM head that *is* the embedding counts once; a quantized LM head is its own packed copy).
* ``per_token``: bytes read to produce one token at full depth: every decoder linear, bias and norm,
  the final norm, the LM head, and one row of the embedding table (a lookup reads one row).
"""

from __future__ import annotations

import torch

from offramp.model.decoder import ModelWeights
from offramp.model.quant import weight_nbytes


def _layer_bytes(weights: ModelWeights, every_layer: bool = False) -> int:
    """Bytes of the decoder layers held here (a pipeline stage holds only its own; the others are
    None). With ``every_layer`` the missing ones count as the mean of those held (one shape for all)."""
    total, held = 0, [layer for layer in weights.layers if layer is not None]
    for layer in held:
        for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down, layer.input_norm, layer.post_norm):
            total += weight_nbytes(w)
        if layer.qkv_bias is not None:
            total += weight_nbytes(layer.qkv_bias)
    if every_layer and held and len(held) < len(weights.layers):
        total = total * len(weights.layers) // len(held)
    return total


def resident_weight_bytes(weights: ModelWeights) -> int:
    """Bytes of every weight held in memory (in this process)."""
    head = 0 if weights.lm_head is weights.embed else weight_nbytes(weights.lm_head)
    return _layer_bytes(weights) + weight_nbytes(weights.embed) + weight_nbytes(weights.final_norm) + head


def weight_bytes_per_token(weights: ModelWeights) -> int:
    """Bytes of weights read per full-depth token (one embedding row, not the table)."""
    embed: torch.Tensor = weights.embed  # [vocab, hidden]
    row = embed.shape[1] * embed.element_size()
    layers = _layer_bytes(weights, every_layer=True)
    return layers + weight_nbytes(weights.final_norm) + weight_nbytes(weights.lm_head) + row
