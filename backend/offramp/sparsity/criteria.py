"""Per-token importance of every query head and FFN neuron group, under two criteria.

For a position t (a decode row: the token at t is being processed, its logits predict token t+1):

* ``magnitude`` (DejaVu): a neuron's |a| where ``a = silu(gate) * up`` is the value that multiplies its
  column of ``down``; a group's importance is the sum of its neurons'. A head's importance is the L2
  norm of its attention output (``[head_dim]``, before ``o_proj``).
* ``plainact`` (ShadowLLM's activation x gradient family): the first-order estimate of how much the
  loss changes when the unit's activation at t is zeroed, ``|a * dL/da|``. L is the summed
  cross-entropy of the sequence's answer positions against the tokens that follow (the dense
  model's own greedy answer). A neuron: ``|a_n * dL/da_n|``, a group the sum over its neurons; a head
  (one unit, as ShadowLLM scores heads): ``|sum_e a_e * dL/da_e|`` over its ``head_dim`` outputs.

Both come from one forward and (for ``plainact``) one backward pass of ``masked.masked_forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offramp.model.decoder import ModelWeights
from offramp.sparsity.layout import SparseLayout
from offramp.sparsity.masked import masked_forward

CRITERIA = ("magnitude", "plainact")


@dataclass(slots=True)
class Importance:
    """One sequence's rows (positions ``prompt_len ..`` that predict a known token)."""

    scores: dict[str, torch.Tensor]  # criterion -> [rows, layers, heads + groups]
    o0: torch.Tensor  # [rows, hidden] layer 0's attention output (the unified predictor's input)
    inputs: torch.Tensor  # [rows, layers, hidden] bfloat16: each layer's input (per-layer predictors)
    neurons: list[torch.Tensor]  # per layer [rows, intermediate] |a| (for the layout's permutation)


def _groups(neurons: torch.Tensor, perm: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, intermediate] -> [rows, groups] summed in the layout's permuted order."""
    return neurons[:, perm].view(neurons.shape[0], -1, group_size).sum(-1)


def collect(
    weights: ModelWeights,
    token_ids: list[int],
    prompt_len: int,
    layout: SparseLayout,
    gradients: bool = True,
    keep_neurons: bool = False,
) -> Importance:
    """Importance at positions ``prompt_len .. T-2`` (rows predicting tokens ``prompt_len+1 ..``);
    ``keep_neurons``: also every neuron's |a| (for the layout; large)."""
    n = len(token_ids)
    rows = slice(prompt_len, n - 1)
    with torch.enable_grad():
        trace = masked_forward(weights, token_ids, track=True)
        grads_a = grads_h = None
        if gradients:
            targets = torch.tensor(token_ids[prompt_len:], dtype=torch.long, device=trace.logits.device)
            loss = F.cross_entropy(trace.logits[prompt_len - 1 : n - 1].float(), targets, reduction="sum")
            grads = torch.autograd.grad(loss, trace.acts + trace.heads)
            grads_a, grads_h = grads[: len(trace.acts)], grads[len(trace.acts) :]
    g = layout.group_size
    mag, plain, neurons = [], [], []
    for layer, (act, head) in enumerate(zip(trace.acts, trace.heads)):
        a, hv = act[rows].detach().float(), head[rows].detach().float()  # [r, I], [r, nh, hd]
        if keep_neurons:
            neurons.append(a.abs())
        mag.append(torch.cat((hv.norm(dim=-1), _groups(a.abs(), layout.perms[layer], g)), dim=-1))
        if gradients:
            ga, gh = grads_a[layer][rows].float(), grads_h[layer][rows].float()
            plain.append(torch.cat(((hv * gh).sum(-1).abs(), _groups((a * ga).abs(), layout.perms[layer], g)), dim=-1))
    scores = {"magnitude": torch.stack(mag, dim=1)}  # [r, L, nh + ng]
    if gradients:
        scores["plainact"] = torch.stack(plain, dim=1)
    inputs = torch.stack([x[rows].detach() for x in trace.inputs], dim=1).to(torch.bfloat16)  # [r, L, hidden]
    return Importance(scores, trace.o0[rows].detach().float(), inputs, neurons)
