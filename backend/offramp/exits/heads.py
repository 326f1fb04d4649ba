"""Exit heads: turn the hidden state after some layers into vocabulary logits.

The identity head reuses the model's final norm and LM head; a low-rank head first applies a trained
shortcut (R3, One Jump Is All You Need) so that an intermediate state looks like the last layer's.
"""

from __future__ import annotations

from abc import ABC
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.model.decoder import ModelWeights, final_logits


class ExitHead(ABC):
    """Turns the hidden state after ``layer`` layers into vocabulary logits."""

    name: str
    weights: ModelWeights

    def transform(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:  # [n, hidden] -> [n, hidden]
        """The hidden state the model's final norm and LM head read in place of the last layer's
        (so the rows of several depths, and full-depth rows, share one LM head call)."""
        return hidden

    def logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:  # [n, hidden] -> [n, vocab] f32
        return final_logits(self.weights, self.transform(hidden, layer))


class IdentityHead(ExitHead):
    """The model's own final norm and LM head applied to an intermediate layer."""

    name = "identity"

    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights


class LowRankHead(ExitHead):
    """A trained low-rank shortcut (R3, OJFA): ``h + up(down(h))`` then the final norm and LM head.

    The safetensors file holds ``down`` [rank, hidden] and ``up`` [hidden, rank] shared by every
    depth (the one-jump shortcut) and/or ``down.<depth>`` / ``up.<depth>`` for a depth of its own
    (per-level shortcuts). A depth with neither uses the identity head.
    """

    name = "low_rank"

    def __init__(self, weights: ModelWeights, path: Path) -> None:
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ValueError(f"exit_head: no shortcut file at {path}")
        tensors = load_file(str(path))
        self.weights = weights
        dtype, hidden = weights.embed.dtype, weights.shape.hidden_size
        self.shortcuts: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in tensors:
            if key.split(".")[0] != "down":
                continue
            depth = int(key.split(".")[1]) if "." in key else None
            up_key = "up" if depth is None else f"up.{depth}"
            down, up = tensors[key], tensors.get(up_key)
            if up is None or down.dim() != 2 or down.shape[1] != hidden or up.shape != (hidden, down.shape[0]):
                raise ValueError(f"exit_head: {path}: '{key}'/'{up_key}' must be [rank, {hidden}] and [{hidden}, rank]")
            device = weights.embed.device
            self.shortcuts[depth] = (down.to(device, dtype), up.to(device, dtype))
        if not self.shortcuts:
            raise ValueError(f"exit_head: {path} holds no 'down'/'up' shortcut tensors")

    def transform(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        pair = self.shortcuts.get(layer, self.shortcuts.get(None))
        if pair is None:
            return hidden
        return hidden + F.linear(F.linear(hidden, pair[0]), pair[1])  # [n, hidden]
