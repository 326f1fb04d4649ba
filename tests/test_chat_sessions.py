"""``offramp.serving.chat`` without Triton or a model: a fake engine records what the conversation layer
submits and the test plays the engine's events back. Turn order, history, START/END, errors,
cancellation, close-only turns and idle expiry."""

from __future__ import annotations

import numpy as np

from offramp.serving.chat import Conversations, Turn, chat_renderer, parse_turn
from offramp.serving.events import RequestHandle, StreamEvent
from offramp.serving.requests import RequestError


class FakeEngine:
    def __init__(self) -> None:
        self.handles: list[RequestHandle] = []
        self.ended: list[str] = []
        self.refuse: RequestError | None = None

    def submit(self, handle: RequestHandle) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.handles.append(handle)

    def end_session(self, session_id: str) -> None:
        self.ended.append(session_id)

    def finish(self, reply: str, error: RequestError | None = None, reason: str = "stop") -> None:
        handle = self.handles[-1]
        handle.emit(StreamEvent(handle.request_id, text=reply[:2]))  # streamed in two pieces
        handle.emit(StreamEvent(handle.request_id, text=reply[2:], finished=True, finish_reason=reason, error=error))


def _render(messages):
    return " | ".join(f"{m['role']}:{m['content']}" for m in messages)


class Client:
    """Turns of one sequence and the events each got."""

    def __init__(self, chats: Conversations, cid: int | str = 7) -> None:
        self.chats, self.cid = chats, cid
        self.events: list[list[StreamEvent]] = []

    def turn(self, text: str | None, start=False, end=False, cancelled=False, params=None) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        self.events.append(events)
        inputs = {"text_input": None if text is None else np.array([text.encode()], dtype=np.object_)}
        if params is not None:
            inputs["sampling_parameters"] = np.array([params.encode()], dtype=np.object_)
        turn = parse_turn(self.cid, inputs, start, end, events.append, lambda: cancelled, 16, 1000)
        self.chats.submit(turn)
        return events


def _setup(**kwargs):
    engine = FakeEngine()
    return engine, Conversations(engine, _render, **kwargs)


def _final(events):
    finals = [e for e in events if e.finished]
    assert len(finals) == 1, events
    return finals[0]


def test_turns_queue_first_in_first_out_and_carry_the_history():
    engine, chats = _setup()
    c = Client(chats)
    first = c.turn("hi", start=True)
    second = c.turn("more")  # sent before the first finished: queued, not lost
    assert len(engine.handles) == 1 and engine.handles[0].request.prompt == "user:hi"
    assert engine.handles[0].request.exclude_input_in_output and engine.handles[0].session_id
    engine.finish("hello there")
    assert "".join(e.text for e in first) == "hello there" and _final(first).finish_reason == "stop"
    assert len(engine.handles) == 2
    assert engine.handles[1].request.prompt == "user:hi | assistant:hello there | user:more"
    assert engine.handles[1].session_id == engine.handles[0].session_id
    engine.finish("ok")
    assert _final(second).error is None and engine.ended == []


def test_end_closes_after_the_final_response_and_start_resets():
    engine, chats = _setup()
    c = Client(chats)
    c.turn("hi", start=True)
    engine.finish("hello")
    sid = engine.handles[0].session_id
    c.turn("again", start=True)  # START on an open conversation: a fresh one
    assert engine.ended == [sid] and engine.handles[1].request.prompt == "user:again"
    assert engine.handles[1].session_id != sid
    last = c.turn("bye", end=True)
    engine.finish("hello again")
    assert engine.handles[2].request.prompt == "user:again | assistant:hello again | user:bye"
    engine.finish("see you")
    assert _final(last).finish_reason == "stop" and engine.ended == [sid, engine.handles[1].session_id]
    assert chats.num_conversations == 0
    late = c.turn("hello?")  # without START after END
    assert "no open conversation" in str(_final(late).error) and len(engine.handles) == 3


def test_a_failed_turn_answers_once_and_the_conversation_goes_on():
    engine, chats = _setup()
    c = Client(chats)
    c.turn("hi", start=True)
    engine.finish("hello")
    bad = c.turn("x", params='{"max_tokens": "many"}')  # refused before the engine
    assert _final(bad).error.code == "invalid" and len(engine.handles) == 1
    refused = c.turn("too long")
    engine.finish("", error=RequestError("prompt: too long"))  # refused by the engine
    assert _final(refused).error is not None
    cancelled = c.turn("stop")
    engine.finish("partial", reason="abort")
    assert _final(cancelled).finish_reason == "abort"
    c.turn("next")
    assert engine.handles[-1].request.prompt == "user:hi | assistant:hello | user:next"


def test_cancelled_while_queued_and_close_only_turns():
    engine, chats = _setup()
    c = Client(chats)
    c.turn("hi", start=True)
    gone = c.turn("never mind", cancelled=True)
    closing = c.turn("", end=True)  # an empty message with END only closes
    engine.finish("hello")
    assert _final(gone).finish_reason == "abort" and _final(closing).finish_reason == "closed"
    assert len(engine.handles) == 1 and engine.ended == [engine.handles[0].session_id]
    assert chats.num_conversations == 0


def test_conversations_are_kept_apart_and_bad_submissions_fail_cleanly():
    engine, chats = _setup(max_pending_turns=2)
    a, b = Client(chats, 1), Client(chats, "1")  # int and str ids are different sequences
    a.turn("from a", start=True)
    b.turn("from b", start=True)
    assert [h.request.prompt for h in engine.handles] == ["user:from a", "user:from b"]
    assert engine.handles[0].session_id != engine.handles[1].session_id
    a.turn("q1")
    a.turn("q2")
    busy = a.turn("q3")
    assert _final(busy).error.code == "unavailable"
    engine.refuse = RequestError("server busy", code="unavailable")
    c = Client(chats, 3)
    assert _final(c.turn("hi", start=True)).error.code == "unavailable"
    chats.close()
    assert all(_final(e).error.code == "unavailable" for e in a.events[1:])


def test_idle_conversations_expire():
    now = [0.0]
    engine, chats = _setup(idle_timeout_s=10.0, clock=lambda: now[0])
    c = Client(chats)
    c.turn("hi", start=True)
    engine.finish("hello")
    now[0] = 11.0
    other = Client(chats, 8)
    other.turn("hey", start=True)  # any submission sweeps
    assert engine.ended == [engine.handles[0].session_id] and chats.num_conversations == 1
    assert "no open conversation" in str(_final(c.turn("still there?")).error)


def test_plain_renderer_without_a_chat_template():
    class NoTemplate:
        chat_template = None

    render = chat_renderer(NoTemplate())
    assert render([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    assert isinstance(Turn(1, print).request_id, str)
