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
