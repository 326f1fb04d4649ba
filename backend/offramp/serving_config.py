"""The served model's settings: ``engine.json`` beside ``model.py``, validated at load."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from offramp.config import EngineConfig

SERVER_KEYS = ("max_queued_requests", "default_max_tokens", "max_prompt_chars")
PATH_KEYS = ("export_dir", "exit_head", "exit_classifier")  # relative paths are relative to engine.json


@dataclass(slots=True)
class ServingConfig:
    engine: EngineConfig
    max_queued_requests: int = 256  # beyond this a request gets UNAVAILABLE ("retry later")
    default_max_tokens: int = 64  # when a request names no max_tokens
    max_prompt_chars: int = 65536  # input-size limit

    def __post_init__(self) -> None:
        for name in SERVER_KEYS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.default_max_tokens > self.engine.max_tokens_limit:
            raise ValueError("default_max_tokens: exceeds max_tokens_limit")


def load_serving_config(path: Path, overrides: dict | None = None) -> ServingConfig:
    """Read ``engine.json``; unknown keys and bad values raise ``ValueError`` naming the field."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read engine settings: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    for key in PATH_KEYS:
        if isinstance(raw.get(key), str) and raw[key] and not Path(raw[key]).is_absolute():
            raw[key] = str(Path(path).parent / raw[key])
    raw.update(overrides or {})
    engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(raw) - engine_keys - set(SERVER_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {unknown}")
    for key in ("block_boundaries", "exit_points"):
        if isinstance(raw.get(key), list):
            raw[key] = tuple(raw[key])
    engine = EngineConfig(**{k: v for k, v in raw.items() if k in engine_keys})
    return ServingConfig(engine, **{k: v for k, v in raw.items() if k in SERVER_KEYS})
