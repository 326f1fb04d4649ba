"""``offramp eval --sparsity``: quality and speed of contextual sparsity against density.

Quality, teacher-forced on the held-out answers ``offramp calibrate --sparsity`` kept: each answer
runs through the plain model once dense and once per setting with the skipped heads and neurons
zeroed (``masked.masked_forward``; the prompt dense, every answer position with its own masks, as
the engine decodes it). ``token_agreement``: share of answer positions (from the second answer
token on, the first comes from the dense prefill) where the sparse argmax equals the dense argmax;
``perplexity_ratio``: exp(mean cross-entropy of the answer tokens, sparse minus dense). Settings:
each criterion x predictor file, plus random selection and the magnitude oracle (true magnitudes, the
upper bound of a magnitude predictor), at each density.

Speed, same run: for the best setting with agreement >= 0.95 and the best >= 0.90, one engine with
that predictor decodes the bundled prompts dense (requests without ``sparsity``) and sparse
(``sparsity`` = the density), alternating, at concurrency 1 and 16; medians of ``repeats`` pairs.
At 16 the two batchings (union, per_row) are both measured.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from offramp.config import EngineConfig
from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.model.loader import load_weights, resolve_model
from offramp.sparsity import criteria
from offramp.sparsity.masked import masked_forward
from offramp.sparsity.predictor import PREDICTOR_KINDS, load_predictor
from offramp.sparsity.selectors import OracleSelector, PredictedSelector, RandomSelector
from offramp.tools.runs import bench_prompt_ids, load_prompts, run_engine
from offramp.tools.sparsity_calibrate import FILES, predictor_file

DENSITIES = (1.0, 0.95, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3)  # 0.95 and 0.9: where the curves cross the targets
TARGETS = (0.95, 0.90)
REFERENCE_DENSITY = 0.5  # speed is also measured here, with the best trained predictor, whatever its quality


@dataclass(slots=True)
class SparsityEvalConfig:
    cal_dir: Path
    output_dir: Path
    densities: tuple[float, ...] = DENSITIES
    head_density: float = 1.0
    floor: float = 0.0
    max_gap: int = 0
    measure: bool = True
    repeats: int = 3
    max_tokens: int = 64
    speed_config: dict = field(default_factory=dict)  # EngineConfig settings of the speed runs (dtype, ...)


@dataclass(slots=True)
class _Seq:
    ids: list[int]
    prompt_len: int
    dense_pick: torch.Tensor  # [m] dense argmax at the scored positions
    dense_ce: torch.Tensor  # [m] dense cross-entropy of the next token there


def _score_slice(s: _Seq) -> slice:
    return slice(s.prompt_len, len(s.ids) - 1)  # positions predicting answer tokens 2..


def _dense(weights, prompt_ids: list[int], answer_ids: list[int]) -> _Seq:
    ids = prompt_ids + answer_ids
    s = _Seq(ids, len(prompt_ids), torch.empty(0), torch.empty(0))
    with torch.no_grad():
        logits = masked_forward(weights, ids).logits[_score_slice(s)]
    s.dense_pick = logits.argmax(-1)
    s.dense_ce = F.cross_entropy(logits, torch.tensor(ids[s.prompt_len + 1 :]), reduction="none")
    return s


def _quality(weights, seqs: list[_Seq], selector) -> tuple[float, float]:
    agree, ce, dense_ce, n = 0, 0.0, 0.0, 0
    with torch.no_grad():
        for s in seqs:
            selector.sparse_from = s.prompt_len
            logits = masked_forward(weights, s.ids, selector, sparse_from=s.prompt_len).logits[_score_slice(s)]
            agree += int((logits.argmax(-1) == s.dense_pick).sum())
            ce += F.cross_entropy(logits, torch.tensor(s.ids[s.prompt_len + 1 :]), reduction="sum").item()
            dense_ce += s.dense_ce.sum().item()
            n += s.dense_pick.numel()
    return round(agree / n, 4), round(math.exp((ce - dense_ce) / n), 4)


def quality_rows(weights, seqs: list[_Seq], cfg: SparsityEvalConfig, progress: bool) -> list[dict]:
    nh = weights.shape.num_heads
    rows, settings, layout = [], [], None
    for criterion in criteria.CRITERIA:
        for kind in PREDICTOR_KINDS:
            path = cfg.cal_dir / predictor_file(criterion, kind)
            if path.is_file():
                pred = load_predictor(path, weights)
                layout = pred.layout
                settings.append((criterion, kind, pred))
    if layout is None:
        raise ValueError(f"calibration: no predictor files in {cfg.cal_dir}; run offramp calibrate --sparsity")
    ng = layout.num_groups(weights.shape.intermediate_size)
    settings.append(("random", "random", None))
    settings.append(("magnitude", "oracle", None))  # true magnitudes: what a perfect predictor would reach
    bar = tqdm(total=len(settings) * len(cfg.densities), desc="sparsity eval", disable=not progress, leave=False)
    for criterion, kind, pred in settings:
        for density in cfg.densities:
            sel = None
            if density >= 1 and cfg.head_density >= 1:
                agreement, ppl = 1.0, 1.0  # every unit kept: the dense model itself
            else:
                if kind == "oracle":
                    sel = OracleSelector(layout, nh, density)
                elif pred is None:
                    sel = RandomSelector(layout, nh, ng, density, cfg.head_density)
                else:
                    sel = PredictedSelector(pred, nh, density, cfg.head_density, cfg.floor, cfg.max_gap)
                agreement, ppl = _quality(weights, seqs, sel)
            row = {"criterion": criterion, "predictor": kind, "density": density, "head_density": cfg.head_density}
            row["density_used"] = 1.0 if sel is None else sel.density_used  # after the floor and gap filling
            row |= {"max_gap": cfg.max_gap, "floor": cfg.floor}
            row |= {"token_agreement": agreement, "perplexity_ratio": ppl}
            if pred is not None:
                row |= {"predictor_params": pred.meta["params"], "spearman": pred.meta["spearman"]}
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def best_setting(rows: list[dict], target: float) -> dict | None:
    """The lowest density actually computed (after the floor and gap filling; then the highest
    agreement) of a trained predictor keeping ``target``."""
    trained = [r for r in rows if r["predictor"] not in ("random", "oracle") and r["density_used"] < 1]
    ok = [r for r in trained if r["token_agreement"] >= target]
    return min(ok, key=lambda r: (r["density_used"], -r["token_agreement"]), default=None)


def not_reached(rows: list[dict], target: float) -> dict:
    """Where the curves stand when no trained setting keeps ``target``: the best trained agreement
    below density 1, and the oracle's, at each density."""
    curve: dict[str, dict] = {}
    for r in rows:
        if r["density"] < 1 and r["predictor"] != "random":
            name = "oracle" if r["predictor"] == "oracle" else "best_predictor"
            best = curve.setdefault(name, {})
            best[str(r["density"])] = max(best.get(str(r["density"]), 0.0), r["token_agreement"])
    crossing = {name: crossing_density(points, target) for name, points in curve.items()}
    return {"target": target, "agreement_by_density": curve, "crosses_target_at_density": crossing}


