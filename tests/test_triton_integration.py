"""Against a real tritonserver started by the fixture (readiness polled): HTTP generate, gRPC
streaming, batching, cancellation, bad input, overload, metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from offramp import EngineConfig, SamplingParams
from offramp_client import OfframpClient

pytestmark = [pytest.mark.integration, pytest.mark.default_model]
REPO = Path(__file__).resolve().parents[1]
PROMPT = "Name three primary colors."


@dataclass
class Server:
    http: int
    grpc: int
    metrics: int
    log: Path

    def post(self, endpoint: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/v2/models/offramp/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        values = [float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
        return sum(values)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def serve(log: Path, model: Path, *extra: str):
    """Start ``offramp serve`` (tritonserver) on free ports, wait until ready, yield, stop it."""
    http, grpc, metrics = _free_ports(3)
    cmd = [sys.executable, "-m", "offramp.cli.main", "serve", "--model", str(model)]
    cmd += ["--model-repository", str(REPO / "model_repository"), "--http-port", str(http)]
    cmd += ["--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(http, grpc, metrics, log)
    deadline = time.monotonic() + 300
    while not srv.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tritonserver did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    yield srv
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_checkpoint):
    log = tmp_path_factory.mktemp("triton") / "server.log"
    yield from serve(log, default_checkpoint, "--max-queued-requests", "24", "--kv-budget-mb", "256")


@pytest.fixture(scope="module")
def offline(default_checkpoint):
    from offramp.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(default_checkpoint)))
    return engine.generate([PROMPT], SamplingParams(max_tokens=32))[0]


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


def test_sixteen_concurrent_requests_are_batched(server):
    before = server.metric("offramp_batch_size_count") - server.metric('offramp_batch_size_bucket{le="1"}')
    results: list = [None] * 16

    def one(i: int) -> None:
        results[i] = server.post(
            "generate",
            {
                "text_input": f"Count from {i} to {i + 20}.",
                "sampling_parameters": '{"max_tokens": 24, "ignore_eos": true}',
            },
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 200 and body["num_output_tokens"] == 24 for status, body in results)
    batched_steps = server.metric("offramp_batch_size_count") - server.metric('offramp_batch_size_bucket{le="1"}')
    assert batched_steps > before, "no engine iteration ran more than one sequence"
    assert server.metric("offramp_kv_pages_used") == 0


def test_cancelled_stream_frees_its_pages(server):
    client = OfframpClient(f"127.0.0.1:{server.grpc}", "grpc")
    stream = client.stream("Write a very long story about a dragon.", max_tokens=400, ignore_eos=True)
    for _, chunk in zip(range(3), stream):
        assert chunk.text is not None
    assert server.metric("offramp_kv_pages_used") > 0
    stream.close()  # closes the gRPC stream with cancel_requests=True
    deadline = time.monotonic() + 20
    while server.metric("offramp_kv_pages_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("offramp_kv_pages_used") == 0
    assert server.metric("offramp_running_sequences") == 0


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


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_a_400_that_names_the_problem(server, body, message):
    status, reply = server.post("generate", body)
    assert status == 400, reply
    assert message in reply.get("error", ""), reply
    assert server.ready()


def test_invalid_utf8_over_grpc(server):
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    errors = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"caf\xe9 \xff"], dtype=np.object_))
    client.async_stream_infer("offramp", [text])
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    client.stop_stream()
    assert errors and "text_input: is not valid UTF-8" in str(errors[0])
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
            finals[str(len(finals))] = f"error: {error}"
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
    assert refused and all("retry" in o for o in refused), outcomes
    assert outcomes.count("ok") >= 24
    assert server.ready() and server.metric("offramp_kv_pages_used") == 0


def test_client_cli_streams_and_cancels(server):
    from offramp_client.cli import main

    url = f"127.0.0.1:{server.grpc}"
    assert main(["--url", url, "--protocol", "grpc", "stream", PROMPT, "--max-tokens", "8", "--json"]) == 0
    assert (
        main(
            [
                "--url",
                url,
                "--protocol",
                "grpc",
                "stream",
                "Tell me a long story.",
                "--max-tokens",
                "300",
                "--cancel-after",
                "2",
                "--json",
            ]
        )
        == 0
    )
    deadline = time.monotonic() + 20
    while server.metric("offramp_kv_pages_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("offramp_kv_pages_used") == 0
    assert main(["--url", "127.0.0.1:1", "generate", "hi"]) == 1  # nothing listening: one error line


def test_closed_http_stream_is_cancelled(server):
    stream = OfframpClient(f"127.0.0.1:{server.http}", "http").stream(
        "Write a very long story about a dragon.", max_tokens=400, ignore_eos=True
    )
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 20
    while server.metric("offramp_kv_pages_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("offramp_kv_pages_used") == 0
