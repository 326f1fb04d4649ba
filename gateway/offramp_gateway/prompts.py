"""Chat messages -> the text sent as ``text_input``.

One user message goes as it is: the model applies its chat template (exactly what Triton's
``generate`` does with the same text, so both answer the same). Any other history (a system
message, earlier turns) is rendered here through the served model's own tokenizer chat template,
loaded with ``offramp.model.loader.load_tokenizer`` from the same checkpoint (the one function
the engine uses too). The model sees text that already starts with the template's markup and
tokenizes it without templating again (``LLMEngine.encode_for_serving``), as the multi-turn
``offramp_chat`` model does with its conversations. The tokenizer is loaded on the first such
request, in a thread (importing ``transformers`` takes seconds and memory a gateway that only
forwards single messages does not need).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from offramp_gateway.errors import OpenAIError

Messages = list[dict[str, str]]


def render_with(tokenizer) -> Callable[[Messages], str]:
    """The tokenizer's chat template (generation prompt added, not tokenized), or a plain
    ``User:`` / ``Assistant:`` transcript for a tokenizer without one (as ``offramp_chat`` does)."""
    if getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def plain(messages: Messages) -> str:
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join([*lines, "Assistant:"])

    return plain


def load_renderer(model: str) -> Callable[[Messages], str]:
    """The served checkpoint's renderer (``default``, a checkpoint directory or a GGUF file)."""
    from offramp.model.loader import load_tokenizer, resolve_model

    return render_with(load_tokenizer(resolve_model(model)))


class PromptRenderer:
    """Renders chat histories with the model's template; loads it once, on first use."""

    def __init__(self, model: str | None, loader: Callable[[str], Callable[[Messages], str]] = load_renderer):
        self.model = model
        self._loader = loader
        self._render: Callable[[Messages], str] | None = None
        self._lock = asyncio.Lock()

    async def text(self, messages: Messages) -> str:
        render = self._render or await self._load()
        try:
            return render(messages)
        except Exception as exc:  # a template may refuse an order of roles (raise_exception)
            raise OpenAIError(400, f"messages: the model's chat template refused them: {exc}", "messages") from None

    async def _load(self) -> Callable[[Messages], str]:
        if self.model is None:
            raise OpenAIError(
                400,
                "messages: this gateway was started without --model, so it can only forward a single user "
                "message (the model applies its template); start it with the served checkpoint to send histories",
                "messages",
                "unsupported_value",
            )
        async with self._lock:
            if self._render is None:
                try:
                    self._render = await asyncio.to_thread(self._loader, self.model)
                except Exception as exc:
                    raise OpenAIError(500, f"cannot load the chat template of {self.model}: {exc}") from None
        return self._render
