"""Runs blocks of decoder layers with contextual sparsity for a step's sparse decode rows.

The block loop hands each block call the sub-batch rows that are sparse and which step item owns
each. Layer 0's attention always runs dense; the unified predictor then reads its output at the
sparse rows and picks, for every layer, the query heads and neuron groups each row keeps (layer 0's
FFN included). The per-layer predictor instead scores each layer from that layer's input just before
it runs. Batching (``sparsity_batching``): ``union`` runs all sparse rows of a layer over the union of
their selections (one product per run, every row gets at least what it asked for); ``per_row`` runs
each row over its own selection (exactly its own mask, one set of products per row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from offramp.model.attention import AttentionMetadata
from offramp.model.decoder import ModelWeights, decoder_layer
from offramp.model.kv_store import KVStore
from offramp.sparsity.execute import attend, feed_forward
from offramp.sparsity.layout import sparse_weights
from offramp.sparsity.predictor import PredictorFile, UnifiedPredictor
from offramp.sparsity.selection import LayerPlan, RowSet, Run, fill_gaps, keep_top, layer_runs

BATCHING = ("union", "per_row")


@dataclass(slots=True)
class SparseStats:
    predictor_s: float = 0.0
    num_row_layers: int = 0  # sparse rows x layers run
    group_density_sum: float = 0.0  # share of FFN groups computed, summed over those row-layers
    head_density_sum: float = 0.0  # share of query heads computed, likewise
    num_ffn_sets: int = 0  # row sets run through a sparse FFN (one per layer in union batching)
    num_ffn_runs: int = 0  # their runs of consecutive groups (one gate/up and one down product each)

    @property
    def mean_density(self) -> float | None:
        return round(self.group_density_sum / self.num_row_layers, 4) if self.num_row_layers else None

    @property
    def runs_per_layer(self) -> float | None:
        return round(self.num_ffn_runs / self.num_ffn_sets, 3) if self.num_ffn_sets else None

    @property
    def mean_head_density(self) -> float | None:
        return round(self.head_density_sum / self.num_row_layers, 4) if self.num_row_layers else None


class SparseExecutor:
    def __init__(
        self,
        weights: ModelWeights,
        kv: KVStore,
        block_ranges: list[tuple[int, int]],
        predictor: PredictorFile,
        head_density: float,
        floor: float,
        batching: str,
        max_gap: int = 0,
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"sparsity_batching: {batching!r} is not one of {', '.join(BATCHING)}")
        self.weights, self.kv, self.block_ranges = weights, kv, block_ranges
        self.shape = weights.shape
        self.layout = predictor.layout
        self.sparse = sparse_weights(weights, predictor.layout)
        self.model = predictor.model.to(weights.embed.device)
        self.unified = isinstance(predictor.model, UnifiedPredictor)
        self.head_density, self.floor, self.batching, self.max_gap = head_density, floor, batching, max_gap
        self.group_size = predictor.layout.group_size
        self.stats = SparseStats()
        self._in_order = False
        self._densities: dict[int, float] = {}
        self._runs: dict[object, tuple[list[list[Run]], list[list[Run]]]] = {}  # owner (, layer) -> (head, group) runs

    def begin(self, densities: list[float | None]) -> None:
        """A new step: each item's FFN density (None: the item runs dense)."""
        self._densities = {i: d for i, d in enumerate(densities) if d is not None}
        self._runs = {}

    def is_sparse(self, item: int) -> bool:
        return item in self._densities

    def run_block(
        self,
        block_idx: int,
        hidden: torch.Tensor,  # [n, hidden]
        meta: AttentionMetadata,
        sparse_rows: list[int],  # rows of ``hidden`` that run sparse
        owners: list[int],  # the step item each of them belongs to
    ) -> torch.Tensor:
        start, end = self.block_ranges[block_idx]
        layers, kv, shape = self.weights.layers, self.kv, self.shape
        if not sparse_rows:
            for layer in range(start, end):
                hidden = decoder_layer(layers[layer], hidden, meta, kv.k[layer], kv.v[layer], shape)
            return hidden
        device = hidden.device
        rows = torch.tensor(sparse_rows, dtype=torch.long, device=device)
        rest = sorted(set(range(hidden.shape[0])) - set(sparse_rows))
        dense = torch.tensor(rest, dtype=torch.long, device=device) if rest else None
        self._in_order = sparse_rows == list(range(len(sparse_rows)))
        for layer in range(start, end):
            w, sw = layers[layer], self.sparse[layer]
            if layer == 0:
                o = attend(w, None, hidden, meta, kv.k[0], kv.v[0], shape, None)  # [n, hidden] dense
                self._predict(0, (o if self.unified else hidden).index_select(0, rows), owners)  # input or o
                hidden = hidden + o
            else:
                if not self.unified:
                    self._predict(layer, hidden.index_select(0, rows), owners)
                plan = self._plan(layer, rows, dense, owners, heads=True)
                hidden = hidden + attend(w, sw, hidden, meta, kv.k[layer], kv.v[layer], shape, plan)
            plan = self._plan(layer, rows, dense, owners, heads=False)
            hidden = hidden + feed_forward(w, sw, hidden, shape, plan, self.group_size)
        return hidden

    def _predict(self, layer: int, x: torch.Tensor, owners: list[int]) -> None:
        """Scores -> kept heads and groups -> runs, for the rows' owners (unified: every layer at once
        from layer 0's attention output; per layer: this layer from its input)."""
        t0 = time.perf_counter()
        nh = self.shape.num_heads
        with torch.inference_mode():
            scores = self.model(x) if self.unified else self.model.layer(layer, x)[:, None]  # [m, L or 1, units]
        density = torch.tensor([self._densities[o] for o in owners], dtype=torch.float32, device=x.device)
        heads = keep_top(scores[..., :nh], torch.full_like(density, self.head_density), self.floor)
        groups = keep_top(scores[..., nh:], density, self.floor)  # [m, L or 1, groups]
        groups = fill_gaps(groups, self.max_gap)
        if self.unified:
            heads[:, 0] = True  # layer 0's attention ran dense (it feeds the predictor)
        self._store(layer, heads, groups, owners)
        self.stats.predictor_s += time.perf_counter() - t0

    def _store(self, layer: int, heads: torch.Tensor, groups: torch.Tensor, owners: list[int]) -> None:
        if self.batching == "union":
            h_runs, g_runs = layer_runs(heads.any(0)), layer_runs(groups.any(0))
            if self.unified:
                self._runs["union"] = (h_runs, g_runs)
            else:
                self._runs[("union", layer)] = (h_runs, g_runs)
            return
        for k, owner in enumerate(owners):
            h_runs, g_runs = layer_runs(heads[k]), layer_runs(groups[k])
            self._runs[owner if self.unified else (owner, layer)] = (h_runs, g_runs)

    def _plan(self, layer: int, rows: torch.Tensor, dense: torch.Tensor | None, owners: list[int], heads: bool):
        """The row sets of one layer's attention (``heads``) or FFN."""
        at = layer if self.unified else 0  # unified runs hold every layer; per-layer runs only this one
        if self.batching == "union":
            sets = [RowSet(rows, *self._pair(self._runs["union" if self.unified else ("union", layer)], at))]
        else:
            sets = [
                RowSet(rows[k : k + 1], *self._pair(self._runs[o if self.unified else (o, layer)], at))
                for k, o in enumerate(owners)
            ]
        self._count(layer, sets, heads)
        return LayerPlan(sets, dense, all_rows=dense is None and len(sets) == 1 and self._in_order)

    def _count(self, layer: int, sets: list[RowSet], heads: bool) -> None:
        """Shares of heads and groups computed (layer 0's attention is dense)."""
        nh, ng = self.shape.num_heads, self.layout.num_groups(self.shape.intermediate_size)
        num_rows = sum(st.rows.numel() for st in sets)
        if heads:
            kept = sum(sum(e - s for s, e in st.head_runs) * st.rows.numel() for st in sets)
            self.stats.head_density_sum += kept / nh
            return
        kept = sum(sum(e - s for s, e in st.group_runs) * st.rows.numel() for st in sets)
        self.stats.group_density_sum += kept / ng
        self.stats.num_ffn_sets += len(sets)
        self.stats.num_ffn_runs += sum(len(st.group_runs) for st in sets)
        self.stats.num_row_layers += num_rows
        if layer == 0:
            self.stats.head_density_sum += num_rows

    @staticmethod
    def _pair(runs_pair: tuple[list[list[Run]], list[list[Run]]], at: int) -> tuple[list[Run], list[Run]]:
        return runs_pair[0][at], runs_pair[1][at]
