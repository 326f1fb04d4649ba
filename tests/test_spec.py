"""Lossless mode (speculative decoding in the block engine): verification, rollback, draft sources,
adaptive draft length and speculative sampling.

The anchor: greedy output with any draft source (n-gram, early exit, an oracle that always drafts the
right continuation, one that is always wrong) is token-identical to plain full-depth greedy, under
continuous batching, preemption, sessions and cancellation. Rollback is checked on ids only by a
scheduler soak whose fake model reads every token back from a fake paged KV store.
"""

from __future__ import annotations

import json
import math
import random
import threading

import pytest
import torch

from offramp import EngineConfig, SamplingParams
from offramp.blocks.base import BlockBackend
from offramp.engine.drafts import DraftSource, ngram_lookup
from offramp.engine.kv_sessions import KVSessionTable, session_owner
from offramp.engine.llm_engine import LLMEngine
from offramp.engine.page_manager import PageManager
from offramp.engine.scheduler import ScheduledSeq, Scheduler
from offramp.engine.sequence import FinishReason, Sequence
from offramp.engine.spec import (
    PROBE_BUDGET,
    VERIFY_STEP_COST,
    VERIFY_STEP_COST_AVX2,
    DraftLength,
    SpecState,
    accept_greedy,
    accept_sampled,
    expected_tokens,
    resolve_spec,
    verify_costs,
)
from offramp.model.attention import SeqSlice
from offramp.model.decoder import decoder_layer, final_logits
from offramp.serving.async_engine import AsyncEngine
from offramp.serving.events import RequestHandle
from offramp.serving.requests import RequestError, parse_request
from offramp.tools.teacher_forcing import teacher_forced_hidden

MAX_TOKENS = 24


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    prompts = [[rng.randint(1, 120) for _ in range(rng.randint(3, 30))] for _ in range(7)]
    return prompts + [[5, 6, 7, 8] * 6]  # a repetitive one: n-gram drafts find matches


PROMPTS = _prompts()


def _greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def _engine(tiny_models, **kw) -> LLMEngine:
    kw.setdefault("num_pages", 256)  # small: the invariant check after each step walks every page
    kw.setdefault("min_exit_layer", 1)
    return LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, **kw))


def _run(engine: LLMEngine, prompts, params) -> list[list[int]]:
    """Run to completion, checking the page invariants after every step; every token is the full
    model's (exit depth = all layers)."""
    seqs = [engine.add_request(f"r{i}-{id(prompts)}", p, params) for i, p in enumerate(prompts)]
    while engine.has_work:
        engine.step()
        engine.pages.check_invariants()
    assert engine.pages.num_used_pages == 0
    assert all(d == engine.num_layers for s in seqs for d in s.exit_layers)
    return [s.output_token_ids for s in seqs]


@pytest.fixture(scope="module")
def reference(tiny_models) -> dict[tuple[int, ...], list[int]]:
    """Plain full-depth greedy continuations (longer than any test asks for)."""
    outs = _run(_engine(tiny_models), PROMPTS, _greedy(64))
    return {tuple(p): o for p, o in zip(PROMPTS, outs)}


class OracleDraft(DraftSource):
    """Drafts the known greedy continuation (``wrong``: a token that is never it)."""

    name = "oracle"

    def __init__(self, reference: dict[tuple[int, ...], list[int]], wrong: bool = False) -> None:
        self.reference, self.wrong = reference, wrong

    def propose(self, items: list[ScheduledSeq]) -> list[list[int]]:
        drafts = []
        for item in items:
            seq = item.seq
            ahead = self.reference.get(tuple(seq.prompt_token_ids), [])[len(seq.output_token_ids) :]
            ahead = ahead[: item.num_draft_slots]
            drafts.append([t % 120 + 1 for t in ahead] if self.wrong else ahead)
        return drafts


def _spec_engine(tiny_models, source: str, reference, **kw) -> LLMEngine:
    if source in ("oracle", "wrong"):
        engine = _engine(tiny_models, spec="exit", **kw)
        engine.spec.set_source("exit", OracleDraft(reference, wrong=source == "wrong"))
        return engine
    return _engine(tiny_models, spec=source, **kw)


# -- greedy: token-identical to plain decoding -----------------------------------------------------


@pytest.mark.parametrize("max_num_seqs", [1, 8])
@pytest.mark.parametrize("source", ["ngram", "exit", "easyspec", "oracle", "wrong"])
def test_greedy_output_is_identical_to_plain_decoding(tiny_models, reference, source, max_num_seqs):
    # the tiny model's layer drafts cost most of a step, so the adaptive length would pause them: forced here
    forced = {"spec_adaptive": False, "spec_max_draft": 3} if source in ("exit", "easyspec") else {}
    engine = _spec_engine(tiny_models, source, reference, max_num_seqs=max_num_seqs, **forced)
    outs = _run(engine, PROMPTS, _greedy())
    assert outs == [reference[tuple(p)][:MAX_TOKENS] for p in PROMPTS]
    stats = engine.runner.stats
    assert stats.num_verifications > 0
    if source == "oracle":
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
    if source == "wrong":
        assert stats.num_accepted_tokens == 0


