"""``offramp calibrate``: trained exits (R3 OJFA shortcuts, exit classifiers) and calibrated thresholds.

1. Collect: the model answers calibration prompts (greedy, full depth); one teacher-forced pass per
   answer collects, at each position that predicted a generated token, the hidden state at every
   exit depth and after the last layer, and the similarity policy's score (cosine between the
   hidden states before and after each exit depth's block). Cached in ``activations.pt``.
2. Shortcuts ``h -> h + up(down(h))`` distilled to the full model's next-token distribution: the
   one-jump shortcut (trained at one depth, used at all) and per-level shortcuts (one per depth).
3. Exit classifiers: per exit depth, ``sigmoid(w . layer_norm(h) + b)`` (no affine), trained with
   BCE to predict whether the *serving head's* greedy token equals the full model's.
4. Thresholds: per policy and target agreement, the smallest threshold whose simulated exits on the
   held-out activations keep agreement >= target (``exit_sim.py``).

Writes the heads (``--exit-head``), ``classifier.safetensors`` (``--exit-classifier``),
``calibration.json`` and ``engine.calibrated.json``. Each safetensors file records its settings; a
rerun reuses a file whose settings match (unless ``force``), and the activations whose key matches.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from offramp.engine.llm_engine import LLMEngine
from offramp.exits import ExitHead, IdentityHead, LowRankHead
from offramp.model.decoder import ModelWeights, final_logits, rms_norm
from offramp.serving.serving_config import ServingConfig, load_serving_config, server_keys
from offramp.tools import exit_sim
from offramp.tools.activations import (
    Activations,
    load_or_collect,
)

HEADS = ("identity", "one_jump", "per_level")
FILES = {
    "one_jump": "one_jump.safetensors",
    "per_level": "per_level.safetensors",
    "classifier": "classifier.safetensors",
    "activations": "activations.pt",
    "report": "calibration.json",
    "engine": "engine.calibrated.json",
}


@dataclass(slots=True)
class TrainConfig:
    rank: int = 64
    steps: int = 150
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    classifier_steps: int = 300
    classifier_lr: float = 1e-2
    head_precision: str = "bfloat16"  # the LM head inside shortcut training: bfloat16 | float32

    def __post_init__(self) -> None:
        if self.head_precision not in ("bfloat16", "float32"):
            raise ValueError(f"head_precision: {self.head_precision!r} is not one of bfloat16, float32")
        for name in ("rank", "steps", "batch_size", "classifier_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("lr", "classifier_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive")


@dataclass(slots=True)
class CalibrationReport:
    depths: list[int]
    num_train_tokens: int
    num_eval_tokens: int
    one_jump_depth: int
    rank: int
    agreement: dict[str, dict[int, float]] = field(default_factory=dict)  # head -> depth -> agreement
    params: dict[str, int] = field(default_factory=dict)
    exit_depths: list[int] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)  # serving head, targets, per policy: choice and sweep
    calibrated: dict = field(default_factory=dict)  # the policy/threshold written to engine.calibrated.json
    reused: list[str] = field(default_factory=list)  # cached or trained files reused from an earlier run


def _logits(weights: ModelWeights, h: torch.Tensor) -> torch.Tensor:
    return final_logits(weights, h.to(weights.embed.dtype)).float()  # [n, vocab]


TEACHER_CACHE_ELEMENTS = 2**30  # 2 GiB of bfloat16: beyond it the teacher is recomputed per step


@torch.no_grad()
def teacher_probs(weights: ModelWeights, final: torch.Tensor) -> torch.Tensor | None:
    """The full model's next-token distribution [n, vocab] (computed in float32, kept in bfloat16)
    for every training row, computed once and shared by every shortcut; None when it would not fit
    ``TEACHER_CACHE_ELEMENTS``."""
    if final.shape[0] * weights.shape.vocab_size > TEACHER_CACHE_ELEMENTS:
        return None
    probs = torch.empty(final.shape[0], weights.shape.vocab_size, dtype=torch.bfloat16)  # [n, vocab]
    for start in range(0, final.shape[0], 512):
        probs[start : start + 512] = _logits(weights, final[start : start + 512]).softmax(-1)
    return probs


class _SoftCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` [n, vocab] against a distribution ``target`` [n, vocab]:
    ``F.cross_entropy`` with probabilities, with one log-softmax kept for the backward pass
    (half its time on a vocabulary of 49k)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = logits.log_softmax(-1)  # [n, vocab]
        ctx.save_for_backward(logp, target)
        return -torch.einsum("nv,nv->", target, logp) / logits.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, target = ctx.saved_tensors
        return logp.exp_().sub_(target).mul_(grad / logp.shape[0]), None


def train_shortcut(
    weights: ModelWeights,
    source: torch.Tensor,
    final: torch.Tensor,
    cfg: TrainConfig,
    progress: bool,
    desc: str,
    teacher: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, hidden], up [hidden, rank]) minimising KL(full model || head(h + up(down(h)))),
    as cross-entropy against the full model's distribution (same gradient; the teacher's entropy is a
    constant). ``teacher``: ``teacher_probs`` of ``final`` when cached. The student's LM head runs
    in ``cfg.head_precision`` (bfloat16 halves a step; the served head runs in the model's dtype)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    hidden = source.shape[1]
    down = (torch.randn(cfg.rank, hidden, generator=gen) / hidden**0.5).requires_grad_()
    up = torch.zeros(hidden, cfg.rank, requires_grad=True)  # starts as the identity head
    opt = torch.optim.Adam([down, up], lr=cfg.lr)
    head_dtype = getattr(torch, cfg.head_precision)
    head = weights.lm_head  # a tensor, or packed int8/int4 weights (--weights): trained against their values
    lm_head = (head if isinstance(head, torch.Tensor) else head.dequantize()).to(head_dtype)  # [vocab, hidden]
    norm, eps = weights.final_norm.float(), weights.shape.rms_norm_eps
    n = source.shape[0]
    for _ in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        h = source[idx].float()  # [b, hidden]
        if teacher is not None:
            target = teacher[idx].float()  # [b, vocab]
        else:
            with torch.no_grad():
                target = _logits(weights, final[idx]).softmax(-1)  # [b, vocab]
        x = rms_norm(h + (h @ down.T) @ up.T, norm, eps)  # [b, hidden]
        loss = _SoftCrossEntropy.apply(F.linear(x.to(head_dtype), lm_head).float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return down.detach(), up.detach()


def train_classifier(source: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [hidden], bias [1]) of ``sigmoid(weight . layer_norm(h) + bias)`` fitted to ``labels``
    [n] bool by binary cross-entropy (Adam, minibatches drawn with ``cfg.seed``)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = F.layer_norm(source.float(), source.shape[-1:])  # [n, hidden], no affine: as ClassifierExit
    y = labels.float()  # [n]
    rate = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.log(rate / (1 - rate)).reshape(1).requires_grad_()  # starts at the base rate
    opt = torch.optim.Adam([weight, bias], lr=cfg.classifier_lr)
    n = x.shape[0]
    for _ in range(cfg.classifier_steps):
        idx = torch.randint(0, n, (min(4 * cfg.batch_size, n),), generator=gen)
        loss = F.binary_cross_entropy_with_logits(x[idx] @ weight + bias, y[idx]) + 1e-3 * weight.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weight.detach(), bias.detach()


def _is_current(path: Path, settings: dict, force: bool) -> bool:
    """Whether ``path`` exists and was written with exactly ``settings`` (never under ``force``)."""
    if force or not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("offramp", "null"))
    except (OSError, ValueError):
        return False
    return saved == json.loads(json.dumps(settings))


def _save(path: Path, tensors: dict[str, torch.Tensor], settings: dict) -> None:
    meta = {"offramp": json.dumps(settings, sort_keys=True)}
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=meta)


@dataclass(slots=True)
class _Run:
    """What every training step of one calibration shares."""

    engine: LLMEngine
    cfg: TrainConfig
    key: str  # the activations' key: trained files record it
    out_dir: Path
    force: bool
    progress: bool
    reused: list[str]


def _shortcuts(run: _Run, train: Activations, depths: tuple[int, ...], one_jump_depth: int) -> dict:
    """Train (or reuse) and write the one-jump and per-level shortcuts; returns their settings."""
    w, cfg = run.engine.weights, run.cfg
    common = {"activations": run.key, "rank": cfg.rank, "steps": cfg.steps, "batch_size": cfg.batch_size}
    common |= {"lr": cfg.lr, "seed": cfg.seed, "head_precision": cfg.head_precision}
    settings = {
        "one_jump": {**common, "kind": "one_jump", "depth": one_jump_depth},
        "per_level": {**common, "kind": "per_level", "depths": list(depths)},
    }
    todo = [k for k in settings if not _is_current(run.out_dir / FILES[k], settings[k], run.force)]
    run.reused += [FILES[k] for k in settings if k not in todo]
    teacher = teacher_probs(w, train.final) if todo else None
    if "one_jump" in todo:
        pair = train_shortcut(w, train.at_depth[one_jump_depth], train.final, cfg, run.progress, "one-jump", teacher)
        _save(run.out_dir / FILES["one_jump"], dict(zip(("down", "up"), pair)), settings["one_jump"])
    if "per_level" in todo:
        tensors = {}
        for d in tqdm(depths, desc="per-level shortcuts", disable=not run.progress):
            pair = train_shortcut(w, train.at_depth[d], train.final, cfg, False, "", teacher)
            tensors[f"down.{d}"], tensors[f"up.{d}"] = pair
        _save(run.out_dir / FILES["per_level"], tensors, settings["per_level"])
    return settings


def load_head(weights: ModelWeights, name: str, out_dir: Path) -> ExitHead:
    if name not in HEADS:
        raise ValueError(f"serve_head: {name!r} is not one of {', '.join(HEADS)}")
    return IdentityHead(weights) if name == "identity" else LowRankHead(weights, out_dir / FILES[name])


CLASSIFIER_ROWS = 8192  # training rows per exit classifier (labels cost a full-vocabulary head per row and depth)


def _classifier_rows(num_tokens: int, seed: int) -> torch.Tensor:
    """A seeded subset of at most ``CLASSIFIER_ROWS`` training rows (all of them when fewer)."""
    if num_tokens <= CLASSIFIER_ROWS:
        return torch.arange(num_tokens)
    return torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))[:CLASSIFIER_ROWS].sort().values


def _classifier(run: _Run, train: Activations, exit_depths: list[int], head_name: str, head_settings) -> None:
    """Train (or reuse) and write ``classifier.safetensors`` predicting the correctness of ``head_name``."""
    cfg = run.cfg
    settings = {"activations": run.key, "head": head_name, "head_settings": head_settings, "depths": exit_depths}
    settings |= {"steps": cfg.classifier_steps, "lr": cfg.classifier_lr, "batch_size": cfg.batch_size}
    settings |= {"seed": cfg.seed, "rows": CLASSIFIER_ROWS}
    path = run.out_dir / FILES["classifier"]
    if _is_current(path, settings, run.force):
        run.reused.append(FILES["classifier"])
        return
    w = run.engine.weights
    head = load_head(w, head_name, run.out_dir)
    rows = _classifier_rows(train.num_tokens, cfg.seed)
    sub = dataclasses.replace(train, at_depth={d: train.at_depth[d][rows] for d in exit_depths})
    outputs = exit_sim.head_outputs(w, head, sub, exit_depths, run.progress, "classifier labels")
    correct = outputs.tokens == exit_sim.full_tokens(w, train.final[rows])  # [D, n]
    tensors = {}
    for i, d in enumerate(exit_depths):
        tensors[f"weight.{d}"], tensors[f"bias.{d}"] = train_classifier(sub.at_depth[d], correct[i], cfg)
    _save(path, tensors, settings)


def engine_json(engine: LLMEngine, chosen: dict, head_path: Path | None, classifier: Path) -> dict:
    """``engine.json`` settings (as ``serving_config`` reads them) serving the chosen policy."""
    raw = dataclasses.asdict(engine.config)
    model = Path(raw["model"])
    if raw["model"] != "default" and model.exists():
        raw["model"] = str(model.resolve())
    raw |= {"exit_policy": chosen["policy"], "exit_gate": None, "exit_classifier": str(classifier.resolve())}
    raw["exit_head"] = str(head_path.resolve()) if head_path is not None else None
    if chosen["threshold"] is not None:
        raw["exit_threshold"] = chosen["threshold"]
    # exit depths from the chosen one on (one of the config's), else from the config's own first one
    raw["min_exit_layer"] = chosen.get("min_exit_layer") or engine.config.min_exit_depth(engine.num_layers)
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in raw.items() if v is not None}
    server = {f.name: f.default for f in dataclasses.fields(ServingConfig) if f.name in server_keys()}
    return raw | server


def calibrate(
    engine: LLMEngine,
    train_prompts: list[str],
    eval_prompts: list[str],
    out_dir: Path,
    one_jump_depth: int,
    cfg: TrainConfig,
    max_tokens: int = 64,
    progress: bool = True,
    *,
    eval_categories: list[str] | None = None,
    targets: tuple[float, ...] = (0.95,),
    serve_head: str = "one_jump",
    force: bool = False,
    samples: int = 0,
) -> CalibrationReport:
    """Collect (or reuse) activations, train shortcuts and classifiers, measure agreement, pick
    thresholds; write the heads, ``calibration.json`` and ``engine.calibrated.json``."""
    exit_depths = sorted(engine.runner.loop.exit_depths)
    depths = tuple(sorted(set(exit_depths) | {one_jump_depth}))
    if one_jump_depth not in {end for _, end in engine.block_ranges} or one_jump_depth >= engine.num_layers:
        raise ValueError(f"one_jump_depth: {one_jump_depth} is not an exit depth (a block end before the last layer)")
    if not exit_depths:
        raise ValueError("exit_points: this layout has no exit depth (check --layers-per-block / --min-exit-layer)")
    if serve_head not in HEADS:
        raise ValueError(f"serve_head: {serve_head!r} is not one of {', '.join(HEADS)}")
    if not targets or any(not 0 < t <= 1 for t in targets):
        raise ValueError(f"target_agreement: each must be in (0, 1], got {list(targets)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"samples_per_prompt: must be a non-negative integer, got {samples!r}")
    if eval_categories is not None and len(eval_categories) != len(eval_prompts):
        raise ValueError("eval_categories: needs one category per held-out prompt")
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = {"train": list(train_prompts), "held": list(eval_prompts)}
    prompts["held_categories"] = list(eval_categories) if eval_categories else ["all"] * len(eval_prompts)
    key, train, held, cached = load_or_collect(
        engine, prompts, depths, max_tokens, cfg.seed, out_dir / FILES["activations"], progress, samples
    )
    report = CalibrationReport(list(depths), train.num_tokens, held.num_tokens, one_jump_depth, cfg.rank)
    report.exit_depths, report.reused = exit_depths, [FILES["activations"]] if cached else []
    run = _Run(engine, cfg, key, out_dir, force, progress, report.reused)
    head_settings = _shortcuts(run, train, depths, one_jump_depth)
    _classifier(run, train, exit_depths, serve_head, head_settings.get(serve_head))
    _finish(engine, held, report, out_dir, serve_head, targets)
    return report


def _finish(engine, held, report: CalibrationReport, out_dir: Path, serve_head: str, targets) -> None:
    """Held-out agreement per head, thresholds for the serving head; write the engine config and report."""
    w = engine.weights
    full = exit_sim.full_tokens(w, held.final)
    for name in HEADS:
        head = load_head(w, name, out_dir)
        outputs = exit_sim.head_outputs(w, head, held, report.depths, progress=False)
        report.agreement[name] = exit_sim.agreement_by_depth(outputs, full)
        if name == serve_head:
            serving = (outputs.at(report.exit_depths), exit_sim.exit_costs(w, head))
    report.params = {k: sum(t.numel() for t in load_file(str(out_dir / FILES[k])).values()) for k in HEADS[1:]}
    classifier = out_dir / FILES["classifier"]
    report.thresholds = {"exit_head": serve_head, "targets": list(targets)}
    report.thresholds |= exit_sim.calibrate_thresholds(held, serving[0], full, serving[1], classifier, targets)
    chosen = exit_sim.choose_policy(report.thresholds, targets[0])
    head_path = None if serve_head == "identity" else out_dir / FILES[serve_head]
    settings = engine_json(engine, chosen, head_path, classifier)
    (out_dir / FILES["engine"]).write_text(json.dumps(settings, indent=1) + "\n")
    load_serving_config(out_dir / FILES["engine"])  # what we wrote must load as a served engine.json
    report.calibrated = {**chosen, "exit_head": serve_head, "engine_config": FILES["engine"]}
    report.calibrated |= {"exit_head_file": settings.get("exit_head"), "exit_classifier": settings["exit_classifier"]}
    (out_dir / FILES["report"]).write_text(json.dumps(report_json(report), indent=1) + "\n")


def report_json(report: CalibrationReport) -> dict:
    return {
        "depths": report.depths,
        "exit_depths": report.exit_depths,
        "num_train_tokens": report.num_train_tokens,
        "num_eval_tokens": report.num_eval_tokens,
        "one_jump_depth": report.one_jump_depth,
        "rank": report.rank,
        "params": report.params,
        "agreement": {head: {str(d): round(a, 4) for d, a in v.items()} for head, v in report.agreement.items()},
        "thresholds": report.thresholds,
        "calibrated": report.calibrated,
        "reused": report.reused,
    }
