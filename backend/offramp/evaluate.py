"""``offramp eval``: the offline trade-off of early exit, simulated on held-out activations.

``offramp calibrate`` collected, on held-out prompts, the hidden state at every exit depth of every
position that predicted a generated token (teacher forcing: full-depth prefixes). Here:

- a token leaves at the first exit depth where its policy's score >= threshold and takes that
  depth's exit-head greedy token; a token that never passes runs to full depth (the fallback);
- token agreement: share of tokens equal to the full model's greedy token;
- exit rate; mean exit layer (full depth counts as ``num_layers``);
- layer speedup = num_layers / mean exit layer (checks counted as free: an upper bound);
- estimated speedup = multiply-accumulates (MACs) per token at full depth / mean MACs per token
  with exits, counting the decoder layers' and heads' matrix products and every check (softmax:
  the exit head on the full vocabulary at each depth tried; classifier and similarity: one dot
  product); attention over the context and the K/V fill of skipped layers are not counted.

``--measure`` adds a real ``offramp bench`` run: the calibrated policy, then full depth, same process.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from offramp.exits import ClassifierExit, ExitHead, IdentityHead, LowRankHead
from offramp.modeling import ModelWeights, final_logits

if TYPE_CHECKING:
    from offramp.calibrate import Activations
    from offramp.engine import LLMEngine

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
    scores = policy_scores(outputs, held, ClassifierExit(classifier, torch.float32))
    result: dict = {"policies": {}, "sweep": {}}
    for policy in POLICIES:
        runs = sweep(policy, scores[policy], outputs, full, costs)
        result["policies"][policy] = {str(t): pick_threshold(runs, t).row() for t in targets}
        picks = sorted({round(i * (len(runs) - 1) / 16) for i in range(17)})  # about 17 of the sweep
        result["sweep"][policy] = [runs[i].row() for i in picks]
    return result


def choose_policy(thresholds: dict, target: float) -> dict:
    """The policy with the best estimated speedup at ``target``; 'none' when no policy with exits beats full depth."""
    rows = [p[str(target)] for p in thresholds["policies"].values()]
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


AT_DEPTH = 20  # the summary's "at_20" figures (the nearest collected depth on shallower models)


@dataclass(slots=True)
class EvalConfig:
    calibration_dir: Path
    output_dir: Path = Path("docs/eval")
    thresholds: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    measure: bool = False
    num_requests: int = 32
    concurrency: int = 16
    max_tokens: int = 32

    def __post_init__(self) -> None:
        for name in ("num_requests", "concurrency", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        unknown = sorted(set(self.thresholds) - set(POLICIES))
        if unknown:
            raise ValueError(f"thresholds: unknown policies {unknown} (use {', '.join(POLICIES)})")


def _heads(weights: ModelWeights, cal_dir: Path) -> dict[str, ExitHead]:
    heads: dict[str, ExitHead] = {"identity": IdentityHead(weights)}
    for name in ("one_jump", "per_level"):
        if (cal_dir / f"{name}.safetensors").is_file():
            heads[name] = LowRankHead(weights, cal_dir / f"{name}.safetensors")
    return heads


def _head_report(weights, name, head, held, depths, exit_depths, full, classifier, cfg, progress):
    """Agreement by depth and category, threshold sweeps and classifier AUC for one head; and a
    function simulating (policy, threshold) on it."""
    outputs = head_outputs(weights, head, held, depths, progress, f"eval {name}")
    cats = held.token_categories()
    by_cat = {}
    for cat in sorted(set(cats)):
        mask = torch.tensor([c == cat for c in cats])
        by_cat[cat] = {str(d): round(a, 4) for d, a in agreement_by_depth(outputs, full, mask).items()}
    result = {
        "agreement": {str(d): round(a, 4) for d, a in agreement_by_depth(outputs, full).items()},
        "by_category": by_cat,
        "sweeps": [],
        "curves": {},
    }
    exits = outputs.at(exit_depths)
    costs = exit_costs(weights, head)
    scores = policy_scores(exits, held, classifier)
    for policy, score in scores.items():
        rows = [simulate(policy, score, exits, full, t, costs) for t in cfg.thresholds.get(policy, ())]
        result["sweeps"] += [{"head": name, **r.row()} for r in rows]
        result["curves"][policy] = [r.row() for r in sweep(policy, score, exits, full, costs, num=48)]
    if classifier is not None:
        correct = exits.tokens == full  # [D, n]
        aucs = {str(d): auc(scores["classifier"][i], correct[i]) for i, d in enumerate(exit_depths)}
        result["classifier_auc"] = {d: None if a is None else round(a, 4) for d, a in aucs.items()}
    return result, lambda policy, threshold: simulate(policy, scores[policy], exits, full, threshold, costs)


def evaluate(engine: LLMEngine, held: Activations, cfg: EvalConfig, progress: bool = True) -> dict:
    """The trade-off report (a JSON-able dict) from ``calibration.json`` and the held-out activations."""
    cal_dir = cfg.calibration_dir
    try:
        calibration = json.loads((cal_dir / "calibration.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"calibration: cannot read {cal_dir / 'calibration.json'} ({exc}); run offramp calibrate"
        ) from None
    w = engine.weights
    depths, exit_depths = sorted(held.at_depth), list(calibration["exit_depths"])
    if held.final.shape[1] != w.shape.hidden_size or max(depths) >= engine.num_layers:
        raise ValueError("calibration: the activations were collected from another model than --model")
    full = full_tokens(w, held.final)
    classifier_head = calibration["thresholds"]["exit_head"]
    classifier_path = cal_dir / "classifier.safetensors"
    per_head, simulators = {}, {}
    for name, head in _heads(w, cal_dir).items():
        classifier = None
        if name == classifier_head and classifier_path.is_file():
            classifier = ClassifierExit(classifier_path, torch.float32)
        per_head[name], simulators[name] = _head_report(
            w, name, head, held, depths, exit_depths, full, classifier, cfg, progress
        )
    report = {
        "settings": {
            "calibration_dir": str(cal_dir),
            "num_layers": engine.num_layers,
            "depths": depths,
            "exit_depths": exit_depths,
            "num_eval_tokens": held.num_tokens,
            "categories": {c: held.token_categories().count(c) for c in sorted(set(held.categories))},
            "classifier_head": classifier_head,
            "cost_model": dataclasses.asdict(exit_costs(w, IdentityHead(w))),
        },
        "agreement_by_depth": {name: r["agreement"] for name, r in per_head.items()},
        "agreement_by_category": {name: r["by_category"] for name, r in per_head.items()},
        "classifier_auc": per_head.get(classifier_head, {}).get("classifier_auc"),
        "sweeps": [row for r in per_head.values() for row in r["sweeps"]],
        "curves": {f"{name}/{p}": c for name, r in per_head.items() for p, c in r["curves"].items()},
        "calibration": {k: calibration.get(k) for k in ("params", "calibrated", "thresholds", "one_jump_depth")},
    }
    calibrated = calibration.get("calibrated") or {}
    sim = None
    if calibrated.get("policy") not in (None, "none") and calibrated.get("exit_head") in per_head:
        sim = simulators[calibrated["exit_head"]](calibrated["policy"], calibrated["threshold"]).row()
    report["calibrated_simulated"] = sim
    report["measured"] = measure(engine, held.prompts, cfg, progress) if cfg.measure else None
    report["summary"] = summary(report, calibration, calibrated, sim)
    return report


def summary(report: dict, calibration: dict, calibrated: dict, sim: dict | None) -> dict:
    depths = report["settings"]["depths"]
    at = min(depths, key=lambda d: (abs(d - AT_DEPTH), d))
    agree = report["agreement_by_depth"]
    params = calibration.get("params") or {}
    measured = report["measured"] or {}
    out = {
        "at_20_depth": at,
        "at_20_note": None if at == AT_DEPTH else f"no depth {AT_DEPTH} here: the nearest collected exit depth is {at}",
    }
    for head in ("identity", "one_jump", "per_level"):
        out[f"{head}_agreement_at_20"] = agree.get(head, {}).get(str(at))
    out |= {
        "one_jump_params": params.get("one_jump"),
        "per_level_params": params.get("per_level"),
        "per_level_to_one_jump_params": round(params["per_level"] / params["one_jump"], 2) if params else None,
        "calibrated_policy": calibrated.get("policy"),
        "calibrated_exit_head": calibrated.get("exit_head"),
        "calibrated_target": calibrated.get("target"),
        "calibrated_threshold": calibrated.get("threshold"),
        "calibrated_token_agreement": sim["token_agreement"] if sim else None,
        "calibrated_exit_rate": sim["exit_rate"] if sim else None,
        "calibrated_mean_exit_layer": sim["mean_exit_layer"] if sim else None,
        "calibrated_est_speedup": sim["est_speedup"] if sim else None,
        "calibrated_speedup": measured.get("speedup"),
        "measured_token_agreement": measured.get("token_agreement"),
        "measured_sequence_match": measured.get("sequence_match"),
    }
    return out


def measure(engine: LLMEngine, prompts: list[str], cfg: EvalConfig, progress: bool) -> dict:
    """``offramp bench`` with the engine's (calibrated) policy, then full depth in the same process."""
    from offramp.bench import bench

    result = bench(engine, prompts, cfg.num_requests, cfg.concurrency, cfg.max_tokens, progress=progress)
    full = result.get("full_depth_tokens_per_s")
    result["speedup"] = round(result["tokens_per_s"] / full, 4) if full else None
    return result


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """``report.json``, the PNG charts and ``report.md`` into ``out_dir``."""
    from offramp.plots import plot_agreement_by_category, plot_agreement_by_depth, plot_eval_tradeoff, render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [
        plot_agreement_by_depth(report, out_dir / "agreement_by_depth.png"),
        plot_agreement_by_category(report, out_dir / "agreement_by_category.png"),
        plot_eval_tradeoff(report, out_dir / "tradeoff.png"),
    ]
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report, [p.name for p in pngs]), encoding="utf-8")
    return [out_dir / "report.json", out_dir / "report.md", *pngs]
