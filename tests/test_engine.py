"""Engine behaviour: stopping, finish reasons, aborts, seeds, request validation, KV sizing."""

from __future__ import annotations

import pytest
import torch

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.model.kv_store import bytes_per_token_per_layer, pages_for_budget

PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [20] * 15]


@pytest.fixture(scope="module")
def engine(tiny_models) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4))


def test_max_tokens_gives_length(engine):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=5))
    assert [len(o.token_ids) for o in outs] == [5, 5, 5]
    assert {o.finish_reason for o in outs} == {"length"}


def test_stop_string_truncates_text_and_stops(engine):
    full = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12))[0]
    words = full.text.split()
    stop = " ".join(words[2:4])  # appears after the second generated word
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and full.text.startswith(out.text)
    assert len(out.token_ids) < len(full.token_ids)


def test_abort_frees_pages_at_once(engine):
    seqs = [engine.add_request(f"abort-{i}", p, SamplingParams(max_tokens=50)) for i, p in enumerate(PROMPTS)]
    for _ in range(3):
        engine.step()
    used = engine.pages.num_used_pages
    assert used > 0
    engine.abort("abort-1")
    assert engine.pages.num_used_pages < used
    assert seqs[1].finish_reason.value == "abort"
    assert engine.output_of(seqs[1]).finish_reason == "abort"
    while engine.has_work:
        engine.step()
    assert len(seqs[1].output_token_ids) <= 3 and len(seqs[0].output_token_ids) == 50
    engine.pages.check_invariants()
    assert engine.pages.num_used_pages == 0


def test_abort_of_waiting_request(engine):
    engine.add_request("waiting", PROMPTS[0], SamplingParams(max_tokens=4))
    assert engine.abort("waiting").finish_reason.value == "abort"
    assert not engine.has_work and engine.pages.num_used_pages == 0
    assert engine.abort("unknown-id") is None


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    alone = engine.generate([PROMPTS[1]], p)[0].token_ids
    batched = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [SamplingParams(max_tokens=10), p, p])
    assert batched[1].token_ids == alone
    other = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.0, seed=99))[0].token_ids
    assert other != alone


@pytest.mark.parametrize(
    ("ids", "params", "message"),
    [
        ([], SamplingParams(), "prompt: is empty"),
        ([1] * 600, SamplingParams(), "prompt: 600 tokens"),
        ([1, 2], SamplingParams(max_tokens=10_000), "max_tokens: 10000 exceeds"),
    ],
)
def test_bad_requests_are_rejected_with_the_field_named(engine, ids, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", ids, params)
    assert not engine.has_work


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request("dup", PROMPTS[0], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("dup", PROMPTS[0], SamplingParams(max_tokens=2))
    engine.abort("dup")


def test_request_larger_than_the_kv_store_is_rejected(tiny_models):
    small = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, num_pages=4))
    with pytest.raises(ValueError, match="exceed the KV store"):
        small.add_request("big", [1] * 10, SamplingParams(max_tokens=10))


def test_kv_store_is_the_size_the_config_says(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=8, kv_budget_bytes=1 << 20))
    shape = engine.weights.shape
    per_token_layer = bytes_per_token_per_layer(shape, torch.float32)
    assert per_token_layer == 2 * shape.num_kv_heads * shape.head_dim * 4
    assert engine.pages.num_pages == pages_for_budget(shape, torch.float32, 8, 1 << 20)
    assert engine.kv.total_bytes == engine.pages.num_pages * 8 * shape.num_layers * per_token_layer
    assert engine.kv.total_bytes <= 1 << 20


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "float16"}, "dtype"),
        ({"backend": "tensorrt-llm"}, "backend"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"page_size": -1}, "page_size"),
        ({"num_pages": 0}, "num_pages"),
        ({"max_num_seqs": True}, "max_num_seqs"),
        ({"block_boundaries": (1, 3)}, "block_boundaries"),
        ({"block_boundaries": (0, 3, 2)}, "block_boundaries"),
        ({"model": ""}, "model"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(**kwargs)


def test_block_boundaries_past_the_last_layer(tiny_models):
    with pytest.raises(ValueError, match="block_boundaries: 9"):
        LLMEngine(EngineConfig(model=str(tiny_models["llama"]), block_boundaries=(0, 9)))
