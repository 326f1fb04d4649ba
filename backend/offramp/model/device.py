"""Where the model lives: resolving ``device`` (cpu | cuda | cuda:N) and moving weights there."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from offramp.config import DEVICE_PATTERN
from offramp.model.quant import Int4CudaWeight, Int4Weight


def available_devices() -> list[str]:
    """``cpu`` and every visible GPU, as ``cuda:N``."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]


def resolve_device(name: str | None) -> torch.device:
    """The device ``name`` asks for; None means ``cuda`` when a GPU is visible, else ``cpu``. A device
    that does not exist here raises ``ValueError`` naming the ones that do."""
    if name is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ValueError(f"device: {name!r} is not cpu, cuda or cuda:N")
    found = available_devices()
    wanted = "cuda:0" if name == "cuda" else name
    if wanted not in found:
        raise ValueError(f"device: {name} is not available on this host; devices here: {', '.join(found)}")
    return torch.device(wanted)


def to_device(obj, device: torch.device):
    """``obj`` with every tensor in it (dataclass fields, lists, dicts, nested) on ``device``. int4 weights
    change layout on the way to a GPU (torch's CPU and CUDA int4 kernels pack differently)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Int4Weight) and device.type == "cuda":
        return obj.to_cuda(device)
    if isinstance(obj, Int4CudaWeight) and device.type != "cuda":
        raise ValueError(f"weights int4: CUDA-packed weights cannot move to {device}; load them there")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@functools.cache
def cpu_vector_isa() -> str:
    """The widest vector extension the CPU kernels use here: ``avx512_bf16``, ``avx512``, ``avx2`` or
    ``other`` (the extension's products differ: bfloat16 dot products, float32 FMAs, torch's kernels)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "other"
    if os.environ.get("OFFRAMP_KERNELS_ISA") == "avx2" and {"avx2", "fma"} <= flags:
        return "avx2"  # the kernels built for AVX2 on a wider CPU (model/fused.py)
    if {"avx512f", "avx512_bf16"} <= flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "other"
