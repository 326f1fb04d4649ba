"""Lossless mode: what a request's speculation is, how long its drafts are, and which drafts the full
model accepts.

A request in lossless mode never keeps an early-exit token: every token it gets is the full model's.
With a draft source (``ngram``, ``exit``) a decoding sequence brings up to k draft tokens into a step
as extra rows, like a short prompt chunk; the full model scores the last token and the drafts in one
pass, the longest prefix of drafts the full model agrees with is accepted, plus the one token the
full model adds after it (the bonus token). The steps of the cycle live where they belong:

- ``Scheduler.schedule`` gives a decoding sequence ``SpecState.num_wanted`` draft slots (token budget
  and pages allowing; drafts never cause a preemption) and allocates their pages;
- ``drafts.Speculator`` fills the slots from the sequence's source (fewer are fine);
- ``ModelRunner.run`` verifies (``accept_greedy``; at temperature > 0 ``accept_sampled``);
- ``Scheduler.postprocess`` appends the accepted tokens and counts as computed only the K/V of the
  last token and the accepted drafts; pages past that are released (they only ever held drafts,
  which sit beyond the prompt, so they are never shared prefix pages);
- ``DraftLength.record`` adapts the sequence's draft length.

Adaptive draft length (``DraftLength``). Per sequence, an acceptance rate ``alpha`` (the chance a
draft token is accepted, estimated from exponentially decayed counts of accepted tokens and of
rejections: the maximum-likelihood estimate for a geometric run of acceptances) and a cost model give
the expected speed of a draft length k relative to plain decoding:

    gain(k) = (1 + alpha + ... + alpha^k) / (verify_cost(k) + k * draft_cost)

In a step shared by B sequences the same k drafts are weighed against the whole step: its tokens grow
by (B - 1 + E_k) / B and its time by (T(B + k) + k * draft_cost) / T(B), with T(n) the cost of n rows
read from the same table (n = 1 + k, extended by its mean slope); B = 1 is the formula above.

``verify_cost(k)``: a verification step with k drafts relative to a plain decode step, measured on
the default model for the dtype and weight format (``VERIFY_STEP_COST``; linear ``1 + c * k`` with
``spec_verify_row_cost`` = c). It is not linear: float32 products with 2-3 rows take a slow kernel
path (a step with 1 draft costs 1.8x a decode step, one with 4 drafts 1.5x), while bfloat16 rows are
nearly free (8 drafts: 1.2x). ``draft_cost``: one draft token relative to a decode step (0 for n-gram
lookup; d layers plus the head for ``exit``, by weight bytes). After each verification the length
becomes the k with the best gain, so it grows while drafts are accepted and shrinks on rejections;
when no k gains (best gain < 1) the sequence decodes plainly for ``retry_steps`` steps, then retries
with one draft (its evidence kept: one more miss pauses it again, twice as long, up to 16x); a costly
retry waits long enough that a miss costs at most 2 % of the steps waited. A new
sequence starts at the best length for an acceptance of one half, or paused where even that does not
pay (exit drafts with int4 weights on a CPU: a draft token costs most of a step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A verification step with k = 0..8 drafts relative to a plain decode step: one sequence of the default
# model, 2 CPU threads, median step time over interleaved runs (docs/speculation.md). Keyed by
# (dtype, weights); "bf16" weights are the bfloat16 dtype's own.
VERIFY_STEP_COST = {
    ("float32", "none"): (1.0, 1.82, 2.19, 1.55, 1.51, 1.66, 1.80, 1.75, 1.70),
    # perf/verify_cost.py (96 steps per k), CPU steps with the fused decode kernels (model/fused.py): one
    # row is what they speed up most, so each extra row costs relatively more than in the eager step;
    # int4/int8 with the bfloat16-dot-product int4 and group-wise int8 products
    ("bfloat16", "none"): (1.0, 1.03, 1.07, 1.16, 1.18, 1.23, 1.24, 1.26, 1.33),
    ("bfloat16", "int4"): (1.0, 1.15, 1.32, 1.50, 1.66, 1.89, 2.19, 2.43, 2.54),
    ("bfloat16", "int8"): (1.0, 1.20, 1.53, 1.74, 1.98, 2.20, 2.51, 2.72, 2.90),
}
# The same on a CPU with AVX2 and no AVX-512 (float32-FMA int4/int8 products: an extra row costs more
# than with bfloat16 dot products; bfloat16 products of several rows run emulated), 2026-12-04.
VERIFY_STEP_COST_AVX2 = {
    ("bfloat16", "none"): (1.0, 1.68, 2.48, 3.25, 3.93, 4.56, 5.38, 6.15, 6.89),
    ("bfloat16", "int4"): (1.0, 1.35, 1.57, 1.79, 2.03, 2.32, 2.51, 2.76, 3.04),
    ("bfloat16", "int8"): (1.0, 1.14, 1.15, 1.25, 1.35, 1.51, 1.76, 1.99, 2.18),
}
# Formats without a measured table (e.g. on a GPU): per extra row, linear.
VERIFY_ROW_COST = {("bfloat16", "int8"): 0.1, ("bfloat16", "int4"): 0.3}
PRIOR_ACCEPTANCE = 0.5  # before any evidence: one accepted token and one rejection
PROBE_BUDGET = 0.02  # a retry that does not pay may cost at most this share of the steps paused before it


@dataclass(slots=True)
class SpecState:
    """One sequence's speculation: its draft source, adaptive length and counters (ids only)."""

    source: str  # ngram | exit
    limit: int  # tokens the sequence may reach (prompt + max_tokens, within the context)
    draft_cost: float  # one draft token relative to a decode step
    num_draft: int  # current draft length
    pause: int = 0  # steps left that decode without drafts
    num_pauses: int = 0  # pauses in a row (each retry that does not pay waits twice as long, up to 16x)
    accepted_ema: float = 1.0  # decayed accepted draft tokens (prior: one)
    rejected_ema: float = 1.0  # decayed rejections (prior: one)
    planned: tuple[int, ...] = ()  # drafts found before scheduling (ngram), used if slots allow
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_verifications: int = 0

    def num_wanted(self, num_tokens: int) -> int:
        """Draft slots worth scheduling now: none while paused or where no token may follow."""
        if self.pause:
            return 0
        wanted = len(self.planned) if self.source == "ngram" else self.num_draft
        return max(0, min(self.num_draft, wanted, self.limit - num_tokens - 1))

    @property
    def acceptance(self) -> float:
        return self.accepted_ema / (self.accepted_ema + self.rejected_ema)


