"""Per-request sampling parameters and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from offramp.config import EXIT_POLICIES, SPEC_SOURCES

GREEDY_EPS = 1e-5
MODES = ("lossless", "early_exit")  # lossless: exactly the full model's output (exits only draft)


@dataclass(slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    ``temperature == 0`` (or below 1e-5) is greedy. ``seed`` makes a sampled request reproducible on its own,
    whatever else shares its batch.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    exit_policy: str | None = None  # None = the server's default
    exit_threshold: float | None = None  # None = the server's default
    mode: str | None = None  # None = the server's default (lossless when its ``spec`` is not none)
    spec: str | None = None  # draft source of the lossless mode; None = the server's (implies lossless)
    sparsity: float | None = None  # share of FFN neuron groups its decode tokens compute; None = the server's

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens: must be an integer, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens: must be positive, got {self.max_tokens}")
        if not _is_number(self.temperature) or self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        if self.exit_policy is not None and self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy: {self.exit_policy!r} is not one of {', '.join(EXIT_POLICIES)}")
        if self.exit_threshold is not None and (
            not _is_number(self.exit_threshold) or not math.isfinite(self.exit_threshold)
        ):
            raise ValueError(f"exit_threshold: must be a finite number, got {self.exit_threshold!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.spec is not None and self.spec not in SPEC_SOURCES:
            raise ValueError(f"spec: {self.spec!r} is not one of {', '.join(SPEC_SOURCES)}")
        if self.spec not in (None, "none") and self.mode == "early_exit":
            raise ValueError(f"spec: drafts ({self.spec}) are verified in mode lossless, not early_exit")
        if self.sparsity is not None and (not _is_number(self.sparsity) or not 0 < self.sparsity <= 1):
            raise ValueError(f"sparsity: must be a number in (0, 1], got {self.sparsity!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop: must be a string or a list of non-empty strings")

    @property
    def is_greedy(self) -> bool:
        """Temperatures this close to 0 are greedy (their softmax would underflow anyway)."""
        return self.temperature < GREEDY_EPS


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Sampler:
    """Picks one token per row of logits; greedy rows take the argmax."""

    def __call__(
        self,
        logits: torch.Tensor,  # [num_seqs, vocab]
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> list[int]:
        token_ids = logits.argmax(dim=-1).tolist()
        for row, (p, gen) in enumerate(zip(params, generators)):
            if not p.is_greedy:
                token_ids[row] = self._sample_row(logits[row].float(), p, gen)
        return token_ids

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        return int(torch.multinomial(Sampler.probs(logits, p), 1, generator=gen).item())

    @staticmethod
    def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        """The distribution a sampled row draws from: [vocab] float32 after temperature, top-k, top-p."""
        # [vocab]; shifted so that tiny temperatures cannot overflow
        logits = (logits.float() - logits.max()) / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        return logits.softmax(-1)
