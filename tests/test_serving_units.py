"""Serving pieces without a server: request parsing, incremental detokenization, engine.json,
and the background engine (one final event per request, cancellation, overload)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from offramp import EngineConfig
from offramp.engine.detokenizer import IncrementalDetokenizer, first_stop
from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.serving.async_engine import AsyncEngine, RequestHandle
from offramp.serving.requests import GenerateRequest, RequestError, parse_request
from offramp.serving.serving_config import load_serving_config


def _parse(text=b"hello", params=None, stream=None, exclude=None):
    return parse_request(
        None if text is None else np.array([text], dtype=np.object_),
        None if stream is None else np.array([stream]),
        None if params is None else np.array([params.encode() if isinstance(params, str) else params], dtype=object),
        None if exclude is None else np.array([exclude]),
    )


def test_parse_good_request():
    req = _parse(
        params=json.dumps(
            {
                "max_tokens": 5,
                "temperature": 0.5,
                "top_p": 0.9,
                "top_k": 3,
                "seed": 1,
                "stop": "\n",
                "exit_policy": "softmax",
                "exit_threshold": 0.8,
            }
        ),
        stream=True,
    )
    assert req.prompt == "hello" and req.stream and not req.exclude_input_in_output
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (5, 0.5, 0.9, 3, 1, ["\n"])
    assert (p.exit_policy, p.exit_threshold) == ("softmax", 0.8)
    assert _parse().params.max_tokens == 64  # the server default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": None}, "text_input: is missing"),
        ({"text": b"   "}, "text_input: is empty"),
        ({"text": b"\xff\xfe"}, "text_input: is not valid UTF-8"),
        ({"params": "{bad"}, "sampling_parameters: is not valid JSON"),
        ({"params": "3"}, "sampling_parameters: must be a JSON object"),
        ({"params": '{"n": 2}'}, "unknown key(s) ['n']"),
        ({"params": '{"max_tokens": "5"}'}, "max_tokens: expected an integer"),
        ({"params": '{"max_tokens": -3}'}, "max_tokens: must be positive"),
        ({"params": '{"temperature": -0.5}'}, "temperature: must be a finite number >= 0"),
        ({"params": '{"top_p": 2}'}, "top_p: must be in (0, 1]"),
        ({"params": '{"top_k": 1.5}'}, "top_k: expected an integer"),
        ({"params": '{"stop": [1]}'}, "stop: expected a string or a list"),
        ({"params": '{"ignore_eos": 1}'}, "ignore_eos: expected true or false"),
        ({"params": '{"exit_policy": "x"}'}, "exit_policy: 'x' is not one of"),
        ({"stream": 3}, "stream: expected a boolean"),
    ],
)
def test_parse_errors_name_the_field(kwargs, message):
    with pytest.raises(RequestError) as info:
        _parse(**kwargs)
    assert message in str(info.value) and info.value.code == "invalid"


def test_prompt_size_limit():
    with pytest.raises(RequestError, match="exceed the limit of 10"):
        parse_request(np.array([b"x" * 11], dtype=object), max_prompt_chars=10)


class _Tok:
    """Bytes-level toy tokenizer: a token is one byte, so characters can span tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _feed(detok: IncrementalDetokenizer, ids: list[int]) -> str:
    detok.add(ids)
    return detok.take()


def test_detokenizer_never_splits_a_character_or_drops_spaces():
    text = "Grüße, 世界 🎉 done"
    detok = IncrementalDetokenizer(_Tok())
    pieces = [_feed(detok, [b]) for b in text.encode("utf-8")]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_holds_back_a_stop_string():
    detok = IncrementalDetokenizer(_Tok(), stop=["END"])
    sent = "".join(_feed(detok, [b]) for b in b"abc EN")
    assert "E" not in sent and detok.stop_at is None  # could be the start of "END"
    sent += "".join(_feed(detok, [b]) for b in b"D more")
    assert detok.stop_at == 4 and detok.final_text == "abc "
    assert sent + detok.flush() == "abc "


def test_detokenizer_finds_the_earliest_stop_string_across_pieces():
    detok = IncrementalDetokenizer(_Tok(), stop=["xyz", "b c"])
    for chunk in (b"a b", b" c x", b"yz"):  # "b c" straddles two pieces; "xyz" comes later
        detok.add(list(chunk))
    assert detok.stop_at == 2 and detok.final_text == "a "


def test_first_stop_is_the_earliest_of_several():
    assert first_stop("one two three", ["three", "two"]) == 4
    assert first_stop("one two", ["x"]) is None
    assert first_stop("ab ab", ["ab"], start=1) == 3


def test_engine_json(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text(
        json.dumps({"model": "default", "layers_per_block": 3, "exit_points": [9, 18], "max_queued_requests": 5})
    )
    cfg = load_serving_config(path, {"exit_policy": "softmax"})
    assert cfg.engine.layers_per_block == 3 and cfg.engine.exit_points == (9, 18) and cfg.max_queued_requests == 5
    assert cfg.engine.exit_policy == "softmax"
    path.write_text(json.dumps({"blocksize": 3}))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['blocksize'\]"):
        load_serving_config(path)
    path.write_text(json.dumps({"max_queued_requests": 0}))
    with pytest.raises(ValueError, match="max_queued_requests: must be a positive integer"):
        load_serving_config(path)
    path.write_text(json.dumps({"dtype": "fp8"}))
    with pytest.raises(ValueError, match="dtype: 'fp8'"):
        load_serving_config(path)


def test_shipped_engine_json_is_valid():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1] / "model_repository" / "offramp" / "1" / "engine.json"
    assert load_serving_config(repo).engine.model == "default"


