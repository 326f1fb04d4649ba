"""Fused CPU decode: a block's layers in one C++ call, the small ops between the products fused.

A decode step on the CPU with bfloat16 activations spends more time in ~35 small eager ops per layer
(norms, RoPE, K/V writes, dtype copies, attention glue, SiLU, residual adds) than in its int4
products. For steps where no sequence brings more than a few rows (decodes, draft verification, redo
rows; not prompt chunks), ``decode_layers`` runs a block's layers in one call of the extension
(``csrc/decode_ops.cpp``), which calls torch's own product kernels and, between them, its fused ops:
RMSNorm, RoPE + K/V write + paged attention, residual add + RMSNorm, SiLU x up. It rounds to
bfloat16 where the eager ops do, so it matches ``decoder.decoder_layer`` up to the order of float32
sums (tested). Everything else (float32, prompt chunks, CUDA) stays eager. The
int8 and int4 products of any number of rows (prompt chunks too) use the extension's ``int8_mm`` (torch
has no group-wise int8 kernel) and ``int4_mm`` (faster than torch's).

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

from offramp.config import EngineConfig
from offramp.model import quant
from offramp.model.attention import AttentionGroup, AttentionMetadata
from offramp.model.decoder import LayerWeights, ModelShape, ModelWeights
from offramp.model.quant import Int4Weight, Int8Weight

log = logging.getLogger("offramp")

SOURCE = Path(__file__).parent / "csrc" / "decode_ops.cpp"
_lock = threading.Lock()
_state: dict[str, ModuleType | str] = {}


# OFFRAMP_KERNELS_ISA=avx2 builds the AVX2 kernels on an AVX-512 machine (a second extension beside the
# native one): with ATEN_CPU_CAPABILITY=avx2 (torch's AVX2 int4 packing) a process then runs as an AVX2
# CPU would, so the AVX2 paths are tested and timed on any x86 machine (tests/test_kernels_avx2.py).
ISA_ENV = "OFFRAMP_KERNELS_ISA"
# -mno-avx512f turns off every AVX-512 subset; avx512_no_vbmi builds the int4 unpacking that AVX-512 BF16 CPUs
# without VBMI (Cooper Lake) run: a lookup instead of the byte permute, the same bits (tests/test_kernels_avx2.py)
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "avx512_no_vbmi": ["-mno-avx512vbmi"]}


def kernels() -> ModuleType | None:
    """The compiled extension (built once per machine and source), or None where it cannot be built."""
    with _lock:
        if "ops" not in _state and "error" not in _state:
            try:
                ops = _state["ops"] = _build()
                if ops.int8_mm_fast():
                    quant.INT8_MM[0] = lambda x, q, s, act16: ops.int8_mm(x, q, s, DENSE_FROM_ROWS, act16)
                if ops.int4_mm_available():
                    quant.INT4_MM_BLOCK[0] = ops.int4_block_rows()
                    quant.INT4_MM[0] = lambda x, p, sz, g, n, act16: ops.int4_mm(x, p, sz, g, n, DENSE_FROM_ROWS, act16)
            except Exception as exc:  # no compiler, no ninja, a failed build: eager decode still works
                lines = str(exc).strip().splitlines() or [""]
                _state["error"] = f"{type(exc).__name__}: {lines[-1]}"
                log.warning("fused decode kernels unavailable, decoding with eager ops (%s)", _state["error"])
        return _state.get("ops")  # type: ignore[return-value]


def int16_activations_available() -> bool:
    """Whether the extension's int4 and int8 products take int16 activations here (its AVX2 kernels)."""
    ops = kernels()
    return ops is not None and bool(ops.int16_activations_available())


def int16_activations_for(wanted: bool | None, weights: str, device: torch.device) -> bool:
    """Whether decode products take int16 activations: ``int16_activations`` as configured (None: wherever the
    extension's AVX2 kernels run), for int4/int8 weights on the CPU only."""
    if weights not in ("int4", "int8") or device.type != "cpu":
        if wanted:
            raise ValueError(
                f"int16_activations: only int4/int8 weights on the CPU take them (not {weights} on {device})"
            )
        return False
    here = int16_activations_available()
    if wanted and not here:
        why = unavailable_reason() or "this CPU runs the AVX-512 bfloat16 kernels or none"
        raise ValueError(f"int16_activations: they are the extension's AVX2 kernels, which do not run here ({why})")
    return here if wanted is None else wanted