def verify_costs(
    dtype: str, weights: str, row_cost: float | None, max_draft: int, cpu: str | None = None
) -> tuple[float, ...]:
    """Relative cost of a verification step with k = 0..``max_draft`` drafts: linear in k with
    ``row_cost``, else measured (``VERIFY_STEP_COST``, or ``VERIFY_STEP_COST_AVX2`` where ``cpu`` is
    ``avx2``; extended by its mean slope), else linear."""
    weights = "none" if weights == "bf16" else weights
    tables = VERIFY_STEP_COST_AVX2 if cpu == "avx2" else VERIFY_STEP_COST
    table = tables.get((dtype, weights)) if row_cost is None else None
    if table is None:
        cost = row_cost if row_cost is not None else VERIFY_ROW_COST.get((dtype, weights), 0.1)
        return tuple(1.0 + cost * k for k in range(max_draft + 1))
    slope = (table[-1] - 1.0) / (len(table) - 1)
    return tuple(table[k] if k < len(table) else table[-1] + slope * (k - len(table) + 1) for k in range(max_draft + 1))


def resolve_spec(mode: str | None, spec: str | None, server_spec: str, exits_on: bool) -> tuple[bool, str]:
    """(lossless, draft source) of a request. Lossless: ``mode`` says so, or the request names a
    draft source, or the server has one (``mode: early_exit`` opts out). The source: the request's,
    else the server's, else (lossless with early exits on) ``exit``: exits then only draft."""
    if mode == "early_exit":
        return False, "none"
    lossless = mode == "lossless" or spec not in (None, "none") or server_spec != "none"
    if not lossless:
        return False, "none"
    source = spec if spec is not None else server_spec
    if spec is None and server_spec == "none" and exits_on:
        source = "exit"
    return True, source


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification of k drafts yields: accepted drafts plus the bonus token."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class DraftLength:
    """Each sequence's draft length, from its recent acceptance and the cost model above."""

    def __init__(self, costs: tuple[float, ...], retry_steps: int, adaptive: bool = True, decay: float = 0.7) -> None:
        self.costs = costs  # verify_cost(k), k = 0..max_draft
        self.max_draft = len(costs) - 1
        self.retry_steps, self.adaptive, self.decay = retry_steps, adaptive, decay

    def new_state(self, source: str, limit: int, draft_cost: float) -> SpecState:
        """A new sequence starts at the best length for the prior acceptance (one half); where no length
        pays at that acceptance (costly draft passes, costly verification rows) it starts paused, as if
        a first try had not paid, and tries one draft after ``retry_steps``."""
        if not self.adaptive:
            return SpecState(source, limit, draft_cost, self.max_draft)
        start, gain = self.best(PRIOR_ACCEPTANCE, draft_cost)
        if gain < 1.0:
            return SpecState(source, limit, draft_cost, 1, pause=self.pause_steps(0, draft_cost), num_pauses=1)
        return SpecState(source, limit, draft_cost, start)

    def pause_steps(self, num_pauses: int, draft_cost: float) -> int:
        """Plain steps before the next retry: ``retry_steps``, doubled per pause in a row (up to 16x), and
        at least what keeps a rejected one-draft retry (its draft pass and verification row) within
        ``PROBE_BUDGET`` of the steps waited (exit drafts with int4 weights on a CPU: ~48 steps)."""
        probe = self.costs[1] - 1.0 + draft_cost
        return max(self.retry_steps << min(num_pauses, 4), math.ceil(probe / PROBE_BUDGET - 1e-9))

    def step_time(self, rows: int) -> float:
        """A step of ``rows`` rows relative to one row (the table read as rows = 1 + k, extended by its
        mean slope)."""
        if rows - 1 < len(self.costs):
            return self.costs[rows - 1]
        slope = (self.costs[-1] - 1.0) / max(1, len(self.costs) - 1)
        return self.costs[-1] + slope * (rows - len(self.costs))

    def gain(self, alpha: float, k: int, draft_cost: float, batch: int = 1) -> float:
        """Expected speed of the step when one of its ``batch`` sequences adds k drafts, relative to the
        step without them: its tokens grow by (batch + accepted) / batch, its time by
        (T(batch + k) + the draft passes) / T(batch) (one sequence: (1 + accepted) / cost(k))."""
        tokens = (batch - 1 + expected_tokens(alpha, k)) / batch
        time = (self.step_time(batch + k) + k * draft_cost) / self.step_time(batch)
        return tokens / time

    def best(self, alpha: float, draft_cost: float, batch: int = 1) -> tuple[int, float]:
        """The draft length with the best gain, and that gain."""
        gain, k = max((self.gain(alpha, k, draft_cost, batch), k) for k in range(1, self.max_draft + 1))
        return k, gain

    def record(self, state: SpecState, num_drafted: int, num_accepted: int, batch: int = 1) -> None:
        """A verification of ``num_drafted`` drafts accepted ``num_accepted`` in a step of ``batch``
        sequences: count it and adapt."""
        state.num_verifications += 1
        state.num_draft_tokens += num_drafted
        state.num_accepted_tokens += num_accepted
        if not self.adaptive:
            return
        state.accepted_ema = self.decay * state.accepted_ema + num_accepted
        state.rejected_ema = self.decay * state.rejected_ema + (num_accepted < num_drafted)
        k, gain = self.best(state.acceptance, state.draft_cost, batch)
        if gain < 1.0:  # drafting does not pay now: decode plainly for a while, then retry small
            state.pause, k = self.pause_steps(state.num_pauses, state.draft_cost), 1
            state.num_pauses += 1
        else:
            state.num_pauses = 0
        state.num_draft = k

    @staticmethod
    def tick(state: SpecState) -> None:
        """A step decoded without drafts: one step less to wait."""
        state.pause = max(0, state.pause - 1)


