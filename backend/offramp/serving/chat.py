"""Multi-turn conversations on the engine's sessions, for a sequence-batched server model
(``offramp_chat``). No Triton here: the model passes plain values in and gets events out.

One conversation per correlation id (Triton's sequence id). Each turn's ``text_input`` is the
user's next message. The conversation keeps every message, user and assistant, and renders ALL of
them through the tokenizer's chat template on every turn, as text: the prompt is exactly the text
a client of the stateless ``offramp`` model would send with the whole history, tokenized the same
way (``LLMEngine.encode_for_serving``). Given the session id, the engine reuses the K/V of the
longest common prefix it still holds and prefills only the rest, so outputs equal the stateless
ones while turn N's prefill is only its new tokens.

- Turns of one conversation run one at a time, first in first out: Triton hands over the next
  turn of a sequence without waiting for the previous one's final response.
- START on an open conversation ends it (its pages are freed) and starts a fresh one.
- END closes the conversation after that turn's final response (the engine frees its pages). A
  turn with END and no (or empty) ``text_input`` only closes it: one final, empty response whose
  finish reason is ``closed``.
- A turn that fails (bad input, an engine error) or is cancelled leaves the history as it was;
  the conversation goes on. Every turn gets exactly one final event.
- Triton forgets idle sequences without telling the model, so conversations idle for longer than
  ``idle_timeout_s`` are dropped here too (the engine expires their pages on its own).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from offramp.serving.async_engine import AsyncEngine
from offramp.serving.events import RequestHandle, StreamEvent
from offramp.serving.requests import GenerateRequest, RequestError, parse_request

Message = dict[str, str]


@dataclass(slots=True)
class Turn:
    """One request of a conversation, as the model received it."""

    correlation_id: int | str
    emit: Callable[[StreamEvent], None]
    request: GenerateRequest | None = None  # None with error set (bad input) or for a close-only turn
    error: RequestError | None = None
    start: bool = False
    end: bool = False
    is_cancelled: Callable[[], bool] = lambda: False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(slots=True)
class Conversation:
    key: str
    session_id: str = ""  # the engine's session: new for every START, so ids are never reused
    messages: list[Message] = field(default_factory=list)
    pending: deque[Turn] = field(default_factory=deque)
    busy: bool = False  # a turn is in the engine
    is_open: bool = False  # between START and END
    last_used: float = 0.0


def conversation_key(correlation_id: int | str) -> str:
    """Integer and string ids are different sequences in Triton, so they are kept apart here."""
    return f"{type(correlation_id).__name__}:{correlation_id}"


def _is_blank(value: object) -> bool:
    if value is None:
        return True
    if hasattr(value, "tolist"):
        value = value.tolist()
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return isinstance(value, (bytes, str)) and not value.strip()


def parse_turn(
    correlation_id: int | str,
    inputs: dict[str, object],
    start: bool,
    end: bool,
    emit: Callable[[StreamEvent], None],
    is_cancelled: Callable[[], bool],
    default_max_tokens: int,
    max_prompt_chars: int,
) -> Turn:
    """A turn from the request's inputs (``None`` for one not sent). Bad input gives a turn that
    carries its error: it still goes through the queue, so its START and END take effect in order."""
    turn = Turn(correlation_id, emit, start=start, end=end, is_cancelled=is_cancelled)
    if end and _is_blank(inputs.get("text_input")):
        return turn  # close only
    try:
        turn.request = parse_request(
            inputs.get("text_input"),
            inputs.get("stream"),
            inputs.get("sampling_parameters"),
            inputs.get("exclude_input_in_output"),
            default_max_tokens,
            max_prompt_chars,
        )
    except RequestError as exc:
        turn.error = exc
    return turn


def chat_renderer(tokenizer, use_chat_template: bool = True) -> Callable[[list[Message]], str]:
    """The whole conversation as prompt text: the tokenizer's chat template (generation prompt
    added, not tokenized), or a plain ``User:`` / ``Assistant:`` transcript without one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):

        def render(messages: list[Message]) -> str:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        return render

    def plain(messages: list[Message]) -> str:
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines + ["Assistant:"])

    return plain


