"""Serving requests: parse and validate what a client sent (Triton tensors as plain Python values).

Tensor names follow Triton's vLLM backend: ``text_input``, ``stream``, ``sampling_parameters``
(a JSON object in a string), ``exclude_input_in_output``. Every problem raises ``RequestError``
whose message names the field, so the server can answer 400 / INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from offramp.engine.sampling import SamplingParams

SAMPLING_KEYS = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "stop": list,
    "ignore_eos": bool,
    "exit_policy": str,
    "exit_threshold": float,
}


class RequestError(ValueError):
    """A request the server refuses. ``code``: ``invalid`` (bad input, HTTP 400), ``unavailable``
    (overload or shutdown: retry later, 503) or ``internal`` (a server fault, 500)."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class GenerateRequest:
    """One parsed request: the single dataclass that crosses from the adapter into the engine side."""

    prompt: str
    params: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False


def _scalar(value: object, name: str) -> object:
    """Unwrap a one-element tensor value (list / numpy array / scalar)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    while isinstance(value, list):
        if len(value) != 1:
            raise RequestError(f"{name}: expected one value, got {len(value)}")
        value = value[0]
    return value


def _text(value: object, name: str) -> str:
    value = _scalar(value, name)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name}: is not valid UTF-8 (byte {exc.start})") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"{name}: expected a string")


def _flag(value: object, name: str) -> bool:
    if value is None:
        return False
    value = _scalar(value, name)
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise RequestError(f"{name}: expected a boolean")


def parse_sampling_parameters(text: str | None, max_tokens_default: int) -> SamplingParams:
    """The JSON object of ``sampling_parameters`` -> ``SamplingParams`` (strict: unknown keys fail)."""
    if text is None or not text.strip():
        return SamplingParams(max_tokens=max_tokens_default)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"sampling_parameters: is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(raw, dict):
        raise RequestError("sampling_parameters: must be a JSON object")
    unknown = sorted(set(raw) - set(SAMPLING_KEYS))
    if unknown:
        raise RequestError(f"sampling_parameters: unknown key(s) {unknown}; allowed: {sorted(SAMPLING_KEYS)}")
    values = {}
    for key, value in raw.items():
        values[key] = _typed(key, value)
    values.setdefault("max_tokens", max_tokens_default)
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        raise RequestError(f"sampling_parameters.{exc}") from None


def _typed(key: str, value: object) -> object:
    kind = SAMPLING_KEYS[key]
    if value is None and key in ("seed", "exit_policy", "exit_threshold"):
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RequestError(f"sampling_parameters.{key}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError(f"sampling_parameters.{key}: expected a finite number, got {value!r}")
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise RequestError(f"sampling_parameters.{key}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise RequestError(f"sampling_parameters.{key}: expected a string, got {value!r}")
    if kind is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise RequestError(f"sampling_parameters.{key}: expected a string or a list of non-empty strings")
    return value


def parse_request(
    text_input: object,
    stream: object = None,
    sampling_parameters: object = None,
    exclude_input_in_output: object = None,
    max_tokens_default: int = 64,
    max_prompt_chars: int = 1 << 20,
) -> GenerateRequest:
    """Validate one request's inputs (``None`` for an input that was not sent)."""
    if text_input is None:
        raise RequestError("text_input: is missing")
    prompt = _text(text_input, "text_input")
    if not prompt.strip():
        raise RequestError("text_input: is empty")
    if len(prompt) > max_prompt_chars:
        raise RequestError(f"text_input: {len(prompt)} characters exceed the limit of {max_prompt_chars}")
    params_text = None if sampling_parameters is None else _text(sampling_parameters, "sampling_parameters")
    return GenerateRequest(
        prompt=prompt,
        params=parse_sampling_parameters(params_text, max_tokens_default),
        stream=_flag(stream, "stream"),
        exclude_input_in_output=_flag(exclude_input_in_output, "exclude_input_in_output"),
    )
