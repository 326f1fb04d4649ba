"""Teacher forcing: one full-depth pass over a prompt and a given continuation, for measurements
(agreement with the full model, hidden states at exit depths). Not on the serving path."""

from __future__ import annotations

import itertools

import torch

from offramp.engine.llm_engine import LLMEngine
from offramp.model.decoder import final_logits

_owners = itertools.count(1)  # negative page-table ids: never a sequence's


def teacher_forced_hidden(
    engine: LLMEngine, prompt_ids: list[int], output_ids: list[int], depths: tuple[int, ...] = ()
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Hidden states (at ``depths`` and after the last layer) at the positions that predicted each of
    ``output_ids``, from one full-depth pass over prompt + outputs."""
    tokens = list(prompt_ids) + list(output_ids[:-1])
    owner = -next(_owners)
    pages = engine.pages
    engine.sessions.reclaim(pages.pages_for(len(tokens)))  # idle sessions' pages are a cache
    if not pages.can_allocate(owner, len(tokens)):
        raise ValueError("teacher forcing: not enough free KV pages; run it when the engine is idle")
    pages.allocate(owner, len(tokens))
    try:
        return engine.runner.full_depth_hidden(tokens, pages.page_table(owner), len(prompt_ids) - 1, depths)
    finally:
        pages.free(owner)


def teacher_forced_agreement(engine: LLMEngine, prompt_ids: list[int], output_ids: list[int]) -> list[bool]:
    """For each generated token: would the full model, given the same prefix, pick it too?"""
    if not output_ids:
        return []
    _, final = teacher_forced_hidden(engine, prompt_ids, output_ids)
    picks = final_logits(engine.weights, final).argmax(-1).tolist()
    return [a == b for a, b in zip(picks, output_ids)]
