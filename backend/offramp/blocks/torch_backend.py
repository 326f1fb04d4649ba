"""The PyTorch block backend: the reference every exported backend is checked against."""

from __future__ import annotations

import torch

from offramp.blocks.base import BlockBackend
from offramp.model import fused as fused_ops
from offramp.model.attention import AttentionMetadata
from offramp.model.decoder import ModelWeights, decoder_layer
from offramp.model.kv_store import KVStore


class TorchBackend(BlockBackend):
    """The PyTorch reference implementation; every other backend is checked against it.

    With ``fused`` (and bfloat16 activations on the CPU), steps where no sequence brings more than a few
    rows run the small ops between the matrix products as fused kernels (``model.fused``); prompt
    chunks run eager.
    """

    def __init__(
        self, weights: ModelWeights, kv: KVStore, block_ranges: list[tuple[int, int]], fused: bool = False
    ) -> None:
        super().__init__(weights, kv, block_ranges)
        on_cpu = all(t.device.type == "cpu" for t in kv.k if t.numel())
        wants = fused and kv.dtype == torch.bfloat16 and on_cpu and not kv.head_major
        self.fused = fused_ops.kernels() if wants else None
        self._pages: tuple[AttentionMetadata | None, torch.Tensor | None] = (None, None)
        if self.fused is not None:  # each block's weights as the extension reads them, gathered once
            self._packed = [fused_ops.pack_layers(weights.layers[a:b]) for a, b in block_ranges]

    def run_block(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        start, end = self.block_ranges[block_idx]
        if self.fused is not None and fused_ops.can_fuse(hidden, meta):
            if self._pages[0] is not meta:  # every block of a step shares the rows' page tables
                self._pages = (meta, fused_ops.row_pages(meta))
            w = self.weights
            return fused_ops.decode_layers(
                self.fused,
                w.layers[start:end],
                hidden,
                meta,
                self.kv.k[start:end],
                self.kv.v[start:end],
                w.shape,
                self._pages[1],
                self._packed[block_idx],
            )
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
