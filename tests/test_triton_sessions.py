"""Multi-turn sessions through a real tritonserver (``offramp_chat``, Triton's sequence batcher):
a conversation equals sending the whole history to the stateless model each turn, END frees its
pages, conversations stay apart, early turns queue, errors leave the conversation working."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid

import numpy as np
import pytest

from live_server import serve
from offramp_client import OfframpClient, OfframpError

pytestmark = [pytest.mark.integration, pytest.mark.default_model]
QUESTIONS = [
    "Name three primary colors.",
    "Which of them is the warmest?",
    "Give me a fruit of that color.",
    "How do I eat it?",
    "Summarize our chat in one sentence.",
]
GREEDY = {"max_tokens": 24, "temperature": 0.0}
CHAT_GAUGES = ("offramp_sessions", "offramp_session_kv_pages", "offramp_kv_pages_used")


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_checkpoint):
    log = tmp_path_factory.mktemp("triton-sessions") / "server.log"
    yield from serve(log, default_checkpoint, "--kv-budget-mb", "128")


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    from offramp.model.loader import load_tokenizer

    return load_tokenizer(default_checkpoint)


def metric(server, name: str) -> float:
    return server.metric(name, model="offramp_chat")


def wait_for_baseline(server, timeout: float = 60.0) -> dict[str, float]:
    """Poll (bounded) until every chat gauge reads 0; the values last read."""
    deadline = time.monotonic() + timeout
    while True:
        values = {name: metric(server, name) for name in CHAT_GAUGES}
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def render(tokenizer, history: list[tuple[str, str]], question: str) -> str:
    messages = []
    for user, reply in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def timed(chunks) -> tuple[float, list]:
    """Time to the first chunk with text, and all chunks."""
    t0, first, out = time.perf_counter(), None, []
    for chunk in chunks:
        if first is None and chunk.text:
            first = time.perf_counter() - t0
        out.append(chunk)
    return first if first is not None else time.perf_counter() - t0, out


def test_five_turns_equal_stateless_history_and_end_frees_the_pages(server, tokenizer):
    url = f"127.0.0.1:{server.grpc}"
    stateless = OfframpClient(url, "grpc", "offramp")
    assert wait_for_baseline(server) == dict.fromkeys(CHAT_GAUGES, 0.0)
    history: list[tuple[str, str]] = []
    rows = []
    with OfframpClient(url, "grpc").chat() as session:
        for turn, question in enumerate(QUESTIONS, 1):
            ttft_s, chunks = timed(session.send(question, **GREEDY))
            prompt = render(tokenizer, history, question)
            ttft_r, ref = timed(stateless.stream(prompt, **GREEDY))
            text, ref_text = "".join(c.text for c in chunks), "".join(c.text for c in ref)
            assert text == ref_text, f"turn {turn}"
            assert chunks[-1].num_input_tokens == ref[-1].num_input_tokens == len(tokenizer(prompt)["input_ids"])
            assert chunks[-1].num_output_tokens == ref[-1].num_output_tokens
            assert [d for c in chunks for d in c.exit_layers] == [d for c in ref for d in c.exit_layers]
            cached = chunks[-1].num_cached_tokens
            assert (cached > 0) == (turn > 1), f"turn {turn}: {cached} cached prompt tokens"
            rows.append((turn, chunks[-1].num_input_tokens, cached, ttft_s, ttft_r))
            history.append((question, text))
        pages = {name: metric(server, name) for name in CHAT_GAUGES}
        assert pages["offramp_sessions"] == 1 and pages["offramp_session_kv_pages"] > 0
    after = wait_for_baseline(server)  # close() sent END
    for turn, num_in, cached, ttft_s, ttft_r in rows:
        print(
            f"turn {turn}: {num_in} prompt tokens, {cached} from the session; "
            f"TTFT session {ttft_s * 1000:.0f} ms vs stateless {ttft_r * 1000:.0f} ms"
        )
    *_, ttft_s, ttft_r = rows[-1]
    print(f"turn 5 TTFT ratio session/stateless: {ttft_s / ttft_r:.2f} (stateless is {ttft_r / ttft_s:.1f}x slower)")
    print(f"session pages after turn 5: {pages}; after END: {after}")
    assert after == dict.fromkeys(CHAT_GAUGES, 0.0)


def test_two_concurrent_sessions_keep_their_own_history(server, tokenizer):
    url = f"127.0.0.1:{server.grpc}"
    topics = {"a": ["Tell me about cats.", "What do they eat?"], "b": ["Tell me about rockets.", "How fast are they?"]}
    results: dict[str, list] = {}
    errors: list[BaseException] = []

    def talk(name: str) -> None:
        try:
            with OfframpClient(url, "grpc").chat(sequence_id=1000 + len(name) + ord(name[0])) as session:
                results[name] = [session.ask(q, max_tokens=16) for q in topics[name]]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(name,), daemon=True) for name in topics]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not [t for t in threads if t.is_alive()], "a session did not finish within 300 s"
    assert not errors, errors
    assert set(results) == set(topics), f"sessions that never answered: {sorted(set(topics) - set(results))}"
    for name, (first, second) in results.items():
        q1, q2 = topics[name]
        assert first.num_input_tokens == len(tokenizer(render(tokenizer, [], q1))["input_ids"])
        own = render(tokenizer, [(q1, first.text)], q2)  # its own history, nothing of the other's
        assert second.num_input_tokens == len(tokenizer(own)["input_ids"]), name
        assert second.num_cached_tokens > 0
    assert wait_for_baseline(server) == dict.fromkeys(CHAT_GAUGES, 0.0)


def _raw_turn(client, text: str, seq: int, start=False, end=False, params=None) -> str:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value, dtype in (
        ("text_input", text.encode(), "BYTES"),
        ("stream", True, "BOOL"),
        ("sampling_parameters", json.dumps(params or {"max_tokens": 12}).encode(), "BYTES"),
    ):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else np.bool_))
        inputs.append(t)
    request_id = uuid.uuid4().hex
    client.async_stream_infer(
        "offramp_chat",
        inputs,
        request_id=request_id,
        sequence_id=seq,
        sequence_start=start,
        sequence_end=end,
        enable_empty_final_response=True,
    )
    return request_id


def test_a_turn_sent_early_is_queued_not_lost(server, tokenizer):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    seq = 424242  # integer ids: string ids crash tritonserver 2.51 (see offramp_client.chat)
    ids = [
        _raw_turn(client, "Name a color.", seq, start=True),
        _raw_turn(client, "Name another one.", seq),  # before the first one finished
        _raw_turn(client, "", seq, end=True),  # END only: closes the conversation
    ]
    order, texts, finals = [], {i: "" for i in ids}, {}
    while len(finals) < 3:
        result, error = events.get(timeout=120)
        assert error is None, error
        response = result.get_response()
        order.append(response.id)
        if response.outputs:
            texts[response.id] += result.as_numpy("text_output")[0].decode()
        if response.parameters["triton_final_response"].bool_param:
            finals[response.id] = result
    client.stop_stream()
    assert order.index(ids[1]) > max(i for i, r in enumerate(order) if r == ids[0])  # strictly after turn 1
    own = render(tokenizer, [("Name a color.", texts[ids[0]])], "Name another one.")
    assert int(finals[ids[1]].as_numpy("num_input_tokens")[0]) == len(tokenizer(own)["input_ids"])
    assert finals[ids[2]].as_numpy("finish_reason")[0].decode() == "closed"
    assert wait_for_baseline(server) == dict.fromkeys(CHAT_GAUGES, 0.0)


def test_an_error_inside_a_session_answers_once_and_the_session_goes_on(server, tokenizer):
    with OfframpClient(f"127.0.0.1:{server.grpc}", "grpc").chat() as session:
        first = session.ask("Name a color.", max_tokens=12)
        with pytest.raises(OfframpError, match="max_tokens: 100000 exceeds"):
            session.ask("Tell me everything.", max_tokens=100000)  # refused by the engine
        with pytest.raises(OfframpError, match="temperature: expected a finite number"):
            session.ask("And now?", temperature="hot")  # refused while parsing
        third = session.ask("Name another one.", max_tokens=12)
        own = render(tokenizer, [("Name a color.", first.text)], "Name another one.")
        assert third.num_input_tokens == len(tokenizer(own)["input_ids"]) and third.num_cached_tokens > 0
        # Responses on the stream come in order: a second answer to a refused turn would have come
        # before the third turn's (and been taken as its answer), or would be waiting now.
        assert session._results.empty()
    assert wait_for_baseline(server) == dict.fromkeys(CHAT_GAUGES, 0.0)


def test_client_cli_chat_non_interactive(server, capsys):
    from offramp_client.cli import main

    url = f"127.0.0.1:{server.grpc}"
    argv = ["--url", url, "chat", "--message", "Hi!", "--message", "What did I say?", "--max-tokens", "8", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [t["user"] for t in out["turns"]] == ["Hi!", "What did I say?"]
    assert out["turns"][1]["num_cached_tokens"] > 0 and all(t["finish_reason"] for t in out["turns"])
    assert wait_for_baseline(server) == dict.fromkeys(CHAT_GAUGES, 0.0)
    assert main(["--url", "127.0.0.1:1", "chat", "--message", "hi"]) == 1
