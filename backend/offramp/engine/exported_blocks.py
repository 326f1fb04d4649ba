"""Exported backends' inputs: the blocks exported (or an up-to-date export reused) and, for
``tensorrt``, its engines built, before the engine builds the backend over them. The only place the
engine reaches into ``offramp_export``."""

from __future__ import annotations

import hashlib
from pathlib import Path

from offramp.config import EngineConfig
from offramp.model.loader import cache_root


def default_export_dir(checkpoint: Path, config: EngineConfig) -> Path:
    """Where exported blocks of this checkpoint and layout are cached when no export_dir is set."""
    key = repr(
        (
            str(checkpoint.resolve()),
            config.layers_per_block,
            config.block_boundaries,
            config.page_size,
            config.exit_head,
        )
    )
    return cache_root() / "export" / f"{checkpoint.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_export(
    config: EngineConfig,
    checkpoint: Path,
    block_ranges: list[tuple[int, int]],
    max_model_len: int,
    num_kv_slots: int,
    num_kv_heads: int,
) -> Path:
    """Export the blocks (or reuse an up-to-date export) and build the TensorRT engines for
    ``tensorrt``; returns the export directory."""
    from offramp_export import export_model
    from offramp_export.tensorrt_build import ProfileLimits, TensorRTUnavailable, build_engines, check_tensorrt

    try:
        if config.backend == "tensorrt":
            check_tensorrt()  # before exporting: fail fast where TensorRT cannot run
        export_dir = Path(config.export_dir) if config.export_dir else default_export_dir(checkpoint, config)
        exit_head = Path(config.exit_head) if config.exit_head else None
        weights_format, group_size = _export_weights(export_dir) if config.export_dir else ("none", 32)
        result = export_model(
            config.model,
            block_ranges,
            config.page_size,
            export_dir,
            exit_head,
            weights_format=weights_format,
            group_size=group_size,
        )
        if config.backend == "tensorrt":
            limits = ProfileLimits(config.max_num_seqs, config.max_num_batched_tokens, max_model_len, num_kv_slots)
            build_engines(result.directory, config.trt_precision, limits, num_kv_heads)
    except TensorRTUnavailable as exc:
        raise ValueError(f"backend tensorrt: {exc}; use backend onnxruntime or torch on this machine") from None
    return result.directory


def _export_weights(export_dir: Path) -> tuple[str, int]:
    """The weight format of an export the user names (``offramp export --weights int4``), kept when it is
    brought up to date; float32 where there is none yet."""
    from offramp.blocks.manifest import ExportManifest

    try:
        manifest = ExportManifest.load(export_dir)
    except ValueError:
        return "none", 32
    return manifest.weights, manifest.weight_group_size or 32
