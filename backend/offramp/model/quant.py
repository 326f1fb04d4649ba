"""Weight-only quantized linear weights for torch's CPU kernels: int8 per output channel, int4 per group.

* ``Int8Weight``: symmetric, ``w ~ q * scale`` with one float16 scale per group of ``INT8_GROUP`` (32)
  input columns of a row: the layout of GGUF's Q8_0 blocks, which it holds exactly. Multiplied by the
  extension's ``int8_mm`` (``model.fused``) on the CPU, elsewhere by an upcast product.
* ``Int4Weight``: asymmetric groups of ``group_size`` input columns, ``w ~ (q - 8) * scale + zero``
  with ``q`` in 0..15, multiplied by ``torch.ops.aten._weight_int4pack_mm_for_cpu``. The kernel's packed
  layout depends on the CPU's vector width (rows are interleaved in blocks of up to 64), so what is
  stored on disk is the portable ``Int4Codes`` form and the kernel layout is made at load.

int4 scales and zeros are bfloat16 because the CPU kernels take them in the activation dtype; int8
scales are float16 like Q8_0's (exact in float32, where the kernel applies them). Quantization here is
round-to-nearest (RTN); GGUF's own blocks become ``Int4Codes`` / ``Int8Weight`` in ``gguf_blocks``.

Why int8 is group-wise, not per output channel: on a checkpoint that is itself 4-bit (the default
model's GGUF), per-channel int8 rounds the Q4_1 grid again and loses agreement with the file's own
model (0.964 teacher-forced on the bundled prompts, below the 0.97 bar), while 32-column groups follow
each block's range closely; and the Q8_0 head is then used as stored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

ROW_MULTIPLE = 16  # the CPU int4 packer needs N % 16 == 0: other widths get zero rows (sliced off)
ROW_BLOCK = 64  # the widest row interleave of the CPU int4 layout: row slices at multiples of it stay valid
INT8_GROUP = 32  # input columns per int8 scale: GGUF's Q8_0 block
# The group-wise int8 product on the CPU (any number of rows); set by ``model.fused`` once its kernels
# are built, else the upcast product runs.
INT8_MM: list = [None]
# The int4 product of any number of rows in torch's CPU layout (bfloat16 dot products; 1.3-1.8x faster than
# torch's kernel from 2 rows on, and the same float32 sums for every batch size); set by ``model.fused``.
INT4_MM: list = [None]
INT4_MM_BLOCK = [ROW_BLOCK]  # output rows per block of the layout INT4_MM reads (64 with AVX-512, 32 with AVX2)


@dataclass(slots=True)
class Int8Weight:
    """Weight-only int8, symmetric, one float16 scale per group of input columns: ``w = q * scale``."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // group_size] float16
    int16_act: bool = False  # decode products take int16 activations (the AVX2 kernels; LLMEngine sets it)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def numel(self) -> int:
        return self.q.numel()

    def nbytes(self) -> int:
        return _nbytes(self.q, self.scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [n, K] bfloat16 -> [n, N] bfloat16
        if INT8_MM[0] is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            return INT8_MM[0](x.contiguous(), self.q, self.scale, self.int16_act)
        # other devices (CUDA) and CPUs without the extension: an upcast product, the weights de-quantized
        # to the activations' dtype (q * s rounded once)
        return torch.nn.functional.linear(x, self.dequantize().to(x.dtype))

    def rows(self, start: int) -> Int8Weight | None:
        """Output rows ``start:`` (e.g. the K/V part of a fused QKV)."""
        return Int8Weight(self.q[start:], self.scale[start:], self.int16_act)

    def dequantize(self) -> torch.Tensor:  # [N, K] float32 (exact: q * scale has at most 19 significant bits)
        return self.q.float() * self.scale.float().repeat_interleave(self.group_size, dim=1)


@dataclass(slots=True)
class Int4Codes:
    """The portable int4 form: ``w = (codes - 8) * scale + zero`` per group of input columns."""

    codes: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor  # [N, K // group_size] float32
    group_size: int

    def dequantize(self) -> torch.Tensor:  # [N, K] float32, with the scales and zeros as held
        scale = self.scale.repeat_interleave(self.group_size, dim=1)  # [N, K]
        zero = self.zero.repeat_interleave(self.group_size, dim=1)  # [N, K]
        return (self.codes.float() - 8) * scale + zero

    def scale_zero(self) -> torch.Tensor:  # [K // group, N, 2] bfloat16, as the CPU kernel reads them
        return torch.stack((self.scale, self.zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


@dataclass(slots=True)
class Int4Weight:
    """Weight-only int4 in the CPU kernel's packed layout (made at load, not portable across CPUs)."""

    packed: torch.Tensor  # [N_pad, K // 2] uint8, N_pad = N rounded up to a multiple of 16
    scale_zero: torch.Tensor  # [K // group_size, N_pad, 2] bfloat16
    group_size: int
    out_features: int  # N: rows beyond it are zero padding
    int16_act: bool = False  # decode products take int16 activations (the AVX2 kernels; LLMEngine sets it)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.packed.shape[1] * 2)

    def numel(self) -> int:
        return self.out_features * self.packed.shape[1] * 2

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scale_zero)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [n, K] bfloat16 -> [n, N] bfloat16
        if INT4_MM[0] is not None and x.device.type == "cpu" and self.packed.shape[0] % INT4_MM_BLOCK[0] == 0:
            return INT4_MM[0](
                x.contiguous(), self.packed, self.scale_zero, self.group_size, self.out_features, self.int16_act
            )
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group_size, self.scale_zero)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def rows(self, start: int) -> Int4Weight | None:
        """Output rows ``start:``, or None where the packed layout cannot be cut there."""
        if start % ROW_BLOCK:
            return None
        sz = self.scale_zero[:, start:].contiguous()  # [K // group, N_pad - start, 2]
        return Int4Weight(self.packed[start:], sz, self.group_size, self.out_features - start, self.int16_act)

    def dequantize(self) -> torch.Tensor:  # [N, K] float32 (exact: the kernel's own float32 path on I)
        k = self.packed.shape[1] * 2
        eye = torch.eye(k, dtype=torch.float32)
        cols = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero.float())
        return cols.t()[: self.out_features].contiguous()

    def codes(self) -> torch.Tensor:  # [N_pad, K] uint8 codes 0..15, read back out of the CPU layout
        n_pad, k = self.packed.shape[0], self.packed.shape[1] * 2
        flat = torch.empty(n_pad * k, dtype=torch.uint8)
        flat[_cpu_layout_sources(n_pad, k)] = _nibbles_in_order(self.packed).to(torch.uint8)
        return flat.view(n_pad, k)

    def to_cuda(self, device: torch.device) -> Int4CudaWeight:
        """The same codes, scales and zeros in the layout of torch's CUDA int4 kernel."""
        k = self.packed.shape[1] * 2
        if self.group_size not in INT4_CUDA_GROUPS:
            sizes = ", ".join(map(str, INT4_CUDA_GROUPS))
            raise ValueError(f"weight_group_size: {self.group_size} is not one the CUDA int4 kernel takes ({sizes})")
        tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
        if tiles is None:
            raise ValueError(f"weights int4 on CUDA: the input width {k} is not a multiple of 32")
        codes = self.codes()  # [N_pad, K], N_pad a multiple of 16 (the CUDA kernel needs 8)
        pairs = (codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous()  # [N_pad, K // 2]: even column high
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.to(device), tiles)
        return Int4CudaWeight(packed, self.scale_zero.to(device), self.group_size, self.out_features, k)