@pytest.mark.parametrize("source", ["ngram", "exit", "easyspec", "oracle", "wrong"])
def test_preemption_drops_drafts_and_keeps_the_output(tiny_models, reference, source):
    engine = _spec_engine(tiny_models, source, reference, num_pages=24, spec_adaptive=False, spec_max_draft=3)
    seqs = [engine.add_request(f"p{i}", p, _greedy()) for i, p in enumerate(PROMPTS)]
    while engine.has_work:
        engine.step()
        engine.pages.check_invariants()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_token_ids for s in seqs] == [reference[tuple(p)][:MAX_TOKENS] for p in PROMPTS]
    assert engine.pages.num_used_pages == 0


def test_perfect_drafts_give_k_plus_one_tokens_per_verification(tiny_models, reference):
    engine = _spec_engine(tiny_models, "oracle", reference, spec_adaptive=False, spec_max_draft=4)
    out = _run(engine, [PROMPTS[0]], _greedy(41))[0]
    assert out == reference[tuple(PROMPTS[0])][:41]
    stats = engine.runner.stats  # the first token comes from the prefill, then 8 x (4 drafts + bonus)
    assert (stats.num_verifications, stats.num_draft_tokens, stats.num_accepted_tokens) == (8, 32, 32)


def test_adaptive_length_grows_on_perfect_drafts_and_pauses_on_wrong_ones(tiny_models, reference):
    good = _spec_engine(tiny_models, "oracle", reference, spec_max_draft=6)
    _run(good, [PROMPTS[1]], _greedy(60))
    stats = good.runner.stats
    assert (stats.num_accepted_tokens + stats.num_verifications) / stats.num_verifications > 4.5
    bad = _spec_engine(tiny_models, "wrong", reference, spec_retry_steps=8)
    _run(bad, [PROMPTS[1]], _greedy(60))
    assert bad.runner.stats.num_verifications < 20  # paused most of the time, retried now and then


def test_ngram_drafts_on_a_repetitive_prompt_are_accepted(tiny_models, reference):
    engine = _spec_engine(tiny_models, "ngram", reference, spec_verify_row_cost=0.02)  # tiny rows: nearly free
    out = _run(engine, [PROMPTS[-1]], _greedy(64))[0]
    assert out == reference[tuple(PROMPTS[-1])]
    stats = engine.runner.stats
    assert stats.num_accepted_tokens > 0
    assert stats.num_verifications < 63  # several tokens came from one step


# -- stops, sessions, cancellation ---------------------------------------------------------------


def test_max_tokens_eos_and_stop_strings_cut_inside_accepted_drafts(tiny_models, reference):
    ref = reference[tuple(PROMPTS[2])]
    engine = _spec_engine(tiny_models, "oracle", reference, spec_adaptive=False, spec_max_draft=4)
    out = engine.generate([PROMPTS[2]], _greedy(7))[0]
    assert (out.token_ids, out.finish_reason) == (ref[:7], "length")
    eos = ref[5]  # EOS accepted mid-draft: nothing after it is kept
    plain = _engine(tiny_models)
    for e in (engine, plain):
        e.eos_ids = {eos}
    outs = [e.generate([PROMPTS[2]], SamplingParams(max_tokens=30))[0] for e in (engine, plain)]
    assert outs[0].token_ids == outs[1].token_ids == ref[: ref.index(eos) + 1]
    assert outs[0].finish_reason == "stop"
    stop = plain.tokenizer.decode(ref[6:8])
    outs = [e.generate([PROMPTS[2]], SamplingParams(max_tokens=30, stop=[stop]))[0] for e in (engine, plain)]
    assert (outs[0].token_ids, outs[0].text, outs[0].finish_reason) == (
        outs[1].token_ids,
        outs[1].text,
        outs[1].finish_reason,
    )
    assert len(outs[0].token_ids) < 30 and engine.pages.num_used_pages == 0


