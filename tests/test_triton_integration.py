"""Against a real tritonserver started by the fixture (readiness polled): HTTP generate, gRPC
streaming, batching, cancellation, bad input over HTTP and gRPC, overload, metrics."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from live_server import metric_value, serve
from offramp import EngineConfig, SamplingParams
from offramp_client import OfframpClient

pytestmark = [pytest.mark.integration, pytest.mark.default_model]
PROMPT = "Name three primary colors."
LONG = "Write a very long story about a dragon."
GAUGES = (
    "offramp_running_sequences",
    "offramp_waiting_sequences",
    "offramp_kv_pages_used",
    "offramp_kv_pages_free",
    "offramp_sessions",
    "offramp_session_kv_pages",
    "offramp_prefix_shared_kv_pages",
)
COUNTERS = ("offramp_generated_tokens_total", "offramp_preemptions_total", "offramp_session_evictions_total")
HISTOGRAMS = (
    "offramp_exit_layer",
    "offramp_batch_size",
    "offramp_time_to_first_token_seconds",
    "offramp_time_per_output_token_seconds",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_checkpoint):
    log = tmp_path_factory.mktemp("triton") / "server.log"
    yield from serve(log, default_checkpoint, "--max-queued-requests", "24", "--kv-budget-mb", "256")


@pytest.fixture(scope="module")
def offline(default_checkpoint):
    from offramp.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(default_checkpoint)))
    return engine.generate([PROMPT], SamplingParams(max_tokens=32))[0]


def test_every_metric_is_set_at_load(server):
    """Before any request: each model's gauges hold the engine's state (its free KV pages, not 0),
    and its counters and histograms exist at 0."""
    initial = server.initial_metrics
    for model in ("offramp", "offramp_chat"):
        for name in GAUGES + COUNTERS:
            metric_value(initial, name, model=model)  # raises KeyError when missing
        for name in HISTOGRAMS:
            assert metric_value(initial, f"{name}_count", model=model) == 0
        assert metric_value(initial, "offramp_kv_pages_used", model=model) == 0
        free = metric_value(initial, "offramp_kv_pages_free", model=model)
        assert free > 0, f"{model}: offramp_kv_pages_free reads {free} before the first request"
        assert free == server.metric("offramp_kv_pages_free", model) + server.metric("offramp_kv_pages_used", model)


def test_http_generate_matches_offline(server, offline):
    status, body = server.post(
        "generate",
        {"text_input": PROMPT, "exclude_input_in_output": True, "sampling_parameters": json.dumps({"max_tokens": 32})},
    )
    assert status == 200, body
    assert body["text_output"] == offline.text
    assert body["num_output_tokens"] == len(offline.token_ids)
    assert body["finish_reason"] == offline.finish_reason
    assert body["exit_layers"] == offline.exit_layers


def test_generate_includes_the_prompt_unless_excluded(server, offline):
    status, body = server.post("generate", {"text_input": PROMPT, "sampling_parameters": '{"max_tokens": 32}'})
    assert status == 200 and body["text_output"] == PROMPT + offline.text


def test_grpc_stream_matches_offline(server, offline):
    chunks = list(OfframpClient(f"127.0.0.1:{server.grpc}", "grpc").stream(PROMPT, max_tokens=32))
    assert len(chunks) > 3  # one response per token (or small group), not one at the end
    assert "".join(c.text for c in chunks) == offline.text
    assert [d for c in chunks for d in c.exit_layers] == offline.exit_layers
    assert chunks[-1].finish_reason == offline.finish_reason and all(not c.finish_reason for c in chunks[:-1])


def test_http_stream_matches_offline(server, offline):
    chunks = list(OfframpClient(f"127.0.0.1:{server.http}", "http").stream(PROMPT, max_tokens=32))
    assert "".join(c.text for c in chunks) == offline.text


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_lossless_stream_returns_the_plain_text(server, offline, protocol):
    """A generate_stream request with "mode": "lossless" (prompt-lookup drafts verified by the full model)
    streams the text a plain request gets."""
    port = server.http if protocol == "http" else server.grpc
    drafted = server.metric("offramp_spec_draft_tokens_total")
    chunks = list(
        OfframpClient(f"127.0.0.1:{port}", protocol).stream(PROMPT, max_tokens=32, mode="lossless", spec="ngram")
    )
    assert "".join(c.text for c in chunks) == offline.text
    assert chunks[-1].finish_reason == offline.finish_reason
    deadline = time.monotonic() + 10  # metrics are updated just after the final response is sent
    while server.metric("offramp_spec_draft_tokens_total") <= drafted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("offramp_spec_draft_tokens_total") > drafted  # the answer repeats its prompt: drafts ran


def _batched_steps(server) -> float:
    """Engine iterations that gave a token to more than one sequence (histogram count minus le=1)."""
    return server.metric("offramp_batch_size_count") - server.metric("offramp_batch_size_bucket", le=1)


def test_sixteen_concurrent_requests_are_batched(server):
    before = _batched_steps(server)
    results: list = [None] * 16

    def one(i: int) -> None:
        results[i] = server.post(
            "generate",
            {
                "text_input": f"Count from {i} to {i + 20}.",
                "sampling_parameters": '{"max_tokens": 24, "ignore_eos": true}',
            },
        )

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not [t for t in threads if t.is_alive()], "a request did not finish within 300 s"
    assert all(r is not None and r[0] == 200 and r[1]["num_output_tokens"] == 24 for r in results), results
    assert _batched_steps(server) > before, "no engine iteration ran more than one sequence"
    assert server.metric("offramp_kv_pages_used") == 0


def _assert_cancelled(server, before: float, max_tokens: int) -> None:
    """Once the pages are back, the request produced far fewer tokens than it asked for (it would
    have run to ``max_tokens``: ``ignore_eos``), which only cancellation explains."""
    assert server.wait_for_metric("offramp_kv_pages_used", 0) == 0
    generated = server.metric("offramp_generated_tokens_total") - before
    assert generated < max_tokens // 4, f"{generated} of {max_tokens} tokens: the request was not cancelled"
    assert server.metric("offramp_running_sequences") == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_stream_is_cancelled(server, protocol):
    assert server.wait_for_metric("offramp_kv_pages_used", 0) == 0
    before = server.metric("offramp_generated_tokens_total")
    port = server.grpc if protocol == "grpc" else server.http
    stream = OfframpClient(f"127.0.0.1:{port}", protocol).stream(LONG, max_tokens=400, ignore_eos=True)
    for _, chunk in zip(range(3), stream):
        assert chunk.text is not None
    assert server.metric("offramp_kv_pages_used") > 0
    stream.close()  # gRPC: stop_stream(cancel_requests=True); HTTP: the connection closes
    _assert_cancelled(server, before, 400)


BAD = [
    ({"text_input": "", "sampling_parameters": "{}"}, "text_input: is empty"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 0}'}, "max_tokens: must be positive"),
    ({"text_input": "hi", "sampling_parameters": '{"max_tokens": 100000}'}, "max_tokens: 100000 exceeds"),
    ({"text_input": "hi", "sampling_parameters": "{not json"}, "sampling_parameters: is not valid JSON"),
    ({"text_input": "hi", "sampling_parameters": '{"temperature": "hot"}'}, "temperature: expected a finite number"),
    ({"text_input": "hi", "sampling_parameters": '{"beam_width": 4}'}, "unknown key(s) ['beam_width']"),
    ({"text_input": "hi", "sampling_parameters": '{"temperature": -1}'}, "temperature: must be a finite number >= 0"),
    ({"text_input": "hi", "sampling_parameters": '{"top_p": 0}'}, "top_p: must be in (0, 1]"),
    ({"text_input": "hi", "sampling_parameters": '{"top_p": 1.5}'}, "top_p: must be in (0, 1]"),
    ({"text_input": "hi", "sampling_parameters": '{"exit_policy": "fast"}'}, "exit_policy: 'fast' is not one of"),
    ({"text_input": "hi", "sampling_parameters": "[1, 2]"}, "sampling_parameters: must be a JSON object"),
    ({"text_input": "word " * 20000, "sampling_parameters": "{}"}, "exceed the limit"),
    ({"text_input": "word " * 9000, "sampling_parameters": "{}"}, "leave no room in the context"),
    ({"sampling_parameters": "{}"}, "text_input"),
]
BAD_IDS = [m[:30] for _, m in BAD]


@pytest.mark.parametrize(("body", "message"), BAD, ids=BAD_IDS)
def test_bad_input_over_http_is_a_400_that_names_the_problem(server, body, message):
    status, reply = server.post("generate", body)
    assert status == 400, reply  # INVALID_ARG
    assert message in reply.get("error", ""), reply
    assert server.ready()


def _grpc_first(server, inputs: dict[str, bytes]):
    """Send one request on a gRPC stream; (the first result, the first error) that comes back."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        tensors = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
            tensors.append(tensor)
        client.async_stream_infer("offramp", tensors, enable_empty_final_response=True)
        return answers.get(timeout=120)
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize(("body", "message"), BAD, ids=BAD_IDS)
def test_bad_input_over_grpc_is_an_error_that_names_the_problem(server, body, message):
    """The same table over gRPC. A gRPC stream carries an error's message but not its code (the
    stream's response has no status field), so the code is checked over HTTP only."""
    result, error = _grpc_first(server, {k: v.encode() for k, v in body.items()})
    assert result is None and error is not None, "a bad request got a response instead of an error"
    assert message in str(error), str(error)
    assert server.ready()


