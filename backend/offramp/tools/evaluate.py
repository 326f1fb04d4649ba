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
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from offramp.exits import ClassifierExit, ExitHead, IdentityHead, LowRankHead
from offramp.model.decoder import ModelWeights
from offramp.tools.exit_sim import (
    DEFAULT_THRESHOLDS,
    POLICIES,
    agreement_by_depth,
    auc,
    exit_costs,
    full_tokens,
    head_outputs,
    policy_scores,
    simulate,
    sweep,
)

if TYPE_CHECKING:
    from offramp.engine.llm_engine import LLMEngine
    from offramp.tools.activations import Activations

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
    repeats: int = 3  # measured pairs (calibrated, full depth), alternating order

    def __post_init__(self) -> None:
        for name in ("num_requests", "concurrency", "max_tokens", "repeats"):
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

    def simulator(policy: str, threshold: float, min_exit_layer: int | None = None):
        """(policy, threshold) simulated with exits at the exit depths >= ``min_exit_layer`` only."""
        j = next((k for k, d in enumerate(exit_depths) if d >= (min_exit_layer or 0)), len(exit_depths))
        return simulate(policy, scores[policy][j:], exits.at(exit_depths[j:]), full, threshold, costs)

    return result, simulator


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
            classifier = ClassifierExit(classifier_path)
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
        run = simulators[calibrated["exit_head"]]
        sim = run(calibrated["policy"], calibrated["threshold"], calibrated.get("min_exit_layer")).row()
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
        "measured_reference_agreement": measured.get("reference_agreement"),
        "measured_lcs_frac": measured.get("lcs_frac"),
        "measured_distinct2": measured.get("distinct2"),
        "measured_full_depth_distinct2": measured.get("full_depth_distinct2"),
        "measured_sequence_match": measured.get("sequence_match"),
        "measured_self_teacher_agreement": measured.get("self_teacher_agreement"),
    }
    return out


def measure(engine: LLMEngine, prompts: list[str], cfg: EvalConfig, progress: bool) -> dict:
    """``offramp bench`` with the engine's (calibrated) policy, then full depth, in the same process;
    then ``cfg.repeats - 1`` more pairs in alternating order. Every run generates ``max_tokens`` per
    request (``ignore_eos``), so both sides do the same number of tokens; tokens/s are medians over
    the runs and ``speedup`` is their ratio (single runs on a shared 2-core machine vary by ~10%)."""
    from offramp.engine.sampling import SamplingParams
    from offramp.tools.bench import bench
    from offramp.tools.runs import bench_prompt_ids, run_engine

    result = bench(engine, prompts, cfg.num_requests, cfg.concurrency, cfg.max_tokens, progress, ignore_eos=True)
    if "full_depth_tokens_per_s" not in result:  # the calibrated policy is "none": nothing to compare
        result["speedup"] = None
        return result
    runs = {"exit": [result["tokens_per_s"]], "full": [result["full_depth_tokens_per_s"]]}
    prompt_ids = bench_prompt_ids(engine, prompts, cfg.num_requests)
    for r in range(1, cfg.repeats):
        for side in ("full", "exit") if r % 2 else ("exit", "full"):
            policy = "none" if side == "full" else None  # None: the engine's calibrated policy
            params = SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True, exit_policy=policy)
            metrics, _ = run_engine(engine, prompt_ids, cfg.concurrency, cfg.max_tokens, progress, params)
            runs[side].append(metrics["tokens_per_s"])
    result["tokens_per_s_runs"], result["full_depth_tokens_per_s_runs"] = runs["exit"], runs["full"]
    result["tokens_per_s"] = round(statistics.median(runs["exit"]), 2)
    result["full_depth_tokens_per_s"] = round(statistics.median(runs["full"]), 2)
    result["speedup"] = round(result["tokens_per_s"] / result["full_depth_tokens_per_s"], 4)
    return result


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """``report.json``, the PNG charts and ``report.md`` into ``out_dir``."""
    from offramp.tools.plots import (
        plot_agreement_by_category,
        plot_agreement_by_depth,
        plot_eval_tradeoff,
        render_markdown,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = [
        plot_agreement_by_depth(report, out_dir / "agreement_by_depth.png"),
        plot_agreement_by_category(report, out_dir / "agreement_by_category.png"),
        plot_eval_tradeoff(report, out_dir / "tradeoff.png"),
    ]
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report, [p.name for p in pngs]), encoding="utf-8")
    return [out_dir / "report.json", out_dir / "report.md", *pngs]
