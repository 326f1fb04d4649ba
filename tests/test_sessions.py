"""Stateful sessions and prefix sharing in the engine, on tiny random models: multi-turn outputs
equal stateless ones with less prefill, eviction is transparent, sharers hold fewer pages, and END,
idle timeout and the session cap give every page back."""

from __future__ import annotations

import random
import threading
import time

import pytest

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.serving.async_engine import AsyncEngine
from offramp.serving.events import RequestHandle
from offramp.serving.requests import GenerateRequest

GREEDY = SamplingParams(max_tokens=6)
BASELINE_FIELDS = ("num_sessions", "num_idle_sessions", "num_session_pages", "num_shared_pages", "num_registered_pages")


def _engine(tiny_models, **kwargs) -> LLMEngine:
    kwargs.setdefault("page_size", 4)
    kwargs.setdefault("num_pages", 400)  # small stores: quick to build, cheap invariant checks
    return LLMEngine(EngineConfig(model=str(tiny_models["llama"]), **kwargs))


def _run(engine: LLMEngine, request_id: str, ids: list[int], params=GREEDY, session_id: str | None = None):
    seq = engine.add_request(request_id, ids, params, session_id=session_id)
    while not seq.is_finished:
        engine.step()
    return seq


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(1, 120) for _ in range(n)]


def test_five_turn_session_matches_stateless_and_prefills_less(tiny_models):
    stateful = _engine(tiny_models)
    stateless = _engine(tiny_models, enable_prefix_sharing=False)
    rng = random.Random(0)
    history: list[int] = []
    for turn in range(5):
        prompt = history + _words(rng, 7)  # the caller sends the whole conversation every turn
        ours = _run(stateful, f"turn-{turn}", prompt, session_id="chat")
        ref = _run(stateless, f"turn-{turn}", prompt)
        assert ours.output_token_ids == ref.output_token_ids, f"turn {turn}"
        cached = max(0, len(history) - 1)  # all but the last answer token, whose K/V was never computed
        assert ours.num_cached_tokens == cached
        assert ours.num_run_tokens == len(prompt) - cached + GREEDY.max_tokens - 1
        assert ref.num_run_tokens == len(prompt) + GREEDY.max_tokens - 1
        history = prompt + ours.output_token_ids
    assert ours.num_run_tokens == 7 + 1 + 5 and ref.num_run_tokens == len(history) - 1  # 13 vs 64 in turn 5
    assert stateful.pages.num_used_pages == stateful.pages.pages_for(len(history) - 1)
    assert stateless.pages.num_used_pages == 0
    stateful.pages.check_invariants()


@pytest.mark.parametrize("how", ["explicit", "memory"])
def test_evicted_session_continues_with_the_same_output(tiny_models, how):
    engine = _engine(tiny_models, num_pages=24)
    reference = _engine(tiny_models, enable_prefix_sharing=False)
    rng = random.Random(1)
    history: list[int] = []
    for turn in range(4):
        prompt = history + _words(rng, 7)
        if turn == 2:
            held = engine.cache_stats.num_session_pages
            assert held > 0
            if how == "explicit":
                assert engine.evict_session("chat") == held
            else:  # a 20-page request arrives while the idle session holds 7 of the 24 pages
                _run(engine, "big", [5] * 60, SamplingParams(max_tokens=20))
                assert engine.scheduler.num_preemptions == 0
            assert engine.cache_stats.num_session_evictions == 1 and engine.sessions.get("chat").token_ids == []
        ours = _run(engine, f"turn-{turn}", prompt, session_id="chat")
        assert ours.output_token_ids == _run(reference, f"turn-{turn}", prompt).output_token_ids, f"turn {turn}"
        assert (ours.num_cached_tokens == 0) == (turn in (0, 2))  # re-prefilled after the eviction
        history = prompt + ours.output_token_ids
    engine.pages.check_invariants()


def _peak_pages(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams):
    seqs = [engine.add_request(f"share-{i}", p, params) for i, p in enumerate(prompts)]
    peak = peak_shared = 0
    while engine.has_work:
        engine.step()
        engine.pages.check_invariants()
        peak = max(peak, engine.pages.num_used_pages)
        peak_shared = max(peak_shared, engine.pages.num_shared_pages)
    return [s.output_token_ids for s in seqs], peak, peak_shared


