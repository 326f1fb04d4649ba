"""``offramp calibrate --sparsity``: importance data, the neuron layout and the predictors (R4).

1. The model answers the calibration prompts (greedy, dense, full depth).
2. Layout: per layer, neurons ordered so co-active ones share a group (``layout.coactive_order`` on
   the |silu(gate) * up| of the first ``layout_tokens`` answer tokens), cut into ``group_size`` groups,
   groups sorted by mean magnitude (``layout.order_groups``: commonly kept groups sit side by side).
3. Importance: one teacher-forced forward and backward pass per answer (``criteria.collect``) gives,
   at each answer position, every head's and group's importance under ``magnitude`` and ``plainact``,
   with the unified predictor's input (layer 0's attention output) and each layer's input.
4. Predictors: per criterion, the unified one and the per-layer baseline, trained on the training
   prompts' tokens, judged by Spearman's rho (heads and groups separately) on the held-out prompts'
   tokens; their parameters, FLOPs and measured time per decode step (one row).

Writes ``predictor_<criterion>_<kind>.safetensors``, ``sparsity_held.json`` (the held-out answers
``offramp eval --sparsity`` scores) and ``sparsity_calibration.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.model.decoder import ModelWeights
from offramp.model.loader import load_weights
from offramp.sparsity import criteria
from offramp.sparsity.layout import SparseLayout, coactive_order, identity_layout, order_groups
from offramp.sparsity.predictor import (
    PREDICTOR_KINDS,
    flops_per_token,
    make_predictor,
    normalise,
    num_params,
    save_predictor,
    spearman,
    train,
)

FILES = {"held": "sparsity_held.json", "report": "sparsity_calibration.json"}


def predictor_file(criterion: str, kind: str) -> str:
    return f"predictor_{criterion}_{kind}.safetensors"


@dataclass(slots=True)
class SparsityTrainConfig:
    group_size: int = 64
    layout_tokens: int = 1024
    unified_width: int = 256
    per_layer_width: int = 128
    steps: int = 600
    lr: float = 2e-3
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("group_size", "layout_tokens", "unified_width", "per_layer_width", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclass(slots=True)
class _Data:
    scores: dict[str, torch.Tensor]  # criterion -> [n, layers, units]
    o0: torch.Tensor  # [n, hidden]
    inputs: torch.Tensor  # [n, layers, hidden] bfloat16


def float_weights(engine: LLMEngine) -> ModelWeights:
    """The model in float32 (the engine's own when it is float32 already)."""
    if engine.config.dtype == "float32" and engine.config.weights == "none" and engine.device.type == "cpu":
        return engine.weights
    return load_weights(engine.checkpoint, torch.float32)[0]


def answers(engine: LLMEngine, prompts: list[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, dense greedy answer ids) per prompt; answers shorter than 2 tokens are dropped."""
    ids = [engine.encode(p) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, exit_policy="none", mode="early_exit")
    outs = engine.generate(ids, params)
    return [(p, o.token_ids) for p, o in zip(ids, outs) if len(o.token_ids) >= 2]


def make_layout(weights: ModelWeights, seqs, cfg: SparsityTrainConfig, progress: bool) -> SparseLayout:
    base = identity_layout(weights.shape, cfg.group_size)
    per_layer: list[list[torch.Tensor]] = [[] for _ in weights.layers]
    count = 0
    for prompt, answer in tqdm(seqs, desc="layout", disable=not progress, leave=False):
        imp = criteria.collect(weights, prompt + answer, len(prompt), base, gradients=False, keep_neurons=True)
        for layer, a in enumerate(imp.neurons):
            per_layer[layer].append(a)
        count += imp.o0.shape[0]
        if count >= cfg.layout_tokens:
            break
    perms = []
    for rows in per_layer:
        imp = torch.cat(rows)  # [tokens, intermediate]
        perms.append(order_groups(coactive_order(imp, cfg.group_size), imp, cfg.group_size))
    return SparseLayout(cfg.group_size, perms)


def collect_all(weights: ModelWeights, seqs, layout: SparseLayout, progress: bool, desc: str) -> _Data:
    parts: list[criteria.Importance] = []
    for prompt, answer in tqdm(seqs, desc=desc, disable=not progress, leave=False):
        parts.append(criteria.collect(weights, prompt + answer, len(prompt), layout))
    return _Data(
        {c: torch.cat([p.scores[c] for p in parts]) for c in criteria.CRITERIA},
        torch.cat([p.o0 for p in parts]),
        torch.cat([p.inputs for p in parts]),
    )


def step_time_ms(model, kind: str, hidden: int, num_layers: int) -> float:
    """Median time of one decode row's prediction (all layers)."""
    x = torch.randn(1, hidden)
    times = []
    with torch.inference_mode():
        for _ in range(60):
            t0 = time.perf_counter()
            if kind == "unified":
                model(x)
            else:
                for layer in range(num_layers):
                    model.layer(layer, x)
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times[10:]) * 1e3, 4)


