"""Calibration activations: the model answers prompts, and one teacher-forced full-depth pass per
answer collects the hidden state at every exit depth (and after the last layer) at each position
that predicted a generated token. Cached in ``activations.pt`` under a key of everything that
changes them (model, layout, prompts, seed, ...), so a calibration re-run reuses them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.tools.teacher_forcing import teacher_forced_hidden


@dataclass(slots=True)
class Activations:
    """Hidden states at the positions that predicted generated tokens."""

    at_depth: dict[int, torch.Tensor]  # depth -> [n, hidden]
    final: torch.Tensor  # [n, hidden] after the last layer
    similarity: dict[int, torch.Tensor] = field(default_factory=dict)  # depth -> [n] cos(before block, after)
    prompt_index: torch.Tensor | None = None  # [n] which prompt each row belongs to
    prompts: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)  # per prompt

    @property
    def num_tokens(self) -> int:
        return self.final.shape[0]

    def token_categories(self) -> list[str]:
        return [self.categories[i] for i in self.prompt_index.tolist()]


SAMPLE_TEMPERATURE = 0.8  # extra answers per training prompt (``samples``) are drawn at this temperature
SAMPLE_TOP_P = 0.95


def answer_params(num_prompts: int, max_tokens: int, samples: int, seed: int) -> list[SamplingParams]:
    """Per answer: the greedy one of each prompt, then ``samples`` seeded sampled ones of each
    (more, and more varied, text from the same prompts; the full model is the target either way)."""
    params = [SamplingParams(max_tokens=max_tokens, exit_policy="none") for _ in range(num_prompts)]
    for k in range(samples):
        params += [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=SAMPLE_TEMPERATURE,
                top_p=SAMPLE_TOP_P,
                seed=seed * 1_000_003 + k * 100_003 + i,
                exit_policy="none",
            )
            for i in range(num_prompts)
        ]
    return params


def collect(
    engine: LLMEngine,
    prompts: list[str],
    depths: tuple[int, ...],
    max_tokens: int,
    progress: bool,
    categories: list[str] | None = None,
    samples: int = 0,
    seed: int = 0,
) -> Activations:
    """Generate answers (greedy, plus ``samples`` sampled per prompt; full depth) and collect
    hidden states by teacher forcing."""
    ids = [engine.encode(p) for p in prompts] * (1 + samples)  # the greedy answers, then each sample round
    outs = engine.generate(ids, answer_params(len(prompts), max_tokens, samples, seed))
    starts = {end: start for start, end in engine.block_ranges if end in depths}  # depth -> its block's start
    capture = tuple(sorted(set(depths) | {s for s in starts.values() if s > 0}))
    at_depth: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    sims: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    finals, owner = [], []
    for i, (prompt_ids, out) in enumerate(tqdm(list(zip(ids, outs)), desc="collect", disable=not progress)):
        if not out.token_ids:
            continue
        captured, final = teacher_forced_hidden(engine, prompt_ids, out.token_ids, capture)
        fed = torch.tensor((list(prompt_ids) + out.token_ids[:-1])[len(prompt_ids) - 1 :])
        embedded = F.embedding(fed, engine.weights.embed)  # [k, hidden]: the input of the first block
        for d in depths:  # copies outside inference mode, so that training can use them
            before = embedded if starts[d] == 0 else captured[starts[d]]
            sims[d].append(F.cosine_similarity(captured[d].float(), before.float(), dim=-1).clone())  # [k]
            at_depth[d].append(captured[d].to(torch.float32, copy=True))
        finals.append(final.to(torch.float32, copy=True))
        owner.append(torch.full((final.shape[0],), i % len(prompts), dtype=torch.long))
    if not finals:
        raise ValueError("prompts: the model generated no tokens for any calibration prompt")
    return Activations(
        {d: torch.cat(v) for d, v in at_depth.items()},
        torch.cat(finals),
        {d: torch.cat(v) for d, v in sims.items()},
        torch.cat(owner),
        list(prompts),
        list(categories) if categories is not None else ["all"] * len(prompts),
    )


def load_prompt_rows(path: str | None = None, bundled: str = "prompts.jsonl") -> list[dict]:
    """``{"prompt", "category"}`` per line of a JSONL prompt file (the bundled set by default);
    a line without a category gets "uncategorized"."""
    from offramp.tools.runs import load_prompts

    prompts = load_prompts(path, bundled)  # validates every line
    if path is None:
        text = resources.files("offramp").joinpath(f"data/{bundled}").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{"prompt": p, "category": str(r.get("category", "uncategorized"))} for p, r in zip(prompts, rows)]


def load_calibration_rows(path: str | None = None) -> list[dict]:
    """Training-only prompts: a JSONL file like ``load_prompt_rows`` reads, or by default the bundled
    calibration set (200 prompts in the same five categories as the bundled prompts, none shared)."""
    return load_prompt_rows(path, "calibration_prompts.jsonl")


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def activation_key(
    engine: LLMEngine, prompts: dict, depths: tuple[int, ...], max_tokens: int, seed: int, samples: int = 0
) -> str:
    """What the collected activations depend on: model, dtype, layout, prompts, answers, seed."""
    return _digest(
        {
            "model": engine.config.model,
            "checkpoint": str(engine.checkpoint),
            "dtype": engine.config.dtype,
            "backend": engine.config.backend,
            "blocks": engine.block_ranges,
            "depths": list(depths),
            "chat": engine.config.use_chat_template,
            "prompts": prompts,
            "max_tokens": max_tokens,
            "seed": seed,
            "samples": [samples, SAMPLE_TEMPERATURE, SAMPLE_TOP_P] if samples else 0,
        }
    )


def _to_dict(a: Activations) -> dict:
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(Activations)}


def load_activations(path: Path) -> tuple[str, Activations, Activations]:
    """(key, train, held) from an ``activations.pt`` cache."""
    try:
        saved = torch.load(path, weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{path}: cannot read cached activations ({exc}); run offramp calibrate") from None
    return saved["key"], Activations(**saved["train"]), Activations(**saved["held"])


def load_or_collect(
    engine: LLMEngine,
    prompts: dict,
    depths: tuple[int, ...],
    max_tokens: int,
    seed: int,
    path: Path,
    progress: bool,
    samples: int = 0,
) -> tuple[str, Activations, Activations, bool]:
    """Cached activations when their key matches, else collect (train and held) and cache them.
    ``samples``: sampled answers per training prompt besides the greedy one (held-out: greedy only)."""
    key = activation_key(engine, prompts, depths, max_tokens, seed, samples)
    if path.is_file():
        try:
            saved_key, train, held = load_activations(path)
            if saved_key == key:
                return key, train, held, True
        except (ValueError, KeyError, TypeError):
            pass
        print(f"offramp: {path} was collected with other settings; collecting again", file=sys.stderr)
    torch.manual_seed(seed)
    train = collect(engine, prompts["train"], depths, max_tokens, progress, samples=samples, seed=seed)
    held = collect(engine, prompts["held"], depths, max_tokens, progress, prompts["held_categories"])
    torch.save({"key": key, "train": _to_dict(train), "held": _to_dict(held)}, path)
    return key, train, held, False