def test_sixteen_sharers_of_a_long_prefix_hold_fewer_pages(tiny_models):
    rng = random.Random(2)
    prefix = _words(rng, 128)  # 8 pages of 16
    prompts = [prefix + [i + 1, i + 2, i + 3] for i in range(16)]
    params = SamplingParams(max_tokens=4)
    shared = _engine(tiny_models, page_size=16)
    copies = _engine(tiny_models, page_size=16, enable_prefix_sharing=False)
    out_shared, peak_shared, most_shared = _peak_pages(shared, prompts, params)
    out_copies, peak_copies, _ = _peak_pages(copies, prompts, params)
    assert out_shared == out_copies
    # Each sequence ends with 131 + 3 computed tokens = 9 pages: 8 of prefix and 1 of its own.
    assert peak_copies == 16 * 9
    assert peak_shared == 8 + 16 * 1 and most_shared == 8
    assert shared.cache_stats.num_prefix_reused_tokens == 15 * 128  # the first computed it, 15 adopted it
    assert shared.pages.num_used_pages == 0 and shared.cache_stats.num_registered_pages == 0


def test_end_session_and_idle_timeout_bring_pages_and_stats_back(tiny_models):
    engine = _engine(tiny_models, session_idle_timeout_s=600)
    baseline = engine.cache_stats
    rng = random.Random(3)
    system = _words(rng, 12)  # both conversations start with the same system prompt: its pages are shared
    for session_id in ("a", "b"):
        history = list(system)
        for turn in range(2):
            prompt = history + _words(rng, 5)
            history = prompt + _run(engine, f"{session_id}-{turn}", prompt, session_id=session_id).output_token_ids
    stats = engine.cache_stats
    assert stats.num_sessions == stats.num_idle_sessions == 2
    assert stats.num_session_pages > 0 and stats.num_shared_pages > 0 and stats.num_session_reused_tokens > 0
    assert stats.num_session_pages == engine.pages.num_used_pages + stats.num_shared_pages

    assert engine.end_session("a") and not engine.end_session("a")
    assert 0 < engine.pages.num_used_pages < stats.num_session_pages
    now = time.monotonic() + 601  # "b" has been idle for longer than the timeout
    engine.sessions.clock = lambda: now
    engine.step()  # no work: step only expires
    assert engine.pages.num_used_pages == 0
    after = engine.cache_stats
    assert after.num_sessions_expired == 1
    assert all(getattr(after, f) == getattr(baseline, f) for f in BASELINE_FIELDS), (after, baseline)
    engine.pages.check_invariants()


def test_one_request_per_session_and_end_aborts_the_one_in_flight(tiny_models):
    engine = _engine(tiny_models)
    seq = engine.add_request("r1", [3, 4, 5, 6, 7], GREEDY, session_id="s")
    with pytest.raises(ValueError, match="session_id: 's' already has a request in flight \\('r1'\\)"):
        engine.add_request("r2", [3, 4, 5, 6, 7, 8], GREEDY, session_id="s")
    with pytest.raises(ValueError, match="session_id: must be a non-empty string"):
        engine.add_request("r3", [3, 4], GREEDY, session_id="")
    engine.step()
    assert engine.pages.num_used_pages > 0
    assert engine.end_session("s")
    assert seq.finish_reason.value == "abort" and not engine.has_work
    assert engine.pages.num_used_pages == 0 and engine.cache_stats.num_sessions == 0
    _run(engine, "r2", [3, 4, 5], session_id="s")  # the id is free again


def test_an_aborted_turn_keeps_its_computed_pages(tiny_models):
    engine = _engine(tiny_models)
    prompt = list(range(1, 11))
    seq = engine.add_request("r", prompt, SamplingParams(max_tokens=50), session_id="s")
    for _ in range(4):
        engine.step()
    engine.abort("r")
    assert engine.sessions.get("s").token_ids == prompt + seq.output_token_ids[:-1]
    nxt = _run(engine, "r2", prompt + seq.output_token_ids + [7], session_id="s")
    assert nxt.num_cached_tokens == len(prompt) + len(seq.output_token_ids) - 1


