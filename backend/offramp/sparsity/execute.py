"""One decoder layer with contextual sparsity for some rows of a sub-batch.

Sparse rows compute only the query heads and FFN neuron groups their ``RowSet`` keeps, reading the
sparse layout's weights by contiguous runs (``layout.py``): no gather, each kept weight read once.
K and V of every KV head are always computed and written (a later token may need a head this one
skipped); a skipped query head's row of attention is never multiplied into the output projection.
Dense rows (``LayerPlan.dense_rows``) run exactly the operations of ``model.decoder.decoder_layer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offramp.model.attention import AttentionMetadata, paged_attention
from offramp.model.decoder import LayerWeights, ModelShape, apply_rope, linear, rms_norm
from offramp.sparsity.layout import SparseLayerWeights
from offramp.sparsity.selection import LayerPlan, RowSet


def attend(
    w: LayerWeights,
    sw: SparseLayerWeights | None,
    x: torch.Tensor,  # [n, hidden]
    meta: AttentionMetadata,
    k_store: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_store: torch.Tensor,
    shape: ModelShape,
    plan: LayerPlan | None,
) -> torch.Tensor:
    """The attention block's output (before the residual add): [n, hidden]. Writes K/V of every row."""
    n = x.shape[0]
    nh, nkv, hd = shape.num_heads, shape.num_kv_heads, shape.head_dim
    h = rms_norm(x, w.input_norm, shape.rms_norm_eps)
    qkv = linear(h, w.qkv, w.qkv_bias) if plan is None else _sparse_qkv(w, sw, h, plan, shape)  # [n, (nh+2nkv)hd]
    qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd), meta.cos, meta.sin)
    q, k = qk.split((nh, nkv), dim=1)  # [n, nh, hd], [n, nkv, hd]
    k_store.index_copy_(0, meta.slot_mapping, k)
    v_store.index_copy_(0, meta.slot_mapping, qkv[:, (nh + nkv) * hd :].view(n, nkv, hd))
    attn = paged_attention(q, k_store, v_store, meta)  # [n, nh * hd]
    if plan is None:
        return linear(attn, w.o_proj)
    if plan.all_rows:
        return _sparse_o(w, sw, attn, plan.sets[0], shape)
    out = x.new_empty(n, shape.hidden_size)  # [n, hidden]
    if plan.dense_rows is not None:
        out.index_copy_(0, plan.dense_rows, linear(attn.index_select(0, plan.dense_rows), w.o_proj))
    for s in plan.sets:
        out.index_copy_(0, s.rows, _sparse_o(w, sw, attn.index_select(0, s.rows), s, shape))
    return out


def _sparse_o(w: LayerWeights, sw: SparseLayerWeights, a: torch.Tensor, s: RowSet, shape: ModelShape) -> torch.Tensor:
    """[m, nh * hd] -> [m, hidden] through the kept heads' columns of the output projection."""
    hd = shape.head_dim
    if s.head_runs == [(0, shape.num_heads)]:
        return linear(a, w.o_proj)  # every head: the dense product
    acc = None
    for start, end in s.head_runs:  # [m, hidden] += a[:, heads] @ o_t[heads]
        part = a[:, start * hd : end * hd] @ sw.o_t[start * hd : end * hd]
        acc = part if acc is None else acc.add_(part)
    return acc


def _sparse_qkv(
    w: LayerWeights, sw: SparseLayerWeights, h: torch.Tensor, plan: LayerPlan, shape: ModelShape
) -> torch.Tensor:
    """Q (kept heads only, zeros elsewhere), K and V: [n, (nh + 2 nkv) * hd]."""
    if plan.all_rows:
        return _set_qkv(w, sw, h, plan.sets[0], shape)
    qkv = h.new_zeros(h.shape[0], w.qkv.shape[0])  # [n, (nh + 2 nkv) * hd]
    if plan.dense_rows is not None:
        qkv.index_copy_(0, plan.dense_rows, linear(h.index_select(0, plan.dense_rows), w.qkv, w.qkv_bias))
    for s in plan.sets:
        qkv.index_copy_(0, s.rows, _set_qkv(w, sw, h.index_select(0, s.rows), s, shape))
    return qkv


def _set_qkv(w: LayerWeights, sw: SparseLayerWeights, hs: torch.Tensor, s: RowSet, shape: ModelShape) -> torch.Tensor:
    """[m, hidden] -> [m, (nh + 2 nkv) * hd]: K/V always, Q of the kept heads (zeros elsewhere)."""
    nq, hd = shape.num_heads * shape.head_dim, shape.head_dim
    if s.head_runs == [(0, shape.num_heads)]:
        return linear(hs, w.qkv, w.qkv_bias)  # every head: the fused product
    part = hs.new_zeros(hs.shape[0], w.qkv.shape[0])
    part[:, nq:] = linear(hs, sw.kv, sw.kv_bias)
    for start, end in s.head_runs:
        bias = None if sw.q_bias is None else sw.q_bias[start * hd : end * hd]
        part[:, start * hd : end * hd] = linear(hs, sw.q[start * hd : end * hd], bias)
    return part


def feed_forward(
    w: LayerWeights,
    sw: SparseLayerWeights | None,
    x: torch.Tensor,  # [n, hidden] (after the attention residual)
    shape: ModelShape,
    plan: LayerPlan | None,
    group_size: int,
) -> torch.Tensor:
    """The FFN block's output (before the residual add): [n, hidden]."""
    h = rms_norm(x, w.post_norm, shape.rms_norm_eps)
    if plan is None:
        gate, up = linear(h, w.gate_up).chunk(2, dim=-1)  # [n, intermediate] each
        return linear(F.silu(gate) * up, w.down)
    if plan.all_rows:
        return _sparse_ffn(w, sw, h, plan.sets[0], group_size)
    out = x.new_empty(x.shape)  # [n, hidden]
    if plan.dense_rows is not None:
        hd = h.index_select(0, plan.dense_rows)
        gate, up = linear(hd, w.gate_up).chunk(2, dim=-1)
        out.index_copy_(0, plan.dense_rows, linear(F.silu(gate) * up, w.down))
    for s in plan.sets:
        out.index_copy_(0, s.rows, _sparse_ffn(w, sw, h.index_select(0, s.rows), s, group_size))
    return out


def _sparse_ffn(w: LayerWeights, sw: SparseLayerWeights, h: torch.Tensor, s: RowSet, group_size: int) -> torch.Tensor:
    """[m, hidden] -> [m, hidden] through the kept neuron groups only: one gate/up product per run of
    kept groups (on a view: each kept row read once), one activation over all of them, then one
    accumulating down product per run."""
    m, g = h.shape[0], group_size
    if s.group_runs == [(0, sw.down_t.shape[0] // g)]:  # every group (a layer the floor made dense)
        gate, up = linear(h, w.gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, w.down)
    if not s.group_runs:
        return h.new_zeros(h.shape)
    parts = [F.linear(h, sw.gate_up[2 * g * start : 2 * g * end]) for start, end in s.group_runs]
    gu = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).view(m, -1, 2, g)  # [m, kept, 2, g]
    act = (F.silu(gu[:, :, 0]) * gu[:, :, 1]).reshape(m, -1)  # [m, kept * g]
    acc, col = None, 0
    for start, end in s.group_runs:  # [m, hidden] += act[:, run] @ down_t[run]
        a, rows = act[:, col : col + (end - start) * g], sw.down_t[g * start : g * end]
        acc = a @ rows if acc is None else acc.addmm_(a, rows)
        col += (end - start) * g
    return acc