@pytest.mark.parametrize("source", ["ngram", "easyspec", "oracle"])
def test_session_second_turn_keeps_only_accepted_kv(tiny_models, reference, source):
    engine = _spec_engine(tiny_models, source, reference, spec_max_draft=4)
    plain = _engine(tiny_models)
    first = engine.add_request("t1", PROMPTS[3], _greedy(20), session_id="s")
    while engine.has_work:
        engine.step()
    assert first.output_token_ids == reference[tuple(PROMPTS[3])][:20]
    held = engine.sessions.get("s").token_ids
    assert held == (PROMPTS[3] + first.output_token_ids)[: first.num_computed_tokens]
    assert len(engine.pages.page_table(session_owner("s"))) == engine.pages.pages_for(len(held))
    turn2 = PROMPTS[3] + first.output_token_ids + [9, 10, 11]
    second = engine.add_request("t2", turn2, _greedy(20), session_id="s")
    while engine.has_work:
        engine.step()
        engine.pages.check_invariants()
    assert second.num_cached_tokens > 0
    assert second.output_token_ids == plain.generate([turn2], _greedy(20))[0].token_ids


def test_cancellation_mid_draft_frees_pages(tiny_models, reference):
    engine = _spec_engine(tiny_models, "oracle", reference, spec_adaptive=False, spec_max_draft=4)
    seqs = [engine.add_request(f"c{i}", p, _greedy()) for i, p in enumerate(PROMPTS[:3])]
    while not seqs[1].spec.num_verifications:
        engine.step()
    held = len(engine.pages.page_table(seqs[1].seq_id))
    assert held > 0
    free = engine.pages.num_free_pages
    engine.abort("c1")
    assert engine.pages.page_table(seqs[1].seq_id) == []
    assert engine.pages.num_free_pages == free + held
    engine.pages.check_invariants()
    while engine.has_work:
        engine.step()
    assert seqs[1].finish_reason is FinishReason.ABORT
    assert [seqs[0].output_token_ids, seqs[2].output_token_ids] == [
        reference[tuple(PROMPTS[i])][:MAX_TOKENS] for i in (0, 2)
    ]
    assert engine.pages.num_used_pages == 0


def test_lossless_request_with_exits_on_uses_exits_only_as_drafts(tiny_models, reference):
    # every token could leave at once; drafts forced (the cost model would pause them on this tiny model)
    engine = _engine(
        tiny_models, exit_policy="softmax", exit_threshold=0.0, spec_adaptive=False, spec_draft_threshold=0.0
    )
    exited = engine.generate([PROMPTS[0]], _greedy())[0]
    assert min(exited.exit_layers) < engine.num_layers
    out = engine.generate([PROMPTS[0]], _greedy(mode="lossless"))[0]
    assert out.token_ids == reference[tuple(PROMPTS[0])][:MAX_TOKENS]
    assert set(out.exit_layers) == {engine.num_layers}
    assert engine.runner.stats.num_verifications > 0  # drafted by the exit source


def test_streamed_lossless_request_streams_accepted_tokens_and_matches_plain_text(tiny_models, reference):
    stats = []
    a = AsyncEngine(
        lambda: _spec_engine(tiny_models, "oracle", reference, spec_adaptive=False, spec_max_draft=3),
        on_stats=stats.append,
    )
    a.start()
    try:
        finals, streams = {}, {}
        done = threading.Event()

        def emit(event):
            streams.setdefault(event.request_id, []).append(event)
            if event.finished:
                finals[event.request_id] = event
                if len(finals) == 2:
                    done.set()

        prompt = " ".join(f"w{t - 1}" for t in PROMPTS[5])  # word-level vocabulary: id = word + 1
        for request_id, params in (("plain", {"mode": "early_exit"}), ("lossless", {"mode": "lossless"})):
            sampling = json.dumps({"max_tokens": 20, "ignore_eos": True, **params})
            request = parse_request(prompt, stream=True, sampling_parameters=sampling)
            a.submit(RequestHandle(request_id, request, emit))
        assert done.wait(60)
    finally:
        a.shutdown(timeout=5)
    texts = {rid: "".join(e.text for e in events) for rid, events in streams.items()}
    assert texts["plain"] == texts["lossless"] and texts["plain"]
    tokens = [t for e in streams["lossless"] for t in e.token_ids]
    assert tokens == [t for e in streams["plain"] for t in e.token_ids] == reference[tuple(PROMPTS[5])][:20]
    assert max(len(e.token_ids) for e in streams["lossless"]) > 1  # accepted drafts stream together
    assert max(len(e.token_ids) for e in streams["plain"]) == 1
    # metrics count every token, accepted drafts included (one exit depth per token)
    assert sum(s.new_tokens for s in stats) == 40 == sum(len(s.exit_layers) for s in stats)
    busiest = max(stats, key=lambda s: s.new_tokens)
    assert busiest.new_tokens > busiest.batch_size  # a verification step grew a row by several tokens


