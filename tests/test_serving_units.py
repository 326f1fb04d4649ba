"""Serving pieces without a server: request parsing, incremental detokenization, engine.json,
and the background engine (one final event per request, cancellation, overload)."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from offramp import EngineConfig
from offramp.engine.detokenizer import IncrementalDetokenizer, first_stop
from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.serving.async_engine import AsyncEngine
from offramp.serving.events import RequestHandle
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
        ({"params": '{"max_tokens": "five"}'}, "max_tokens: expected an integer"),
        ({"params": '{"max_tokens": "2.5"}'}, "max_tokens: expected an integer"),
        ({"params": '{"temperature": "nan"}'}, "temperature: expected a finite number"),
        ({"params": '{"exit_policy": "softmax", "exit_threshold": 7}'}, "outside softmax's range (0, 1]"),
        ({"params": '{"exit_policy": "classifier", "exit_threshold": 0}'}, "outside classifier's range (0, 1]"),
        ({"params": '{"exit_policy": "similarity", "exit_threshold": -1.5}'}, "outside similarity's range [-1, 1]"),
        ({"params": '{"exit_threshold": 7}'}, "outside every policy's range [-1, 1]"),
        ({"params": '{"max_tokens": 8, "min_tokens": 4}'}, "min_tokens: only 0 or a value >= max_tokens (8"),
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


def test_numeric_strings_count_as_numbers():
    """genai-perf's vLLM converter sends ``"max_tokens": "256"``; other vLLM deployments accept it."""
    params = {"max_tokens": "256", "top_k": " 3 ", "seed": "1e3", "temperature": "0.5", "top_p": ".9"}
    p = _parse(params=json.dumps(params)).params
    assert (p.max_tokens, p.top_k, p.seed, p.temperature, p.top_p) == (256, 3, 1000, 0.5, 0.9)
    assert isinstance(p.max_tokens, int) and isinstance(p.temperature, float)


def test_min_tokens_as_far_as_ignore_eos_reaches():
    """genai-perf's --output-tokens-mean-deterministic sends min_tokens == max_tokens (as strings)."""
    assert _parse(params='{"max_tokens": "16", "min_tokens": "16"}').params.ignore_eos
    assert not _parse(params='{"max_tokens": 16, "min_tokens": 0}').params.ignore_eos


def test_exit_threshold_range_follows_the_policy():
    ok = [("similarity", -1), ("similarity", 0.5), ("softmax", 1), ("classifier", "0.7"), ("none", 7)]
    for policy, threshold in ok:
        _parse(params=json.dumps({"exit_policy": policy, "exit_threshold": threshold}))
    body = json.dumps({"exit_threshold": -0.5})  # no policy named: the server's default decides
    assert parse_request(np.array([b"hi"], dtype=object), sampling_parameters=body).params.exit_threshold == -0.5
    with pytest.raises(RequestError, match=r"outside softmax's range \(0, 1\]"):
        parse_request(np.array([b"hi"], dtype=object), sampling_parameters=body, default_exit_policy="softmax")


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
    """A request's ``emit``: its events, an event set at the first one and at the final one."""

    def __init__(self):
        self.events, self.started, self.done = [], threading.Event(), threading.Event()

    def __call__(self, event):
        self.events.append(event)
        self.started.set()
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
    assert c.started.wait(30)
    flag.set()
    assert c.done.wait(30)
    assert c.events[-1].finish_reason == "abort" and sum(e.finished for e in c.events) == 1
    assert c.events[-1].num_output_tokens < 400
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