class _Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finished:
            self.done.set()


@pytest.fixture
def async_engine(tiny_models):
    a = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4)), max_queued=3)
    a.start()
    yield a
    a.shutdown(timeout=5)


def _handle(rid, prompt="w1 w2 w3", stream=True, max_tokens=6, cancelled=lambda: False):
    c = _Collector()
    req = GenerateRequest(prompt, SamplingParams(max_tokens=max_tokens), stream=stream, exclude_input_in_output=True)
    return RequestHandle(rid, req, c, cancelled), c


def test_stream_then_exactly_one_final_event(async_engine):
    handle, c = _handle("a")
    async_engine.submit(handle)
    assert c.done.wait(30)
    finals = [e for e in c.events if e.finished]
    assert len(finals) == 1 and c.events[-1].finished and finals[0].finish_reason == "length"
    assert sum(len(e.token_ids) for e in c.events) == 6 and finals[0].num_output_tokens == 6
    assert finals[0].num_input_tokens == 3
    assert async_engine.engine.pages.num_used_pages == 0


def test_non_streaming_is_one_event(async_engine):
    handle, c = _handle("b", stream=False)
    async_engine.submit(handle)
    assert c.done.wait(30)
    assert len(c.events) == 1 and len(c.events[0].token_ids) == 6 and c.events[0].exit_layers == [4] * 6


def test_cancel_frees_pages_and_sends_the_final_event(async_engine):
    flag = threading.Event()
    handle, c = _handle("c", max_tokens=400, cancelled=flag.is_set)
    async_engine.submit(handle)
    while not c.events:
        pass
    flag.set()
    assert c.done.wait(30)
    assert c.events[-1].finish_reason == "abort" and sum(e.finished for e in c.events) == 1
    assert async_engine.engine.pages.num_used_pages == 0


def test_bad_request_gets_one_error_event(async_engine):
    handle, c = _handle("d", prompt="w1 " * 600)  # longer than the 512-token context
    async_engine.submit(handle)
    assert c.done.wait(30)
    assert len(c.events) == 1 and c.events[0].error is not None and "prompt" in str(c.events[0].error)


def test_load_error_surfaces_in_start(tmp_path):
    a = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tmp_path / "missing"))))
    with pytest.raises(Exception, match="model not found"):
        a.start()


def test_overload_is_refused_with_unavailable(async_engine):
    handles = [_handle(f"o{i}", max_tokens=200) for i in range(3)]
    for h, _ in handles:
        async_engine.submit(h)
    extra, _ = _handle("o-extra")
    with pytest.raises(RequestError) as info:
        async_engine.submit(extra)
    assert info.value.code == "unavailable" and "retry" in str(info.value)
    for _, c in handles:
        assert c.done.wait(60)


def test_shutdown_finishes_or_aborts_everything(tiny_models):
    a = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4)))
    a.start()
    short, c_short = _handle("s", max_tokens=2)
    long, c_long = _handle("l", max_tokens=5000 // 10)
    a.submit(short)
    a.submit(long)
    a.shutdown(timeout=0.3)
    assert c_short.done.is_set() and c_long.done.is_set()
    assert c_short.events[-1].finish_reason == "length"
    assert c_long.events[-1].finish_reason in ("abort", "length")
    assert a.engine.pages.num_used_pages == 0
    with pytest.raises(RequestError, match="shutting down"):
        a.submit(_handle("late")[0])


def test_detokenizer_flush_keeps_a_cut_character():
    detok = IncrementalDetokenizer(_Tok())
    data = "Party 🎉".encode()[:-1]  # generation stopped inside the emoji
    sent = _feed(detok, list(data))  # held back: the window ends inside a character
    assert sent + detok.flush() == "Party \ufffd" and detok.text == "Party \ufffd"


def test_one_bad_policy_fails_only_its_request(async_engine):
    good, c_good = _handle("g", max_tokens=20)
    bad, c_bad = _handle("x")
    bad.request.params.exit_policy = "classifier"  # no classifier file on this server
    async_engine.submit(good)
    async_engine.submit(bad)
    assert c_bad.done.wait(30) and c_good.done.wait(30)
    assert c_bad.events[-1].error is not None and c_bad.events[-1].error.code == "invalid"
    assert c_good.events[-1].error is None and c_good.events[-1].finish_reason == "length"


def test_a_failing_cancel_probe_aborts_only_that_request(async_engine):
    def broken():
        raise RuntimeError("client gone")

    ok, c_ok = _handle("ok", max_tokens=20)
    gone, c_gone = _handle("gone", max_tokens=200, cancelled=broken)
    async_engine.submit(ok)
    async_engine.submit(gone)
    assert c_ok.done.wait(30) and c_gone.done.wait(30)
    assert c_gone.events[-1].finish_reason == "abort" and c_ok.events[-1].finish_reason == "length"
