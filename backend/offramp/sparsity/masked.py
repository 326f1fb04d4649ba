"""The reference: a whole sequence through the plain model, with skipped heads and neurons zeroed.

No paged store, differentiable, per-position masks: the definition the sparse engine is tested
against (zeroing a neuron's activation = not computing its gate/up rows nor its down column; zeroing
a head's attention output = not computing its query nor its output-projection columns), the pass
that collects importance (``criteria.py``) and the pass that evaluates masks teacher-forced
(``tools/sparsity.py``). Positions before ``sparse_from`` (the prompt) always run dense, as prompt
chunks do in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from offramp.model.decoder import ModelWeights, apply_rope, final_logits, linear, rms_norm, rope_tables

Masks = tuple[torch.Tensor | None, torch.Tensor | None]  # heads kept [T, heads], neurons kept [T, intermediate]


class Selector(Protocol):
    def select(self, layer: int, x_in: torch.Tensor, o0: torch.Tensor) -> Masks:
        """Masks of ``layer`` (bool, original neuron order) from its input [T, hidden] and layer 0's
        attention output [T, hidden]. Layer 0's heads mask is ignored (its attention feeds the predictor)."""


@dataclass(slots=True)
class Trace:
    logits: torch.Tensor  # [T, vocab] float32
    o0: torch.Tensor  # [T, hidden] layer 0's attention output (before the residual add)
    inputs: list[torch.Tensor] = field(default_factory=list)  # per layer [T, hidden] its input
    acts: list[torch.Tensor] = field(default_factory=list)  # per layer [T, intermediate] silu(gate) * up
    heads: list[torch.Tensor] = field(default_factory=list)  # per layer [T, heads, head_dim] attention output


def masked_forward(
    weights: ModelWeights,
    token_ids: list[int],
    selector: Selector | None = None,
    sparse_from: int = 0,
    track: bool = False,
) -> Trace:
    """Run ``token_ids`` (positions 0..T-1) causally. ``track``: keep every layer's input, FFN
    activation and per-head attention output in the autograd graph (for gradient criteria)."""
    s = weights.shape
    nh, nkv, hd = s.num_heads, s.num_kv_heads, s.head_dim
    n = len(token_ids)
    ids = torch.tensor(token_ids, dtype=torch.long, device=weights.embed.device)
    x = F.embedding(ids, weights.embed)  # [T, hidden]
    if track:
        x = x.detach().requires_grad_(True)
    cos, sin = rope_tables(weights.inv_freq, n, weights.attention_scaling, x.dtype)
    cos, sin = cos[:, None], sin[:, None]  # [T, 1, hd]
    trace = Trace(logits=x, o0=x)
    for layer, w in enumerate(weights.layers):
        if track:
            trace.inputs.append(x)
        h = rms_norm(x, w.input_norm, s.rms_norm_eps)
        qkv = linear(h, w.qkv, w.qkv_bias)  # [T, (nh + 2 nkv) * hd]
        qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd), cos, sin)
        q, k = qk.split((nh, nkv), dim=1)
        v = qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, enable_gqa=True
        )[0].transpose(0, 1)  # [T, nh, hd]
        if track:
            trace.heads.append(attn)
        heads_keep = neurons_keep = None
        if layer == 0:
            o = linear(attn.reshape(n, nh * hd), w.o_proj)
            trace.o0 = o
            if selector is not None:
                _, neurons_keep = selector.select(0, x, o)
        else:
            if selector is not None:
                heads_keep, neurons_keep = selector.select(layer, x, trace.o0)
            if heads_keep is not None:
                attn = attn * _dense_before(heads_keep, sparse_from)[..., None].to(attn.dtype)
            o = linear(attn.reshape(n, nh * hd), w.o_proj)
        x = x + o
        h = rms_norm(x, w.post_norm, s.rms_norm_eps)
        gate, up = linear(h, w.gate_up).chunk(2, dim=-1)  # [T, intermediate] each
        act = F.silu(gate) * up
        if track:
            trace.acts.append(act)
        if neurons_keep is None and hasattr(selector, "ffn_keep"):  # an oracle reads the true activations
            neurons_keep = selector.ffn_keep(layer, act)
        if neurons_keep is not None:
            act = act * _dense_before(neurons_keep, sparse_from).to(act.dtype)
        x = x + linear(act, w.down)
    trace.logits = final_logits(weights, x)
    return trace


def _dense_before(keep: torch.Tensor, sparse_from: int) -> torch.Tensor:
    keep = keep.clone()
    keep[:sparse_from] = True
    return keep
