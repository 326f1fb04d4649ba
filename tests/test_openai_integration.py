"""The OpenAI gateway against a real server: ``offramp serve --openai-port`` started by the fixture
(readiness polled), used through the official ``openai`` client: the same greedy text and token
counts as Triton's ``generate``, streaming, bad input, and a closed stream freeing its KV pages."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from live_server import Server, serve

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.integration, pytest.mark.default_model]
PROMPT = "Name three primary colors."
LONG = "Write a very long story about a dragon."


@dataclass
class Gateway:
    """The live server (``live_server.Server``) seen through its OpenAI gateway."""

    srv: Server

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.srv.openai_port}/v1"

    def client(self):
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)

    def post(self, url: str, data: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def generate(self, body: dict) -> dict:
        status, reply = self.srv.post("generate", body)
        assert status == 200, reply
        return reply

    def healthy(self) -> bool:
        return self.srv.ready()

    def metric(self, name: str) -> float:
        return self.srv.metric(name, model="offramp")

    def wait_for_metric(self, name: str, value: float, timeout: float = 60.0) -> float:
        return self.srv.wait_for_metric(name, value, timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_checkpoint):
    log = tmp_path_factory.mktemp("openai") / "server.log"
    with contextlib.contextmanager(serve)(log, default_checkpoint, "--kv-budget-mb", "256", openai=True) as srv:
        yield Gateway(srv)
    with pytest.raises(urllib.error.URLError):  # the gateway stopped with the server
        urllib.request.urlopen(f"http://127.0.0.1:{srv.openai_port}/v1/models", timeout=2)


@pytest.fixture(scope="module")
def reference(server) -> dict:
    """Triton's own answer: greedy (the server default), prompt left out."""
    body = {"text_input": PROMPT, "exclude_input_in_output": True, "sampling_parameters": '{"max_tokens": 32}'}
    return server.generate(body)


def _usage(reference: dict) -> tuple[int, int]:
    return reference["num_input_tokens"], reference["num_output_tokens"]


def test_chat_completion_matches_triton_generate(server, reference):
    reply = server.client().chat.completions.create(
        model="offramp", messages=[{"role": "user", "content": PROMPT}], max_tokens=32, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.content == reference["text_output"]
    assert choice.finish_reason == reference["finish_reason"]
    assert choice.model_extra["offramp"]["exit_layers"] == reference["exit_layers"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == _usage(reference)


def test_completion_matches_triton_generate(server, reference):
    reply = server.client().completions.create(model="offramp", prompt=PROMPT, max_tokens=32, temperature=0)
    assert reply.choices[0].text == reference["text_output"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == _usage(reference)


def test_streamed_chat_matches_triton_generate(server, reference):
    stream = server.client().chat.completions.create(
        model="offramp",
        messages=[{"role": "user", "content": PROMPT}],
        max_completion_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c for c in chunks if c.choices]
    assert len(pieces) > 3  # one chunk per token (or small group), not one at the end
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == reference["text_output"]
    assert [d for c in pieces for d in c.choices[0].model_extra["offramp"]["exit_layers"]] == reference["exit_layers"]
    assert pieces[-1].choices[0].finish_reason == reference["finish_reason"]
    assert not chunks[-1].choices and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == _usage(
        reference
    )


def test_streamed_completion_matches_triton_generate(server, reference):
    stream = server.client().completions.create(model="offramp", prompt=PROMPT, max_tokens=32, stream=True)
    assert "".join(c.choices[0].text for c in stream) == reference["text_output"]


def test_a_history_goes_through_the_chat_template(server):
    """A system message and earlier turns: rendered by the gateway with the model's own template,
    which the model then tokenizes as it is (the same text sent to generate gives the same answer)."""
    from offramp.model.loader import load_tokenizer, resolve_model

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": PROMPT},
    ]
    tokenizer = load_tokenizer(resolve_model("default"))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    body = {"text_input": text, "exclude_input_in_output": True, "sampling_parameters": '{"max_tokens": 16}'}
    expected = server.generate(body)
    reply = server.client().chat.completions.create(model="offramp", messages=messages, max_tokens=16)
    assert reply.choices[0].message.content == expected["text_output"]
    assert reply.usage.prompt_tokens == expected["num_input_tokens"]


BAD = [
    ({"model": "offramp", "messages": openai.omit}, "messages"),  # omitted: the client checks it otherwise
    ({"model": "offramp", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "offramp", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "offramp", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
    (
        {
            "model": "offramp",
            "messages": [{"role": "user", "content": "hi"}],
            "extra_body": {"exit_policy": "softmax", "exit_threshold": 7},  # Offramp's extras
        },
        "exit_threshold",
    ),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_in_openais_shape(server, body, param):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert server.healthy()


def test_malformed_json_is_a_400(server):
    status, reply = server.post(f"{server.base_url}/chat/completions", b'{"model": "offramp", "messages": [')
    assert status == 400 and reply["error"]["code"] == "invalid_json"
    assert server.healthy()


def test_numeric_strings_in_sampling_parameters(server):
    """genai-perf's vLLM converter sends "max_tokens": "8"; Triton's own generate accepts it now."""
    body = {"text_input": PROMPT, "sampling_parameters": '{"max_tokens": "8", "ignore_eos": true}'}
    assert server.generate(body)["num_output_tokens"] == 8


def test_closing_a_stream_cancels_it_and_frees_its_kv_pages(server):
    assert server.wait_for_metric("offramp_kv_pages_used", 0.0) == 0.0
    before = server.metric("offramp_generated_tokens_total")
    stream = server.client().completions.create(
        model="offramp", prompt=LONG, max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    for _, chunk in zip(range(3), stream):
        assert chunk.choices[0].text is not None
    assert server.metric("offramp_kv_pages_used") > 0
    stream.close()  # the gateway cancels the Triton request; the engine frees its pages
    assert server.wait_for_metric("offramp_kv_pages_used", 0.0) == 0.0
    generated = server.metric("offramp_generated_tokens_total") - before
    assert generated < 100, f"{generated} of 400 tokens (ignore_eos): the request was not cancelled"
    assert server.metric("offramp_running_sequences") == 0
    assert server.healthy()
