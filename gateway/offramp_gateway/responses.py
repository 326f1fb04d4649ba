"""OpenAI response objects: whole completions, stream chunks and usage.

Each choice (and chunk choice) carries an ``offramp`` extension object with ``exit_layers``: the
number of layers each generated token ran before it left (the model's depth when none left early).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}


def usage(num_input_tokens: int, num_output_tokens: int) -> dict:
    """The model's own counts (``num_input_tokens`` includes the chat template's tokens)."""
    return {
        "prompt_tokens": num_input_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_input_tokens + num_output_tokens,
    }


def sse(payload: dict | str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


@dataclass(slots=True)
class ResponseBuilder:
    """The objects of one response: ``chat.completion`` / ``text_completion`` and their chunks."""

    kind: str  # "chat" or "completion"
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def completion(self, text: str, finish_reason: str, exit_layers: list[int], counts: dict) -> dict:
        """The whole (non-streaming) response."""
        choice: dict = {"index": 0}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(
            {"logprobs": None, "finish_reason": finish(finish_reason), "offramp": {"exit_layers": exit_layers}}
        )
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": counts}

    def chunk(self, text: str, exit_layers: list[int], finish_reason: str = "", first: bool = False) -> dict:
        """One streamed piece; a chat's first one also names the role."""
        choice: dict = {"index": 0}
        if self.kind == "chat":
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        choice.update(
            {"logprobs": None, "finish_reason": finish(finish_reason), "offramp": {"exit_layers": exit_layers}}
        )
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [choice]}

    def usage_chunk(self, counts: dict) -> dict:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": counts}


def finish(reason: str) -> str | None:
    """The model's finish reason in OpenAI's words (None while the answer goes on)."""
    return FINISH_REASONS.get(reason, reason) if reason else None