def accept_greedy(logits: torch.Tensor, drafts: list[int]) -> list[int]:
    """Greedy verification. ``logits`` [k+1, vocab]: the full model's after the last token and after
    each of the k drafts. Returns the accepted drafts (the longest prefix equal to the full model's
    argmax) followed by the full model's own next token."""
    picks = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == picks[n]:
        n += 1
    return picks[: n + 1]


def accept_sampled(probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None) -> list[int]:
    """Speculative sampling for deterministic drafts (every source drafts greedily: the draft
    distribution q is a point mass). ``probs`` [k+1, vocab]: the full model's distributions after
    temperature/top-k/top-p. Draft j is accepted with probability min(1, p/q) = p_j(d_j); on the
    first rejection the token is drawn from the residual max(p - q, 0), i.e. p_j without d_j; if all
    are accepted the bonus token is drawn from p_k. The output is distributed as plain sampling's."""
    uniform = torch.rand(len(drafts), generator=generator, device=probs.device).tolist() if drafts else []
    for j, draft in enumerate(drafts):
        if uniform[j] < probs[j, draft].item():
            continue
        residual = probs[j].clone()  # [vocab]
        residual[draft] = 0.0
        return drafts[:j] + [int(torch.multinomial(residual, 1, generator=generator).item())]
    return drafts + [int(torch.multinomial(probs[-1], 1, generator=generator).item())]