def prepare_products(weights: ModelWeights, config: EngineConfig, device: torch.device) -> None:
    """What an engine (or a pipeline stage) does once its weights are loaded on ``device``: int8/int4 on the
    CPU build the extension's products (eager torch/upcast without them), and take int16 activations where
    ``config`` asks for them (by default wherever the AVX2 kernels run)."""
    if config.weights in ("int8", "int4") and device.type == "cpu":
        kernels()
    if int16_activations_for(config.int16_activations, config.weights, device):
        use_int16_activations(weights, int4=not config.rows_invariant)


def use_int16_activations(weights: ModelWeights, int4: bool = True) -> None:
    """Mark the int8 linears of ``weights`` (layers a pipeline stage holds, and the LM head) to take int16
    activations in their decode products, and with ``int4`` the int4 ones too. int4 products take them for a
    lone row only (faster there, slower for several), so a row's bits then depend on what shares its step:
    an engine that needs them not to (``batch_invariant``) passes ``int4=False``."""
    linears = [
        w for layer in weights.layers if layer is not None for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
    ]
    for w in [*linears, weights.lm_head]:
        if isinstance(w, Int8Weight) or (int4 and isinstance(w, Int4Weight)):
            w.int16_act = True


def int4_product_available() -> bool:
    """Whether the extension's int4 product runs here (built, with AVX-512 BF16 or AVX2, and torch's
    int4 packing in the layout it reads); elsewhere int4 runs torch's own kernel."""
    ops = kernels()
    return ops is not None and bool(ops.int4_mm_available())


