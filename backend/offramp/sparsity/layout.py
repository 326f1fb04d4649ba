"""The sparse weight layout: FFN neurons permuted offline into contiguous groups, and the copies of
the weights the sparse decode path reads.

Skipping a neuron means not reading its row of gate and up and its column of down. A gather that
copies the selected rows first reads them twice, so instead the neurons of every layer are permuted
once (co-active neurons next to each other, ``coactive_order``) and cut into groups of
``group_size``; the sparse path multiplies by *views* of runs of consecutive kept groups, so every
selected weight byte is read exactly once and skipped groups are never touched:

* ``gate_up``: ``[num_groups, 2, group_size, hidden]`` flattened to ``[2 * intermediate, hidden]``:
  a group's gate rows then its up rows, so a run of groups is one contiguous block of rows.
* ``down_t``: ``down`` transposed and permuted, ``[intermediate, hidden]``: a group's down columns
  are contiguous rows.
* ``o_t``: ``o_proj`` transposed, ``[heads * head_dim, hidden]``: a query head's columns of the
  output projection are contiguous rows. The query rows of the fused QKV weight already are.

Format: the dtype's own float weights (float32, or bfloat16 with ``--dtype bfloat16`` and
``--weights none`` / ``bf16``). torch's int8/int4 CPU kernels only multiply a whole packed matrix
(int4 rows are interleaved in blocks of 64 and its groups run along the input, so ``down``'s
columns cannot be cut without repacking), so packed formats are refused with a clear error.
The copies cost one extra FFN + ``o_proj`` of memory; the dense path keeps the original weights, so
prompt chunks and dense requests compute exactly as without sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offramp.model.decoder import LayerWeights, ModelShape, ModelWeights


@dataclass(slots=True)
class SparseLayout:
    """How neurons are grouped: per layer a permutation of the FFN neurons, cut into groups."""

    group_size: int
    perms: list[torch.Tensor]  # per layer [intermediate] long: new position j holds neuron perms[l][j]

    def num_groups(self, intermediate: int) -> int:
        return intermediate // self.group_size

    def neuron_mask(self, layer: int, groups: torch.Tensor) -> torch.Tensor:
        """Groups kept [..., num_groups] bool -> neurons kept [..., intermediate] in the original order."""
        permuted = groups.repeat_interleave(self.group_size, dim=-1)  # [..., intermediate]
        out = torch.empty_like(permuted)
        out[..., self.perms[layer]] = permuted
        return out


def identity_layout(shape: ModelShape, group_size: int) -> SparseLayout:
    check_group_size(shape, group_size)
    return SparseLayout(group_size, [torch.arange(shape.intermediate_size) for _ in range(shape.num_layers)])


def check_group_size(shape: ModelShape, group_size: int) -> None:
    if group_size <= 0 or shape.intermediate_size % group_size:
        raise ValueError(f"sparsity_group_size: {group_size} does not divide the FFN width {shape.intermediate_size}")


@dataclass(slots=True)
class SparseLayerWeights:
    """One layer's weights in the sparse layout (views where the original layout already fits)."""

    q: torch.Tensor  # [heads * head_dim, hidden] view of the fused QKV's query rows
    q_bias: torch.Tensor | None  # [heads * head_dim]
    kv: torch.Tensor  # [2 * kv_heads * head_dim, hidden] view of the fused QKV's K/V rows
    kv_bias: torch.Tensor | None
    o_t: torch.Tensor  # [heads * head_dim, hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden] group-interleaved (gate rows, up rows) per group
    down_t: torch.Tensor  # [intermediate, hidden] permuted rows


def sparse_layer_weights(w: LayerWeights, shape: ModelShape, perm: torch.Tensor, group_size: int) -> SparseLayerWeights:
    for name in ("qkv", "o_proj", "gate_up", "down"):
        if not isinstance(getattr(w, name), torch.Tensor):
            raise ValueError(
                "sparsity: the sparse path reads float weights (--weights none or bf16); "
                "int8/int4 packed weights cannot be cut by neuron"
            )
    nq = shape.num_heads * shape.head_dim
    inter, hidden = shape.intermediate_size, shape.hidden_size
    ng = inter // group_size
    perm = perm.to(w.gate_up.device)
    gate, up = w.gate_up[:inter][perm], w.gate_up[inter:][perm]  # [inter, hidden] each, permuted
    gate_up = torch.stack((gate.view(ng, group_size, hidden), up.view(ng, group_size, hidden)), dim=1)
    bias = w.qkv_bias
    return SparseLayerWeights(
        q=w.qkv[:nq],
        q_bias=None if bias is None else bias[:nq],
        kv=w.qkv[nq:],
        kv_bias=None if bias is None else bias[nq:],
        o_t=w.o_proj.t().contiguous(),
        gate_up=gate_up.reshape(2 * inter, hidden).contiguous(),
        down_t=w.down[:, perm].t().contiguous(),
    )


def sparse_weights(weights: ModelWeights, layout: SparseLayout) -> list[SparseLayerWeights]:
    check_group_size(weights.shape, layout.group_size)
    return [
        sparse_layer_weights(w, weights.shape, layout.perms[i], layout.group_size) for i, w in enumerate(weights.layers)
    ]


def coactive_order(importance: torch.Tensor, group_size: int, iters: int = 30) -> torch.Tensor:
    """A neuron order that puts co-active neurons into the same group: ``importance`` [tokens, neurons]
    (one layer's per-token magnitudes). Recursive balanced bisection: each set is split, at a multiple
    of ``group_size``, by the neurons' loadings on the first principal component of their
    (log-magnitude) correlation, found by power iteration from the most connected neuron's column
    (so that of two equally strong clusters one is found, not their mix). Returns [neurons] long."""
    z = torch.log1p(importance.float())
    z = (z - z.mean(0)) / (z.std(0) + 1e-6)  # [tokens, neurons] standardized
    corr = z.t() @ z / max(1, z.shape[0] - 1)  # [neurons, neurons]
    order: list[int] = []

    def split(ids: torch.Tensor) -> None:
        k = ids.numel() // group_size
        if k <= 1:
            order.extend(ids.tolist())
            return
        sub = corr[ids][:, ids]
        v = sub[:, sub.abs().sum(0).argmax()].clone()  # start at the most connected neuron's column
        for _ in range(iters):
            v = sub @ v
            v = v / (v.norm() + 1e-12)
        ranked = ids[torch.argsort(v, descending=True)]
        cut = (k // 2) * group_size
        split(ranked[:cut])
        split(ranked[cut:])

    split(torch.arange(importance.shape[1]))
    return torch.tensor(order, dtype=torch.long)


def order_groups(perm: torch.Tensor, importance: torch.Tensor, group_size: int) -> torch.Tensor:
    """``perm`` with its groups sorted by mean importance (descending): the groups most tokens keep
    sit side by side, so a token's kept groups form few runs (fewer, longer products)."""
    groups = perm.view(-1, group_size)  # [num_groups, group_size]
    mean = importance.float().mean(0)[groups].mean(-1)  # [num_groups]
    return groups[torch.argsort(mean, descending=True)].reshape(-1)
