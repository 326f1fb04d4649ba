"""Serving requests: parse and validate what a client sent (Triton tensors as plain Python values).

Tensor names follow Triton's vLLM backend: ``text_input``, ``stream``, ``sampling_parameters``
(a JSON object in a string), ``exclude_input_in_output``. Every problem raises ``RequestError``
whose message names the field, so the server can answer 400 / INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import math
import re
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
    "mode": str,  # "lossless": exactly the full model's output (early exits only draft), or "early_exit"
    "spec": str,  # the lossless mode's draft source: none, ngram or exit
    "sparsity": float,  # share of FFN neuron groups its decode tokens compute, in (0, 1] (contextual sparsity)
    "min_tokens": int,  # vLLM's; only as far as ignore_eos reaches (see _apply_min_tokens)
}

# genai-perf / AIPerf (``--backend vllm``) send numbers as strings ("256"), as other vLLM-backend
# deployments accept: a plain decimal or exponent literal in a string counts as that number.
NUMERIC_STRING = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

# Where each exit policy's score lives, so a threshold it can never reach is refused:
# (low, high, low included). Softmax: top-1 probability; classifier: sigmoid; similarity: cosine.
THRESHOLD_RANGES = {"softmax": (0.0, 1.0, False), "classifier": (0.0, 1.0, False), "similarity": (-1.0, 1.0, True)}


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


def parse_sampling_parameters(
    text: str | None, max_tokens_default: int, default_exit_policy: str | None = None
) -> SamplingParams:
    """The JSON object of ``sampling_parameters`` -> ``SamplingParams`` (strict: unknown keys fail).
    ``default_exit_policy`` (the server's) decides the range of an ``exit_threshold`` sent without
    an ``exit_policy``; unknown (None), the widest range of any policy applies."""
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
    _apply_min_tokens(values, values.pop("min_tokens", None))
    try:
        params = SamplingParams(**values)
    except ValueError as exc:
        raise RequestError(f"sampling_parameters.{exc}") from None
    _check_threshold(params.exit_threshold, params.exit_policy or default_exit_policy)
    return params


def _apply_min_tokens(values: dict, min_tokens: int | None) -> None:
    """vLLM's ``min_tokens`` (no EOS before that many tokens) where it equals ``ignore_eos``: 0, or at
    least ``max_tokens``, as genai-perf's ``--output-tokens-mean-deterministic`` sends (equal)."""
    if min_tokens is None or min_tokens == 0:
        return
    if min_tokens < 0 or min_tokens < values["max_tokens"]:
        raise RequestError(
            f"sampling_parameters.min_tokens: only 0 or a value >= max_tokens ({values['max_tokens']}, "
            f"the same as ignore_eos) is supported, got {min_tokens}"
        )
    values["ignore_eos"] = True


def _check_threshold(threshold: float | None, policy: str | None) -> None:
    """A threshold outside its policy's score range would never (or always) let a token leave."""
    if threshold is None or policy == "none":
        return
    low, high, low_included = THRESHOLD_RANGES.get(policy, (-1.0, 1.0, True))
    if (low <= threshold if low_included else low < threshold) and threshold <= high:
        return
    name = f"{policy}'s" if policy in THRESHOLD_RANGES else "every policy's"
    bracket = "[" if low_included else "("
    raise RequestError(
        f"sampling_parameters.exit_threshold: {threshold:g} is outside {name} range {bracket}{low:g}, {high:g}]"
    )


def _from_string(key: str, value: str, kind: type) -> int | float:
    """A numeric string as the number it spells (integer fields need an integer value)."""
    text = value.strip()
    number = float(text) if NUMERIC_STRING.fullmatch(text) else math.nan
    if not math.isfinite(number):
        expected = "an integer" if kind is int else "a finite number"
        raise RequestError(f"sampling_parameters.{key}: expected {expected}, got {value!r}")
    if kind is float:
        return number
    if not number.is_integer():
        raise RequestError(f"sampling_parameters.{key}: expected an integer, got {value!r}")
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else int(number)


def _typed(key: str, value: object) -> object:
    kind = SAMPLING_KEYS[key]
    if value is None and key in ("seed", "exit_policy", "exit_threshold", "mode", "spec", "sparsity"):
        return None
    if kind in (int, float) and isinstance(value, str):
        return _from_string(key, value, kind)
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
    default_exit_policy: str | None = None,
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
        params=parse_sampling_parameters(params_text, max_tokens_default, default_exit_policy),
        stream=_flag(stream, "stream"),
        exclude_input_in_output=_flag(exclude_input_in_output, "exclude_input_in_output"),
    )
