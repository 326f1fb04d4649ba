"""Greedy output of the engine == Hugging Face greedy generate, on tiny random models built here."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import divergence_report, hf_greedy
from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine

MAX_NEW = 24


def _prompts(seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 121) for _ in range(n)] for n in (3, 9, 17, 30, 41, 5)]


@pytest.fixture(scope="module")
def references(tiny_models) -> dict[str, tuple[object, list[list[int]]]]:
    from transformers import AutoModelForCausalLM

    refs = {}
    for name, path in tiny_models.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        refs[name] = (hf, [hf_greedy(hf, p, MAX_NEW) for p in _prompts()])
    return refs


def _check(engine: LLMEngine, hf, refs: list[list[int]]) -> None:
    outs = engine.generate(_prompts(), SamplingParams(max_tokens=MAX_NEW))
    for prompt, out, ref in zip(_prompts(), outs, refs):
        assert out.token_ids == ref, divergence_report(hf, prompt, out.token_ids, ref)
        assert out.finish_reason == "length"
        assert out.exit_layers == [engine.num_layers] * MAX_NEW
    engine.pages.check_invariants()
    assert engine.pages.num_used_pages == 0


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_batched_greedy_matches_hf(tiny_models, references, model_type):
    engine = LLMEngine(EngineConfig(model=str(tiny_models[model_type]), page_size=4, layers_per_block=2))
    _check(engine, *references[model_type])


def test_preemption_keeps_output(tiny_models, references):
    # 20 pages of 4 tokens cannot hold six sequences of up to 65 tokens at once.
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, num_pages=20))
    _check(engine, *references["llama"])
    assert engine.scheduler.num_preemptions > 0


def test_chunked_prefill_keeps_output(tiny_models, references):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["qwen2"]), page_size=4, max_num_batched_tokens=8))
    _check(engine, *references["qwen2"])


@pytest.mark.parametrize("layout", [{"layers_per_block": 1}, {"layers_per_block": 3}, {"block_boundaries": (0, 1, 3)}])
def test_block_layout_does_not_change_output(tiny_models, references, layout):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["mistral"]), page_size=8, **layout))
    assert len(engine.backend.block_ranges) == {1: 4, 3: 2}.get(layout.get("layers_per_block"), 3)
    _check(engine, *references["mistral"])


def test_one_sequence_at_a_time_matches_batched(tiny_models):
    path = str(tiny_models["llama"])
    batched = LLMEngine(EngineConfig(model=path, page_size=4)).generate(_prompts(), SamplingParams(max_tokens=MAX_NEW))
    single = LLMEngine(EngineConfig(model=path, page_size=4, max_num_seqs=1))
    for prompt, out in zip(_prompts(), batched):
        assert single.generate([prompt], SamplingParams(max_tokens=MAX_NEW))[0].token_ids == out.token_ids
