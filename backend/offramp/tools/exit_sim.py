"""Exits simulated on collected activations: per head and depth, the greedy token and each policy's
score; a token leaves at the first exit depth whose score passes the threshold (else full depth).
From that: token agreement, exit rate, mean exit layer, estimated speed (see ``evaluate``), and the
threshold picked for a target agreement (used by ``offramp calibrate`` and ``offramp eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from offramp.exits import ClassifierExit, ExitHead, LowRankHead
from offramp.model.decoder import ModelWeights, final_logits

if TYPE_CHECKING:
    from offramp.tools.activations import Activations

POLICIES = ("softmax", "classifier", "similarity")
DEFAULT_THRESHOLDS = {
    "softmax": (0.5, 0.7, 0.9, 0.95, 0.99),
    "classifier": (0.5, 0.7, 0.9, 0.95, 0.99),
    "similarity": (0.9, 0.95, 0.98, 0.99, 0.995),
}
CHUNK_ROWS = 512  # rows per head call: [512, vocab] float32 logits at a time


@dataclass(slots=True)
class HeadOutputs:
    """One exit head applied to a set of activations, per exit depth."""

    depths: list[int]
    tokens: torch.Tensor  # [D, n] the head's greedy token at each depth
    top1: torch.Tensor  # [D, n] its top-1 probability (the softmax policy's score)

    def at(self, depths: list[int]) -> HeadOutputs:
        rows = [self.depths.index(d) for d in depths]
        return HeadOutputs(list(depths), self.tokens[rows], self.top1[rows])


@torch.inference_mode()
def head_outputs(
    weights: ModelWeights, head: ExitHead, acts: Activations, depths: list[int], progress: bool = False, desc: str = ""
) -> HeadOutputs:
    tokens, top1 = [], []
    for d in tqdm(depths, desc=desc or head.name, disable=not progress, leave=False):
        hidden = acts.at_depth[d]  # [n, hidden] float32
        tok, prob = [], []
        for rows in torch.split(hidden, CHUNK_ROWS):
            logits = head.logits(rows.to(weights.embed.dtype), d)  # [c, vocab] float32
            tok.append(logits.argmax(-1))
            prob.append(logits.softmax(-1).amax(-1))
        tokens.append(torch.cat(tok))
        top1.append(torch.cat(prob))
    return HeadOutputs(list(depths), torch.stack(tokens), torch.stack(top1))


@torch.inference_mode()
def full_tokens(weights: ModelWeights, final: torch.Tensor) -> torch.Tensor:
    """[n, hidden] after the last layer -> [n] the full model's greedy token."""
    picks = [final_logits(weights, rows.to(weights.embed.dtype)).argmax(-1) for rows in torch.split(final, CHUNK_ROWS)]
    return torch.cat(picks)


@torch.inference_mode()
def policy_scores(
    outputs: HeadOutputs, acts: Activations, classifier: ClassifierExit | None = None
) -> dict[str, torch.Tensor]:
    """Each policy's score per depth and token ([D, n]); a depth without a classifier never passes."""
    scores = {
        "softmax": outputs.top1,
        "similarity": torch.stack([acts.similarity[d] for d in outputs.depths]),
    }
    if classifier is not None:
        rows = []
        for d in outputs.depths:
            prob = classifier.probability(acts.at_depth[d], d)  # [n] or None
            rows.append(prob if prob is not None else torch.full((acts.num_tokens,), float("-inf")))
        scores["classifier"] = torch.stack(rows)
    return scores


@dataclass(slots=True)
class ExitCosts:
    """Multiply-accumulates per token of the matrix products that early exit changes."""

    num_layers: int
    layer: int  # one decoder layer (QKV, output, gate/up, down projections)
    head: int  # the LM head on the full vocabulary
    shortcut: int  # the exit head's low-rank shortcut (0 for the identity head)
    hidden: int  # a classifier or similarity check: one dot product

    def check(self, policy: str) -> int:
        return self.head + self.shortcut if policy == "softmax" else self.hidden

    @property
    def full_depth(self) -> int:
        return self.num_layers * self.layer + self.head


