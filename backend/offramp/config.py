"""One validated configuration for the engine."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16")
ENGINES = ("torch", "onnxruntime", "tensorrt")
EXIT_POLICIES = ("none", "softmax", "similarity", "classifier")
KV_FILLS = ("propagate", "recompute")


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to know, checked once at construction.

    Invalid values raise ``ValueError`` naming the field.
    """

    model: str = "default"
    dtype: str = "float32"
    engine: str = "torch"  # torch | onnxruntime | tensorrt (exported blocks, see offramp export)
    export_dir: str | None = None  # where the exported blocks live; None = a cache directory per model/layout
    trt_precision: str = "fp16"  # tensorrt engine: fp32 | fp16 | bf16 inside the engines (I/O stays float32)
    block_size: int = 2  # decoder layers per block
    block_boundaries: tuple[int, ...] | None = None  # explicit layer indices where blocks start
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV budget in pages; None derives it from kv_budget_bytes
    kv_budget_bytes: int = 512 * 1024 * 1024
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # defaults to the model's context length
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    use_chat_template: bool = True
    seed: int = 0
    exit_policy: str = "none"  # server default; requests may choose their own
    exit_threshold: float = 0.9
    exit_points: tuple[int, ...] | None = None  # layer depths where tokens may leave; None = every block end
    min_exit_layer: int = 1
    kv_fill: str = "propagate"  # how skipped layers get their K/V
    exit_classifier: str | None = None  # safetensors file for the classifier policy
    exit_head: str | None = None  # safetensors file of trained low-rank shortcuts; None = identity head
    exit_gate: str | None = None  # cheap gate before the softmax check: similarity | classifier
    exit_gate_threshold: float = 0.95
    enable_prefix_sharing: bool = True  # share computed full prompt pages between identical prefixes
    max_sessions: int = 1024  # sessions kept at once; a new one closes the least recently used idle one
    session_idle_timeout_s: float = 600.0  # an idle session's pages are freed after this long

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model: must be 'default' or a path to a checkpoint directory or GGUF file")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.engine != "torch" and self.dtype != "float32":
            raise ValueError(f"dtype: the {self.engine} engine runs the float32 export; use dtype float32")
        if self.trt_precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"trt_precision: {self.trt_precision!r} is not one of fp32, fp16, bf16")
        if self.export_dir is not None and (not isinstance(self.export_dir, str) or not self.export_dir):
            raise ValueError("export_dir: must be a directory path")
        _positive("block_size", self.block_size)
        _positive("page_size", self.page_size)
        _positive("kv_budget_bytes", self.kv_budget_bytes)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_tokens_limit", self.max_tokens_limit)
        if self.num_pages is not None:
            _positive("num_pages", self.num_pages)
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        if self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy: {self.exit_policy!r} is not one of {', '.join(EXIT_POLICIES)}")
        if self.exit_gate not in (None, "similarity", "classifier"):
            raise ValueError(f"exit_gate: {self.exit_gate!r} is not one of similarity, classifier")
        if isinstance(self.exit_gate_threshold, bool) or not isinstance(self.exit_gate_threshold, (int, float)):
            raise ValueError(f"exit_gate_threshold: must be a number, got {self.exit_gate_threshold!r}")
        if self.kv_fill not in KV_FILLS:
            raise ValueError(f"kv_fill: {self.kv_fill!r} is not one of {', '.join(KV_FILLS)}")
        if isinstance(self.exit_threshold, bool) or not isinstance(self.exit_threshold, (int, float)):
            raise ValueError(f"exit_threshold: must be a number, got {self.exit_threshold!r}")
        _positive("min_exit_layer", self.min_exit_layer)
        _positive("max_sessions", self.max_sessions)
        if not isinstance(self.enable_prefix_sharing, bool):
            raise ValueError(f"enable_prefix_sharing: must be true or false, got {self.enable_prefix_sharing!r}")
        timeout = self.session_idle_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"session_idle_timeout_s: must be a positive number of seconds, got {timeout!r}")
        if self.exit_points is not None:
            points = tuple(self.exit_points)
            if not points or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in points):
                raise ValueError("exit_points: must be positive layer depths, e.g. (10, 20)")
            self.exit_points = tuple(sorted(set(points)))
        if self.block_boundaries is not None:
            bounds = tuple(self.block_boundaries)
            if not bounds or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
                raise ValueError("block_boundaries: must start at 0 and be strictly increasing, e.g. (0, 10, 20)")
            self.block_boundaries = bounds

    def exit_depths(self, num_layers: int) -> set[int]:
        """Depths (layers run) after which a token may leave: block ends, filtered by the config."""
        ends = {end for _, end in self.block_ranges(num_layers)}
        if self.exit_points is not None:
            missing = [p for p in self.exit_points if p not in ends]
            if missing:
                raise ValueError(f"exit_points: {missing} are not block ends ({sorted(ends)})")
            ends = set(self.exit_points)
        return {d for d in ends if self.min_exit_layer <= d < num_layers}

    def block_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """Half-open layer ranges ``[start, end)`` of each block."""
        if self.block_boundaries is None:
            starts = list(range(0, num_layers, self.block_size))
        else:
            starts = list(self.block_boundaries)
            if starts[-1] >= num_layers:
                raise ValueError(f"block_boundaries: {starts[-1]} is not a layer of this {num_layers}-layer model")
        ends = starts[1:] + [num_layers]
        return list(zip(starts, ends))


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