def unavailable_reason() -> str | None:
    kernels()
    return _state.get("error")  # type: ignore[return-value]


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    # ninja from the project's environment (a pip wheel) when it is not on PATH
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    isa = os.environ.get(ISA_ENV, "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    log.info("offramp: compiling the fused decode kernels (once per machine, about a minute)")
    return cpp_extension.load(
        name="offramp_decode_ops" + ("" if isa == "native" else f"_{isa}"),
        sources=[str(SOURCE)],
        # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds (without it, it runs serially); the
        # library resolves to the libgomp.so.1 torch has already loaded (same soname), one thread pool
        extra_cflags=["-O3", "-march=native", *ISA_FLAGS[isa], "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


# An int4/int8 product of this many rows or more outside the fused step (a prompt chunk) de-quantizes
# the weights to bfloat16 and runs one oneDNN product (int4: 1.6x faster at 1,024 rows); fused steps
# never do, so that decode and verification rows compute the same sums at any batch size.
DENSE_FROM_ROWS = 256
MAX_ROWS_PER_SEQ = 16  # a sequence bringing more new rows (a prompt chunk) runs eager: SDPA is the better kernel there


INT16_ACT = 8  # added to a linear's kind in pack_layers: the product takes int16 activations (kInt16Act)
ALL_ROWS = 1 << 62  # max_rows of a batch-invariant engine: prompt chunks run fused too


def can_fuse(hidden: torch.Tensor, meta: AttentionMetadata, max_rows: int = MAX_ROWS_PER_SEQ) -> bool:
    """Whether a step's rows can take the fused path: bfloat16 on the CPU and no sequence bringing more
    than ``max_rows`` rows (decodes, draft verification, redo rows; ``split_step`` separates a mixed
    step). The caller checks the K/V store is slot-major."""
    return can_fuse_some(hidden, meta, max_rows) and all(fusable_group(g, max_rows) for g in meta.groups)


def can_fuse_some(hidden: torch.Tensor, meta: AttentionMetadata, max_rows: int = MAX_ROWS_PER_SEQ) -> bool:
    """Whether some of a step's rows can take the fused path (see ``split_step``)."""
    return (
        hidden.dtype == torch.bfloat16
        and hidden.device.type == "cpu"
        and any(fusable_group(g, max_rows) for g in meta.groups)
        and meta.page_size & (meta.page_size - 1) == 0  # the kernel finds slots by shifts
    )


def fusable_group(g: AttentionGroup, max_rows: int = MAX_ROWS_PER_SEQ) -> bool:
    return g.max_new <= max_rows


def split_step(
    meta: AttentionMetadata, max_rows: int = MAX_ROWS_PER_SEQ
) -> list[tuple[int, int, AttentionMetadata, bool]]:
    """A step's rows as runs of consecutive groups that the fused kernels take (decodes, verification and
    redo rows; with ``max_rows`` = ``ALL_ROWS`` prompt chunks too) or not (prompt chunks):
    ``(row_start, row_end, the run's own metadata, fusable)``. A mixed step runs each run its way:
    sequences never read each other's rows, and a decode row then computes the same bits whatever
    shares its step (which lossless speculation relies on). Fused rows compute the same bits in any
    step; eager prompt rows follow the chunk (SDPA's and oneDNN's sums depend on the shapes)."""
    runs: list[list[AttentionGroup]] = []
    for g in meta.groups:
        if runs and fusable_group(runs[-1][-1], max_rows) == fusable_group(g, max_rows):
            runs[-1].append(g)
        else:
            runs.append([g])
    out = []
    for groups in runs:
        lo, hi = groups[0].row_start, groups[-1].row_end
        shifted = [
            AttentionGroup(g.row_start - lo, g.row_end - lo, g.num_seqs, g.max_new, g.kv_pages, g.mask) for g in groups
        ]
        sub = AttentionMetadata(
            meta.positions[lo:hi], meta.slot_mapping[lo:hi], meta.cos[lo:hi], meta.sin[lo:hi], shifted, meta.page_size
        )
        out.append((lo, hi, sub, fusable_group(groups[0], max_rows)))
    return out


def row_pages(meta: AttentionMetadata) -> torch.Tensor:
    """Each row's page table, [num_tokens, max_pages] long: a decode group has one row per sequence, a
    sequence's several rows share its table. Each row attends to positions up to its own (causal)."""
    parts = [g.kv_pages if g.max_new == 1 else g.kv_pages.expand(g.row_end - g.row_start, -1) for g in meta.groups]
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts]) if len(parts) > 1 else parts[0]


def pack_layers(layers: list[LayerWeights]) -> tuple[list[torch.Tensor], list[int]]:
    """What ``decode_block`` reads per layer: 11 tensors and 12 ints (see csrc/decode_ops.cpp)."""
    tensors: list[torch.Tensor] = []
    specs: list[int] = []
    for w in layers:
        bias = w.qkv_bias if w.qkv_bias is not None else torch.empty(0, dtype=w.input_norm.dtype)
        tensors += [w.input_norm, w.post_norm]
        for i, weight in enumerate((w.qkv, w.o_proj, w.gate_up, w.down)):
            if isinstance(weight, torch.Tensor):
                parts, spec = (weight, weight), (0, 0, weight.shape[0])
            elif isinstance(weight, Int8Weight):
                kind = 1 + INT16_ACT * weight.int16_act
                parts, spec = (weight.q, weight.scale), (kind, weight.group_size, weight.shape[0])
            elif isinstance(weight, Int4Weight):
                kind = 2 + INT16_ACT * weight.int16_act
                parts, spec = (weight.packed, weight.scale_zero), (kind, weight.group_size, weight.out_features)
            else:
                raise TypeError(f"fused decode: no kernel for a {type(weight).__name__} weight")
            tensors += [*parts, bias] if i == 0 else list(parts)
            specs += spec
    return tensors, specs


def decode_layers(
    ops: ModuleType,
    layers: list[LayerWeights],
    hidden: torch.Tensor,  # [n, hidden] bfloat16
    meta: AttentionMetadata,
    k_stores: list[torch.Tensor],  # per layer [num_slots, kv_heads, head_dim]
    v_stores: list[torch.Tensor],
    shape: ModelShape,
    pages: torch.Tensor | None = None,  # [n, max_pages]: row_pages(meta), when the caller has it
    packed: tuple[list[torch.Tensor], list[int]] | None = None,  # pack_layers(layers), when the caller has it
) -> torch.Tensor:  # [n, hidden] bfloat16
    """The layers in turn, as ``decoder_layer`` computes them, in one call of the extension."""
    n = hidden.shape[0]
    tensors, specs = pack_layers(layers) if packed is None else packed
    return ops.decode_block(
        hidden,
        tensors,
        specs,
        k_stores,
        v_stores,
        meta.cos.view(n, shape.head_dim),  # [n, hd]
        meta.sin.view(n, shape.head_dim),
        meta.slot_mapping,
        row_pages(meta) if pages is None else pages,
        meta.positions + 1,  # [n]: each row sees the positions up to its own
        shape.num_heads,
        shape.num_kv_heads,
        shape.head_dim,
        meta.page_size,
        shape.rms_norm_eps,
    )
