"""``offramp calibrate``: train low-rank exit shortcuts by distillation (R3, OJFA).

1. The model generates answers to calibration prompts (no data download); one teacher-forced
   full-depth pass per answer collects the hidden state at every exit depth and after the last
   layer, at each position that predicted a generated token.
2. A shortcut ``h -> h + up(down(h))`` is trained so that the final norm + LM head applied to it
   matches the full model's next-token distribution (KL divergence):
   - the one-jump shortcut: trained at one depth, used at every depth;
   - per-level shortcuts: one per exit depth (the baseline it is measured against).
3. Agreement with the full model's greedy token is measured on held-out prompts for the identity
   head, the one-jump shortcut and the per-level shortcuts.

The heads are written as safetensors that ``--exit-head`` loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from offramp.engine import LLMEngine
from offramp.modeling import ModelWeights, final_logits
from offramp.sampling import SamplingParams


@dataclass(slots=True)
class Activations:
    """Hidden states at the positions that predicted generated tokens."""

    at_depth: dict[int, torch.Tensor]  # depth -> [n, hidden]
    final: torch.Tensor  # [n, hidden] after the last layer

    @property
    def num_tokens(self) -> int:
        return self.final.shape[0]


@dataclass(slots=True)
class TrainConfig:
    rank: int = 64
    steps: int = 150
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")
        if not self.lr > 0:
            raise ValueError("lr: must be positive")


@dataclass(slots=True)
class CalibrationReport:
    depths: list[int]
    num_train_tokens: int
    num_eval_tokens: int
    one_jump_depth: int
    rank: int
    agreement: dict[str, dict[int, float]] = field(default_factory=dict)  # head -> depth -> agreement
    params: dict[str, int] = field(default_factory=dict)


def collect(
    engine: LLMEngine, prompts: list[str], depths: tuple[int, ...], max_tokens: int, progress: bool
) -> Activations:
    """Generate answers (greedy, full depth) and collect hidden states by teacher forcing."""
    ids = [engine.encode(p) for p in prompts]
    outs = engine.generate(ids, SamplingParams(max_tokens=max_tokens, exit_policy="none"))
    at_depth: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    finals = []
    for prompt_ids, out in tqdm(list(zip(ids, outs)), desc="collect", disable=not progress, leave=False):
        if not out.token_ids:
            continue
        captured, final = engine.teacher_forced_hidden(prompt_ids, out.token_ids, depths)
        for d in depths:  # copies outside inference mode, so that training can use them
            at_depth[d].append(captured[d].to(torch.float32, copy=True))
        finals.append(final.to(torch.float32, copy=True))
    return Activations({d: torch.cat(v) for d, v in at_depth.items()}, torch.cat(finals))


def _logits(weights: ModelWeights, h: torch.Tensor) -> torch.Tensor:
    return final_logits(weights, h.to(weights.embed.dtype)).float()  # [n, vocab]


def train_shortcut(
    weights: ModelWeights, source: torch.Tensor, final: torch.Tensor, cfg: TrainConfig, progress: bool, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [rank, hidden], up [hidden, rank]) minimising KL(full model || head(h + up(down(h))))."""
    gen = torch.Generator().manual_seed(cfg.seed)
    hidden = source.shape[1]
    down = (torch.randn(cfg.rank, hidden, generator=gen) / hidden**0.5).requires_grad_()
    up = torch.zeros(hidden, cfg.rank, requires_grad=True)  # starts as the identity head
    opt = torch.optim.Adam([down, up], lr=cfg.lr)
    n = source.shape[0]
    for _ in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        h = source[idx]
        with torch.no_grad():
            teacher = F.log_softmax(_logits(weights, final[idx]), dim=-1)  # [b, vocab]
        student = F.log_softmax(_logits(weights, h + (h @ down.T) @ up.T), dim=-1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return down.detach(), up.detach()


@torch.inference_mode()
def agreement(weights: ModelWeights, source: torch.Tensor, final: torch.Tensor, pair=None) -> float:
    """Share of positions where the head's greedy token equals the full model's."""
    h = source if pair is None else source + (source @ pair[0].T) @ pair[1].T
    target = _logits(weights, final).argmax(-1)
    return float((_logits(weights, h).argmax(-1) == target).float().mean())


def calibrate(
    engine: LLMEngine,
    train_prompts: list[str],
    eval_prompts: list[str],
    out_dir: Path,
    one_jump_depth: int,
    cfg: TrainConfig,
    max_tokens: int = 64,
    progress: bool = True,
) -> CalibrationReport:
    """Collect, train one-jump and per-level shortcuts, evaluate; write heads and a JSON report."""
    depths = tuple(sorted(engine.runner.loop.exit_depths | {one_jump_depth}))
    if one_jump_depth not in {end for _, end in engine.block_ranges} or one_jump_depth >= engine.num_layers:
        raise ValueError(f"one_jump_depth: {one_jump_depth} is not an exit depth (a block end before the last layer)")
    torch.manual_seed(cfg.seed)
    train = collect(engine, train_prompts, depths, max_tokens, progress)
    held = collect(engine, eval_prompts, depths, max_tokens, progress)
    w = engine.weights
    one_jump = train_shortcut(
        w, train.at_depth[one_jump_depth], train.final, cfg, progress, f"one-jump@{one_jump_depth}"
    )
    per_level = {d: train_shortcut(w, train.at_depth[d], train.final, cfg, progress, f"level {d}") for d in depths}
    report = CalibrationReport(list(depths), train.num_tokens, held.num_tokens, one_jump_depth, cfg.rank)
    report.agreement = {
        "identity": {d: agreement(w, held.at_depth[d], held.final) for d in depths},
        "one_jump": {d: agreement(w, held.at_depth[d], held.final, one_jump) for d in depths},
        "per_level": {d: agreement(w, held.at_depth[d], held.final, per_level[d]) for d in depths},
    }
    size = one_jump[0].numel() + one_jump[1].numel()
    report.params = {"one_jump": size, "per_level": size * len(depths)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"down": one_jump[0].contiguous(), "up": one_jump[1].contiguous()}, str(out_dir / "one_jump.safetensors"))
    save_file(
        {f"{k}.{d}": t.contiguous() for d, pair in per_level.items() for k, t in zip(("down", "up"), pair)},
        str(out_dir / "per_level.safetensors"),
    )
    (out_dir / "calibration.json").write_text(json.dumps(report_json(report), indent=1))
    return report


def report_json(report: CalibrationReport) -> dict:
    return {
        "depths": report.depths,
        "num_train_tokens": report.num_train_tokens,
        "num_eval_tokens": report.num_eval_tokens,
        "one_jump_depth": report.one_jump_depth,
        "rank": report.rank,
        "params": report.params,
        "agreement": {head: {str(d): round(a, 4) for d, a in v.items()} for head, v in report.agreement.items()},
    }