class _Clock:
    """The drain deadline's clock, moved by the test."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_shutdown_drains_then_aborts_at_the_deadline(tiny_models):
    """Deterministic: the short request finishes during the drain (the clock stands still), the long
    one is held on its stream until then and is aborted once the deadline has passed."""
    a = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4)))
    a.start()
    a._clock = clock = _Clock()
    short, c_short = _handle("s", max_tokens=3)
    long, c_long = _handle("l", max_tokens=400)
    release = threading.Event()

    def hold_after_short(event):  # the engine thread waits here once the short one is done
        c_long(event)
        if c_short.done.is_set() and not event.finished:
            assert release.wait(60)

    long.emit = hold_after_short
    a.submit(long)
    assert c_long.started.wait(30)  # in flight before the shutdown
    a.submit(short)
    stopper = threading.Thread(target=a.shutdown, kwargs={"timeout": 10.0})
    stopper.start()
    assert c_short.done.wait(30) and a._stop.wait(30)
    assert [e.finish_reason for e in c_short.events if e.finished] == ["length"]
    assert not c_long.done.is_set()  # still draining: the deadline has not passed
    with pytest.raises(RequestError, match="shutting down"):
        a.submit(_handle("late")[0])
    clock.now = 11.0  # past the drain deadline
    release.set()
    assert c_long.done.wait(30)
    stopper.join(30)
    assert not stopper.is_alive()
    finals = [e for e in c_long.events if e.finished]
    assert len(finals) == 1 and finals[0].finish_reason == "abort" and finals[0].num_output_tokens < 400
    assert a.engine.pages.num_used_pages == 0


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


def test_ttft_counts_from_submission(tiny_models):
    """A request that waited 100 s before the engine thread took it reports a TTFT of over 100 s."""
    stats = []
    a = AsyncEngine(
        lambda: LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4)), on_stats=stats.append
    )
    a.start()
    try:
        handle, c = _handle("t", max_tokens=3)
        handle.submitted_at -= 100.0
        a.submit(handle)
        assert c.done.wait(30)
    finally:
        a.shutdown(timeout=5)
    ttfts = [t for s in stats for t in s.ttft_s]
    assert len(ttfts) == 1 and 100.0 <= ttfts[0] < 200.0


class _WaitSpy(threading.Event):
    """The loop's stop event: records each wait's timeout and returns at once (no real sleep)."""

    def __init__(self):
        super().__init__()
        self.timeouts = []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        return super().wait(0)


def test_loop_error_while_idle_is_logged_once_and_backs_off(tiny_models, caplog):
    """Session expiry (run while no request is live) fails 7 times in a row: one log record with the
    traceback, one with the count of repeats once it passes, and the waits double up to 1 s."""
    a = AsyncEngine(lambda: LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4)))
    a.start()
    calls, passed = [], threading.Event()

    def expire():
        calls.append(1)
        if len(calls) <= 7:
            raise RuntimeError("session table broke")
        if len(calls) >= 9:  # the 8th pass went through, and closed the account of the error
            passed.set()
        return []

    spy = _WaitSpy()
    with caplog.at_level(logging.ERROR, logger="offramp.engine_loop"):
        a._stop, a.engine.expire_sessions = spy, expire
        try:
            assert passed.wait(30)
        finally:
            a.shutdown(timeout=5)
    assert spy.timeouts[:7] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    records = [r for r in caplog.records if r.name == "offramp.engine_loop"]
    assert [r.exc_info is not None for r in records] == [True, False], [r.getMessage() for r in records]
    assert "session table broke" in records[0].getMessage() and "repeated 6 more time(s)" in records[1].getMessage()


def test_loop_error_fails_every_live_request_once_and_the_loop_goes_on(async_engine, caplog):
    """A step fails with two requests in flight, and aborting one of them fails too: both get one
    final error event (``internal``), and the next request is served."""
    (h1, c1), (h2, c2) = _handle("f1", max_tokens=300), _handle("f2", max_tokens=300)
    async_engine.submit(h1)
    async_engine.submit(h2)
    assert c1.started.wait(30) and c2.started.wait(30)
    engine = async_engine.engine
    step, abort = engine.step, engine.abort

    def failing_step():
        engine.step = step
        raise RuntimeError("step broke")

    def failing_abort(request_id):
        if request_id == "f1":
            raise RuntimeError("abort broke")
        return abort(request_id)

    with caplog.at_level(logging.ERROR, logger="offramp.engine_loop"):
        engine.abort, engine.step = failing_abort, failing_step
        assert c1.done.wait(30) and c2.done.wait(30)
        engine.abort = abort
    for c in (c1, c2):
        finals = [e for e in c.events if e.finished]
        assert len(finals) == 1 and finals[0].error is not None and finals[0].error.code == "internal"
        assert "step broke" in str(finals[0].error)
    assert any("abort broke" in r.getMessage() for r in caplog.records)
    handle, c = _handle("after", max_tokens=4)
    async_engine.submit(handle)
    assert c.done.wait(60) and c.events[-1].error is None and c.events[-1].finish_reason == "length"


class _FakeMetric:
    def __init__(self):
        self.value, self.observed = 0.0, []

    def set(self, value):
        self.value = value

    def increment(self, value):
        self.value += value

    def observe(self, value):
        self.observed.append(value)


class _FakePb:
    """The parts of ``triton_python_backend_utils`` that ``ModelAdapter`` and ``Metrics`` use."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __init__(self):
        self.metrics: dict[str, _FakeMetric] = {}
        metrics = self.metrics

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name, description, kind):
                self.name = name

            def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
                return metrics.setdefault(self.name, _FakeMetric())

        class TritonError:
            INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

            def __init__(self, message, code):
                self.message, self.code = message, code

        self.MetricFamily, self.TritonError = MetricFamily, TritonError

    @staticmethod
    def using_decoupled_model_transaction_policy(model_config):
        return True


