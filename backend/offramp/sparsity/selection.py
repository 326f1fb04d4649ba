"""From predicted importance to what a decode row computes: the kept query heads and neuron groups
of each layer, the confidence floor, and contiguous runs (the unit the sparse kernels read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

Run = tuple[int, int]  # [start, end) of consecutive kept units (heads or neuron groups)


@dataclass(slots=True)
class RowSet:
    """Rows of a sub-batch that share one selection in one layer."""

    rows: torch.Tensor  # [m] long: row indices into the sub-batch
    head_runs: list[Run]  # query heads kept
    group_runs: list[Run]  # neuron groups kept (in the permuted order of ``SparseLayout``)


@dataclass(slots=True)
class LayerPlan:
    """One layer of one block call: sparse row sets, and the rows that run dense (prompt chunks,
    dense requests, recomputed tokens)."""

    sets: list[RowSet]
    dense_rows: torch.Tensor | None  # [d] long, or None when every row is sparse
    all_rows: bool = False  # one set holding every row in order: no gather or scatter of rows needed


def keep_top(scores: torch.Tensor, density: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """scores [rows, layers, units] (higher: more important), density [rows] in (0, 1] ->
    kept [rows, layers, units] bool: the ``round(density * units)`` best units (at least one) of
    every layer. Confidence floor: where the kept units hold less than ``floor`` of the layer's
    predicted (non-negative) importance, the predictor is unsure and the whole layer is kept."""
    units = scores.shape[-1]
    k = (density.float() * units).round().clamp(1, units).long()  # [rows]
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # [rows, layers, units]: 0 = best
    keep = rank < k[:, None, None]
    if floor > 0:
        pos = scores.float().clamp_min(0)
        share = (pos * keep).sum(-1) / pos.sum(-1).clamp_min(1e-12)  # [rows, layers]
        keep |= (share < floor)[..., None]
    return keep


def fill_gaps(keep: torch.Tensor, max_gap: int = 1) -> torch.Tensor:
    """keep [..., units] bool, with every gap of at most ``max_gap`` skipped units between two kept
    ones kept too: the runs on both sides become one product. Worth it where a product's fixed cost
    exceeds reading the gap (bfloat16 on the CPU: ~30 us per call, about the bytes of 2-3 groups of 64)."""
    if max_gap <= 0:
        return keep
    n = keep.shape[-1]
    idx = torch.arange(n, device=keep.device).expand_as(keep)
    prev = torch.where(keep, idx, -1).cummax(-1).values  # last kept unit at or before each
    nxt = torch.where(keep, idx, n).flip(-1).cummin(-1).values.flip(-1)  # first kept at or after
    return keep | ((prev >= 0) & (nxt < n) & (nxt - prev - 1 <= max_gap))


def runs(keep: list[bool]) -> list[Run]:
    """[True, True, False, True] -> [(0, 2), (3, 4)]."""
    out: list[Run] = []
    start = None
    for i, k in enumerate(keep):
        if k and start is None:
            start = i
        elif not k and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(keep)))
    return out


def layer_runs(keep: torch.Tensor) -> list[list[Run]]:
    """keep [layers, units] bool -> per layer its runs (one ``tolist`` for all layers)."""
    return [runs(row) for row in keep.tolist()]