def exit_costs(weights: ModelWeights, head: ExitHead) -> ExitCosts:
    w = weights.layers[0]
    layer = w.qkv.numel() + w.o_proj.numel() + w.gate_up.numel() + w.down.numel()
    shortcut = 0
    if isinstance(head, LowRankHead):
        shortcut = max(down.numel() + up.numel() for down, up in head.shortcuts.values())
    shape = weights.shape
    return ExitCosts(shape.num_layers, layer, weights.lm_head.numel(), shortcut, shape.hidden_size)


@dataclass(slots=True)
class SimResult:
    policy: str
    threshold: float
    agreement: float
    exit_rate: float
    mean_exit_layer: float
    layer_speedup: float  # num_layers / mean_exit_layer
    est_speedup: float  # full-depth MACs / mean MACs with exits and checks

    def row(self) -> dict:
        return {
            "policy": self.policy,
            "threshold": self.threshold,
            "token_agreement": round(self.agreement, 4),
            "exit_rate": round(self.exit_rate, 4),
            "mean_exit_layer": round(self.mean_exit_layer, 3),
            "layer_speedup": round(self.layer_speedup, 4),
            "est_speedup": round(self.est_speedup, 4),
        }


def simulate(
    policy: str, score: torch.Tensor, outputs: HeadOutputs, full: torch.Tensor, threshold: float, costs: ExitCosts
) -> SimResult:
    """Each token leaves at the first depth where ``score`` [D, n] >= ``threshold``, with that depth's
    head token; the others run to full depth and take ``full`` [n]."""
    n = full.shape[0]
    passed = score >= threshold  # [D, n]
    left = passed.any(0)  # [n]
    first = passed.float().argmax(0)  # [n] first passing depth (0 where none passed)
    layer = torch.where(left, torch.tensor(outputs.depths)[first], costs.num_layers)  # [n]
    token = torch.where(left, outputs.tokens[first, torch.arange(n)], full)  # [n]
    checks = torch.where(left, first + 1, len(outputs.depths))  # [n] checks each token paid for
    exit_head = 0 if policy == "softmax" else costs.head + costs.shortcut  # softmax reuses its logits
    macs = layer * costs.layer + checks * costs.check(policy) + torch.where(left, exit_head, costs.head)  # [n]
    mean_layer = float(layer.double().mean())
    return SimResult(
        policy,
        float(threshold),
        int((token == full).sum()) / n,
        float(left.double().mean()),
        mean_layer,
        costs.num_layers / mean_layer,
        costs.full_depth / float(macs.double().mean()),
    )


def candidate_thresholds(score: torch.Tensor, num: int = 256) -> list[float]:
    """Ascending thresholds between observed scores (never equal to one): below all, about ``num``
    midpoints between neighbouring distinct scores, and above all (nothing leaves)."""
    values = score[torch.isfinite(score)].flatten().unique()  # sorted
    if values.numel() == 0:
        return [float("inf")]
    picks = torch.linspace(0, values.numel() - 2, min(num, max(values.numel() - 1, 0))).round().long().unique()
    mids = (values[picks] + values[picks + 1]) / 2 if values.numel() > 1 else values[:0]
    low = torch.nextafter(values[0], torch.tensor(float("-inf")))
    high = torch.nextafter(values[-1], torch.tensor(float("inf")))
    return sorted({float(low), *(float(m) for m in mids), float(high)})


def sweep(
    policy: str, score: torch.Tensor, outputs: HeadOutputs, full: torch.Tensor, costs: ExitCosts, num: int = 256
) -> list[SimResult]:
    return [simulate(policy, score, outputs, full, t, costs) for t in candidate_thresholds(score, num)]


