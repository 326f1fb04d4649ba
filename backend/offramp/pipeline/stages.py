"""A stage on a device of this process: its blocks' weights and K/V live there; hidden states and the
step's attention metadata are moved there when they arrive from another device.

``LocalStage`` and ``remote.RemoteStage`` share one interface (``run``, ``propagate``, ``busy``), so
``PlacedBackend`` walks its stages without knowing where they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from offramp.blocks.torch_backend import TorchBackend
from offramp.model.attention import AttentionGroup, AttentionMetadata
from offramp.model.decoder import ModelWeights, project_kv
from offramp.model.kv_store import KVStore
from offramp.pipeline.placement import StageSpec


@dataclass(slots=True)
class BusyLog:
    """Wall-clock intervals (``time.time()``, comparable across processes of one host) a stage computed;
    recorded only while ``enabled`` (timelines and bubble measurements)."""

    enabled: bool = False
    intervals: list[tuple[float, float]] = field(default_factory=list)

    def add(self, start: float, end: float) -> None:
        if self.enabled:
            self.intervals.append((start, end))


def meta_to(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """``meta`` with every tensor on ``device``."""
    groups = [
        AttentionGroup(
            g.row_start,
            g.row_end,
            g.num_seqs,
            g.max_new,
            g.kv_pages.to(device),
            None if g.mask is None else g.mask.to(device),
        )
        for g in meta.groups
    ]
    return AttentionMetadata(
        meta.positions.to(device),
        meta.slot_mapping.to(device),
        meta.cos.to(device),
        meta.sin.to(device),
        groups,
        meta.page_size,
    )


class LocalStage:
    """Blocks ``spec.blocks`` on ``spec.device`` of this process, over the layers' K/V there."""

    def __init__(
        self, spec: StageSpec, weights: ModelWeights, kv: KVStore, block_ranges: list[tuple[int, int]]
    ) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        self.weights, self.kv = weights, kv
        self.blocks = TorchBackend(weights, kv, block_ranges)
        self.busy = BusyLog()
        self.waits = BusyLog()  # stays empty: a stage of this process never waits for another
        self._meta: tuple[AttentionMetadata | None, AttentionMetadata | None] = (None, None)  # (given, moved)

    def _local_meta(self, meta: AttentionMetadata) -> AttentionMetadata:
        if meta.positions.device == self.device:
            return meta
        if self._meta[0] is not meta:  # a step's metadata moves once, whatever the number of blocks
            self._meta = (meta, meta_to(meta, self.device))
        return self._meta[1]

    def run(self, first: int, last: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Blocks ``[first, last)`` on ``hidden`` [rows, hidden]; the result stays on this device."""
        start = time.time()
        hidden, local = hidden.to(self.device), self._local_meta(meta)
        for b in range(first, last):
            hidden = self.blocks.run_block(b, hidden, local)
        self.busy.add(start, time.time())
        return hidden

    def propagate(
        self,
        hidden: torch.Tensor,  # [n, hidden] exit hidden states
        cos: torch.Tensor,  # [n, 1, head_dim]
        sin: torch.Tensor,  # [n, 1, head_dim]
        slots: torch.Tensor,  # [n] long
        from_layer: int,
    ) -> None:
        """K/V of this stage's layers ``from_layer ..`` for exited tokens (CALM propagation)."""
        start = time.time()
        hidden, cos, sin, slots = (t.to(self.device) for t in (hidden, cos, sin, slots))
        for layer in range(max(from_layer, self.spec.layers[0]), self.spec.layers[1]):
            k, v = project_kv(self.weights.layers[layer], hidden, cos, sin, self.weights.shape)
            self.kv.write(layer, slots, k, v)
        self.busy.add(start, time.time())

    def close(self) -> None:
        pass
