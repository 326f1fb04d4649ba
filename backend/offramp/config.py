"""One validated configuration for the engine: the single source of every engine option.

The ``offramp`` command-line flags, the ``offramp serve`` overrides and the keys of a served model's
``engine.json`` are all derived from ``EngineConfig``'s fields (name, type, default, help).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields

from offramp import config_layout
from offramp.config_layout import MIN_EXIT_FRACTION

DTYPES = ("float32", "bfloat16")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
EXIT_POLICIES = ("none", "softmax", "similarity", "classifier")
KV_FILLS = ("propagate", "recompute")
EXIT_GATES = ("similarity", "classifier")
TRT_PRECISIONS = ("fp32", "fp16", "bf16")
WEIGHTS = ("none", "bf16", "int8", "int4")
WEIGHT_GROUP_SIZES = (32, 64, 128)
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
SPEC_SOURCES = ("none", "ngram", "exit", "easyspec")  # draft sources of the lossless mode
SPARSITY_BATCHING = ("union", "per_row")  # a batch's sparse rows share the union of their selections, or not


def option(default, help: str, **meta):
    """A config field with its command-line help (and, rarely, a ``flag`` name and ``scale`` for the
    command line, e.g. ``kv_budget_bytes`` is given in MiB as ``--kv-budget-mb``). The CLI flags,
    ``offramp serve`` overrides and ``engine.json`` keys are all derived from these fields."""
    return field(default=default, metadata={"help": help, **meta})


# Old names still accepted in engine.json and on the command line, with a deprecation message.
RENAMED = {"block_size": "layers_per_block", "engine": "backend"}


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs to know, checked once at construction.

    Invalid values raise ``ValueError`` naming the field.
    """

    model: str = option("default", "'default' (SmolLM2-135M-Instruct), a checkpoint directory or a .gguf file")
    dtype: str = option(
        "float32", "weights and activations: float32 (the exactness reference) or bfloat16", choices=DTYPES
    )
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    devices: tuple[str, ...] | None = option(
        None,
        "one process over several devices, e.g. cpu,cpu or cuda:0,cuda:1: each holds a contiguous range of blocks "
        "with their weights and K/V (balanced by measured cost; the first also holds the embedding and heads); "
        "with --pipeline-stages N, stage s runs on the s-th",
    )
    pipeline_stages: int = option(
        1,
        "pipeline stages as processes joined by torch.distributed (gloo): this process is stage 0 and owns the "
        "scheduler; each stage holds a contiguous block range and its K/V",
    )
    micro_batches: int | None = option(
        None,
        "pipeline stages: a full-depth step's batch is split into this many micro-batches in flight across the "
        "stages at once (default: one per stage; 1: none)",
    )
    stage_timeout_s: float = option(
        30.0, "pipeline stages: a stage that does not answer within this many seconds has failed"
    )
    weights: str = option(
        "none",
        "decoder linears and LM head: none (the dtype's own), bf16, int8 (per channel) or int4 (group-wise, "
        "LM head int8); bf16/int8/int4 need --dtype bfloat16 (the embedding lookup stays exact)",
        choices=WEIGHTS,
    )
    weight_group_size: int = option(
        32, "weights int4: input columns sharing one scale and zero", choices=WEIGHT_GROUP_SIZES
    )
    backend: str = option(
        "torch",
        "block backend: torch, or exported graphs (onnxruntime, tensorrt; exported on first use)",
        choices=BACKENDS,
    )
    export_dir: str | None = option(
        None, "where exported blocks live (default: a cache directory per model and layout)"
    )
    trt_precision: str = option(
        "fp16", "tensorrt backend: precision inside the engines (I/O stays float32)", choices=TRT_PRECISIONS
    )
    layers_per_block: int = option(2, "decoder layers per block (blocks are where tokens may exit)")
    block_boundaries: tuple[int, ...] | None = option(None, "explicit first layers of blocks, e.g. 0,10,20")
    page_size: int = option(16, "tokens per KV page")
    num_pages: int | None = option(None, "KV budget in pages (overrides --kv-budget-mb)")
    kv_budget_bytes: int = option(512 * 1024 * 1024, "KV budget in MiB", flag="kv-budget-mb", scale=1024 * 1024)
    kv_budget_fraction: float | None = option(
        None,
        "on a GPU: KV budget as this fraction of the memory free once the weights are loaded (overrides --kv-budget-mb)",
    )
    max_num_seqs: int = option(32, "sequences running at once")
    max_num_batched_tokens: int = option(1024, "tokens computed in one step (prompt chunks and decode rows)")
    max_model_len: int | None = option(None, "context length (default: the model's)")
    max_tokens_limit: int = option(4096, "largest max_tokens a request may ask for")
    num_threads: int | None = option(None, "torch intra-op threads (default: torch's choice)")
    fused_decode: bool = option(
        True,
        "torch backend, CPU, bfloat16: decode steps run the small ops between the matrix products as fused C++ "
        "kernels (compiled once on first use; eager where no compiler is found)",
    )
    int16_activations: bool | None = option(
        None,
        "int4/int8 weights on an AVX2 CPU without AVX512-BF16: decode products quantize each row's activations to "
        "int16 per 32 columns and multiply the weights as integers (twice the products per instruction of float32 "
        "FMAs, the same quality) (default: on wherever those kernels run)",
    )
    cuda_graphs: bool = option(
        True,
        "torch backend, one GPU: full-depth decode steps (exits off, up to 64 sequences) replay CUDA graphs captured "
        "once per batch and context bucket, one launch instead of ~1,100 kernels; eager where a step does not fit",
    )
    batch_invariant: bool | None = option(
        None,
        "torch backend, CPU, bfloat16, fused decode: prompt chunks also run through the fused per-row kernels, so "
        "every row computes the same bits whatever shares its step (lossless speculation then matches plain "
        "greedy at any concurrency; prompts prefill slower); default: on when spec is not none",
    )
    use_chat_template: bool = option(True, "wrap prompts in the tokenizer's chat template (--raw: send raw text)")
    seed: int = option(0, "seed of the random streams of requests that name no seed of their own")
    exit_policy: str = option(
        "none", "server default exit policy; requests may choose their own", choices=EXIT_POLICIES
    )
    exit_threshold: float = option(0.9, "softmax: top-1 probability; similarity: cosine; classifier: probability")
    exit_points: tuple[int, ...] | None = option(None, "layer depths (block ends) where tokens may leave, e.g. 10,20")
    min_exit_layer: int | None = option(
        None,
        f"no token leaves before this many layers (default: the block end nearest {MIN_EXIT_FRACTION} x the model's layers; "
        "with --exit-points, none)",
    )
    kv_fill: str = option(
        "propagate", "K/V of skipped layers: propagate (approximate, now) or recompute (exact, later)", choices=KV_FILLS
    )
    exit_classifier: str | None = option(None, "safetensors file for --exit-policy classifier")
    exit_head: str | None = option(None, "safetensors file of trained low-rank shortcuts (default: identity head)")
    exit_gate: str | None = option(None, "cheap gate before the softmax check", choices=EXIT_GATES)
    exit_gate_threshold: float = option(0.95, "threshold of --exit-gate")
    enable_prefix_sharing: bool = option(True, "share computed full prompt pages between identical prefixes")
    max_sessions: int = option(1024, "sessions kept at once; a new one closes the least recently used idle one")
    session_idle_timeout_s: float = option(600.0, "an idle session's pages are freed after this many seconds")
    spec: str = option(
        "none",
        "lossless mode's draft source (requests verified by the full model): none, ngram (prompt lookup), "
        "exit (the first --spec-exit-depth layers and the exit head) or easyspec; not none: requests are lossless",
        choices=SPEC_SOURCES,
    )
    spec_max_draft: int = option(8, "most draft tokens one sequence brings into a verification step")
    spec_exit_depth: int | None = option(
        None, "spec exit and easyspec: layers that draft, a block end (default: the block end nearest half the layers)"
    )
    spec_draft_threshold: float = option(
        0.3, "spec exit and easyspec: drafting stops when the exit head's top-1 probability falls below this (Kangaroo)"
    )
    spec_group_size: int = option(
        2,
        "spec easyspec: consecutive draft layers that all read their group's input (fuzzy speculation, R5); "
        "1 drafts exactly, as the exit source",
    )
    spec_adaptive: bool = option(True, "adapt each sequence's draft length to its acceptance (else always the most)")
    spec_verify_row_cost: float | None = option(
        None, "cost of one extra verification row relative to a decode step (default: measured for the dtype)"
    )
    spec_retry_steps: int = option(
        16, "a sequence whose drafts do not pay decodes plainly this many steps, then retries (then 2x, up to 16x)"
    )

    sparsity: float = option(
        1.0,
        "contextual sparsity: share of FFN neuron groups each decode token computes, in (0, 1] (1.0: dense); "
        "below 1 needs --sparsity-predictor; requests may ask for their own (sampling_parameters 'sparsity')",
    )
    head_density: float = option(1.0, "contextual sparsity: share of query heads each sparse decode token computes")
    sparsity_predictor: str | None = option(
        None, "safetensors predictor from offramp calibrate --sparsity (unified or per-layer)"
    )
    sparsity_floor: float = option(
        0.0,
        "contextual sparsity's confidence floor: a layer whose kept heads or groups hold less than this share "
        "of the predicted importance runs dense for that token (0: never)",
    )
    sparsity_batching: str = option(
        "union",
        "sparse rows of one step: union (all rows over the union of their selections) or per_row (each its own)",
        choices=SPARSITY_BATCHING,
    )
    sparsity_max_gap: int = option(
        0,
        "contextual sparsity: also compute gaps of at most this many skipped neuron groups between kept ones "
        "(one product instead of two; bfloat16 products have a large fixed cost on the CPU)",
    )
    sparsity_group_size: int | None = option(
        None, "FFN neurons per group the predictor must have been trained for (default: the file's own)"
    )

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model: must be 'default' or a path to a checkpoint directory or GGUF file")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device is not None and (not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device)):
            raise ValueError(f"device: {self.device!r} is not cpu, cuda or cuda:N")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        self._check_weights()
        self._check_placement()
        if self.batch_invariant is not None and not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant: must be true, false or null (auto), got {self.batch_invariant!r}")
        if self.backend != "torch" and self.dtype != "float32":
            raise ValueError(f"dtype: the {self.backend} backend runs the float32 export; use dtype float32")
        if self.trt_precision not in TRT_PRECISIONS:
            raise ValueError(f"trt_precision: {self.trt_precision!r} is not one of {', '.join(TRT_PRECISIONS)}")
        if self.export_dir is not None and (not isinstance(self.export_dir, str) or not self.export_dir):
            raise ValueError("export_dir: must be a directory path")
        _positive("layers_per_block", self.layers_per_block)
        _positive("page_size", self.page_size)
        _positive("kv_budget_bytes", self.kv_budget_bytes)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_tokens_limit", self.max_tokens_limit)
        if self.num_pages is not None:
            _positive("num_pages", self.num_pages)
        fraction = self.kv_budget_fraction
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1
        ):
            raise ValueError(f"kv_budget_fraction: must be a number in (0, 1), got {fraction!r}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.num_threads is not None:
            _positive("num_threads", self.num_threads)
        if self.exit_policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy: {self.exit_policy!r} is not one of {', '.join(EXIT_POLICIES)}")
        if self.exit_gate not in (None, *EXIT_GATES):
            raise ValueError(f"exit_gate: {self.exit_gate!r} is not one of {', '.join(EXIT_GATES)}")
        if isinstance(self.exit_gate_threshold, bool) or not isinstance(self.exit_gate_threshold, (int, float)):
            raise ValueError(f"exit_gate_threshold: must be a number, got {self.exit_gate_threshold!r}")
        if self.kv_fill not in KV_FILLS:
            raise ValueError(f"kv_fill: {self.kv_fill!r} is not one of {', '.join(KV_FILLS)}")
        if isinstance(self.exit_threshold, bool) or not isinstance(self.exit_threshold, (int, float)):
            raise ValueError(f"exit_threshold: must be a number, got {self.exit_threshold!r}")
        if self.min_exit_layer is not None:
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
        self._check_spec()
        self._check_sparsity()

    def _check_sparsity(self) -> None:
        _fraction("sparsity", self.sparsity)
        _fraction("head_density", self.head_density)
        floor = self.sparsity_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(f"sparsity_floor: must be a number in [0, 1], got {floor!r}")
        if self.sparsity_batching not in SPARSITY_BATCHING:
            raise ValueError(
                f"sparsity_batching: {self.sparsity_batching!r} is not one of {', '.join(SPARSITY_BATCHING)}"
            )
        if self.sparsity_group_size is not None:
            _positive("sparsity_group_size", self.sparsity_group_size)
        gap = self.sparsity_max_gap
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"sparsity_max_gap: must be an integer >= 0, got {gap!r}")
        if self.sparsity_predictor is not None and (
            not isinstance(self.sparsity_predictor, str) or not self.sparsity_predictor
        ):
            raise ValueError("sparsity_predictor: must be a file path")
        if (self.sparsity < 1 or self.head_density < 1) and self.sparsity_predictor is None:
            raise ValueError(
                "sparsity: below 1 needs a predictor (--sparsity-predictor, from offramp calibrate --sparsity)"
            )
        if self.sparsity_predictor is not None and (self.backend != "torch" or self.weights in ("int8", "int4")):
            raise ValueError(
                "sparsity_predictor: sparse decode runs in the torch backend on float weights "
                "(--weights none or bf16), not int8/int4 or exported backends"
            )
        if self.sparsity_predictor is not None and (self.pipeline_stages > 1 or len(self.devices or ()) > 1):
            raise ValueError(
                "sparsity_predictor: sparse decode runs the blocks in one process on one device, "
                f"not over pipeline stages ({self.pipeline_stages}) or devices ({','.join(self.devices or ())})"
            )

    def _check_placement(self) -> None:
        _positive("pipeline_stages", self.pipeline_stages)
        if self.micro_batches is not None:
            _positive("micro_batches", self.micro_batches)
        timeout = self.stage_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"stage_timeout_s: must be a positive number of seconds, got {timeout!r}")
        if self.devices is not None:
            devices = tuple(self.devices)
            if not devices or any(not isinstance(d, str) or not DEVICE_PATTERN.match(d) for d in devices):
                raise ValueError(
                    f"devices: {','.join(map(str, devices)) or '(none)'} is not a list of cpu, cuda, cuda:N"
                )
            self.devices = devices
            if self.device is not None and self.device != devices[0]:
                raise ValueError(f"device: {self.device} differs from the first of --devices ({devices[0]}); give one")
            if self.pipeline_stages > 1 and len(devices) != self.pipeline_stages:
                raise ValueError(
                    f"devices: {len(devices)} devices for {self.pipeline_stages} pipeline stages; give one per stage"
                )
        if self.is_placed and self.backend != "torch":
            raise ValueError(f"backend: {self.backend} does not run split over devices or stages yet; use torch")

    @property
    def is_placed(self) -> bool:
        """Blocks split over several devices (``devices``) or processes (``pipeline_stages``)."""
        return self.pipeline_stages > 1 or (self.devices is not None and len(self.devices) > 1)

    def _check_spec(self) -> None:
        if self.spec not in SPEC_SOURCES:
            raise ValueError(f"spec: {self.spec!r} is not one of {', '.join(SPEC_SOURCES)}")
        _positive("spec_max_draft", self.spec_max_draft)
        _positive("spec_retry_steps", self.spec_retry_steps)
        _positive("spec_group_size", self.spec_group_size)
        if self.spec_exit_depth is not None:
            _positive("spec_exit_depth", self.spec_exit_depth)
        threshold = self.spec_draft_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"spec_draft_threshold: must be a probability in [0, 1), got {threshold!r}")
        cost = self.spec_verify_row_cost
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost <= 1):
            raise ValueError(f"spec_verify_row_cost: must be a number in [0, 1], got {cost!r}")
        if not isinstance(self.spec_adaptive, bool):
            raise ValueError(f"spec_adaptive: must be true or false, got {self.spec_adaptive!r}")

    def _check_weights(self) -> None:
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights: {self.weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.int16_activations not in (None, True, False):
            raise ValueError(f"int16_activations: must be true or false, got {self.int16_activations!r}")
        if self.int16_activations and self.weights not in ("int4", "int8"):
            raise ValueError(f"int16_activations: only int4/int8 weights take them, not weights {self.weights}")
        if self.weight_group_size not in WEIGHT_GROUP_SIZES:
            sizes = ", ".join(map(str, WEIGHT_GROUP_SIZES))
            raise ValueError(f"weight_group_size: {self.weight_group_size!r} is not one of {sizes}")
        if self.weights == "none":
            return
        if self.backend != "torch":
            raise ValueError(f"weights: {self.weights} runs in the torch backend only so far; use --backend torch")
        if self.dtype != "bfloat16":
            why = "" if self.weights == "bf16" else " (x86 has no vectorised float32 kernel for it: ~10-100x slower)"
            raise ValueError(f"weights: {self.weights} computes with bfloat16 activations{why}; use --dtype bfloat16")

    @property
    def rows_invariant(self) -> bool:
        """``batch_invariant`` resolved: as set, else on where the server speculates."""
        return self.batch_invariant if self.batch_invariant is not None else self.spec != "none"

    def exit_depths(self, num_layers: int) -> set[int]:
        return config_layout.exit_depths(self, num_layers)

    def min_exit_depth(self, num_layers: int) -> int:
        return config_layout.min_exit_depth(self, num_layers)

    def block_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        return config_layout.block_ranges(self, num_layers)


def upgrade_renamed(raw: dict, where: str) -> dict:
    """Accept the old names of renamed options (``RENAMED``), with a deprecation message."""
    for old, new in RENAMED.items():
        if old in raw:
            if new in raw:
                raise ValueError(f"{where}: both {old!r} (its old name) and {new!r} are set; keep {new!r}")
            logging.getLogger("offramp").warning("%s: %r is deprecated; it is now called %r", where, old, new)
            raw[new] = raw.pop(old)
    return raw


def config_from_dict(raw: dict, where: str) -> EngineConfig:
    """An ``EngineConfig`` from JSON-like settings: old names upgraded, unknown keys refused, lists
    made tuples."""
    raw = upgrade_renamed(dict(raw), where)
    names = {f.name for f in fields(EngineConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}")
    for key in ("block_boundaries", "exit_points", "devices"):
        if isinstance(raw.get(key), list):
            raw[key] = tuple(raw[key])
    return EngineConfig(**raw)


def _fraction(name: str, value: object) -> None:
    """A density: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: must be a number in (0, 1], got {value!r}")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