def test_sampling_parameters_carry_mode_and_spec():
    params = parse_request("w1", sampling_parameters='{"mode": "lossless", "spec": "ngram"}').params
    assert (params.mode, params.spec) == ("lossless", "ngram")
    with pytest.raises(RequestError, match="sampling_parameters.mode: 'fast'"):
        parse_request("w1", sampling_parameters='{"mode": "fast"}')
    with pytest.raises(RequestError, match="sampling_parameters.spec: drafts"):
        parse_request("w1", sampling_parameters='{"mode": "early_exit", "spec": "exit"}')


# -- configuration and requests -------------------------------------------------------------------


def test_resolve_spec():
    assert resolve_spec(None, None, "none", exits_on=False) == (False, "none")
    assert resolve_spec(None, None, "ngram", exits_on=True) == (True, "ngram")
    assert resolve_spec("lossless", None, "none", exits_on=False) == (True, "none")
    assert resolve_spec("lossless", None, "none", exits_on=True) == (True, "exit")
    assert resolve_spec(None, "exit", "none", exits_on=False) == (True, "exit")
    assert resolve_spec("early_exit", None, "ngram", exits_on=True) == (False, "none")
    assert resolve_spec(None, "none", "ngram", exits_on=False) == (True, "none")


def test_bad_spec_settings_name_the_field(tiny_models):
    with pytest.raises(ValueError, match="spec_group_size: must be"):
        EngineConfig(spec="easyspec", spec_group_size=0)
    with pytest.raises(ValueError, match="spec_exit_depth: 3 is not a block end"):
        _engine(tiny_models, spec="exit", spec_exit_depth=3)
    with pytest.raises(ValueError, match="spec: 'fast'"):
        EngineConfig(spec="fast")
    with pytest.raises(ValueError, match="spec_draft_threshold"):
        EngineConfig(spec_draft_threshold=1.5)
    with pytest.raises(ValueError, match="mode: 'exact'"):
        SamplingParams(mode="exact")
    with pytest.raises(ValueError, match="spec: drafts"):
        SamplingParams(mode="early_exit", spec="ngram")
    with pytest.raises(ValueError, match="spec_exit_depth: 5 is not a block end"):
        _engine(tiny_models, spec="easyspec", spec_exit_depth=5)


# -- easyspec: fuzzy layer groups ------------------------------------------------------------------


def test_fuzzy_groups_add_the_updates_of_layers_that_read_one_input(tiny_models):
    """Group 1 is the exact walk (bit for bit); group 2 equals a reference built from single layers:
    layers 2i and 2i+1 both read the output of the group before, and their updates add up."""
    engine = _engine(tiny_models, layers_per_block=1)
    loop = engine.runner.loop
    w, kv, shape = loop.weights, loop.backend.kv, loop.weights.shape
    depth = shape.num_layers
    prompt = PROMPTS[0]
    engine.pages.allocate("fuzzy", len(prompt))
    slices = [SeqSlice(0, len(prompt), engine.pages.page_table("fuzzy"))]
    with torch.inference_mode():
        exact = loop.run_shallow(slices, prompt, depth)
        assert torch.equal(loop.run_fuzzy(slices, prompt, depth, 1), exact)
        fuzzy = loop.run_fuzzy(slices, prompt, depth, 2)
        meta, ref = loop._meta(slices), loop._embed(prompt)
        for first in range(0, depth, 2):
            outs = [decoder_layer(w.layers[i], ref, meta, kv.k[i], kv.v[i], shape) for i in (first, first + 1)]
            ref = outs[0] + (outs[1] - ref)
    assert depth % 2 == 0 and depth >= 4
    torch.testing.assert_close(fuzzy, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fuzzy, exact, atol=1e-3)  # stale inputs: not the exact walk
    engine.pages.free("fuzzy")


def test_fuzzy_drafts_need_single_layers():
    """Backends that run whole blocks (exported graphs) cannot draft fuzzily; the engine refuses
    easyspec with them at load (``Speculator``), naming the backend."""
    with pytest.raises(NotImplementedError, match="easyspec needs the torch backend"):
        BlockBackend.run_fuzzy(object.__new__(_WholeBlocks), torch.zeros(1, 4), None, 2, 2)


class _WholeBlocks(BlockBackend):
    def run_block(self, block_idx, hidden, meta):
        return hidden


def test_ngram_lookup_takes_the_latest_longest_match():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]
    assert ngram_lookup([4, 5, 6, 5], 3) == [6, 5]  # n = 1: after the latest earlier 5
    assert ngram_lookup([1, 2, 3], 4) == []
    assert ngram_lookup([7, 7, 7, 7], 3) == [7]  # the match may run into the tail


def test_accept_greedy_takes_the_longest_agreeing_prefix_and_the_bonus():
    logits = torch.zeros(4, 10)
    for row, token in enumerate([3, 4, 5, 6]):
        logits[row, token] = 1.0
    assert accept_greedy(logits, [3, 4, 5]) == [3, 4, 5, 6]
    assert accept_greedy(logits, [3, 9, 5]) == [3, 4]
    assert accept_greedy(logits, [1, 4, 5]) == [3]
    assert accept_greedy(logits[:1], []) == [3]


