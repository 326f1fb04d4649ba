"""Importance predictors and their files.

* ``UnifiedPredictor`` (ShadowLLM): one MLP reads layer 0's attention output at the current position
  (the attention block's output before the residual add, ``[hidden]``) and scores every query head
  and every neuron group of *all* layers at once: ``norm -> Linear(hidden, width) -> ReLU ->
  Linear(width, layers * (heads + groups))``.
* ``PerLayerPredictor`` (DejaVu-style baseline): one MLP per layer, reading that layer's input hidden
  state: ``norm -> Linear(hidden, width) -> ReLU -> Linear(width, heads + groups)``.

Both regress the importance (``criteria.py``) normalised per token and layer (each kind's units
divided by their mean), with mean squared error; what matters downstream is the *ranking*, judged by
Spearman's rho. A file records the model (a fingerprint of its shape and embedding), the layout
(group size and neuron permutations) and the criterion; loading it for another model or layout is
refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from offramp.model.decoder import ModelShape, ModelWeights
from offramp.sparsity.layout import SparseLayout

PREDICTOR_KINDS = ("unified", "per_layer")
FORMAT = "offramp-sparsity-predictor-1"


class UnifiedPredictor(nn.Module):
    kind = "unified"

    def __init__(self, hidden: int, num_layers: int, num_units: int, width: int = 256) -> None:
        super().__init__()
        self.num_layers, self.num_units, self.width = num_layers, num_units, width
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, num_layers * num_units)

    def forward(self, o0: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, layers, units]
        z = F.layer_norm(o0.float(), o0.shape[-1:])
        return self.fc2(F.relu(self.fc1(z))).view(o0.shape[0], self.num_layers, self.num_units)


class PerLayerPredictor(nn.Module):
    kind = "per_layer"

    def __init__(self, hidden: int, num_layers: int, num_units: int, width: int = 128) -> None:
        super().__init__()
        self.num_layers, self.num_units, self.width = num_layers, num_units, width
        self.w1 = nn.Parameter(torch.randn(num_layers, width, hidden) / hidden**0.5)  # [L, width, hidden]
        self.b1 = nn.Parameter(torch.zeros(num_layers, width))
        self.w2 = nn.Parameter(torch.randn(num_layers, num_units, width) / width**0.5)  # [L, units, width]
        self.b2 = nn.Parameter(torch.zeros(num_layers, num_units))

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, units]
        z = F.layer_norm(x.float(), x.shape[-1:])
        return F.linear(F.relu(F.linear(z, self.w1[i], self.b1[i])), self.w2[i], self.b2[i])

    def forward(self, xs: torch.Tensor) -> torch.Tensor:  # [n, layers, hidden] -> [n, layers, units]
        z = F.layer_norm(xs.float(), xs.shape[-1:])
        hid = F.relu(torch.einsum("nlh,lwh->nlw", z, self.w1) + self.b1)
        return torch.einsum("nlw,luw->nlu", hid, self.w2) + self.b2


Predictor = UnifiedPredictor | PerLayerPredictor


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: Predictor, hidden: int) -> int:
    """Multiply-adds x 2 of one token's prediction (all layers)."""
    if isinstance(model, UnifiedPredictor):
        return 2 * (hidden * model.width + model.width * model.num_layers * model.num_units)
    return 2 * model.num_layers * (hidden * model.width + model.width * model.num_units)


def make_predictor(kind: str, shape: ModelShape, num_groups: int, width: int | None = None) -> Predictor:
    units = shape.num_heads + num_groups
    if kind == "unified":
        return UnifiedPredictor(shape.hidden_size, shape.num_layers, units, width or 256)
    if kind == "per_layer":
        return PerLayerPredictor(shape.hidden_size, shape.num_layers, units, width or 128)
    raise ValueError(f"predictor: {kind!r} is not one of {', '.join(PREDICTOR_KINDS)}")


def normalise(importance: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[n, layers, heads + groups] -> each kind's units divided by their mean (per token and layer)."""
    heads, groups = importance.float().split((num_heads, importance.shape[-1] - num_heads), dim=-1)
    return torch.cat(
        (
            heads / heads.mean(-1, keepdim=True).clamp_min(1e-12),
            groups / groups.mean(-1, keepdim=True).clamp_min(1e-12),
        ),
        dim=-1,
    )


def train(
    model: Predictor, inputs: torch.Tensor, targets: torch.Tensor, steps: int, lr: float, batch: int, seed: int
) -> list[float]:
    """Fit ``model`` (inputs: [n, hidden] unified or [n, layers, hidden] per layer; targets: normalised
    importance [n, layers, units]) with Adam; returns the loss every 50 steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=gen)
        loss = F.mse_loss(model(inputs[idx].float()), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 5))
    return losses


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).float()


def spearman(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Mean Spearman rank correlation over the last dimension (ties broken by order): [..., units]."""
    a, b = _ranks(pred), _ranks(true)
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    rho = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)
    return round(rho.mean().item(), 4)


def model_fingerprint(weights: ModelWeights) -> str:
    """The model a predictor belongs to: its shape and a corner of its embedding (as bfloat16, so
    float32 and bfloat16 engines of one checkpoint agree)."""
    s = weights.shape
    dims = [s.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.vocab_size]
    corner = weights.embed[:32, :32].detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
    return hashlib.sha256(json.dumps(dims).encode() + corner.numpy().tobytes()).hexdigest()[:16]


@dataclass(slots=True)
class PredictorFile:
    model: Predictor
    layout: SparseLayout
    meta: dict  # kind, criterion, fingerprint, group_size, width, spearman, ...


def save_predictor(path: Path, model: Predictor, layout: SparseLayout, weights: ModelWeights, info: dict) -> None:
    meta = {
        "format": FORMAT,
        "kind": model.kind,
        "width": model.width,
        "fingerprint": model_fingerprint(weights),
        "num_layers": weights.shape.num_layers,
        "num_heads": weights.shape.num_heads,
        "intermediate_size": weights.shape.intermediate_size,
        "group_size": layout.group_size,
        **info,
    }
    tensors = {f"predictor.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors["layout.perms"] = torch.stack(layout.perms)  # [layers, intermediate]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"offramp": json.dumps(meta)})


def load_predictor(path: Path, weights: ModelWeights, group_size: int | None = None) -> PredictorFile:
    """A predictor file for this model (and, when given, this group size); ``ValueError`` otherwise."""
    if not path.is_file():
        raise ValueError(f"sparsity_predictor: no such file {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("offramp", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a file that is not one
        raise ValueError(f"sparsity_predictor: {path} is not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"sparsity_predictor: {path} is not an Offramp sparsity predictor")
    if meta["fingerprint"] != model_fingerprint(weights):
        raise ValueError(
            f"sparsity_predictor: {path} was trained for another model (fingerprint {meta['fingerprint']})"
        )
    if group_size is not None and group_size != meta["group_size"]:
        raise ValueError(
            f"sparsity_predictor: {path} was trained for neuron groups of {meta['group_size']}, not {group_size}"
        )
    shape = weights.shape
    perms = tensors.pop("layout.perms")
    num_groups = shape.intermediate_size // meta["group_size"]
    model = make_predictor(meta["kind"], shape, num_groups, meta["width"])
    model.load_state_dict({k.removeprefix("predictor."): v for k, v in tensors.items()})
    model.eval().requires_grad_(False)
    return PredictorFile(model, SparseLayout(meta["group_size"], list(perms.unbind(0))), meta)
