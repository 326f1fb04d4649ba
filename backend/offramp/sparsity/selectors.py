"""Mask choosers for the teacher-forced reference pass (``masked.masked_forward``): a trained
predictor, random selection (the baseline) and fixed masks (tests). Each picks, per position, the
same number of heads and groups the engine would (``selection.keep_top``)."""

from __future__ import annotations

import torch

from offramp.sparsity.layout import SparseLayout
from offramp.sparsity.masked import Masks
from offramp.sparsity.predictor import PredictorFile, UnifiedPredictor
from offramp.sparsity.selection import fill_gaps, keep_top


class _TopK:
    def __init__(
        self,
        layout: SparseLayout,
        num_heads: int,
        density: float,
        head_density: float,
        floor: float,
        max_gap: int = 0,
    ) -> None:
        self.layout, self.num_heads = layout, num_heads
        self.density, self.head_density, self.floor, self.max_gap = density, head_density, floor, max_gap
        self.sparse_from = 0  # positions before it run dense (the prompt): not counted
        self.kept = self.total = 0  # groups kept / groups, over the sparse positions of every layer

    def _count(self, groups: torch.Tensor) -> torch.Tensor:
        self.kept += int(groups[self.sparse_from :].sum())
        self.total += groups[self.sparse_from :].numel()
        return groups

    @property
    def density_used(self) -> float | None:
        return round(self.kept / self.total, 4) if self.total else None

    def _masks(self, layer: int, scores: torch.Tensor) -> Masks:  # scores [T, heads + groups]
        n, nh = scores.shape[0], self.num_heads
        heads = keep_top(scores[:, None, :nh], torch.full((n,), self.head_density), self.floor)[:, 0]
        groups = keep_top(scores[:, None, nh:], torch.full((n,), self.density), self.floor)[:, 0]
        groups = self._count(fill_gaps(groups, self.max_gap))
        return heads, self.layout.neuron_mask(layer, groups)


class PredictedSelector(_TopK):
    """The engine's choice: a unified predictor scores all layers from layer 0's attention output,
    a per-layer one each layer from its input."""

    def __init__(
        self,
        pred: PredictorFile,
        num_heads: int,
        density: float,
        head_density: float = 1.0,
        floor: float = 0.0,
        max_gap: int = 0,
    ):
        super().__init__(pred.layout, num_heads, density, head_density, floor, max_gap)
        self.model = pred.model
        self._all: torch.Tensor | None = None

    def select(self, layer: int, x_in: torch.Tensor, o0: torch.Tensor) -> Masks:
        with torch.no_grad():
            if isinstance(self.model, UnifiedPredictor):
                if layer == 0:
                    self._all = self.model(o0)  # [T, layers, units]
                scores = self._all[:, layer]
            else:
                scores = self.model.layer(layer, x_in)
        return self._masks(layer, scores)


class RandomSelector(_TopK):
    """Uniformly random heads and groups per position and layer (seeded)."""

    def __init__(
        self,
        layout: SparseLayout,
        num_heads: int,
        num_groups: int,
        density: float,
        head_density: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(layout, num_heads, density, head_density, 0.0)
        self.units = num_heads + num_groups
        self.gen = torch.Generator().manual_seed(seed)

    def select(self, layer: int, x_in: torch.Tensor, o0: torch.Tensor) -> Masks:
        return self._masks(layer, torch.rand(x_in.shape[0], self.units, generator=self.gen))


class FixedSelector:
    """Given masks: heads [T, layers, heads] and groups [T, layers, groups] bool."""

    def __init__(self, layout: SparseLayout, heads: torch.Tensor, groups: torch.Tensor) -> None:
        self.layout, self.heads, self.groups = layout, heads, groups

    def select(self, layer: int, x_in: torch.Tensor, o0: torch.Tensor) -> Masks:
        return self.heads[:, layer], self.layout.neuron_mask(layer, self.groups[:, layer])


class OracleSelector(_TopK):
    """The upper bound of a magnitude predictor: each position keeps the groups with the largest true
    sum of |silu(gate) * up| in that layer (read after computing them; heads all kept)."""

    def __init__(self, layout: SparseLayout, num_heads: int, density: float) -> None:
        super().__init__(layout, num_heads, density, 1.0, 0.0)

    def select(self, layer: int, x_in: torch.Tensor, o0: torch.Tensor) -> Masks:
        return None, None

    def ffn_keep(self, layer: int, act: torch.Tensor) -> torch.Tensor:  # act [T, intermediate]
        g = self.layout.group_size
        scores = act.detach().abs()[:, self.layout.perms[layer]].view(act.shape[0], -1, g).sum(-1)  # [T, groups]
        groups = self._count(keep_top(scores[:, None], torch.full((act.shape[0],), self.density))[:, 0])
        return self.layout.neuron_mask(layer, groups)
