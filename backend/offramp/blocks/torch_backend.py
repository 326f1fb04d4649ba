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

    With ``fused`` (and bfloat16 activations on the CPU), the rows of sequences that bring at most a few
    (decodes, verification, redo rows) run each block in one call of the fused kernels (``model.fused``);
    prompt chunks run eager, in their own part of a mixed step, or with ``invariant`` fused too, so that
    every row's bits are the same whatever shares its step or how its prompt was chunked.
    """

    def __init__(
        self,
        weights: ModelWeights,
        kv: KVStore,
        block_ranges: list[tuple[int, int]],
        fused: bool = False,
        invariant: bool = False,
    ) -> None:
        super().__init__(weights, kv, block_ranges)
        self.max_rows = fused_ops.ALL_ROWS if invariant else fused_ops.MAX_ROWS_PER_SEQ
        on_cpu = all(t.device.type == "cpu" for t in kv.k if t.numel())
        wants = fused and kv.dtype == torch.bfloat16 and on_cpu and not kv.head_major
        self.fused = fused_ops.kernels() if wants else None
        self._runs: tuple[AttentionMetadata | None, list] = (None, [])
        self._spans: dict[tuple[int, int], tuple[list[torch.Tensor], list[int]]] = {}  # run_blocks' packed weights
        if self.fused is not None:  # each block's weights as the extension reads them, gathered once
            self._packed = [fused_ops.pack_layers(weights.layers[a:b]) for a, b in block_ranges]

    def run_blocks(self, first: int, last: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Several blocks whose rows all take the fused path (a full-depth decode step, a draft pass) run in
        one call of the extension: the same layers and roundings as block by block, without a return to
        Python between blocks."""
        if last - first > 1 and self.fused is not None and fused_ops.can_fuse_some(hidden, meta, self.max_rows):
            runs = self._step_runs(meta)
            if len(runs) == 1 and runs[0][3] is not None:
                return self._fused(first, last, hidden, meta, runs[0][3])
        return super().run_blocks(first, last, hidden, meta)

    def _step_runs(self, meta: AttentionMetadata) -> list:
        if self._runs[0] is not meta:  # every block of a step shares its runs and the rows' page tables
            runs = fused_ops.split_step(meta, self.max_rows)
            self._runs = (meta, [(lo, hi, sub, fused_ops.row_pages(sub) if ok else None) for lo, hi, sub, ok in runs])
        return self._runs[1]

    def run_block(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.fused is None or not fused_ops.can_fuse_some(hidden, meta, self.max_rows):
            return self._eager(block_idx, hidden, meta)
        runs = self._step_runs(meta)
        if len(runs) == 1:
            return self._fused(block_idx, block_idx + 1, hidden, meta, runs[0][3])
        # a mixed step: decode/verification rows fused, prompt chunks eager, each run with its own metadata
        outs = [
            self._fused(block_idx, block_idx + 1, hidden[lo:hi], sub, pages)
            if pages is not None
            else self._eager(block_idx, hidden[lo:hi], sub)
            for lo, hi, sub, pages in runs
        ]
        return torch.cat(outs)

    def _fused(
        self, first: int, last: int, hidden: torch.Tensor, meta: AttentionMetadata, pages: torch.Tensor
    ) -> torch.Tensor:
        """Blocks ``[first, last)`` in one call of the extension."""
        start, end = self.block_ranges[first][0], self.block_ranges[last - 1][1]
        if last - first == 1:
            packed = self._packed[first]
        else:  # the blocks' packed weights end to end, gathered once per span
            if (first, last) not in self._spans:
                parts = self._packed[first:last]
                self._spans[(first, last)] = ([t for p in parts for t in p[0]], [i for p in parts for i in p[1]])
            packed = self._spans[(first, last)]
        w = self.weights
        return fused_ops.decode_layers(
            self.fused,
            w.layers[start:end],
            hidden,
            meta,
            self.kv.k[start:end],
            self.kv.v[start:end],
            w.shape,
            pages,
            packed,
        )

    def _eager(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        start, end = self.block_ranges[block_idx]
        for layer in range(start, end):
            hidden = decoder_layer(
                self.weights.layers[layer], hidden, meta, self.kv.k[layer], self.kv.v[layer], self.weights.shape
            )
        return hidden

    def run_fuzzy(self, hidden: torch.Tensor, meta: AttentionMetadata, depth: int, group: int) -> torch.Tensor:
        w, kv, shape = self.weights.layers, self.kv, self.weights.shape
        # draft rows are decode-like (a few per sequence): one fused call per layer where the kernels serve them
        pages = (
            fused_ops.row_pages(meta)
            if self.fused is not None and fused_ops.can_fuse(hidden, meta, self.max_rows)
            else None
        )
        for first in range(0, depth, group):
            x = hidden  # [num_tokens, hidden]: what every layer of this group reads
            for layer in range(first, min(first + group, depth)):
                # a layer returns x + its update; with one layer per group this is the exact walk
                if pages is None:
                    out = decoder_layer(w[layer], x, meta, kv.k[layer], kv.v[layer], shape)
                else:
                    out = fused_ops.decode_layers(
                        self.fused,
                        [w[layer]],
                        x,
                        meta,
                        kv.k[layer : layer + 1],
                        kv.v[layer : layer + 1],
                        shape,
                        pages,
                        self._layer_packed(layer),
                    )
                hidden = out if hidden is x else hidden + (out - x)
        return hidden

    def _layer_packed(self, layer: int) -> tuple[list[torch.Tensor], list[int]]:
        """One layer's part of its block's packed weights (``pack_layers``: 11 tensors, 12 ints a layer)."""
        b = next(i for i, (start, end) in enumerate(self.block_ranges) if start <= layer < end)
        tensors, specs = self._packed[b]
        i = layer - self.block_ranges[b][0]
        return tensors[11 * i : 11 * i + 11], specs[12 * i : 12 * i + 12]