def pick_threshold(results: list[SimResult], target: float) -> SimResult:
    """The smallest threshold from which on every higher candidate keeps agreement >= ``target``.

    (So a higher target never gets a lower threshold; the last candidate lets nothing leave and
    always qualifies.)"""
    if not 0 < target <= 1:
        raise ValueError(f"target_agreement: must be in (0, 1], got {target}")
    ordered = sorted(results, key=lambda r: r.threshold)
    best = ordered[-1]
    for r in reversed(ordered):
        if r.agreement < target:
            break
        best = r
    return best


def calibrate_thresholds(
    held: Activations, outputs: HeadOutputs, full: torch.Tensor, costs: ExitCosts, classifier: Path, targets
) -> dict:
    """Per policy and target: the chosen threshold (``pick_threshold``) and a sweep.
    ``outputs``: the serving head at the exit depths on the held-out activations."""
    scores = policy_scores(outputs, held, ClassifierExit(classifier))
    result: dict = {"policies": {}, "sweep": {}, "from_depth": {}}
    for policy in POLICIES:
        runs = sweep(policy, scores[policy], outputs, full, costs)
        result["policies"][policy] = {str(t): pick_threshold(runs, t).row() for t in targets}
        picks = sorted({round(i * (len(runs) - 1) / 16) for i in range(17)})  # about 17 of the sweep
        result["sweep"][policy] = [runs[i].row() for i in picks]
        result["from_depth"][policy] = best_from_depth(policy, scores[policy], outputs, full, costs, targets)
    return result


def best_from_depth(
    policy: str, score: torch.Tensor, outputs: HeadOutputs, full: torch.Tensor, costs: ExitCosts, targets
) -> dict[str, dict]:
    """Exits from one depth on: for each first exit depth ``m`` (exit depths >= m only; fewer checks)
    and each target, the threshold ``pick_threshold`` gives; per target, the row of the ``m`` of best
    estimated speedup, with ``min_exit_layer`` = m."""
    best: dict[str, dict] = {}
    for j, m in enumerate(outputs.depths):
        runs = sweep(policy, score[j:], outputs.at(outputs.depths[j:]), full, costs)  # one sweep for every target
        for t in targets:
            row = pick_threshold(runs, t).row() | {"min_exit_layer": m}
            held = best.get(str(t))
            if held is None or (row["exit_rate"] > 0, row["est_speedup"]) > (
                held["exit_rate"] > 0,
                held["est_speedup"],
            ):
                best[str(t)] = row
    return best


def choose_policy(thresholds: dict, target: float) -> dict:
    """The policy (and first exit depth) with the best estimated speedup at ``target``; 'none' when
    no policy with exits beats full depth. Candidates: each policy over every exit depth, and from
    the first exit depth that pays best (``best_from_depth``)."""
    rows = [p[str(target)] for p in thresholds["policies"].values()]
    rows += [p[str(target)] for p in thresholds.get("from_depth", {}).values()]
    rows = [r for r in rows if r["exit_rate"] > 0 and r["est_speedup"] > 1]
    if not rows:
        return {"policy": "none", "threshold": None, "target": target, "reason": "no policy reaches the target faster"}
    best = max(rows, key=lambda r: r["est_speedup"])
    return {**best, "target": target, "reason": f"best estimated speedup at token agreement >= {target}"}


def agreement_by_depth(outputs: HeadOutputs, full: torch.Tensor, mask: torch.Tensor | None = None) -> dict[int, float]:
    eq = outputs.tokens == full  # [D, n]
    if mask is not None:
        eq = eq[:, mask]
    n = max(eq.shape[1], 1)
    return {d: int(eq[i].sum()) / n for i, d in enumerate(outputs.depths)}


def auc(score: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (rank statistic; None with a single class)."""
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = torch.empty(score.shape[0], dtype=torch.float64)
    ranks[score.argsort()] = torch.arange(1, score.shape[0] + 1, dtype=torch.float64)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