def test_draft_length_cost_model():
    lengths = DraftLength(verify_costs("float32", "none", 0.05, 8), retry_steps=5)
    state = lengths.new_state("ngram", limit=1000, draft_cost=0.0)
    assert state.num_draft == 3  # the best length at the prior acceptance of one half
    lengths.record(state, 4, 4)
    assert state.num_draft == 8 and not state.pause  # grows on full acceptance
    lengths.record(state, 8, 2)
    assert state.num_draft == 7  # shrinks on a rejection
    state = lengths.new_state("exit", limit=1000, draft_cost=0.05)
    for _ in range(6):
        if not state.pause:
            lengths.record(state, state.num_draft, 0)
    assert state.pause == 5 and state.num_draft == 1  # drafts that are never right do not pay
    assert state.num_wanted(10) == 0
    for _ in range(5):
        lengths.tick(state)
    assert state.num_wanted(10) == 1 and state.num_wanted(999) == 0  # the limit leaves no room
    lengths.record(state, 1, 0)
    assert state.pause == 10  # a retry that does not pay waits twice as long
    # where no length pays at the prior acceptance (a draft token costing most of a step, int4 rows), a
    # new sequence starts paused and tries one draft later, after enough steps that the retry's cost
    # if rejected (0.8 draft + 0.15 verification row) stays within 2 % of them; ngram's free drafts start
    # at once
    int4 = DraftLength(verify_costs("bfloat16", "int4", None, 8), retry_steps=5)
    assert int4.best(0.5, 0.8)[1] < 1.0
    probe = int4.costs[1] - 1.0 + 0.8
    state = int4.new_state("exit", limit=1000, draft_cost=0.8)
    assert (state.pause, state.num_draft, state.num_wanted(10)) == (math.ceil(probe / PROBE_BUDGET), 1, 0)
    assert state.pause == 48
    for _ in range(48):
        int4.tick(state)
    assert state.num_wanted(10) == 1
    int4.record(state, 1, 0)
    assert state.pause == 48  # the second try that did not pay: 5 << 1 would retry sooner than the budget allows
    assert int4.pause_steps(4, 0.8) == 80 and int4.pause_steps(9, 0.8) == 80  # doubling, up to 16x
    assert int4.new_state("ngram", limit=1000, draft_cost=0.0).pause == 0


def test_drafts_are_weighed_against_the_whole_step_of_a_batch():
    lengths = DraftLength(verify_costs("bfloat16", "int4", None, 8), retry_steps=5)
    for k in range(1, 9):  # one sequence: tokens over the step's cost, as before
        assert lengths.gain(0.5, k, 0.0) == pytest.approx(expected_tokens(0.5, k) / lengths.costs[k])
    assert lengths.step_time(9) == lengths.costs[8] and lengths.step_time(12) > lengths.step_time(9)
    # 16 sequences: one accepted token is 1/16 more tokens, so a draft must cost < 1/16 of the step.
    b16 = lengths.gain(0.5, 1, 0.0, batch=16)
    assert b16 == pytest.approx((15 + 1.5) / 16 / (lengths.step_time(17) / lengths.step_time(16)))
    assert lengths.best(0.36, 0.0, batch=16)[1] < 1.0 < lengths.best(0.36, 0.0)[1]  # pays alone, not in a batch
    state = lengths.new_state("ngram", 100, 0.0)
    lengths.record(state, 2, 1, batch=16)
    assert state.pause > 0  # int4 in a full batch: decode plainly for a while


def test_verify_costs_measured_extended_or_linear():
    measured = verify_costs("bfloat16", "bf16", None, 10)
    assert measured[:9] == VERIFY_STEP_COST[("bfloat16", "none")] and measured[10] > measured[8]
    assert verify_costs("float32", "none", 0.1, 3) == pytest.approx((1.0, 1.1, 1.2, 1.3))
    assert verify_costs("bfloat16", "int4", None, 2) == VERIFY_STEP_COST[("bfloat16", "int4")][:3]
    assert verify_costs("bfloat16", "int4", 0.3, 2) == pytest.approx((1.0, 1.3, 1.6))  # a given row cost wins
    # AVX2 CPUs have their own measured tables (float32-FMA products: extra rows cost more)
    avx2 = verify_costs("bfloat16", "int4", None, 8, cpu="avx2")
    assert avx2 == VERIFY_STEP_COST_AVX2[("bfloat16", "int4")] and avx2[1] > VERIFY_STEP_COST[("bfloat16", "int4")][1]
    assert verify_costs("bfloat16", "int4", None, 8, cpu="avx512_bf16") == VERIFY_STEP_COST[("bfloat16", "int4")]
    assert verify_costs("bfloat16", "int4", 0.3, 1, cpu="avx2") == pytest.approx((1.0, 1.3))
    floats = DraftLength(verify_costs("float32", "none", None, 8), retry_steps=5)
    assert floats.best(0.6, 0.0)[0] >= 3  # 2-3 row products are slow in float32: longer drafts pay


