"""TensorRT engines from the exported ONNX blocks (NVIDIA GPUs only).

One engine per block, built with one optimization profile whose ranges cover what the scheduler
can send: 1..max_num_seqs sequences, 1..max_num_batched_tokens rows, contexts up to
max_model_len, and the whole KV store. Engines are cached beside the ONNX files as
``block_XX.<precision>.plan``; ``tensorrt.json`` records what they were built for (TensorRT
version, GPU, precision, limits) and a matching cache is reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from offramp.blocks.manifest import ExportManifest

PRECISIONS = ("fp32", "fp16", "bf16")
CACHE_NAME = "tensorrt.json"


class TensorRTUnavailable(RuntimeError):
    """No ``tensorrt`` module or no CUDA GPU: the TensorRT path is skipped (one clear message)."""


@dataclass(slots=True)
class ProfileLimits:
    """The largest step a block engine must accept (from the engine config)."""

    max_num_seqs: int = 32
    max_rows: int = 1024  # max_num_batched_tokens
    max_context: int = 8192  # max_model_len
    num_slots: int = 16 * 728  # num_pages * page_size of the KV store

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_rows", "max_context", "num_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclass(slots=True)
class BuildResult:
    engines: list[Path]
    reused: bool
    seconds: float


Shape = tuple[int, ...]


def profile_shapes(
    manifest: ExportManifest, layers_in_block: int, num_kv_heads: int, head_dim: int, limits: ProfileLimits
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every block input. ``opt`` is a full decode step: the shape that
    runs most often."""
    page = manifest.page_size
    hidden = manifest.hidden_size
    max_pages = -(-limits.max_context // page)
    seqs, rows = limits.max_num_seqs, limits.max_rows
    rows_per_seq = min(rows, limits.max_context)
    decode_pages = min(max_pages, -(-512 // page))  # opt: contexts around 512 tokens
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        "hidden": ((1, hidden), (seqs, hidden), (rows, hidden)),
        "cos": ((1, head_dim), (seqs, head_dim), (rows, head_dim)),
        "sin": ((1, head_dim), (seqs, head_dim), (rows, head_dim)),
        "page_ids": ((1, 1), (seqs, decode_pages), (seqs, max_pages)),
        "mask": (
            (1, 1, page + 1),
            (seqs, 1, decode_pages * page + 1),
            (seqs, rows_per_seq, max_pages * page + rows_per_seq),
        ),
    }
    store = (
        (num_kv_heads, page, head_dim),
        (num_kv_heads, limits.num_slots, head_dim),
        (num_kv_heads, limits.num_slots, head_dim),
    )
    for i in range(layers_in_block):
        shapes[f"k_store.{i}"] = store
        shapes[f"v_store.{i}"] = store
    return shapes


def check_tensorrt():
    """The tensorrt module and the GPU's name; raises ``TensorRTUnavailable`` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("the 'tensorrt' Python package is not installed (pip install tensorrt)") from None
    try:
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no CUDA GPU is visible to this process")
        gpu = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a dependency
        raise TensorRTUnavailable("torch is needed to find the GPU") from None
    return trt, gpu


def build_engines(
    export_dir: Path,
    precision: str = "fp16",
    limits: ProfileLimits | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Build (or reuse) one serialized TensorRT engine per exported block."""
    if precision not in PRECISIONS:
        raise ValueError(f"trt_precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    trt, gpu = check_tensorrt()
    t0 = time.perf_counter()
    export_dir = Path(export_dir)
    manifest = ExportManifest.load(export_dir)
    limits = limits or ProfileLimits()
    record = {
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "precision": precision,
        "limits": asdict(limits),
        "source_checksum": manifest.source_checksum,
    }
    plans = [export_dir / Path(b.file).with_suffix(f".{precision}.plan").name for b in manifest.blocks]
    cache = export_dir / CACHE_NAME
    if not force and cache.is_file() and all(p.is_file() for p in plans):
        if json.loads(cache.read_text()).get(precision) == record:
            return BuildResult(plans, True, time.perf_counter() - t0)
    logger = trt.Logger(trt.Logger.WARNING)
    for block, plan in tqdm(list(zip(manifest.blocks, plans)), desc="tensorrt build", disable=not progress):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(export_dir / block.file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse {block.file}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        kv_heads = num_kv_heads or network.get_input(5).shape[0]
        hd = head_dim or network.get_input(1).shape[1]
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(manifest, block.end - block.start, kv_heads, hd, limits).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT could not build an engine for {block.file} (see the log above)")
        plan.write_bytes(bytes(serialized))
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    cached[precision] = record
    cache.write_text(json.dumps(cached, indent=2) + "\n")
    return BuildResult(plans, False, time.perf_counter() - t0)
