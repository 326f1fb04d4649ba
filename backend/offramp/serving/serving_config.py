"""The served model's settings: ``engine.json`` beside ``model.py``, validated at load.

``engine.json`` holds every ``EngineConfig`` field (see ``offramp.config``) and the server's own
fields below; ``offramp serve`` derives an override flag from each of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from offramp.config import EngineConfig, config_from_dict, option

PATH_KEYS = ("export_dir", "exit_head", "exit_classifier")  # relative paths are relative to engine.json


@dataclass(slots=True)
class ServingConfig:
    engine: EngineConfig
    max_queued_requests: int = option(256, "requests waiting at once; beyond this a request gets UNAVAILABLE")
    default_max_tokens: int = option(64, "max_tokens of a request that names none")
    max_prompt_chars: int = option(65536, "longest prompt accepted, in characters")

    def __post_init__(self) -> None:
        for name in server_keys():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.default_max_tokens > self.engine.max_tokens_limit:
            raise ValueError("default_max_tokens: exceeds max_tokens_limit")


def server_keys() -> tuple[str, ...]:
    """The server's own settings (every ``ServingConfig`` field but the engine's)."""
    return tuple(f.name for f in fields(ServingConfig) if f.name != "engine")


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
    server = {k: raw.pop(k) for k in server_keys() if k in raw}
    return ServingConfig(config_from_dict(raw, str(path)), **server)
