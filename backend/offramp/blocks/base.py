"""The block-backend interface: run one block of decoder layers on a sub-batch over the paged KV store."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from offramp.model.attention import AttentionMetadata
from offramp.model.decoder import ModelWeights, project_kv
from offramp.model.kv_store import KVStore


class BlockBackend(ABC):
    """Hidden states in, hidden states out, for layers ``[start, end)`` of one block.

    Implementations (PyTorch in ``torch_backend``; exported graphs on ONNX Runtime in
    ``ort_backend`` and on TensorRT in ``trt_backend``) read and write the block's layers' KV through
    the same paged store, so the runner can stop between any two blocks.
    """

    def __init__(self, weights: ModelWeights, kv: KVStore, block_ranges: list[tuple[int, int]]) -> None:
        self.weights = weights
        self.kv = kv
        self.block_ranges = block_ranges

    @property
    def num_blocks(self) -> int:
        return len(self.block_ranges)

    @abstractmethod
    def run_block(
        self,
        block_idx: int,
        hidden: torch.Tensor,  # [num_tokens, hidden]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """Run every layer of block ``block_idx`` on ``hidden`` (the tokens ``meta`` describes)."""

    def run_fuzzy(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden]
        meta: AttentionMetadata,
        depth: int,
        group: int,
    ) -> torch.Tensor:  # [num_tokens, hidden] after layers [0, depth), approximately
        """EasySpec's fuzzy draft pass (R5) over layers ``[0, depth)``: the layers go in groups of ``group``
        consecutive ones that all read the group's input, and the group adds up their residual updates, so
        a group's layers could run at once. Each layer writes the K/V of its (stale) input. Only backends
        that run single layers can do this (``NotImplementedError`` elsewhere)."""
        raise NotImplementedError(
            f"{type(self).__name__} runs whole blocks; easyspec needs the torch backend in one process"
        )

    def run_blocks(
        self,
        first: int,
        last: int,
        hidden: torch.Tensor,  # [num_tokens, hidden]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        """Blocks ``[first, last)`` in turn (a backend split over stages sends each stage one call)."""
        for b in range(first, last):
            hidden = self.run_block(b, hidden, meta)
        return hidden

    def micro_batches(self, sizes: list[int]) -> list[tuple[int, int]]:
        """How a full-depth step of items with ``sizes`` rows is split into micro-batches (ranges of
        items) for ``run_pipelined``: one, unless the blocks run in pipeline stages."""
        return [(0, len(sizes))]

    def run_pipelined(self, parts: list[tuple[torch.Tensor, AttentionMetadata]]) -> list[torch.Tensor]:
        """Every block on each micro-batch ([rows, hidden] and its metadata); stages in several
        processes keep several micro-batches in flight at once."""
        return [self.run_blocks(0, self.num_blocks, hidden, meta) for hidden, meta in parts]

    @property
    def failure(self) -> str | None:
        """Why this backend cannot run any more (e.g. a pipeline stage died), or None."""
        return None

    def close(self) -> None:  # noqa: B027 (most backends hold nothing outside this process)
        """Release what the backend holds outside this process (pipeline stages)."""

    def propagate_kv(
        self,
        hidden: torch.Tensor,  # [n, hidden] exit hidden states of tokens that left early
        cos: torch.Tensor,  # [n, 1, head_dim]
        sin: torch.Tensor,  # [n, 1, head_dim]
        slots: torch.Tensor,  # [n] long
        from_layer: int,
    ) -> None:
        """Fill K/V of layers ``from_layer ..`` for exited tokens from their exit hidden state (CALM).

        Only each skipped layer's input norm and K/V projections run, in PyTorch for every backend.
        """
        for layer in range(from_layer, self.weights.shape.num_layers):
            k, v = project_kv(self.weights.layers[layer], hidden, cos, sin, self.weights.shape)
            self.kv.write(layer, slots, k, v)