# -- speculative sampling ------------------------------------------------------------------------


def _chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor, dof: int) -> float:
    stat = ((observed - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat.double() / 2))


def test_speculative_sampling_rule_keeps_the_distribution():
    """Goodness of fit of 20,000 draws of the first two tokens against the target p (joint over the
    first token, and the second given an accepted first draft); p-value threshold 1e-3."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    n = 20_000
    first = torch.zeros(4)
    second = torch.zeros(4)
    for _ in range(n):
        tokens = accept_sampled(probs, [1, 2], gen)
        first[tokens[0]] += 1
        if tokens[0] == 1:
            second[tokens[1]] += 1
    assert _chi2_pvalue(first, n * probs[0], 3) > 1e-3
    assert _chi2_pvalue(second, second.sum() * probs[1], 3) > 1e-3


def test_sampled_lossless_matches_plain_sampling_distribution(tiny_models, reference):
    """The second and third generated tokens (verified drafts or residual draws) of 1,200 seeded
    requests under speculation against 1,200 of plain sampling: chi-square test of homogeneity over
    the tokens seen at least 10 times in all, p-value threshold 1e-3."""
    prompt = PROMPTS[4]
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=s, ignore_eos=True) for s in range(1200)]
    counts = []
    for spec in ("none", "exit"):
        engine = _engine(tiny_models, max_num_seqs=64, spec=spec, spec_adaptive=False, spec_max_draft=2)
        if spec != "none":  # drafts: the full model's greedy token after each sampled context
            engine.spec.set_source("exit", _GreedyOfContext(engine))
        outs = engine.generate([prompt] * len(params), params)
        counts.append([tuple(o.token_ids[1:]) for o in outs])
        if spec != "none":
            stats = engine.runner.stats
            assert 100 < stats.num_accepted_tokens < stats.num_draft_tokens - 100  # both branches ran
    for position in (0, 1):
        a = [c[position] for c in counts[0]]
        b = [c[position] for c in counts[1]]
        tokens = sorted({t for t in a + b if (a + b).count(t) >= 10})
        table = torch.tensor([[a.count(t) for t in tokens], [b.count(t) for t in tokens]], dtype=torch.float64)
        expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
        assert _chi2_pvalue(table, expected, len(tokens) - 1) > 1e-3


class _GreedyOfContext(DraftSource):
    """Drafts the full model's greedy continuation of each sequence's current context (a
    deterministic draft that is often right, so both acceptance and residual draws occur)."""

    name = "greedy"

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.cache: dict[tuple[int, ...], list[int]] = {}

    def propose(self, items: list[ScheduledSeq]) -> list[list[int]]:
        out = []
        for item in items:
            context = tuple(item.seq.prompt_token_ids + item.seq.output_token_ids)
            if context not in self.cache:
                hidden = teacher_forced_hidden(self.engine, list(context), [0])[1]  # [1, hidden]
                self.cache[context] = [int(final_logits(self.engine.weights, hidden)[-1].argmax())]
            out.append(self.cache[context][: item.num_draft_slots])
        return out


# -- rollback on ids only: a randomized scheduler soak --------------------------------------------


def _next(tokens: list[int]) -> int:
    return sum((i + 1) * t for i, t in enumerate(tokens)) % 1000


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(_next(tokens))
    return tokens[len(prompt) :]


class _FakeSpecEngine:
    """Scheduler + sessions + a fake model that writes every row (drafts too) into a fake paged KV
    store and reads the whole context back for each prediction, so stale, lost or shared K/V after
    a rollback changes some output."""

    def __init__(self, rng: random.Random, num_pages: int, page_size: int = 4) -> None:
        self.rng = rng
        self.pages = PageManager(num_pages, page_size)
        self.sessions = KVSessionTable(self.pages, max_sessions=8, idle_timeout_s=600.0)
        self.sched = Scheduler(self.pages, 6, 40, self.sessions, enable_prefix_sharing=True)
        self.kv: dict[int, list[int | None]] = {p: [None] * page_size for p in range(num_pages)}
        self.num_accepted = self.num_rejected = 0

    def _slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        return self.pages.page_table(seq.seq_id)[pos // self.pages.page_size], pos % self.pages.page_size

    def _drafts(self, item: ScheduledSeq) -> list[int]:
        tokens, drafts = item.seq.token_ids(0, item.seq.num_tokens), []
        for _ in range(self.rng.randint(0, item.num_draft_slots)):
            right = _next(tokens + drafts)
            drafts.append(right if self.rng.random() < 0.7 else (right + 1) % 1000)
        return drafts

    def _run(self, item: ScheduledSeq) -> tuple[list[int], int]:
        seq, start = item.seq, item.seq.num_computed_tokens
        for pos, tok in zip(range(start, start + item.num_new_tokens), item.token_ids(), strict=True):
            page, off = self._slot(seq, pos)
            assert self.pages.is_writable(page), "a draft row writes into a shared or registered page"
            self.kv[page][off] = tok
        if not item.samples:
            return [], 0
        end, drafts, preds = seq.num_tokens, item.draft_token_ids, []
        for j in range(len(drafts) + 1):
            cached = [self.kv[p][o] for p, o in (self._slot(seq, pos) for pos in range(end + j))]
            assert cached == seq.token_ids(0, end) + drafts[:j], "stale K/V read back"
            preds.append(_next(cached))
        n = 0
        while n < len(drafts) and drafts[n] == preds[n]:
            n += 1
        return preds[: n + 1], n

    def step(self) -> None:
        out = self.sched.schedule()
        for item in out.scheduled:
            if item.num_draft_slots:
                item.set_drafts(self._drafts(item))
        tables = {i.seq.seq_id: list(self.pages.page_table(i.seq.seq_id)) for i in out.scheduled}
        writable = {p: self.pages.is_writable(p) for t in tables.values() for p in t}
        results = [self._run(item) for item in out.scheduled]
        tokens = [
            t[: item.seq.params.max_tokens - len(item.seq.output_token_ids)]
            for item, (t, _) in zip(out.scheduled, results)
        ]
        accepted = [a for _, a in results]
        self.num_accepted += sum(accepted)
        self.num_rejected += sum(len(i.draft_token_ids) - a for i, a in zip(out.scheduled, accepted))
        grown = self.sched.postprocess(out, tokens, [[4] * len(t) for t in tokens], accepted)
        for item in out.scheduled:
            seq, before = item.seq, tables[item.seq.seq_id]
            after = self.pages.page_table(seq.seq_id)
            assert before[: len(after)] == after
            dropped = before[len(after) :]
            assert all(writable[p] for p in dropped), "rollback let go of a shared or registered page"
            assert len(after) >= seq.num_prompt_tokens // self.pages.page_size or not dropped
            if item.num_draft_slots:
                assert len(after) == self.pages.pages_for(seq.num_computed_tokens)
        for seq in grown:
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.finish(seq, FinishReason.LENGTH)
        self.pages.check_invariants()
        self.check_sessions()

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.session_id is not None and not seq.is_finished:
            self.sessions.detach(seq.session_id, seq.seq_id, seq.token_ids(0, seq.num_computed_tokens))
        self.sched.finish(seq, reason)

    def check_sessions(self) -> None:
        for session in self.sessions._sessions.values():
            table = self.pages.page_table(session_owner(session.session_id))
            size = self.pages.page_size
            held = [self.kv[table[pos // size]][pos % size] for pos in range(len(session.token_ids))]
            assert held == session.token_ids, "a session kept K/V of a rejected draft"


@pytest.mark.parametrize("seed", range(6))
def test_randomized_rollback_keeps_page_invariants(seed):
    rng = random.Random(seed)
    eng = _FakeSpecEngine(rng, num_pages=rng.choice([14, 20, 40]))
    shared = [rng.randint(0, 999) for _ in range(9)]
    live: list[tuple[Sequence, list[int]]] = []
    turns: dict[str, list[int]] = {}
    aborted: set[int] = set()
    for _ in range(300):
        if sum(not s.is_finished for s, _ in live) < 8 and rng.random() < 0.4:
            session = rng.choice([None, None, "a", "b"])
            if session is not None and any(s.session_id == session and not s.is_finished for s, _ in live):
                session = None
            prompt = turns.get(session, []) + (shared if rng.random() < 0.5 else []) + [rng.randint(0, 999)]
            max_tokens = rng.randint(1, 24)
            if eng.pages.pages_for(len(prompt) + max_tokens) > eng.pages.num_pages // 2:  # as the engine refuses
                session, prompt = None, [rng.randint(0, 999)]
            seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens), session_id=session)
            seq.spec = SpecState("exit", seq.num_prompt_tokens + seq.params.max_tokens, 0.0, rng.randint(1, 5))
            if session is not None:
                eng.sessions.open(session, str(seq.seq_id))
            eng.sched.add(seq)
            live.append((seq, prompt))
        if live and rng.random() < 0.05:
            victim = rng.choice(live)[0]
            if not victim.is_finished:
                eng.finish(victim, FinishReason.ABORT)
                aborted.add(victim.seq_id)
        if eng.sched.has_work:
            eng.step()
        for seq, prompt in live:
            if seq.is_finished and seq.session_id is not None:
                turns[seq.session_id] = prompt + seq.output_token_ids
    for _ in range(2000):
        if not eng.sched.has_work:
            break
        eng.step()
    assert not eng.sched.has_work, "the scheduler made no progress"
    assert eng.num_accepted > 0 and eng.num_rejected > 0
    assert eng.sched.num_preemptions > 0 or eng.pages.num_pages == 40
    for seq, prompt in live:
        if seq.seq_id not in aborted:
            assert seq.output_token_ids == _reference(prompt, seq.params.max_tokens)
    for session in ("a", "b"):
        eng.sessions.end(session)
    eng.pages.check_invariants()
    assert eng.pages.num_used_pages == 0


def test_triton_spec_counters_count_deltas_of_the_engine_totals():
    from offramp.serving.triton_adapter import Metrics

    class Metric:
        value = 0

        def increment(self, n):
            self.value += n

    class Family:
        COUNTER = GAUGE = HISTOGRAM = "kind"
        made: dict[str, Metric] = {}

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
            return Family.made.setdefault(self.name, Metric())

    class Pb:
        MetricFamily = Family

    metrics = Metrics(Pb, "m", 4)
    metrics.update_spec(10, 4)
    metrics.update_spec(10, 4)  # an iteration without verification adds nothing
    metrics.update_spec(16, 9)
    assert Family.made["offramp_spec_draft_tokens_total"].value == 16
    assert Family.made["offramp_spec_accepted_tokens_total"].value == 9


# -- bench: HF's own speculative decoding beside ours ---------------------------------------------


@pytest.mark.parametrize("source", ["ngram", "exit", "easyspec"])
def test_bench_reports_spec_figures_and_hfs_own_speculation(tiny_models, source):
    from offramp.tools.bench import bench

    engine = _engine(tiny_models, spec=source, spec_max_draft=3)
    prompts = [" ".join(f"w{t - 1}" for t in p) for p in PROMPTS[5:]]  # word-level vocabulary: id = word + 1
    result = bench(engine, prompts, 3, 2, 8, compare_hf=True, progress=False, ignore_eos=True)
    assert result["spec"] == source and result["sequence_match"] == 1.0
    assert result["spec_exit_depth"] == (None if source == "ngram" else engine.spec.exit_depth())
    assert result["spec_group_size"] == (2 if source == "easyspec" else None)
    if source == "easyspec":
        assert "hf_spec" not in result  # HF has no fuzzy drafting to compare with
    else:
        expected = "assistant_early_exit" if source == "exit" else "prompt_lookup_num_tokens"
        assert result["hf_spec"].startswith(expected)
        assert result["hf_spec_sequence_match"] == 1.0  # HF's speculation is lossless too (greedy, float32)
        assert result["hf_spec_tokens_per_s"] > 0 and result["hf_batch1_tokens_per_s"] > 0


def test_bench_rounds_interleave_lossless_and_plain_and_report_medians(tiny_models, monkeypatch):
    """--rounds 3: three lossless and three plain runs, alternating which goes first; the reported
    speeds are the medians, every pair's ratio is listed and the speedup is their median."""
    from offramp.tools import bench as bench_mod

    engine = _engine(tiny_models, spec="ngram", spec_max_draft=3)
    prompts = [" ".join(f"w{t - 1}" for t in p) for p in PROMPTS[5:]]
    order, real = [], bench_mod.run_engine
    speeds = iter([30.0, 10.0, 12.0, 40.0, 50.0, 11.0])  # lossless, plain, plain, lossless, lossless, plain

    def counted(engine, prompt_ids, concurrency, max_tokens, progress=True, params=None):
        metrics, outputs = real(engine, prompt_ids, concurrency, max_tokens, progress, params)
        order.append("plain" if params.mode == "early_exit" else "lossless")
        return {**metrics, "tokens_per_s": next(speeds)}, outputs

    monkeypatch.setattr(bench_mod, "run_engine", counted)
    result = bench_mod.bench(engine, prompts, 3, 1, 8, progress=False, ignore_eos=True, rounds=3)
    assert order == ["lossless", "plain", "plain", "lossless", "lossless", "plain"]
    assert result["rounds"] == 3 and result["round_speedups"] == [3.0, 3.333, 4.545]
    assert (result["tokens_per_s"], result["plain_tokens_per_s"], result["speedup"]) == (40.0, 11.0, 3.333)
    assert result["sequence_match"] == 1.0
