"""Exit policies: may this token leave here?

A policy looks at the sub-batch of tokens still running after a block and returns which of them
leave. Tokens that are never confident run to full depth (the fallback).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.config import EXIT_POLICIES
from offramp.exits.heads import ExitHead


@dataclass(slots=True)
class ExitCheck:
    """What a policy sees for the tokens still running after a block."""

    hidden: torch.Tensor  # [n, hidden] after the block
    hidden_before: torch.Tensor  # [n, hidden] before the block
    layer: int  # layers run so far
    thresholds: torch.Tensor  # [n] float32, per request
    head: ExitHead


@dataclass(slots=True)
class ExitDecision:
    """Which rows leave; a policy that had to compute the head's logits to decide hands over those of
    the leavers (in row order), so they are not computed twice."""

    leave: torch.Tensor  # [n] bool
    logits: torch.Tensor | None = None  # [number of leavers, vocab] f32, or None


class ExitPolicy(ABC):
    name: str

    @abstractmethod
    def decide(self, check: ExitCheck) -> ExitDecision: ...


class NoExit(ExitPolicy):
    """Full depth for every token."""

    name = "none"

    def decide(self, check: ExitCheck) -> ExitDecision:
        return ExitDecision(torch.zeros(check.hidden.shape[0], dtype=torch.bool, device=check.hidden.device))


class SoftmaxExit(ExitPolicy):
    """Softmax response: the head's top-1 probability (or top-1 minus top-2 margin) >= threshold."""

    name = "softmax"

    def __init__(self, margin: bool = False) -> None:
        self.margin = margin

    def decide(self, check: ExitCheck) -> ExitDecision:
        logits = check.head.logits(check.hidden, check.layer)  # [n, vocab]
        top = logits.softmax(-1).topk(2, dim=-1).values  # [n, 2]
        score = top[:, 0] - top[:, 1] if self.margin else top[:, 0]
        leave = score >= check.thresholds
        return ExitDecision(leave, logits[leave])


class SimilarityExit(ExitPolicy):
    """Hidden-state saturation: cosine(hidden before the block, hidden after) >= threshold."""

    name = "similarity"

    def decide(self, check: ExitCheck) -> ExitDecision:
        cos = F.cosine_similarity(check.hidden.float(), check.hidden_before.float(), dim=-1)  # [n]
        return ExitDecision(cos >= check.thresholds)


class ClassifierExit(ExitPolicy):
    """A learned linear classifier per exit layer: sigmoid(w . norm(h) + b) >= threshold.

    Weights come from a safetensors file with ``weight.<layer>`` ([hidden]) and ``bias.<layer>``
    ([1]) for each exit layer (written by ``offramp calibrate``).
    """

    name = "classifier"

    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ValueError(f"exit_classifier: no classifier file at {path} (run offramp calibrate)")
        tensors = load_file(str(path))
        self.weight = {int(k.split(".")[1]): v.float() for k, v in tensors.items() if k.startswith("weight.")}
        self.bias = {int(k.split(".")[1]): v.float() for k, v in tensors.items() if k.startswith("bias.")}

    def probability(self, hidden: torch.Tensor, layer: int) -> torch.Tensor | None:
        """[n, hidden] -> [n] predicted probability that the exit head's token is the full model's;
        None where this layer has no classifier."""
        if layer not in self.weight:
            return None
        if self.weight[layer].device != hidden.device:  # moved once, to the engine's device
            self.weight[layer], self.bias[layer] = (
                self.weight[layer].to(hidden.device),
                self.bias[layer].to(hidden.device),
            )
        h = F.layer_norm(hidden.float(), hidden.shape[-1:])
        return torch.sigmoid(h @ self.weight[layer] + self.bias[layer])  # [n]

    def decide(self, check: ExitCheck) -> ExitDecision:
        prob = self.probability(check.hidden, check.layer)
        if prob is None:
            return ExitDecision(torch.zeros(check.hidden.shape[0], dtype=torch.bool, device=check.hidden.device))
        return ExitDecision(prob >= check.thresholds)


class GatedExit(ExitPolicy):
    """Two-stage check: a cheap gate (similarity or classifier) picks candidates, and only those pay
    for the expensive confirmation (full-vocabulary softmax) at the request's threshold."""

    def __init__(self, gate: ExitPolicy, gate_threshold: float, confirm: ExitPolicy) -> None:
        self.gate, self.gate_threshold, self.confirm = gate, gate_threshold, confirm
        self.name = f"{gate.name}+{confirm.name}"

    def decide(self, check: ExitCheck) -> ExitDecision:
        n, device = check.hidden.shape[0], check.hidden.device
        gate_check = ExitCheck(
            check.hidden,
            check.hidden_before,
            check.layer,
            torch.full((n,), self.gate_threshold, device=device),
            check.head,
        )
        rows = self.gate.decide(gate_check).leave.nonzero().flatten()
        leave = torch.zeros(n, dtype=torch.bool, device=device)
        if rows.numel() == 0:
            return ExitDecision(leave)
        sub = ExitCheck(check.hidden[rows], check.hidden_before[rows], check.layer, check.thresholds[rows], check.head)
        decision = self.confirm.decide(sub)
        leave[rows] = decision.leave
        return ExitDecision(leave, decision.logits)  # rows ascend, so the leavers' order is kept


def make_policy(name: str, classifier_path: Path | None = None) -> ExitPolicy:
    if name == "none":
        return NoExit()
    if name == "softmax":
        return SoftmaxExit()
    if name == "similarity":
        return SimilarityExit()
    if name == "classifier":
        if classifier_path is None:
            raise ValueError("exit_policy: 'classifier' needs a trained classifier file (exit_classifier)")
        return ClassifierExit(classifier_path)
    raise ValueError(f"exit_policy: {name!r} is not one of {', '.join(EXIT_POLICIES)}")