INT4_CUDA_GROUPS = (32, 64, 128, 256)  # group sizes torch's CUDA int4 kernel takes


@dataclass(slots=True)
class Int4CudaWeight:
    """``Int4Weight``'s codes, scales and zeros in torch's CUDA layout (tiles for ``_weight_int4pack_mm``,
    the tensor-core kernel of gpt-fast/torchao): made from the CPU form when the model moves to a GPU."""

    packed: torch.Tensor  # [N_pad / 8, K / (inner_k_tiles * 16), 32, inner_k_tiles / 2] int32
    scale_zero: torch.Tensor  # [K // group_size, N_pad, 2] bfloat16: w = (q - 8) * scale + zero
    group_size: int
    out_features: int  # N: rows beyond it are zero padding
    in_features: int  # K

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def numel(self) -> int:
        return self.out_features * self.in_features

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scale_zero)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [n, K] bfloat16 -> [n, N] bfloat16
        y = torch.ops.aten._weight_int4pack_mm(x.contiguous(), self.packed, self.group_size, self.scale_zero)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def rows(self, start: int) -> None:
        """The tiles interleave output rows: never cut (the caller runs the whole product)."""
        return None

    def dequantize(self) -> torch.Tensor:  # [N, K] float32 (through the kernel: bfloat16 results)
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return self.matmul(eye).t().float().contiguous()