class Conversations:
    """Conversations keyed by correlation id, each with its message history and queue of turns."""

    def __init__(
        self,
        engine: AsyncEngine,
        render: Callable[[list[Message]], str],
        idle_timeout_s: float = 600.0,
        max_pending_turns: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.render = render
        self.idle_timeout_s = idle_timeout_s
        self.max_pending_turns = max_pending_turns
        self.clock = clock
        self._conversations: dict[str, Conversation] = {}
        self._lock = threading.Lock()
        self._num_pending = 0
        self._closed = False
        self._next_sweep = 0.0
        self._ids = itertools.count()

    @property
    def num_conversations(self) -> int:
        return len(self._conversations)

    def submit(self, turn: Turn) -> None:
        """Queue a turn (from any thread); it runs once the conversation's earlier turns are done."""
        with self._lock:
            self._sweep()
            key = conversation_key(turn.correlation_id)
            conv = self._conversations.get(key)
            if self._closed:
                return self._reject(turn, RequestError("the model is shutting down; retry later", "unavailable"))
            if conv is None and not turn.start:
                return self._reject(turn, self._not_open(turn))
            if self._num_pending >= self.max_pending_turns:
                error = RequestError(f"server busy: {self.max_pending_turns} turns queued; retry later", "unavailable")
                return self._reject(turn, error)
            if conv is None:
                conv = self._conversations[key] = Conversation(key)
            conv.pending.append(turn)
            conv.last_used = self.clock()
            self._num_pending += 1
            self._pump(conv)

    def close(self) -> None:
        """Stop taking turns; queued ones get their final (error) event. Turns in the engine finish
        there (``AsyncEngine.shutdown`` drains them)."""
        with self._lock:
            self._closed = True
            error = RequestError("the model is shutting down; retry later", "unavailable")
            for conv in self._conversations.values():
                while conv.pending:
                    self._num_pending -= 1
                    self._reject(conv.pending.popleft(), error)

    # -- under the lock -------------------------------------------------------------------------
    def _pump(self, conv: Conversation) -> None:
        """Start queued turns until one is in the engine (turns that fail at once finish here)."""
        while not conv.busy and conv.pending:
            turn = conv.pending.popleft()
            self._num_pending -= 1
            if self._closed:
                self._reject(turn, RequestError("the model is shutting down; retry later", "unavailable"))
                continue
            if turn.start:
                self._restart(conv)
            if not conv.is_open:  # a turn after END without START (Triton itself prevents this)
                self._reject(turn, self._not_open(turn))
                continue
            if turn.error is None and turn.request is not None and not self._cancelled(turn):
                try:
                    self.engine.submit(self._handle(conv, turn))
                    conv.busy = True
                    return
                except RequestError as exc:
                    turn.error = exc
                except Exception as exc:  # e.g. the chat template refused the messages
                    turn.error = RequestError(f"chat template: {exc}", "invalid")
            if turn.error is not None:
                turn.emit(StreamEvent(turn.request_id, finished=True, error=turn.error))
            else:  # cancelled while queued, or a close-only turn
                reason = "closed" if turn.request is None else "abort"
                turn.emit(StreamEvent(turn.request_id, finished=True, finish_reason=reason))
            self._after(conv, turn)

    def _handle(self, conv: Conversation, turn: Turn) -> RequestHandle:
        req = turn.request
        user = {"role": "user", "content": req.prompt}
        prompt = self.render(conv.messages + [user])
        pieces: list[str] = []

        def emit(event: StreamEvent) -> None:
            pieces.append(event.text)
            turn.emit(event)
            if event.finished:
                ok = event.error is None and event.finish_reason != "abort"
                self._done(conv, turn, [user, {"role": "assistant", "content": "".join(pieces)}] if ok else [])

        # The reply alone comes back (the prompt is the rendered conversation, not the user's text).
        request = GenerateRequest(prompt, req.params, req.stream, exclude_input_in_output=True)
        return RequestHandle(turn.request_id, request, emit, turn.is_cancelled, session_id=conv.session_id)

    def _done(self, conv: Conversation, turn: Turn, new_messages: list[Message]) -> None:
        """A turn's final event was emitted (on the engine thread): record it, start the next."""
        with self._lock:
            conv.busy = False
            conv.messages.extend(new_messages)
            self._after(conv, turn)
            self._pump(conv)

    def _after(self, conv: Conversation, turn: Turn) -> None:
        conv.last_used = self.clock()
        if turn.end:
            self._end(conv)
            if not conv.pending and self._conversations.get(conv.key) is conv:
                del self._conversations[conv.key]

    def _restart(self, conv: Conversation) -> None:
        if conv.is_open:
            self._end(conv)
        conv.session_id = f"chat-{next(self._ids)}-{conv.key}"
        conv.is_open = True

    def _end(self, conv: Conversation) -> None:
        self.engine.end_session(conv.session_id)  # frees its pages on the engine thread
        conv.messages = []
        conv.is_open = False

    def _sweep(self) -> None:
        """Drop conversations idle for longer than ``idle_timeout_s`` (cheap when none is due)."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self.idle_timeout_s / 4)
        for key, conv in list(self._conversations.items()):
            if not conv.busy and not conv.pending and conv.last_used <= now - self.idle_timeout_s:
                if conv.is_open:
                    self._end(conv)
                del self._conversations[key]

    def _not_open(self, turn: Turn) -> RequestError:
        return RequestError(
            f"sequence {turn.correlation_id!r}: no open conversation (it ended, idled out after "
            f"{self.idle_timeout_s:g} s, or never started); start it again with sequence_start"
        )

    @staticmethod
    def _cancelled(turn: Turn) -> bool:
        try:
            return bool(turn.is_cancelled())
        except Exception:  # the probe failed: the client is gone
            return True

    @staticmethod
    def _reject(turn: Turn, error: RequestError) -> None:
        turn.emit(StreamEvent(turn.request_id, finished=True, error=error))