def _rho(pred: torch.Tensor, true: torch.Tensor, num_heads: int) -> dict:
    return {
        "heads": spearman(pred[..., :num_heads], true[..., :num_heads]),
        "groups": spearman(pred[..., num_heads:], true[..., num_heads:]),
    }


def fit_predictors(weights, layout, train_data: _Data, held: _Data, cfg: SparsityTrainConfig, out: Path) -> list[dict]:
    shape, rows = weights.shape, []
    ng = layout.num_groups(shape.intermediate_size)
    for criterion in criteria.CRITERIA:
        target = normalise(train_data.scores[criterion], shape.num_heads)
        held_target = normalise(held.scores[criterion], shape.num_heads)
        for kind in PREDICTOR_KINDS:
            torch.manual_seed(cfg.seed)
            width = cfg.unified_width if kind == "unified" else cfg.per_layer_width
            model = make_predictor(kind, shape, ng, width)
            x, hx = (train_data.o0, held.o0) if kind == "unified" else (train_data.inputs, held.inputs)
            t0 = time.perf_counter()
            losses = train(model, x, target, cfg.steps, cfg.lr, cfg.batch_size, cfg.seed)
            train_s = time.perf_counter() - t0
            model.eval()
            with torch.no_grad():
                rho = _rho(model(hx.float()), held_target, shape.num_heads)
            info = {
                "criterion": criterion,
                "spearman": rho,
                "params": num_params(model),
                "flops_per_token": flops_per_token(model, shape.hidden_size),
                "step_ms": step_time_ms(model, kind, shape.hidden_size, shape.num_layers),
                "train_s": round(train_s, 1),
                "losses": losses,
            }
            save_predictor(out / predictor_file(criterion, kind), model, layout, weights, info)
            rows.append({"kind": kind, "file": predictor_file(criterion, kind), **info})
    return rows


def calibrate_sparsity(
    engine: LLMEngine,
    train_prompts: list[str],
    held_prompts: list[str],
    out: Path,
    cfg: SparsityTrainConfig,
    max_tokens: int,
    progress: bool,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    weights = float_weights(engine)
    t0 = time.perf_counter()
    train_seqs, held_seqs = answers(engine, train_prompts, max_tokens), answers(engine, held_prompts, max_tokens)
    layout = make_layout(weights, train_seqs, cfg, progress)
    train_data = collect_all(weights, train_seqs, layout, progress, "importance (train)")
    held_data = collect_all(weights, held_seqs, layout, progress, "importance (held out)")
    collect_s = time.perf_counter() - t0
    held_rows = [{"prompt_ids": p, "answer_ids": a} for p, a in held_seqs]
    (out / FILES["held"]).write_text(json.dumps({"model": engine.config.model, "sequences": held_rows}))
    predictors = fit_predictors(weights, layout, train_data, held_data, cfg, out)
    report = {
        "model": engine.config.model,
        "group_size": cfg.group_size,
        "num_groups": layout.num_groups(weights.shape.intermediate_size),
        "num_heads": weights.shape.num_heads,
        "num_train_tokens": int(train_data.o0.shape[0]),
        "num_held_tokens": int(held_data.o0.shape[0]),
        "collect_s": round(collect_s, 1),
        "criteria": {
            "magnitude": "neuron |silu(gate)*up| summed per group; head L2 norm of its attention output",
            "plainact": "|a * dL/da| (L: summed answer cross-entropy); neuron-wise summed per group; "
            "head |sum over head_dim of a * dL/da|",
        },
        "predictors": predictors,
    }
    (out / FILES["report"]).write_text(json.dumps(report, indent=2))
    return report
