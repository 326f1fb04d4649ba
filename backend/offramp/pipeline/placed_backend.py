"""The block backend of a model split over stages: each block runs on the stage that holds it.

The block loop sees one backend as before. A call for blocks ``[first, last)`` visits the stages
holding them in order; the hidden states move from stage to stage at block boundaries and come back
to the home device (stage 0's: embedding, exit checks, heads, sampling) at the end of the call, so
an exit decision after any block is made at stage 0 and a row that leaves is sent no further
(EE-LLM's early return). Propagated K/V of skipped layers (``propagate_kv``) goes to every stage
holding one of those layers.

Stages in other processes can work at once: a full-depth step is split into micro-batches
(``run_pipelined``) so that stage 0 computes one while the others compute earlier ones, as vLLM's
pipeline parallelism keeps several batches in flight; with exits the walk stays one batch (each exit
decision needs its block's output back at stage 0).
"""

from __future__ import annotations

from collections import deque

import torch

from offramp.blocks.base import BlockBackend
from offramp.model.attention import AttentionMetadata
from offramp.model.decoder import ModelWeights
from offramp.model.kv_store import KVStore
from offramp.pipeline.placement import Placement, partition
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
        num_micro_batches: int = 1,
    ) -> None:
        super().__init__(weights, kv, block_ranges)
        self.placement, self.stages, self.home, self.processes = placement, stages, home, processes
        self.num_micro_batches = num_micro_batches

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

    def micro_batches(self, sizes: list[int]) -> list[tuple[int, int]]:
        """Contiguous ranges of items with balanced rows, one per stage (or ``num_micro_batches``),
        when stages are processes that can work at once; else one range."""
        count = min(self.num_micro_batches, len(sizes)) if self.processes is not None else 1
        return [(0, len(sizes))] if count <= 1 else partition([float(n) for n in sizes], count)

    def run_pipelined(self, parts: list[tuple[torch.Tensor, AttentionMetadata]]) -> list[torch.Tensor]:
        """Every block on each micro-batch, several in flight: stage 0 runs the next micro-batch while
        the other stages (processes) run earlier ones; each stage takes them in order, one at a time."""
        spans = [spec.blocks for spec in self.placement.stages]
        hidden, metas = [h for h, _ in parts], [m for _, m in parts]
        waiting: list[deque[int]] = [deque() for _ in self.stages]  # per stage: micro-batches ready for it
        waiting[0].extend(range(len(parts)))
        in_flight: dict[int, int] = {}  # remote stage -> its micro-batch, oldest first
        done = 0
        while done < len(parts):
            for s in range(1, len(self.stages)):  # hand work to idle stage processes first
                if s not in in_flight and waiting[s]:
                    in_flight[s] = p = waiting[s].popleft()
                    self.stages[s].submit(*spans[s], hidden[p], metas[p])
            if waiting[0]:
                s, p = 0, waiting[0].popleft()
                hidden[p] = self.stages[0].run(*spans[0], hidden[p], metas[p])
            else:  # nothing to do here: wait for the stage busy the longest
                s = next(iter(in_flight))
                p = in_flight.pop(s)
                hidden[p] = self.stages[s].result()
            if s + 1 < len(self.stages):
                waiting[s + 1].append(p)
            else:
                done += 1
        return [h.to(self.home) for h in hidden]

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
        for log in [log for stage in self.stages for log in (stage.busy, stage.waits)]:
            log.enabled = enabled
            if enabled:
                log.intervals.clear()

    def close(self) -> None:
        """Stop the stage processes (pipeline stages); nothing to do for devices of this process."""
        if self.processes is not None:
            self.processes.close()
