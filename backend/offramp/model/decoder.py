"""Llama-family decoder math in plain PyTorch: weights, RMSNorm, RoPE, one decoder layer.

Matches Hugging Face ``transformers``' Llama/Mistral/Qwen2 modules operation for operation, so
that greedy output is token-identical. Q/K/V and gate/up projections are fused into one matrix
each (fewer, larger matrix products). A linear weight is a plain tensor or a weight-only quantized one
(``quant``: int8 per channel, int4 group-wise); ``linear`` dispatches on which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offramp.model.attention import AttentionMetadata, paged_attention
from offramp.model.quant import Weight


@dataclass(slots=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Weight  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None  # [(heads + 2 * kv_heads) * head_dim] (Qwen2)
    o_proj: Weight  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight  # [hidden, intermediate]


@dataclass(slots=True)
class ModelWeights:
    shape: ModelShape
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: Weight  # [vocab, hidden] (the embedding itself when tied and not quantized)
    inv_freq: torch.Tensor  # [head_dim // 2] float32
    attention_scaling: float = 1.0


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias``: [num_tokens, in] -> [num_tokens, out], for a tensor or a quantized weight."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w.matmul(x)  # [num_tokens, out] in x's dtype (bfloat16)
    return y if bias is None else y + bias


def weight_rows(w: Weight, start: int) -> Weight | None:
    """Output rows ``start:`` of a weight, or None where a packed layout cannot be cut there."""
    return w[start:] if isinstance(w, torch.Tensor) else w.rows(start)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Hugging Face's LlamaRMSNorm computes it (in float32, then back to x's dtype)."""
    if x.dtype == torch.float32:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(
    inv_freq: torch.Tensor, max_len: int, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for every position: each ``[max_len, head_dim]`` in ``dtype``.

    The first half of the sin table is negated, so that ``rotate_half(x) * sin`` becomes
    ``roll(x, half) * signed_sin`` (bit-identical: only a sign moves).
    """
    pos = torch.arange(max_len, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq[None, :].float()  # [max_len, head_dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    cos, sin = (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos/signed_sin: [num_tokens, 1, head_dim]."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def decoder_layer(
    w: LayerWeights,
    x: torch.Tensor,  # [num_tokens, hidden]
    meta: AttentionMetadata,
    k_store: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_store: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    shape: ModelShape,
) -> torch.Tensor:
    """One pre-norm decoder layer; writes this layer's new K/V into the paged store."""
    n = x.shape[0]
    nh, nkv, hd = shape.num_heads, shape.num_kv_heads, shape.head_dim
    h = rms_norm(x, w.input_norm, shape.rms_norm_eps)
    qkv = linear(h, w.qkv, w.qkv_bias)  # [n, (nh + 2 nkv) * hd]
    qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd), meta.cos, meta.sin)
    q, k = qk.split((nh, nkv), dim=1)  # [n, nh, hd], [n, nkv, hd]
    k_store.index_copy_(0, meta.slot_mapping, k)
    v_store.index_copy_(0, meta.slot_mapping, qkv[:, (nh + nkv) * hd :].view(n, nkv, hd))
    attn = paged_attention(q, k_store, v_store, meta)  # [n, nh * hd]
    x = x + linear(attn, w.o_proj)
    h = rms_norm(x, w.post_norm, shape.rms_norm_eps)
    gate, up = linear(h, w.gate_up).chunk(2, dim=-1)  # [n, intermediate] each
    return x + linear(F.silu(gate) * up, w.down)


def project_kv(
    w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shape: ModelShape
) -> tuple[torch.Tensor, torch.Tensor]:
    """K (RoPE applied) and V that layer ``w`` would store for input ``x``, without running the layer.

    x: [n, hidden]; cos/sin: [n, 1, head_dim]. Returns two [n, kv_heads, head_dim] tensors.
    """
    n = x.shape[0]
    nh, nkv, hd = shape.num_heads, shape.num_kv_heads, shape.head_dim
    h = rms_norm(x, w.input_norm, shape.rms_norm_eps)
    kv_w = weight_rows(w.qkv, nh * hd)  # [2 * nkv * hd, hidden]
    if kv_w is None:  # a packed layout that cannot be cut at nh * hd: run the whole QKV product
        kv = linear(h, w.qkv, w.qkv_bias)[:, nh * hd :]  # [n, 2 * nkv * hd]
    else:
        kv = linear(h, kv_w, None if w.qkv_bias is None else w.qkv_bias[nh * hd :])  # [n, 2 * nkv * hd]
    k, v = kv.split((nkv * hd, nkv * hd), dim=-1)
    return apply_rope(k.view(n, nkv, hd), cos, sin), v.view(n, nkv, hd)


def final_logits(weights: ModelWeights, x: torch.Tensor) -> torch.Tensor:
    """[num_rows, hidden] -> [num_rows, vocab] in float32."""
    h = rms_norm(x, weights.final_norm, weights.shape.rms_norm_eps)
    return linear(h, weights.lm_head).float()
