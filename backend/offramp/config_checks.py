"""The checks of ``EngineConfig``: each field's value and the combinations the engine cannot run.

Part of the configuration layer: ``offramp.config`` defines the options (names, defaults, help, choices)
and calls ``check`` once per config; a bad value is one ``ValueError`` naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from offramp import config as options  # the choices (a module imported while it defines EngineConfig)

if TYPE_CHECKING:
    from offramp.config import EngineConfig


def check(c: EngineConfig) -> None:
    """Every field's value, and the combinations the engine cannot run (``ValueError`` naming the field).
    List-valued fields become tuples (``exit_points`` sorted, without repeats)."""
    if not isinstance(c.model, str) or not c.model:
        raise ValueError("model: must be 'default' or a path to a checkpoint directory or GGUF file")
    if c.dtype not in options.DTYPES:
        raise ValueError(f"dtype: {c.dtype!r} is not one of {', '.join(options.DTYPES)}")
    if c.device is not None and (not isinstance(c.device, str) or not options.DEVICE_PATTERN.match(c.device)):
        raise ValueError(f"device: {c.device!r} is not cpu, cuda or cuda:N")
    if c.backend not in options.BACKENDS:
        raise ValueError(f"backend: {c.backend!r} is not one of {', '.join(options.BACKENDS)}")
    _check_weights(c)
    _check_placement(c)
    if c.batch_invariant is not None and not isinstance(c.batch_invariant, bool):
        raise ValueError(f"batch_invariant: must be true, false or null (auto), got {c.batch_invariant!r}")
    if c.backend != "torch" and c.dtype != "float32":
        raise ValueError(f"dtype: the {c.backend} backend runs the float32 export; use dtype float32")
    if c.trt_precision not in options.TRT_PRECISIONS:
        raise ValueError(f"trt_precision: {c.trt_precision!r} is not one of {', '.join(options.TRT_PRECISIONS)}")
    if c.export_dir is not None and (not isinstance(c.export_dir, str) or not c.export_dir):
        raise ValueError("export_dir: must be a directory path")
    _positive("layers_per_block", c.layers_per_block)
    _positive("page_size", c.page_size)
    _positive("kv_budget_bytes", c.kv_budget_bytes)
    _positive("max_num_seqs", c.max_num_seqs)
    _positive("max_num_batched_tokens", c.max_num_batched_tokens)
    _positive("max_tokens_limit", c.max_tokens_limit)
    if c.num_pages is not None:
        _positive("num_pages", c.num_pages)
    fraction = c.kv_budget_fraction
    if fraction is not None and (
        isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1
    ):
        raise ValueError(f"kv_budget_fraction: must be a number in (0, 1), got {fraction!r}")
    if c.max_model_len is not None:
        _positive("max_model_len", c.max_model_len)
    if c.num_threads is not None:
        _positive("num_threads", c.num_threads)
    if c.exit_policy not in options.EXIT_POLICIES:
        raise ValueError(f"exit_policy: {c.exit_policy!r} is not one of {', '.join(options.EXIT_POLICIES)}")
    if c.exit_gate not in (None, *options.EXIT_GATES):
        raise ValueError(f"exit_gate: {c.exit_gate!r} is not one of {', '.join(options.EXIT_GATES)}")
    if isinstance(c.exit_gate_threshold, bool) or not isinstance(c.exit_gate_threshold, (int, float)):
        raise ValueError(f"exit_gate_threshold: must be a number, got {c.exit_gate_threshold!r}")
    if c.kv_fill not in options.KV_FILLS:
        raise ValueError(f"kv_fill: {c.kv_fill!r} is not one of {', '.join(options.KV_FILLS)}")
    if isinstance(c.exit_threshold, bool) or not isinstance(c.exit_threshold, (int, float)):
        raise ValueError(f"exit_threshold: must be a number, got {c.exit_threshold!r}")
    if c.min_exit_layer is not None:
        _positive("min_exit_layer", c.min_exit_layer)
    _positive("max_sessions", c.max_sessions)
    if not isinstance(c.enable_prefix_sharing, bool):
        raise ValueError(f"enable_prefix_sharing: must be true or false, got {c.enable_prefix_sharing!r}")
    timeout = c.session_idle_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"session_idle_timeout_s: must be a positive number of seconds, got {timeout!r}")
    if c.exit_points is not None:
        points = tuple(c.exit_points)
        if not points or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in points):
            raise ValueError("exit_points: must be positive layer depths, e.g. (10, 20)")
        c.exit_points = tuple(sorted(set(points)))
    if c.block_boundaries is not None:
        bounds = tuple(c.block_boundaries)
        if not bounds or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError("block_boundaries: must start at 0 and be strictly increasing, e.g. (0, 10, 20)")
        c.block_boundaries = bounds
    _check_spec(c)
    _check_sparsity(c)


def _check_sparsity(c: EngineConfig) -> None:
    _fraction("sparsity", c.sparsity)
    _fraction("head_density", c.head_density)
    floor = c.sparsity_floor
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise ValueError(f"sparsity_floor: must be a number in [0, 1], got {floor!r}")
    if c.sparsity_batching not in options.SPARSITY_BATCHING:
        raise ValueError(
            f"sparsity_batching: {c.sparsity_batching!r} is not one of {', '.join(options.SPARSITY_BATCHING)}"
        )
    if c.sparsity_group_size is not None:
        _positive("sparsity_group_size", c.sparsity_group_size)
    gap = c.sparsity_max_gap
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"sparsity_max_gap: must be an integer >= 0, got {gap!r}")
    if c.sparsity_predictor is not None and (not isinstance(c.sparsity_predictor, str) or not c.sparsity_predictor):
        raise ValueError("sparsity_predictor: must be a file path")
    if (c.sparsity < 1 or c.head_density < 1) and c.sparsity_predictor is None:
        raise ValueError(
            "sparsity: below 1 needs a predictor (--sparsity-predictor, from offramp calibrate --sparsity)"
        )
    if c.sparsity_predictor is not None and (c.backend != "torch" or c.weights in ("int8", "int4")):
        raise ValueError(
            "sparsity_predictor: sparse decode runs in the torch backend on float weights "
            "(--weights none or bf16), not int8/int4 or exported backends"
        )
    if c.sparsity_predictor is not None and (c.pipeline_stages > 1 or len(c.devices or ()) > 1):
        raise ValueError(
            "sparsity_predictor: sparse decode runs the blocks in one process on one device, "
            f"not over pipeline stages ({c.pipeline_stages}) or devices ({','.join(c.devices or ())})"
        )


def _check_placement(c: EngineConfig) -> None:
    _positive("pipeline_stages", c.pipeline_stages)
    if c.micro_batches is not None:
        _positive("micro_batches", c.micro_batches)
    timeout = c.stage_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"stage_timeout_s: must be a positive number of seconds, got {timeout!r}")
    if c.devices is not None:
        devices = tuple(c.devices)
        if not devices or any(not isinstance(d, str) or not options.DEVICE_PATTERN.match(d) for d in devices):
            raise ValueError(f"devices: {','.join(map(str, devices)) or '(none)'} is not a list of cpu, cuda, cuda:N")
        c.devices = devices
        if c.device is not None and c.device != devices[0]:
            raise ValueError(f"device: {c.device} differs from the first of --devices ({devices[0]}); give one")
        if c.pipeline_stages > 1 and len(devices) != c.pipeline_stages:
            raise ValueError(
                f"devices: {len(devices)} devices for {c.pipeline_stages} pipeline stages; give one per stage"
            )
    if c.is_placed and c.backend != "torch":
        raise ValueError(f"backend: {c.backend} does not run split over devices or stages yet; use torch")


def _check_spec(c: EngineConfig) -> None:
    if c.spec not in options.SPEC_SOURCES:
        raise ValueError(f"spec: {c.spec!r} is not one of {', '.join(options.SPEC_SOURCES)}")
    _positive("spec_max_draft", c.spec_max_draft)
    _positive("spec_retry_steps", c.spec_retry_steps)
    _positive("spec_group_size", c.spec_group_size)
    if c.spec_exit_depth is not None:
        _positive("spec_exit_depth", c.spec_exit_depth)
    threshold = c.spec_draft_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ValueError(f"spec_draft_threshold: must be a probability in [0, 1), got {threshold!r}")
    cost = c.spec_verify_row_cost
    if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost <= 1):
        raise ValueError(f"spec_verify_row_cost: must be a number in [0, 1], got {cost!r}")
    if not isinstance(c.spec_adaptive, bool):
        raise ValueError(f"spec_adaptive: must be true or false, got {c.spec_adaptive!r}")


def _check_weights(c: EngineConfig) -> None:
    if c.weights not in options.WEIGHTS:
        raise ValueError(f"weights: {c.weights!r} is not one of {', '.join(options.WEIGHTS)}")
    if c.int16_activations not in (None, True, False):
        raise ValueError(f"int16_activations: must be true or false, got {c.int16_activations!r}")
    if c.int16_activations and c.weights not in ("int4", "int8"):
        raise ValueError(f"int16_activations: only int4/int8 weights take them, not weights {c.weights}")
    if c.weight_group_size not in options.WEIGHT_GROUP_SIZES:
        sizes = ", ".join(map(str, options.WEIGHT_GROUP_SIZES))
        raise ValueError(f"weight_group_size: {c.weight_group_size!r} is not one of {sizes}")
    if c.weights == "none":
        return
    if c.backend != "torch":
        raise ValueError(f"weights: {c.weights} runs in the torch backend only so far; use --backend torch")
    if c.dtype != "bfloat16":
        why = "" if c.weights == "bf16" else " (x86 has no vectorised float32 kernel for it: ~10-100x slower)"
        raise ValueError(f"weights: {c.weights} computes with bfloat16 activations{why}; use --dtype bfloat16")


def _fraction(name: str, value: object) -> None:
    """A density: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: must be a number in (0, 1], got {value!r}")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
