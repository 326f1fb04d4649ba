"""Builds the block backend a config names, and says what KV layout it needs.

Exported backends read graphs that ``offramp_export`` wrote (the engine exports on first use before
calling here); this package never imports the exporter, so the exporter can import it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from offramp.blocks.base import BlockBackend
from offramp.config import EngineConfig
from offramp.model.decoder import ModelWeights
from offramp.model.kv_store import KVStore


def kv_layout(config: EngineConfig, device: torch.device) -> tuple[torch.device, bool]:
    """(device of the KV pages, head-major?) for ``config.backend``: the torch backend keeps them on
    the engine's device; exported graphs read head-major pages, ONNX Runtime on the CPU, TensorRT on
    the GPU."""
    if config.backend == "torch":
        return device, False
    if config.backend == "tensorrt":
        return (device if device.type == "cuda" else torch.device("cuda")), True
    return torch.device("cpu"), True


def build_backend(
    config: EngineConfig,
    weights: ModelWeights,
    kv: KVStore,
    block_ranges: list[tuple[int, int]],
    export_dir: Path | None = None,
) -> BlockBackend:
    """The backend of ``config.backend`` over ``kv``; exported ones load the graphs in ``export_dir``."""
    if config.backend == "torch":
        from offramp.blocks.torch_backend import TorchBackend

        return TorchBackend(weights, kv, block_ranges, fused=config.fused_decode, invariant=config.rows_invariant)
    if export_dir is None:
        raise ValueError(f"backend {config.backend}: needs an export directory (offramp export)")
    if config.backend == "onnxruntime":
        from offramp.blocks.ort_backend import OrtBackend

        return OrtBackend(weights, kv, block_ranges, export_dir, config.num_threads)
    from offramp.blocks.trt_backend import TrtBackend

    return TrtBackend(weights, kv, block_ranges, export_dir, config.trt_precision)
