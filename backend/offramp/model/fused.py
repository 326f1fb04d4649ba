"""Fused CPU decode: the small ops between a layer's matrix products in one C++ call each.

A decode step on the CPU with bfloat16 activations spends more time in ~35 small eager ops per layer
(norms, RoPE, K/V writes, dtype copies, attention glue, SiLU, residual adds) than in its int4
products. For steps where no sequence brings more than a few rows (decodes, draft verification, redo
rows; not prompt chunks), ``decode_layers`` runs a range of layers with four calls around the four
products of each layer (``csrc/decode_ops.cpp``):
RMSNorm, RoPE + K/V write + paged attention, residual add + RMSNorm, SiLU x up. It rounds to
bfloat16 where the eager ops do, so it matches ``decoder.decoder_layer`` up to the order of float32
sums (tested). Everything else (float32, prompt chunks, CUDA) stays eager. The
int8 LM head of one to four rows uses the extension's ``int8_gemv`` (torch's kernel reads it slower).

The kernels are compiled on first use with ``torch.utils.cpp_extension`` (g++ and ninja; about a
minute, cached under torch's extension directory). Without a compiler the engine says so once and
runs eager.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from offramp.model import quant
from offramp.model.attention import AttentionMetadata
from offramp.model.decoder import LayerWeights, ModelShape, linear

log = logging.getLogger("offramp")

SOURCE = Path(__file__).parent / "csrc" / "decode_ops.cpp"
_lock = threading.Lock()
_state: dict[str, ModuleType | str] = {}


def kernels() -> ModuleType | None:
    """The compiled extension (built once per machine and source), or None where it cannot be built."""
    with _lock:
        if "ops" not in _state and "error" not in _state:
            try:
                _state["ops"] = _build()
                quant.SMALL_BATCH_INT8[0] = _state["ops"].int8_gemv
            except Exception as exc:  # no compiler, no ninja, a failed build: eager decode still works
                lines = str(exc).strip().splitlines() or [""]
                _state["error"] = f"{type(exc).__name__}: {lines[-1]}"
                log.warning("fused decode kernels unavailable, decoding with eager ops (%s)", _state["error"])
        return _state.get("ops")  # type: ignore[return-value]


def unavailable_reason() -> str | None:
    kernels()
    return _state.get("error")  # type: ignore[return-value]


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    # ninja from the project's environment (a pip wheel) when it is not on PATH
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    log.info("offramp: compiling the fused decode kernels (once per machine, about a minute)")
    return cpp_extension.load(
        name="offramp_decode_ops",
        sources=[str(SOURCE)],
        # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds (without it, it runs serially); the
        # library resolves to the libgomp.so.1 torch has already loaded (same soname), one thread pool
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


MAX_ROWS_PER_SEQ = 16  # a sequence bringing more new rows (a prompt chunk) runs eager: SDPA is the better kernel there


def can_fuse(hidden: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether a step can take the fused path: bfloat16 on the CPU and no sequence bringing more than
    ``MAX_ROWS_PER_SEQ`` rows (decodes, draft verification, redo rows). The caller checks the K/V store
    is slot-major."""
    return (
        hidden.dtype == torch.bfloat16
        and hidden.device.type == "cpu"
        and all(g.max_new <= MAX_ROWS_PER_SEQ for g in meta.groups)
        and meta.page_size & (meta.page_size - 1) == 0  # the kernel finds slots by shifts
    )


def row_pages(meta: AttentionMetadata) -> torch.Tensor:
    """Each row's page table, [num_tokens, max_pages] long: a decode group has one row per sequence, a
    sequence's several rows share its table. Each row attends to positions up to its own (causal)."""
    parts = [
        g.kv_pages if g.max_new == 1 else g.kv_pages.expand(g.row_end - g.row_start, -1) for g in meta.groups
    ]
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts]) if len(parts) > 1 else parts[0]


def decode_layers(
    ops: ModuleType,
    layers: list[LayerWeights],
    hidden: torch.Tensor,  # [n, hidden] bfloat16
    meta: AttentionMetadata,
    k_stores: list[torch.Tensor],  # per layer [num_slots, kv_heads, head_dim]
    v_stores: list[torch.Tensor],
    shape: ModelShape,
    pages: torch.Tensor | None = None,  # [n, max_pages]: row_pages(meta), when the caller has it
) -> torch.Tensor:  # [n, hidden] bfloat16
    """The layers in turn, as ``decoder_layer`` computes them, with the small ops fused."""
    n = hidden.shape[0]
    nh, nkv, hd, eps = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rms_norm_eps
    pages = row_pages(meta) if pages is None else pages
    cos, sin = meta.cos.view(n, hd), meta.sin.view(n, hd)  # [n, hd]
    lens = meta.positions + 1  # [n]: each row sees the positions up to its own
    x = hidden.contiguous()
    h = ops.rms_norm(x, layers[0].input_norm, eps)
    for i, w in enumerate(layers):
        qkv = linear(h, w.qkv, w.qkv_bias)  # [n, (nh + 2 nkv) * hd]
        attn = ops.rope_attend(
            qkv, cos, sin, k_stores[i], v_stores[i], meta.slot_mapping, pages, lens, nh, nkv, hd, meta.page_size
        )  # [n, nh * hd]
        x, h = ops.add_rms_norm(x, linear(attn, w.o_proj), w.post_norm, eps)
        down = linear(ops.silu_mul(linear(h, w.gate_up)), w.down)  # [n, hidden]
        if i + 1 < len(layers):
            x, h = ops.add_rms_norm(x, down, layers[i + 1].input_norm, eps)
        else:
            x = x + down
    return x
