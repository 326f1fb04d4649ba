"""The PyTorch block backend: the reference every exported backend is checked against."""

from __future__ import annotations

import torch

from offramp.blocks.base import BlockBackend
from offramp.model.attention import AttentionMetadata
from offramp.model.decoder import decoder_layer


class TorchBackend(BlockBackend):
    """The PyTorch reference implementation; every other backend is checked against it."""

    def run_block(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        start, end = self.block_ranges[block_idx]
        for layer in range(start, end):
            hidden = decoder_layer(
                self.weights.layers[layer], hidden, meta, self.kv.k[layer], self.kv.v[layer], self.weights.shape
            )
        return hidden

    def run_fuzzy(self, hidden: torch.Tensor, meta: AttentionMetadata, depth: int, group: int) -> torch.Tensor:
        w, kv, shape = self.weights.layers, self.kv, self.weights.shape
        for first in range(0, depth, group):
            x = hidden  # [num_tokens, hidden]: what every layer of this group reads
            for layer in range(first, min(first + group, depth)):
                # decoder_layer returns x + its update; with one layer per group this is the exact walk
                out = decoder_layer(w[layer], x, meta, kv.k[layer], kv.v[layer], shape)
                hidden = out if hidden is x else hidden + (out - x)
        return hidden
