"""The block backend of a model split over stages: each block runs on the stage that holds it.

The block loop sees one backend as before. A call for blocks ``[first, last)`` visits the stages
holding them in order; the hidden states move from stage to stage at block boundaries and come back
to the home device (stage 0's: embedding, exit checks, heads, sampling) at the end of the call, so
an exit decision after any block is made at stage 0 and a row that leaves is sent no further
(EE-LLM's early return). Propagated K/V of skipped layers (``propagate_kv``) goes to every stage
holding one of those layers.
"""

from __future__ import annotations

import torch

from offramp.blocks.base import BlockBackend
from offramp.model.attention import AttentionMetadata
from offramp.model.decoder import ModelWeights
from offramp.model.kv_store import KVStore
from offramp.pipeline.placement import Placement
from offramp.pipeline.remote import StageProcesses


class PlacedBackend(BlockBackend):
    def __init__(
        self,
        weights: ModelWeights,
        kv: KVStore,
        block_ranges: list[tuple[int, int]],
        placement: Placement,
        stages: list,  # LocalStage or RemoteStage, one per placement stage
        home: torch.device,
        processes: StageProcesses | None = None,
    ) -> None:
        super().__init__(weights, kv, block_ranges)
        self.placement, self.stages, self.home, self.processes = placement, stages, home, processes

    @property
    def failure(self) -> str | None:
        """Why the pipeline cannot run any more (a stage died or hung), or None."""
        return None if self.processes is None else self.processes.failure

    def run_block(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.run_blocks(block_idx, block_idx + 1, hidden, meta)

    def run_blocks(
        self,
        first: int,
        last: int,
        hidden: torch.Tensor,  # [rows, hidden]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [rows, hidden] on the home device
        for spec, stage in zip(self.placement.stages, self.stages):
            lo, hi = max(first, spec.blocks[0]), min(last, spec.blocks[1])
            if lo < hi:
                hidden = stage.run(lo, hi, hidden, meta)
        return hidden.to(self.home)

    def propagate_kv(
        self,
        hidden: torch.Tensor,  # [n, hidden]
        cos: torch.Tensor,  # [n, 1, head_dim]
        sin: torch.Tensor,  # [n, 1, head_dim]
        slots: torch.Tensor,  # [n] long
        from_layer: int,
    ) -> None:
        for spec, stage in zip(self.placement.stages, self.stages):
            if spec.layers[1] > from_layer:
                stage.propagate(hidden, cos, sin, slots, from_layer)

    def record_busy(self, enabled: bool) -> None:
        """Start (clearing) or stop recording each stage's busy intervals."""
        for stage in self.stages:
            stage.busy.enabled = enabled
            if enabled:
                stage.busy.intervals.clear()

    def close(self) -> None:
        """Stop the stage processes (pipeline stages); nothing to do for devices of this process."""
        if self.processes is not None:
            self.processes.close()
