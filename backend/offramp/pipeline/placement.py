"""Which blocks run where: contiguous block ranges per stage, balanced by per-block cost.

A stage is one device in this process (``--devices``) or one process (``--pipeline-stages``). The
split minimises the most expensive stage (the pipeline's pace); on a tie the earlier stages get
less, since stage 0 also embeds, runs the exit heads, samples and schedules.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class StageSpec:
    """One stage: its device, its blocks ``[first, last)`` and their layers ``[start, end)``."""

    index: int
    device: str
    blocks: tuple[int, int]
    layers: tuple[int, int]
    cost: float  # its blocks' cost (stage 0: and the LM head's), in the units of the costs given

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    def holds_block(self, block: int) -> bool:
        return self.blocks[0] <= block < self.blocks[1]


@dataclass(slots=True)
class Placement:
    """The stages in order; ``is_remote``: stages beyond 0 are processes (pipeline stages)."""

    stages: list[StageSpec]
    is_remote: bool
    balanced_by: str  # "block count" (equal blocks) or "measured block cost" (timed at start)

    def stage_of_block(self, block: int) -> StageSpec:
        return next(s for s in self.stages if s.holds_block(block))

    def describe(self) -> str:
        """The mapping printed at start: one line per stage."""
        kind = "process" if self.is_remote else "device"
        total = sum(s.cost for s in self.stages) or 1.0
        lines = [f"offramp: {len(self.stages)} stages ({kind} each), balanced by {self.balanced_by}"]
        for s in self.stages:
            lines.append(
                f"offramp:   stage {s.index} on {s.device}: blocks {s.blocks[0]}-{s.blocks[1] - 1}, "
                f"layers {s.layers[0]}-{s.layers[1] - 1} ({s.cost / total:.0%} of the cost)"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """In ``engine.json`` terms: the devices and where each stage's blocks begin."""
        return {
            "pipeline_stages" if self.is_remote else "devices": (
                len(self.stages) if self.is_remote else [s.device for s in self.stages]
            ),
            "stage_devices": [s.device for s in self.stages],
            "stage_first_layers": [s.layers[0] for s in self.stages],
            "stage_blocks": [list(s.blocks) for s in self.stages],
        }


def partition(costs: list[float], num_stages: int, first_extra: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous ranges ``[first, last)`` of ``costs``, one per stage, each non-empty, that minimise
    the largest range sum (the first range also carries ``first_extra``); ties give earlier ranges less."""
    n = len(costs)
    if num_stages > n:
        raise ValueError(f"{num_stages} stages for {n} blocks: each stage needs at least one block")
    prefix = [0.0, *itertools.accumulate(costs)]
    inf = float("inf")
    # best[k][i]: the least possible max over k ranges covering blocks [0, i); cut[k][i]: last range's start
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):  # smallest j first: on a tie the last range is the longest
                value = max(best[k - 1][j], prefix[i] - prefix[j] + (first_extra if k == 1 else 0.0))
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    ranges, end = [], n
    for k in range(num_stages, 0, -1):
        start = cut[k][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def place(
    block_ranges: list[tuple[int, int]],
    devices: list[str],
    costs: list[float],
    is_remote: bool,
    head_cost: float = 0.0,
    balanced_by: str | None = None,
) -> Placement:
    """Stages over ``devices`` (one each) for blocks with the given per-block ``costs``; stage 0 also
    carries ``head_cost`` (its LM head)."""
    if len(devices) > len(block_ranges):
        raise ValueError(
            f"pipeline: {len(devices)} stages for {len(block_ranges)} blocks; each stage needs at least one block "
            "(use fewer stages or smaller --layers-per-block)"
        )
    if balanced_by is None:
        balanced_by = "block count" if len(set(costs)) == 1 else "measured block cost"
    if head_cost:
        balanced_by += " (stage 0 also runs the LM head)"
    stages = []
    for index, ((first, last), device) in enumerate(zip(partition(costs, len(devices), head_cost), devices)):
        layers = (block_ranges[first][0], block_ranges[last - 1][1])
        cost = sum(costs[first:last]) + (head_cost if index == 0 else 0.0)
        stages.append(StageSpec(index, device, (first, last), layers, cost))
    return Placement(stages, is_remote, balanced_by)