def crossing_density(agreement_by_density: dict[str, float], target: float) -> float | None:
    """The density at which agreement falls to ``target``, interpolated linearly between the lowest
    measured density still keeping it (density 1.0, dense, keeps 1.0) and the next one below; None
    when even the lowest measured density keeps it."""
    points = sorted(((float(d), a) for d, a in agreement_by_density.items()), reverse=True)
    above = (1.0, 1.0)
    for density, agreement in points:
        if agreement < target:
            (d1, a1), (d0, a0) = above, (density, agreement)
            return round(d0 + (target - a0) * (d1 - d0) / (a1 - a0), 3)
        above = (density, agreement)
    return None


def _tokens_per_s(engine: LLMEngine, prompt_ids, concurrency: int, max_tokens: int, sparsity: float | None):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, sparsity=sparsity)
    metrics, _ = run_engine(engine, prompt_ids, concurrency, max_tokens, False, params=params)
    return metrics["tokens_per_s"], metrics


def measure_speed(setting: dict, cfg: SparsityEvalConfig, model: str) -> dict:
    """Dense and sparse decoding in one engine, alternating, at concurrency 1 and 16."""
    path = cfg.cal_dir / predictor_file(setting["criterion"], setting["predictor"])
    settings = {"model": model, "dtype": "bfloat16", **cfg.speed_config, "sparsity_predictor": str(path)}
    settings |= {"head_density": setting["head_density"], "sparsity_max_gap": cfg.max_gap}
    settings["sparsity_floor"] = cfg.floor
    engine = LLMEngine(EngineConfig(**settings))
    prompts = load_prompts()
    out = {"dtype": engine.config.dtype, "weights": engine.config.weights}
    for concurrency, num_requests in ((1, 4), (16, 32)):
        prompt_ids = bench_prompt_ids(engine, prompts, num_requests)
        dense, sparse, cost = [], [], []
        for _ in range(cfg.repeats):
            dense.append(_tokens_per_s(engine, prompt_ids, concurrency, cfg.max_tokens, None)[0])
            tps, metrics = _tokens_per_s(engine, prompt_ids, concurrency, cfg.max_tokens, setting["density"])
            sparse.append(tps)
            cost.append(metrics["predictor_cost_frac"])
        d, s = statistics.median(dense), statistics.median(sparse)
        out[f"c{concurrency}"] = {
            "dense_tokens_per_s": d,
            "sparse_tokens_per_s": s,
            "speedup": round(s / d, 3),
            "predictor_cost_frac": statistics.median(cost),
            "density_used": metrics["density"],
            "ffn_runs_per_layer": metrics.get("ffn_runs_per_layer"),
        }
    engine.runner.sparse.batching = "per_row"  # the other batching at 16, same prompts
    tps = statistics.median(
        _tokens_per_s(engine, prompt_ids, 16, cfg.max_tokens, setting["density"])[0] for _ in range(cfg.repeats)
    )
    out["c16"]["per_row_tokens_per_s"] = tps
    out["c16"]["faster_batching"] = "union" if out["c16"]["sparse_tokens_per_s"] >= tps else "per_row"
    return out


