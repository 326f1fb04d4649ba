"""OpenAI request bodies -> one ``GenerationRequest`` for the Triton model (no I/O here).

Standard fields are checked here so that a mistake is a 400 naming the field (``param``). Fields
the engine cannot honour (``n`` > 1, ``logprobs``, tools, penalties, ...) are refused with a 400
that says so, rather than silently ignored. Fields OpenAI does not define (``exit_policy``,
``exit_threshold``, ``top_k``, ``ignore_eos``, later ``mode`` / ``spec`` / ``sparsity``; the
``extra_body`` of the ``openai`` client) pass through into ``sampling_parameters`` unchanged: the
model validates them and its 400 names the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from offramp_gateway.errors import invalid

ROLES = {"system", "developer", "user", "assistant"}
IGNORED = {  # accepted and without effect here
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
    "reasoning_effort",
    "verbosity",
    "modalities",
}
UNSUPPORTED = {  # field -> values that mean "not asked for"; anything else is a 400
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "logit_bias": (None, {}),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
COMMON = {"model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "seed", "stop"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "response_format"} | IGNORED | set(UNSUPPORTED)
COMPLETION_FIELDS = COMMON | {"prompt", "echo"} | IGNORED | set(UNSUPPORTED)


@dataclass(slots=True)
class GenerationRequest:
    """What the gateway sends to Triton for one OpenAI request."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: str = ""  # completion prompt, or a chat's single user message
    messages: list[dict[str, str]] = field(default_factory=list)  # a chat that needs the template
    sampling: dict = field(default_factory=dict)  # -> sampling_parameters (JSON)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (a malformed body is a 400, not a 500)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at char {exc.pos})" if isinstance(exc, json.JSONDecodeError) else ""
        raise invalid(f"the request body is not valid JSON{where}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")
    return body


def parse_chat(body: dict, models: list[str]) -> GenerationRequest:
    req = GenerationRequest("chat", _model(body, models))
    messages = _messages(body.get("messages"))
    if len(messages) == 1 and messages[0]["role"] == "user":
        req.prompt = messages[0]["content"]  # the model applies its chat template, as for /generate
    else:
        req.messages = messages
    _response_format(body.get("response_format"))
    limit = body.get("max_completion_tokens")
    limit_name = "max_completion_tokens"
    if limit is None:
        limit, limit_name = body.get("max_tokens"), "max_tokens"
    _common(req, body, CHAT_FIELDS, limit, limit_name)
    return req


def parse_completion(body: dict, models: list[str]) -> GenerationRequest:
    req = GenerationRequest("completion", _model(body, models))
    req.prompt = _prompt(body.get("prompt"))
    req.echo = _flag(body, "echo")
    _common(req, body, COMPLETION_FIELDS, body.get("max_tokens"), "max_tokens")
    return req


def _common(req: GenerationRequest, body: dict, known: set[str], max_tokens: object, max_name: str) -> None:
    """Fields both endpoints share: streaming, ``n``, sampling, the refused ones and the extras."""
    _refuse_unsupported(body)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid(f"n: only n=1 is supported (one completion per request), got {n!r}", "n", "unsupported_value")
    req.stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options: must be an object", "stream_options")
        req.include_usage = req.stream and _flag(options, "include_usage", "stream_options.include_usage")
    req.sampling = _sampling(body, max_tokens, max_name)
    req.sampling.update({k: v for k, v in body.items() if k not in known})  # Offramp's extras


def _sampling(body: dict, max_tokens: object, max_name: str) -> dict:
    out: dict = {}
    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens <= 0:
            raise invalid(f"{max_name}: must be a positive integer, got {max_tokens!r}", max_name)
        out["max_tokens"] = max_tokens
    checks = {
        "temperature": (lambda v: 0 <= v <= 2, "a number in [0, 2]"),
        "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    }
    for name, (ok, what) in checks.items():
        value = body.get(name)
        if value is not None:
            if not _is_number(value) or not ok(value):
                raise invalid(f"{name}: must be {what}, got {value!r}", name)
            out[name] = float(value)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise invalid(f"seed: must be an integer, got {seed!r}", "seed")
        out["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise invalid("stop: must be a string or a list of non-empty strings", "stop")
        if stop:
            out["stop"] = stop
    return out


def _model(body: dict, models: list[str]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: is required (a string; GET /v1/models lists them)", "model")
    if model not in models:
        raise invalid(f"model: {model!r} does not exist; served: {', '.join(models)}", "model", "model_not_found")
    return model


def _messages(value: object) -> list[dict[str, str]]:
    if value is None:
        raise invalid("messages: is required", "messages")
    if not isinstance(value, list) or not value:
        raise invalid("messages: must be a non-empty list of messages", "messages")
    return [_message(m, i) for i, m in enumerate(value)]


def _message(message: object, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{where}: must be an object with role and content", where)
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role: must be one of {', '.join(sorted(ROLES))}, got {role!r}", f"{where}.role")
    if message.get("tool_calls") or message.get("function_call"):
        raise invalid(f"{where}: tool and function calls are not supported", where, "unsupported_value")
    content = _content(message.get("content"), f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _content(content: object, where: str) -> str:
    """A string, or a list of text parts (joined); other part types are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}: only text parts are supported", where, "unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(f"{where}: must be a string or a list of text parts", where)


def _prompt(value: object) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise invalid("prompt: is empty", "prompt")
        return value
    if value is None:
        raise invalid("prompt: is required", "prompt")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise invalid("prompt: one prompt per request is supported", "prompt", "unsupported_value")
    raise invalid("prompt: must be a string (token-id prompts are not supported)", "prompt")


def _response_format(value: object) -> None:
    if value is not None and not (isinstance(value, dict) and value.get("type") == "text"):
        raise invalid("response_format: only {'type': 'text'} is supported", "response_format", "unsupported_value")


def _refuse_unsupported(body: dict) -> None:
    for name, defaults in UNSUPPORTED.items():
        value = body.get(name)
        if value is None or value in defaults:
            continue
        raise invalid(f"{name}: is not supported by this server", name, "unsupported_value")


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{param or name}: must be true or false, got {value!r}", param or name)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
