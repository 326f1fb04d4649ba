"""The PyTorch modules that are traced into ONNX: one decoder block, the embedding, the heads.

They compute exactly what ``offramp.model.decoder`` computes, written in operations every ONNX
consumer (ONNX Runtime, TensorRT) runs well: the block reads its layers' K/V straight from the
paged store (a Gather of whole pages), attends over that context followed by the new rows' own
K/V (a Concat; no scatter, which ONNX Runtime runs slowly), and hands the new K/V back for the
caller to store.

Block inputs (B sequences of T new rows each; ``N = B * T``; ``C = pages * page_size``):

- ``hidden`` [N, hidden], ``cos`` / ``sin`` [N, head_dim] (the signed-sin RoPE rows)
- ``page_ids`` [B, P] int64: each sequence's page table, 0-padded
- ``mask`` [B, T, C + T] bool: which stored slots, then which new rows, each row attends to
  (a stored slot that a new row is rewriting is not visible: the new row's K/V is)
- ``k_store.<l>`` / ``v_store.<l>`` [kv_heads, num_slots, head_dim] for each layer l of the block
  (head-major, so that the gathered pages are already in the layout attention multiplies)

Outputs: ``hidden_out`` [N, hidden] and ``k_new.<l>`` / ``v_new.<l>`` [N, kv_heads, head_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offramp.model.decoder import LayerWeights, ModelShape, ModelWeights


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, head_dim]; cos/sin: [N, 1, head_dim]. ``roll`` by half, written as a concat."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class _Layer(nn.Module):
    def __init__(self, w: LayerWeights) -> None:
        super().__init__()
        self.input_norm = nn.Parameter(w.input_norm.float(), requires_grad=False)
        self.qkv = nn.Parameter(w.qkv.float(), requires_grad=False)
        self.qkv_bias = None if w.qkv_bias is None else nn.Parameter(w.qkv_bias.float(), requires_grad=False)
        self.o_proj = nn.Parameter(w.o_proj.float(), requires_grad=False)
        self.post_norm = nn.Parameter(w.post_norm.float(), requires_grad=False)
        self.gate_up = nn.Parameter(w.gate_up.float(), requires_grad=False)
        self.down = nn.Parameter(w.down.float(), requires_grad=False)


class BlockGraph(nn.Module):
    """Layers ``[start, end)`` over the paged KV store (see the module docstring for the I/O)."""

    def __init__(self, weights: ModelWeights, start: int, end: int, page_size: int) -> None:
        super().__init__()
        self.shape: ModelShape = weights.shape
        self.page_size = page_size
        self.layers = nn.ModuleList(_Layer(weights.layers[i]) for i in range(start, end))

    def input_names(self) -> list[str]:
        stores = [f"{kind}_store.{i}" for i in range(len(self.layers)) for kind in ("k", "v")]
        return ["hidden", "cos", "sin", "page_ids", "mask", *stores]

    def output_names(self) -> list[str]:
        return ["hidden_out", *[f"{kind}_new.{i}" for i in range(len(self.layers)) for kind in ("k", "v")]]

    def forward(self, hidden, cos, sin, page_ids, mask, *stores):
        s = self.shape
        nh, nkv, hd = s.num_heads, s.num_kv_heads, s.head_dim
        g = nh // nkv
        b, t = mask.shape[0], mask.shape[1]
        n = hidden.shape[0]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, hd]
        flat_pages = page_ids.reshape(-1)  # [B * P]
        bias = torch.zeros_like(mask, dtype=hidden.dtype).masked_fill(~mask, float("-inf"))  # [B, T, C + T]
        bias = bias.unsqueeze(1).unsqueeze(0)  # [1, B, 1, T, C + T]: the same for every head
        new_kv = []
        x = hidden
        for i, w in enumerate(self.layers):
            k_store, v_store = stores[2 * i], stores[2 * i + 1]
            h = _rms_norm(x, w.input_norm, s.rms_norm_eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias)  # [N, (nh + 2 nkv) * hd]
            qk = _rope(qkv[:, : (nh + nkv) * hd].reshape(n, nh + nkv, hd), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]  # [N, nh, hd], [N, nkv, hd]
            v = qkv[:, (nh + nkv) * hd :].reshape(n, nkv, hd)
            new_kv += [k, v]
            # Whole pages of this layer's store (head-major): [nkv, B, C, hd]; nothing is transposed
            k_past = k_store.reshape(nkv, -1, self.page_size * hd)[:, flat_pages].reshape(nkv, b, -1, hd)
            v_past = v_store.reshape(nkv, -1, self.page_size * hd)[:, flat_pages].reshape(nkv, b, -1, hd)
            k_rows = k.reshape(b, t, nkv, hd).permute(2, 0, 1, 3)  # [nkv, B, T, hd]
            v_rows = v.reshape(b, t, nkv, hd).permute(2, 0, 1, 3)
            # Queries grouped by the KV head they share: [nkv, B, group * T, hd]
            qg = q.reshape(b, t, nkv, g, hd).permute(2, 0, 3, 1, 4).reshape(nkv, b, g * t, hd)
            scores = torch.cat(
                (torch.matmul(qg, k_past.transpose(2, 3)), torch.matmul(qg, k_rows.transpose(2, 3))), dim=-1
            )  # [nkv, B, group * T, C + T]
            scores = scores.reshape(nkv, b, g, t, -1) * (hd**-0.5) + bias
            probs = scores.softmax(-1).reshape(nkv, b, g * t, -1)
            c = k_past.shape[2]
            attn = torch.matmul(probs[..., :c], v_past) + torch.matmul(probs[..., c:], v_rows)  # [nkv, B, gT, hd]
            attn = attn.reshape(nkv, b, g, t, hd).permute(1, 3, 0, 2, 4).reshape(n, nh * hd)
            x = x + F.linear(attn, w.o_proj)
            h = _rms_norm(x, w.post_norm, s.rms_norm_eps)
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)  # [N, intermediate] each
            x = x + F.linear(F.silu(gate) * up, w.down)
        return (x, *new_kv)


class EmbedGraph(nn.Module):
    """token_ids [N] int64 -> hidden [N, hidden]."""

    def __init__(self, weights: ModelWeights) -> None:
        super().__init__()
        self.embed = nn.Parameter(weights.embed.float(), requires_grad=False)

    def forward(self, token_ids):
        return F.embedding(token_ids, self.embed)


class HeadGraph(nn.Module):
    """hidden [N, hidden] -> logits [N, vocab]: an optional low-rank shortcut ``h + up(down(h))``
    (a trained exit head), then the final norm and LM head."""

    def __init__(self, weights: ModelWeights, down: torch.Tensor | None = None, up: torch.Tensor | None = None):
        super().__init__()
        self.eps = weights.shape.rms_norm_eps
        self.final_norm = nn.Parameter(weights.final_norm.float(), requires_grad=False)
        self.lm_head = nn.Parameter(weights.lm_head.float(), requires_grad=False)
        self.down = None if down is None else nn.Parameter(down.float(), requires_grad=False)  # [rank, hidden]
        self.up = None if up is None else nn.Parameter(up.float(), requires_grad=False)  # [hidden, rank]

    def forward(self, hidden):
        if self.down is not None:
            hidden = hidden + F.linear(F.linear(hidden, self.down), self.up)
        return F.linear(_rms_norm(hidden, self.final_norm, self.eps), self.lm_head)
