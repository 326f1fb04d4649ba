"""Lossless speculation on the default model: every draft source gives plain greedy's tokens, eight
prompts batched at concurrency 1 and 16, with the fastest CPU format (int4 weights, bfloat16
activations, batch-invariant fused steps: a row computes the same bits whatever shares its step)."""

from __future__ import annotations

import pytest

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.model import fused
from offramp.tools.runs import load_prompts

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(not fused.int4_product_available(), reason="the fused int4 product does not run here"),
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def copy_prompts() -> list[str]:
    return load_prompts(None, bundled="copy_prompts.jsonl")[:8]


@pytest.mark.parametrize("source", ["ngram", "exit", "easyspec"])
def test_every_source_matches_plain_greedy_at_concurrency_1_and_16(default_checkpoint, copy_prompts, source):
    # layer drafts are forced (three per step, never paused): adaptively they would rarely draft on a CPU
    forced = {} if source == "ngram" else {"spec_adaptive": False, "spec_max_draft": 3, "spec_draft_threshold": 0.0}
    plain = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, mode="early_exit")
    lossless = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, mode="lossless")
    for max_num_seqs in (1, 16):
        config = EngineConfig(
            model=str(default_checkpoint),
            dtype="bfloat16",
            weights="int4",
            spec=source,
            spec_exit_depth=None if source == "ngram" else 24,
            max_num_seqs=max_num_seqs,
            **forced,
        )
        engine = LLMEngine(config)
        try:
            assert engine.runner.backend.max_rows == fused.ALL_ROWS  # batch-invariant where it speculates
            want = [o.token_ids for o in engine.generate(copy_prompts, plain)]
            got = [o.token_ids for o in engine.generate(copy_prompts, lossless)]
            stats = engine.runner.stats
            assert stats.num_verifications > 0 and stats.num_draft_tokens > 0, (source, max_num_seqs)
            assert got == want, (source, max_num_seqs)
            assert engine.pages.num_used_pages == 0
        finally:
            engine.close()
