"""Where the blocks fall and where tokens may leave, from an ``EngineConfig`` and a model's depth.

Part of the configuration layer (``offramp.config`` delegates its ``block_ranges``, ``exit_depths`` and
``min_exit_depth`` here; the checks live in ``config_checks``): the option definitions stay in ``config.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from offramp.config import EngineConfig

# Default first exit depth, as a share of the model's layers: on the default model (30 layers) exits
# before it loop (docs/early-exit.md, "Choosing min_exit_layer"); the default is the block end nearest it.
MIN_EXIT_FRACTION = 0.85


def block_ranges(config: EngineConfig, num_layers: int) -> list[tuple[int, int]]:
    """Half-open layer ranges ``[start, end)`` of each block."""
    if config.block_boundaries is None:
        starts = list(range(0, num_layers, config.layers_per_block))
    else:
        starts = list(config.block_boundaries)
        if starts[-1] >= num_layers:
            raise ValueError(f"block_boundaries: {starts[-1]} is not a layer of this {num_layers}-layer model")
    ends = starts[1:] + [num_layers]
    return list(zip(starts, ends))


def exit_depths(config: EngineConfig, num_layers: int) -> set[int]:
    """Depths (layers run) after which a token may leave: block ends, filtered by the config."""
    ends = {end for _, end in block_ranges(config, num_layers)}
    if config.exit_points is not None:
        missing = [p for p in config.exit_points if p not in ends]
        if missing:
            raise ValueError(f"exit_points: {missing} are not block ends ({sorted(ends)})")
        ends = set(config.exit_points)
    first = min_exit_depth(config, num_layers)
    return {d for d in ends if first <= d < num_layers}


def min_exit_depth(config: EngineConfig, num_layers: int) -> int:
    """``min_exit_layer``, or its default: no bound under explicit ``exit_points``, else the block end
    (before the last) nearest ``MIN_EXIT_FRACTION`` of the layers (the lower one on a tie)."""
    if config.min_exit_layer is not None:
        return config.min_exit_layer
    if config.exit_points is not None:
        return 1
    ends = [end for _, end in block_ranges(config, num_layers) if end < num_layers]
    target = MIN_EXIT_FRACTION * num_layers
    return min(ends, key=lambda end: (abs(end - target), end), default=num_layers)