@pytest.mark.parametrize("kv_fill", ["recompute", "propagate"])
def test_session_keeps_exact_kv_under_recompute_and_the_approximation_under_propagate(tiny_models, kv_fill):
    engine = _engine(tiny_models, layers_per_block=1, min_exit_layer=2, kv_fill=kv_fill)
    forced = SamplingParams(max_tokens=5, exit_policy="similarity", exit_threshold=-1.0)  # every decode leaves at 2
    prompt = [3, 4, 5, 6, 7, 8]
    first = _run(engine, "t1", prompt, forced, session_id="s")
    assert first.exit_layers == [4, 2, 2, 2, 2]
    held = engine.sessions.get("s").token_ids
    if kv_fill == "recompute":  # the first decoded token's K/V above layer 2 was still pending
        assert held == prompt
    else:  # propagated K/V is kept, the same approximation the request decoded with
        assert held == prompt + first.output_token_ids[:-1]
    second_prompt = prompt + first.output_token_ids + [9]
    second = _run(engine, "t2", second_prompt, forced, session_id="s")
    assert second.num_cached_tokens == len(held) and not engine.runner.loop.pending
    if kv_fill == "recompute":  # exact reused K/V: the turn equals a stateless request
        fresh = _engine(tiny_models, layers_per_block=1, min_exit_layer=2, kv_fill=kv_fill)
        assert _run(fresh, "t2", second_prompt, forced).output_token_ids == second.output_token_ids


def test_max_sessions_closes_the_least_recently_used_idle_session(tiny_models):
    engine = _engine(tiny_models, max_sessions=2)
    _run(engine, "a", [1, 2, 3], session_id="a")
    _run(engine, "b", [4, 5, 6], session_id="b")
    _run(engine, "a2", [1, 2, 3, 9], session_id="a")  # "a" is now the most recently used
    _run(engine, "c", [7, 8, 9], session_id="c")
    assert "b" not in engine.sessions and "a" in engine.sessions and "c" in engine.sessions
    assert engine.cache_stats.num_sessions_expired == 1
    engine.add_request("a3", [1, 2], GREEDY, session_id="a")
    engine.add_request("c2", [7, 8], GREEDY, session_id="c")
    with pytest.raises(ValueError, match="max_sessions: all 2 sessions have a request in flight"):
        engine.add_request("d", [1], GREEDY, session_id="d")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_sessions": 0}, "max_sessions"),
        ({"session_idle_timeout_s": 0}, "session_idle_timeout_s"),
        ({"session_idle_timeout_s": "600"}, "session_idle_timeout_s"),
        ({"session_idle_timeout_s": float("nan")}, "session_idle_timeout_s"),
        ({"enable_prefix_sharing": 1}, "enable_prefix_sharing"),
    ],
)
def test_session_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(**kwargs)


def test_async_engine_sessions_and_end_session(tiny_models):
    stats, freed = [], threading.Event()

    def on_stats(s):
        stats.append(s)
        if s.num_sessions == 0 and s.pages_used == 0 and len(stats) > 1:
            freed.set()

    a = AsyncEngine(lambda: _engine(tiny_models), on_stats=on_stats)
    a.start()
    try:
        done, events = threading.Event(), []

        def emit(event):
            events.append(event)
            if event.finished:
                done.set()

        req = GenerateRequest("w1 w2 w3 w4 w5", SamplingParams(max_tokens=4))
        a.submit(RequestHandle("x", req, emit, session_id="s"))
        assert done.wait(30) and events[-1].finish_reason == "length"
        assert stats[-1].num_sessions == 1 and stats[-1].session_pages > 0
        assert a.engine.pages.num_used_pages > 0
        done.clear()
        answer = " ".join(f"w{t - 1}" for t in events[-1].token_ids)  # word-level vocabulary: id = word + 1
        req = GenerateRequest(f"w1 w2 w3 w4 w5 {answer} w6", SamplingParams(max_tokens=4))
        a.submit(RequestHandle("y", req, emit, session_id="s"))
        assert done.wait(30) and events[-1].finish_reason == "length"
        assert events[-1].num_cached_tokens == 5 + 4 - 1  # the first turn, but its last token
        freed.clear()
        a.end_session("s")
        assert freed.wait(30), "end_session did not free the session's pages"
        assert a.engine.pages.num_used_pages == 0 and stats[-1].num_sessions == 0
    finally:
        a.shutdown(timeout=5)
