"""The OpenAI gateway without a server: request translation, responses, streaming, errors and
cancellation, against a fake Triton backend (the real path: tests/test_openai_integration.py)."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path

import grpc
import pytest
from fastapi.testclient import TestClient

from offramp_gateway.app import ClientGone, _events, create_app, until_disconnect
from offramp_gateway.errors import OpenAIError
from offramp_gateway.prompts import PromptRenderer, render_with
from offramp_gateway.protocol import GenerationRequest
from offramp_gateway.responses import ResponseBuilder
from offramp_gateway.triton import Delta, TritonStream, build_inputs, model_error

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Name three colors."}]


class FakeStream:
    """What ``TritonBackend.generate`` returns: deltas (or an exception) and a ``cancel``."""

    def __init__(self, items: list) -> None:
        self.items = list(items)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeBackend:
    def __init__(self, items: list | None = None) -> None:
        self.items = items
        self.calls: list[tuple[str, dict, bool]] = []
        self.streams: list[FakeStream] = []
        self.is_ready = True

    def generate(self, text: str, sampling: dict, stream: bool) -> FakeStream:
        self.calls.append((text, sampling, stream))
        items = self.items
        if items is None:  # one final response, or three streamed tokens
            items = [Delta("A B C", [3, 30, 30], "stop", 7, 3, True)]
            if stream:
                items = [Delta("A", [3], "", 7, 1), Delta(" B", [30], "", 7, 2), Delta(" C", [30], "stop", 7, 3, True)]
        self.streams.append(FakeStream(items))
        return self.streams[-1]

    async def ready(self) -> bool:
        return self.is_ready

    async def close(self) -> None:
        pass


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


def make_client(backend: FakeBackend, model: str | None = "default") -> TestClient:
    renderer = PromptRenderer(model, loader=lambda _m: render_with(FakeTokenizer()))
    return TestClient(create_app(backend, renderer, ["offramp"]))


def sse_events(text: str) -> list:
    datas = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


# -- translation ---------------------------------------------------------------------------------
def test_chat_request_becomes_the_models_tensors():
    backend = FakeBackend()
    body = {
        "model": "offramp",
        "messages": USER,
        "max_completion_tokens": 12,
        "max_tokens": 99,  # the older name loses to max_completion_tokens
        "temperature": 0,
        "top_p": 0.5,
        "seed": 3,
        "stop": "\n",
        "n": 1,
        "user": "ignored",
        "presence_penalty": 0,
        "exit_policy": "softmax",  # Offramp's extras pass through
        "exit_threshold": 0.9,
        "mode": "later",
    }
    reply = make_client(backend).post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    text, sampling, stream = backend.calls[0]
    assert text == USER[0]["content"] and stream is False  # one user message goes as it is
    assert sampling == {
        "max_tokens": 12,
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": 3,
        "stop": ["\n"],
        "exit_policy": "softmax",
        "exit_threshold": 0.9,
        "mode": "later",
    }
    out = reply.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "offramp"
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "A B C"} and choice["finish_reason"] == "stop"
    assert choice["offramp"] == {"exit_layers": [3, 30, 30]}
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_a_history_is_rendered_with_the_models_chat_template():
    backend = FakeBackend()
    messages = [{"role": "developer", "content": "Be brief."}, *USER, {"role": "assistant", "content": "Red."}]
    messages.append({"role": "user", "content": [{"type": "text", "text": "More"}, {"type": "text", "text": "?"}]})
    reply = make_client(backend).post("/v1/chat/completions", json={"model": "offramp", "messages": messages})
    assert reply.status_code == 200, reply.text
    assert backend.calls[0][0] == (
        "<|system|>Be brief.<|user|>Name three colors.<|assistant|>Red.<|user|>More?<|assistant|>"
    )
    assert backend.calls[0][1] == {}  # nothing asked for: the server's defaults


def test_a_history_needs_the_model_to_render_it():
    backend = FakeBackend()
    body = {"model": "offramp", "messages": [{"role": "system", "content": "x"}, *USER]}
    reply = make_client(backend, model=None).post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and "without --model" in reply.json()["error"]["message"]
    assert not backend.calls


def test_completion_with_echo():
    backend = FakeBackend()
    reply = make_client(backend).post("/v1/completions", json={"model": "offramp", "prompt": ["Hi"], "echo": True})
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["choices"][0]["text"] == "HiA B C" and backend.calls[0][0] == "Hi"


def test_streamed_chat_chunks_and_usage():
    backend = FakeBackend()
    body = {"model": "offramp", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    reply = make_client(backend).post("/v1/chat/completions", json=body)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]" and backend.calls[0][2] is True
    chunks, last = events[:-2], events[-2]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["A", " B", " C"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert [c["choices"][0]["offramp"]["exit_layers"] for c in chunks] == [[3], [30], [30]]
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in chunks)
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert len({c["id"] for c in events[:-1]}) == 1


def test_streamed_completion_without_usage():
    backend = FakeBackend()
    reply = make_client(backend).post("/v1/completions", json={"model": "offramp", "prompt": "Hi", "stream": True})
    events = sse_events(reply.text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["A", " B", " C"]
    assert all("usage" not in e for e in events[:-1]) and events[-1] == "[DONE]"


def test_models_health_and_unknown_routes():
    backend = FakeBackend()
    client = make_client(backend)
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["offramp"]
    assert client.get("/v1/models/offramp").json()["id"] == "offramp"
    assert client.get("/v1/models/gpt-4").status_code == 404
    assert client.get("/health").status_code == 200
    backend.is_ready = False
    assert client.get("/health").status_code == 503
    missing = client.post("/v1/embeddings", json={})
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


# -- errors --------------------------------------------------------------------------------------
BAD = [
    ("chat", {"model": "offramp"}, "messages", "messages: is required"),
    ("chat", {"model": "offramp", "messages": []}, "messages", "non-empty list"),
    ("chat", {"model": "offramp", "messages": USER, "n": 2}, "n", "only n=1 is supported"),
    ("chat", {"model": "offramp", "messages": USER, "max_tokens": -1}, "max_tokens", "positive integer"),
    ("chat", {"model": "offramp", "messages": USER, "max_completion_tokens": 0}, "max_completion_tokens", "positive"),
    ("chat", {"model": "gpt-4", "messages": USER}, "model", "'gpt-4' does not exist"),
    ("chat", {"messages": USER}, "model", "model: is required"),
    ("chat", {"model": "offramp", "messages": USER, "temperature": 3}, "temperature", "[0, 2]"),
    ("chat", {"model": "offramp", "messages": USER, "top_p": 0}, "top_p", "(0, 1]"),
    ("chat", {"model": "offramp", "messages": USER, "seed": 1.5}, "seed", "integer"),
    ("chat", {"model": "offramp", "messages": USER, "stop": [""]}, "stop", "non-empty strings"),
    ("chat", {"model": "offramp", "messages": USER, "stream": "yes"}, "stream", "true or false"),
    ("chat", {"model": "offramp", "messages": USER, "logprobs": True}, "logprobs", "not supported"),
    ("chat", {"model": "offramp", "messages": USER, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ("chat", {"model": "offramp", "messages": USER, "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ("chat", {"model": "offramp", "messages": USER, "response_format": {"type": "json_object"}}, "response_format", ""),
    ("chat", {"model": "offramp", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "one of"),
    ("chat", {"model": "offramp", "messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
    (
        "chat",
        {"model": "offramp", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
        "only text parts",
    ),
    ("completion", {"model": "offramp"}, "prompt", "prompt: is required"),
    ("completion", {"model": "offramp", "prompt": [1, 2]}, "prompt", "token-id prompts"),
    ("completion", {"model": "offramp", "prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ("completion", {"model": "offramp", "prompt": "x", "best_of": 2}, "best_of", "not supported"),
    ("completion", {"model": "offramp", "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
]


@pytest.mark.parametrize(("kind", "body", "param", "message"), BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_in_openais_shape(kind, body, param, message):
    backend = FakeBackend()
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    reply = make_client(backend).post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"]
    assert not backend.calls  # refused before Triton


@pytest.mark.parametrize("raw", [b'{"model": "offramp", "messages":', b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_a_400(raw):
    reply = make_client(FakeBackend()).post("/v1/chat/completions", content=raw)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


TRITON_ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, "sampling_parameters.exit_threshold: 7 is outside", 400, "exit_threshold"),
    (grpc.StatusCode.INVALID_ARGUMENT, "prompt: 9000 tokens leave no room in the context", 400, "prompt"),
    (grpc.StatusCode.UNAVAILABLE, "server busy: 8 requests in flight; retry later", 503, None),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", 503, None),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", 504, None),
    (grpc.StatusCode.INTERNAL, "the stub crashed", 500, None),
]


@pytest.mark.parametrize(("code", "details", "status", "param"), TRITON_ERRORS)
@pytest.mark.parametrize("stream", [False, True])
def test_triton_errors_keep_their_status(code, details, status, param, stream):
    backend = FakeBackend([model_error(_rpc_error(code, details))])
    body = {"model": "offramp", "messages": USER, "stream": stream}
    reply = make_client(backend).post("/v1/chat/completions", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and details in error["message"]
    if status == 503:
        assert "retry" in error["message"]


def test_an_error_after_the_first_chunk_is_an_error_event():
    failure = model_error(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    backend = FakeBackend([Delta("A", [30], "", 7, 1), failure])
    reply = make_client(backend).post("/v1/completions", json={"model": "offramp", "prompt": "x", "stream": True})
    events = sse_events(reply.text)
    assert events[0]["choices"][0]["text"] == "A" and events[-1]["error"]["type"] == "timeout_error"
    assert backend.streams[0].cancelled


# -- cancellation --------------------------------------------------------------------------------
def test_closing_a_stream_cancels_the_triton_request():
    stream = FakeStream([Delta(" B", [30], "", 7, 2), Delta(" C", [30], "stop", 7, 3, True)])
    req = GenerationRequest("completion", "offramp", prompt="x", stream=True)
    events = _events(req, stream, ResponseBuilder("completion", "offramp"), Delta("A", [30], "", 7, 1))

    async def read_one_then_close():
        first = await events.__anext__()
        await events.aclose()  # what Starlette does when the client goes away
        return first

    assert b'"text":"A"' in asyncio.run(read_one_then_close())
    assert stream.cancelled


def test_a_dropped_connection_while_waiting_is_noticed():
    class Gone:
        async def receive(self):
            return {"type": "http.disconnect"}

    async def never():
        await asyncio.sleep(60)

    async def run():
        with pytest.raises(ClientGone):
            await asyncio.wait_for(until_disconnect(Gone(), never()), 5)

    asyncio.run(run())


class FakeCall:
    """A ``tritonclient.grpc.aio`` stream call: (result, error) pairs, or an exception."""

    def __init__(self, items: list) -> None:
        self.items = items
        self.cancelled = False

    async def __anext__(self):
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item, None

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeResult:
    def __init__(self, text: bytes, finish: bytes, final: bool) -> None:
        import numpy as np

        self.arrays = {
            "text_output": np.array([text], dtype=object),
            "finish_reason": np.array([finish], dtype=object),
            "num_input_tokens": np.array([5], dtype=np.int32),
            "num_output_tokens": np.array([1], dtype=np.int32),
            "exit_layers": np.array([12], dtype=np.int32),
        }
        self.final = final

    def as_numpy(self, name):
        return self.arrays.get(name)

    def get_response(self):
        from tritonclient.grpc import service_pb2

        response = service_pb2.ModelInferResponse()
        response.parameters["triton_final_response"].bool_param = self.final
        return response


class FakeClient:
    def __init__(self, call: FakeCall) -> None:
        self.call = call
        self.headers = None

    def stream_infer(self, requests, stream_timeout=None, headers=None):
        self.headers = headers
        return self.call


def test_triton_stream_reads_until_the_final_response_and_cancels_otherwise():
    async def run(items):
        call = FakeCall(items)
        client = FakeClient(call)
        stream = TritonStream(client, "offramp", build_inputs("hi", {"max_tokens": 2}, True), 10)
        got = []
        try:
            async for delta in stream:
                got.append(delta)
        except OpenAIError as exc:
            got.append(exc)
        stream.cancel()
        assert client.headers == {"triton_grpc_error": "true"}
        return got, call.cancelled

    deltas, cancelled = asyncio.run(run([FakeResult(b"A", b"", False), FakeResult("é".encode(), b"length", True)]))
    assert [(d.text, d.finish_reason, d.final, d.exit_layers) for d in deltas] == [
        ("A", "", False, [12]),
        ("é", "length", True, [12]),
    ]
    assert not cancelled  # complete: nothing to cancel
    got, cancelled = asyncio.run(run([FakeResult(b"A", b"", False), _rpc_error(grpc.StatusCode.UNAVAILABLE, "x")]))
    assert isinstance(got[-1], OpenAIError) and got[-1].status == 503


def test_inputs_follow_the_vllm_backend_names():
    inputs = build_inputs("hi", {"max_tokens": 3}, False)
    assert [i.name() for i in inputs] == ["text_input", "stream", "sampling_parameters", "exclude_input_in_output"]


# -- layering ------------------------------------------------------------------------------------
def _imports(folder: Path) -> dict[str, set[str]]:
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_engine_never_imports_the_gateway_or_a_web_framework():
    web = ("fastapi", "starlette", "uvicorn", "offramp_gateway")
    for path, names in _imports(ROOT / "backend/offramp").items():
        assert not [n for n in names if n.split(".")[0] in web], path


def test_the_gateway_uses_only_offramps_model_loader():
    for path, names in _imports(ROOT / "gateway/offramp_gateway").items():
        offramp = {n for n in names if n.split(".")[0] == "offramp"}
        assert offramp <= {"offramp.model.loader"}, (path, offramp)