def test_invalid_utf8_over_grpc(server):
    result, error = _grpc_first(server, {"text_input": b"caf\xe9 \xff"})
    assert result is None and error is not None and "text_input: is not valid UTF-8" in str(error)
    assert server.ready()


def test_overload_is_unavailable_not_a_hang(server):
    """40 requests at once on one gRPC stream against a 24-request limit: the excess is refused with
    UNAVAILABLE at once, the rest complete, and every request gets exactly one final response."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    finals: dict[str, str] = {}
    done = threading.Event()

    def on_result(result, error):
        if error is not None:
            finals[f"error-{len(finals)}"] = f"error: {error}"
        elif result.get_response().parameters["triton_final_response"].bool_param:
            finals[result.get_response().id] = "ok"
        if len(finals) == 40:
            done.set()

    client.start_stream(callback=on_result)
    for i in range(40):
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"Tell me a long story."], dtype=np.object_))
        params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([b'{"max_tokens": 48, "ignore_eos": true}'], dtype=np.object_))
        client.async_stream_infer("offramp", [text, params], request_id=f"r{i}", enable_empty_final_response=True)
    assert done.wait(300), f"only {len(finals)} of 40 requests finished"
    client.stop_stream()
    outcomes = list(finals.values())
    refused = [o for o in outcomes if o.startswith("error")]
    assert refused and all("server busy" in o and "retry" in o for o in refused), outcomes
    assert outcomes.count("ok") >= 24
    assert server.ready() and server.wait_for_metric("offramp_kv_pages_used", 0) == 0


def test_overload_over_http_is_refused_at_once(server):
    """The same limit over HTTP: the excess gets an error reply at once (Triton's generate endpoint
    answers a response's error with HTTP 400 whatever its code, so UNAVAILABLE is visible only in
    the message), the rest complete."""
    replies: list = [None] * 40
    body = {"text_input": "Tell me a long story.", "sampling_parameters": '{"max_tokens": 32, "ignore_eos": true}'}

    def one(i: int) -> None:
        replies[i] = server.post("generate", body)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not [t for t in threads if t.is_alive()], "a request did not finish within 300 s"
    refused = [r[1].get("error", "") for r in replies if r[0] != 200]
    assert refused and all("server busy" in e and "retry" in e for e in refused), replies
    assert {r[0] for r in replies} == {200, 400} and len(refused) <= 40 - 24
    assert all(r[1]["num_output_tokens"] == 32 for r in replies if r[0] == 200)
    assert server.wait_for_metric("offramp_kv_pages_used", 0) == 0


def test_client_cli_streams_and_cancels(server, capsys):
    from offramp_client.cli import main

    url = f"127.0.0.1:{server.grpc}"
    assert main(["--url", url, "--protocol", "grpc", "stream", PROMPT, "--max-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["finish_reason"] == "length"
    # How long the answer runs uncancelled (the CLI has no ignore_eos): the cancelled one must stop far short.
    status, full = server.post("generate", {"text_input": LONG, "sampling_parameters": '{"max_tokens": 120}'})
    assert status == 200 and full["num_output_tokens"] >= 60, full
    before = server.metric("offramp_generated_tokens_total")
    argv = ["--url", url, "--protocol", "grpc", "stream", LONG, "--max-tokens", "120", "--cancel-after", "2"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["finish_reason"] == "cancelled"
    _assert_cancelled(server, before, full["num_output_tokens"])
    assert main(["--url", "127.0.0.1:1", "generate", "hi"]) == 1  # nothing listening: one error line
