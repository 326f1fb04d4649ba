"""One validated configuration for the engine: the single source of every engine option.

The ``offramp`` command-line flags, the ``offramp serve`` overrides and the keys of a served model's
``engine.json`` are all derived from ``EngineConfig``'s fields (name, type, default, help).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields

from offramp import config_checks, config_layout
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
        "float32",
        "weights and activations: float32 (the exactness reference) or bfloat16 (the command line's default with "
        "--weights bf16/int8/int4)",
        choices=DTYPES,
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
        "LM head int8); bf16/int8/int4 compute in bfloat16 (--dtype float32 is refused; the embedding lookup stays "
        "exact)",
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
        config_checks.check(self)

    @property
    def is_placed(self) -> bool:
        """Blocks split over several devices (``devices``) or processes (``pipeline_stages``)."""
        return self.pipeline_stages > 1 or (self.devices is not None and len(self.devices) > 1)

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