@functools.lru_cache(maxsize=8)
def _cpu_layout_sources(n: int, k: int) -> torch.Tensor:
    """For each nibble of torch's CPU int4 packing of an [n, k] matrix (byte by byte, low nibble first),
    the flat index ``row * k + col`` of the code it holds. Found by packing probe matrices whose codes
    are the 4-bit digits of each position's index, so it holds for whichever layout this CPU's packer
    uses (the layout follows the vector width)."""
    flat = torch.arange(n * k, dtype=torch.int64)
    src = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(4, (n * k - 1).bit_length()), 4):
        probe = ((flat >> shift) & 15).to(torch.int32).view(n, k)
        src |= _nibbles_in_order(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)) << shift
    if not torch.equal(torch.sort(src).values, flat):
        raise RuntimeError("torch's CPU int4 packing is not a permutation of the codes: it cannot be read back")
    return src


def _nibbles_in_order(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols] uint8 -> [rows * cols * 2] int64: each byte's low nibble, then its high nibble."""
    wide = packed.to(torch.int64)
    return torch.stack((wide & 15, wide >> 4), dim=-1).reshape(-1)


QuantWeight = Int8Weight | Int4Weight | Int4CudaWeight
Weight = torch.Tensor | Int8Weight | Int4Weight | Int4CudaWeight


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_nbytes(w: Weight) -> int:
    """Bytes a weight holds in memory (packed data, scales and zeros included)."""
    return _nbytes(w) if isinstance(w, torch.Tensor) else w.nbytes()


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= x (x >= 0), as float32: a scale that covers the whole range."""
    r = x.to(torch.bfloat16)
    up = (r.view(torch.int16) + 1).view(torch.bfloat16)  # the next bfloat16 above r (r >= 0, finite)
    return torch.where(r.float() < x, up.float(), r.float())


def quantize_int8(w: torch.Tensor, group_size: int = INT8_GROUP) -> Int8Weight:
    """Symmetric RTN per group of input columns: scale = max|w| / 127 (float16, rounded up so that the
    whole range fits), q in -127..127; |w - q * scale| <= scale / 2."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"weights int8: groups of {group_size} input columns do not divide the input width {k}")
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K / g, g]
    target = g.abs().amax(dim=-1) / 127  # [N, K / g]
    scale = target.to(torch.float16)
    up = (scale.view(torch.int16) + 1).view(torch.float16)  # the next float16 above (scale >= 0, finite)
    scale = torch.where(scale.float() < target, up, scale)
    scale = scale.clamp_min(torch.finfo(torch.float16).smallest_normal)  # [N, K / g]
    q = torch.round(g / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)  # [N, K / g, g]
    return Int8Weight(q.reshape(n, k), scale)


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Codes:
    """Asymmetric RTN per group: scale = (max - min) / 15 and zero = min + 8 * scale, both rounded to
    bfloat16 *before* the codes are chosen, so |w - dequantized| <= scale / 2 plus the zero's rounding."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"weight_group_size: {group_size} does not divide the input width {k}")
    g = w.float().reshape(n, k // group_size, group_size)  # [N, K / g, g]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, K / g]
    scale = _round_up_bf16((hi - lo) / 15).clamp_min(torch.finfo(torch.bfloat16).tiny)  # [N, K / g]
    zero = (lo + 8 * scale).to(torch.bfloat16).float()  # [N, K / g]
    codes = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15)  # [N, K / g, g]
    return Int4Codes(codes.to(torch.uint8).reshape(n, k), scale, zero, group_size)


def concat_codes(parts: list[Int4Codes]) -> Int4Codes:
    """Fuse along the output rows (e.g. Q, K, V -> QKV): groups run along K, so rows are independent."""
    return Int4Codes(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scale for p in parts]),
        torch.cat([p.zero for p in parts]),
        parts[0].group_size,
    )


def nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 -> [N, K // 2] uint8, even columns in the low nibble (the on-disk form)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unnibble(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] int32 codes 0..15 (inverse of ``nibbles``)."""
    wide = packed.to(torch.int32)  # [N, K // 2]
    return torch.stack((wide & 15, wide >> 4), dim=-1).view(packed.shape[0], -1)


def int4_weight(packed_nibbles: torch.Tensor, scale_zero: torch.Tensor, group_size: int) -> Int4Weight:
    """The CPU kernel's layout from the on-disk form (nibbles [N, K // 2], scale_zero [K // g, N, 2])."""
    codes = unnibble(packed_nibbles)  # [N, K] int32
    n = codes.shape[0]
    pad = -n % ROW_MULTIPLE
    if pad:
        codes = torch.cat([codes, torch.full((pad, codes.shape[1]), 8, dtype=torch.int32)])  # [N_pad, K]
        zeros = torch.zeros(scale_zero.shape[0], pad, 2, dtype=scale_zero.dtype)
        scale_zero = torch.cat([scale_zero, zeros], dim=1)  # [K // g, N_pad, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)  # [N_pad, K // 2]
    return Int4Weight(packed, scale_zero.contiguous(), group_size, n)