def test_adapter_sets_every_gauge_at_load_and_maps_error_codes(tiny_models, tmp_path, monkeypatch):
    from offramp.serving.triton_adapter import OVERRIDES_ENV, ModelAdapter

    monkeypatch.delenv(OVERRIDES_ENV, raising=False)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "engine.json").write_text(json.dumps({"model": str(tiny_models["llama"]), "page_size": 4}))
    pb = _FakePb()
    args = {"model_config": "{}", "model_name": "offramp", "model_repository": str(tmp_path), "model_version": "1"}
    adapter = ModelAdapter(pb, args, watch_parent=False)  # this process is not a stub
    try:
        free = adapter.engine.engine.pages.num_free_pages
        assert free > 0 and pb.metrics["offramp_kv_pages_free"].value == free  # before any request
        assert pb.metrics["offramp_kv_pages_used"].value == 0
        codes = {
            code: adapter.error(RequestError("x", code=code)).code for code in ("invalid", "unavailable", "internal")
        }
        assert codes == {"invalid": "INVALID_ARG", "unavailable": "UNAVAILABLE", "internal": "INTERNAL"}
    finally:
        adapter.stop()


def test_serve_picks_the_fast_format_for_the_default_model_only(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from offramp.model import fused
    from offramp.serving.serve import FALLBACK_FORMAT, FAST_FORMAT, fast_format

    monkeypatch.setattr(fused, "int4_product_available", lambda: True)

    repo = Path(__file__).resolve().parents[1] / "model_repository"  # its engine.json names the default model
    assert fast_format(repo, {}) == FAST_FORMAT == {"dtype": "bfloat16", "weights": "int4"}
    assert "int4 weights" in capsys.readouterr().err  # says so, and how to get float32
    assert fast_format(repo, {"model": "default", "kv_budget_bytes": 1 << 20}) == FAST_FORMAT
    for chosen in ({"dtype": "float32"}, {"weights": "none"}, {"backend": "onnxruntime"}, {"device": "cuda"}):
        assert fast_format(repo, chosen) == {}, chosen  # the command line chose: it is kept
    assert fast_format(repo, {"model": str(tmp_path)}) == {}  # another model: its own format
    other = tmp_path / "repo" / "offramp" / "1"
    other.mkdir(parents=True)
    (other / "engine.json").write_text(json.dumps({"model": "/models/mine"}))
    assert fast_format(tmp_path / "repo", {}) == {}
    # The format it picks is one the engine accepts.
    EngineConfig(**FAST_FORMAT)
    # where the extension's int4 product does not run, bfloat16 weights (torch's int4 kernel can be slower)
    monkeypatch.setattr(fused, "int4_product_available", lambda: False)
    assert fast_format(repo, {}) == FALLBACK_FORMAT
    assert "bfloat16 weights" in capsys.readouterr().err
    EngineConfig(**FALLBACK_FORMAT)
