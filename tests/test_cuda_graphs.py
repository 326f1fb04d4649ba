"""Decode steps as CUDA graph replays (``blocks/cuda_graphs.py``).

On the CPU the padded, bucketed step that a graph records runs eagerly (``capture=False``): its padding
rows, scratch page and masked page-table columns must leave every real row's tokens as the plain step
makes them. On a GPU (skipped without one) the captured graphs must give the eager engine's tokens (float32;
most of them in bfloat16, where a padded batch's products round differently).
"""

from __future__ import annotations

import pytest
import torch

from offramp import EngineConfig, SamplingParams
from offramp.blocks.cuda_graphs import BATCH_BUCKETS, DecodeGraphs
from offramp.engine.llm_engine import LLMEngine

# five requests of different lengths: the batch shrinks 5 (padded to 8) -> 4 -> 3 (padded to 4) -> 2 -> 1 as
# they finish, while the first (the owner of page 0) lives on; contexts cross page buckets (page_size 4)
PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20, 21] * 6, [30], [40, 41, 42]]
PARAMS = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (18, 6, 10, 14, 4)]


def _tokens(engine: LLMEngine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_padded_bucketed_step_makes_the_plain_steps_tokens(tiny_models, dtype):
    config = EngineConfig(
        model=str(tiny_models["llama"]), page_size=4, num_pages=64, dtype=dtype, fused_decode=False, device="cpu"
    )
    plain = _tokens(LLMEngine(config))
    engine = LLMEngine(config)
    scratch = 63  # a page these requests never reach (they need at most 6 pages each)
    loop = engine.runner.loop
    loop.graphs = DecodeGraphs(
        engine.backend, loop.cos, loop.sin, 4, engine.max_model_len, scratch_page=scratch, capture=False
    )
    calls = []
    run = loop.graphs.run
    loop.graphs.run = lambda ids, slices: calls.append(len(slices)) or run(ids, slices)
    assert _tokens(engine) == plain
    assert {1, 2, 3, 4, 5} <= set(calls)  # every batch size ran through the padded path (3 and 5 padded)
    assert engine.pages.refcount(scratch) == 0 and engine.pages.num_used_pages == 0


def test_buckets_cover_the_batch_and_context_limits(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, num_pages=64, device="cpu"))
    loop = engine.runner.loop
    graphs = DecodeGraphs(engine.backend, loop.cos, loop.sin, 4, 10, scratch_page=63, capture=False)
    assert graphs.page_buckets == (1, 2, 3) and graphs.max_rows == BATCH_BUCKETS[-1] == 64
    assert engine.runner.loop.graphs is None  # graphs are for CUDA only


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "weights"), [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int4")])
def test_graph_replays_give_the_eager_engines_tokens(tiny_models, dtype, weights):
    common = dict(model=str(tiny_models["llama"]), page_size=4, dtype=dtype, weights=weights, device="cuda")
    eager = _tokens(LLMEngine(EngineConfig(**common, cuda_graphs=False)))
    engine = LLMEngine(EngineConfig(**common))
    graphs = engine.runner.loop.graphs
    assert graphs is not None and engine.kv.scratch_page == engine.pages.num_pages
    replayed = _tokens(engine)
    if dtype == "float32":
        assert replayed == eager
    else:  # products over padded batches round differently in bfloat16 (as any change of batch does on a GPU)
        same = [a == b for r, e in zip(replayed, eager) for a, b in zip(r, e)]
        assert sum(same) / len(same) >= 0.8, (replayed, eager)
    assert graphs.disabled is None and graphs.num_replays > 0 and len(graphs.graphs) >= 4
    assert engine.pages.num_used_pages == 0