def comparisons(rows: list[dict]) -> dict:
    """Per criterion: does the unified predictor beat random at every density below 1, and how far
    is it from the per-layer predictors (agreement points) at what share of their parameters."""
    out = {}
    at = {(r["criterion"], r["predictor"], r["density"]): r for r in rows}
    for criterion in criteria.CRITERIA:
        uni = [r for r in rows if r["criterion"] == criterion and r["predictor"] == "unified" and r["density"] < 1]
        if not uni:
            continue
        beats = all(r["token_agreement"] > at[("random", "random", r["density"])]["token_agreement"] for r in uni)
        gaps = {
            r["density"]: round(
                100 * (at[(criterion, "per_layer", r["density"])]["token_agreement"] - r["token_agreement"]), 2
            )
            for r in uni
            if (criterion, "per_layer", r["density"]) in at
        }
        per_layer = next((r for r in rows if r["criterion"] == criterion and r["predictor"] == "per_layer"), None)
        out[criterion] = {
            "unified_beats_random_at_every_density": beats,
            "per_layer_minus_unified_points": gaps,
            "unified_within_2_points": all(g <= 2 for g in gaps.values()) if gaps else None,
            "unified_param_share": round(uni[0]["predictor_params"] / per_layer["predictor_params"], 3)
            if per_layer
            else None,
        }
    return out


def evaluate_sparsity(cfg: SparsityEvalConfig, progress: bool, num_threads: int | None = None) -> dict:
    held = json.loads((cfg.cal_dir / FILES["held"]).read_text(encoding="utf-8"))
    calibration = json.loads((cfg.cal_dir / FILES["report"]).read_text(encoding="utf-8"))
    model = cfg.speed_config.get("model") or held["model"]
    if num_threads:
        torch.set_num_threads(num_threads)
    weights = load_weights(resolve_model(model), torch.float32)[0]
    seqs = [_dense(weights, s["prompt_ids"], s["answer_ids"]) for s in held["sequences"]]
    rows = quality_rows(weights, seqs, cfg, progress)
    summary: dict = {}
    for target in TARGETS:
        best = best_setting(rows, target)
        key = f"agreement_{int(target * 100)}"
        if best is None:
            summary[key] = {"reached": False, **not_reached(rows, target)}
            continue
        entry = {k: best.get(k) for k in ("criterion", "predictor", "density", "density_used", "head_density")}
        entry["token_agreement"] = best["token_agreement"]
        entry |= {k: best.get(k) for k in ("perplexity_ratio", "predictor_params", "spearman")}
        if cfg.measure:
            speed = measure_speed(best, cfg, model)
            entry |= {"speedup_c1": speed["c1"]["speedup"], "speedup_c16": speed["c16"]["speedup"], "speed": speed}
        summary[key] = entry
    reference = max(
        (r for r in rows if r["density"] == REFERENCE_DENSITY and r["predictor"] not in ("random", "oracle")),
        key=lambda r: r["token_agreement"],
        default=None,
    )
    if cfg.measure and reference is not None:  # speed at a fixed density, whatever the quality
        keys = ("criterion", "predictor", "density", "token_agreement", "perplexity_ratio")
        summary["speed_at_reference_density"] = {k: reference[k] for k in keys} | measure_speed(reference, cfg, model)
    summary["comparisons"] = comparisons(rows)
    keys = ("kind", "criterion", "spearman", "params", "flops_per_token", "step_ms")
    summary["predictors"] = [{k: p[k] for k in keys} for p in calibration["predictors"]]
    summary["num_held_tokens"] = sum(s.dense_pick.numel() for s in seqs)
    return {"summary": summary, "rows": rows, "calibration": calibration, "densities": list(cfg.densities)}


def write_sparsity_report(report: dict, out_dir: Path) -> list[Path]:
    from offramp.tools.plots import plot_sparsity

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sparsity.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return [path, plot_sparsity(report, out_dir / "sparsity.png")]
