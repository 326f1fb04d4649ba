"""A GGUF file's 4-bit and 8-bit blocks as int4 codes / int8 weights, used as stored (no de-quantize /
re-quantize round trip).

ggml's blocks hold 32 weights of one row: Q4_1 is ``fp16 d, fp16 m, 16 bytes of nibbles`` with
``w = d * q + m``; Q4_0 is ``fp16 d, 16 bytes`` with ``w = d * (q - 8)``. Byte ``j`` holds weight ``j``
in its low nibble and weight ``j + 16`` in its high one. Both map onto the int4 kernel's
``(q - 8) * scale + zero`` with group 32: Q4_1 as scale ``d``, zero ``m + 8 d``; Q4_0 as scale ``d``,
zero 0. llama.cpp stores the rows of a Llama model's Q and K projections permuted (for its RoPE
layout); ``transformers`` un-permutes them when it loads the file, and so do we, row by row (groups
run along the input columns, so a row permutation moves whole groups). Q8_0 is ``fp16 d, 32 int8``
with ``w = d * q``: exactly ``Int8Weight`` with group 32 (float16 scales).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from offramp.model.quant import INT8_GROUP, Int4Codes, Int8Weight

GGUF_BLOCK = 32
AS_STORED = ("Q4_0", "Q4_1")  # int4 codes taken from the file's own blocks
REQUANTIZED = ("F32", "F16", "BF16", "Q8_0")  # int4 from their (de-quantized) values, round to nearest
INT4_TYPES = AS_STORED + REQUANTIZED
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


class GGUFBlocks:
    """Raw tensors of one GGUF file (memory-mapped), by GGUF name."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        reader = GGUFReader(self.path)
        arch = reader.fields.get("general.architecture")
        self.architecture = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else ""
        self.tensors = {t.name: t for t in reader.tensors}
        self.heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def check_int4(self, name: str) -> None:
        """One error line for a tensor type that ``weights int4`` cannot read."""
        kind = self.type_name(name)
        if kind not in INT4_TYPES:
            raise ValueError(
                f"weights: GGUF tensor '{name}' of {self.path.name} is stored as {kind}; weights int4 reads the "
                f"GGUF types {', '.join(INT4_TYPES)} (weights int8, bf16 or none read any type)"
            )

    def int4_codes(self, name: str) -> Int4Codes | None:
        """The tensor's own 4-bit blocks as codes (rows un-permuted like ``transformers``), or None
        when it is not stored as Q4_0/Q4_1."""
        kind = self.type_name(name)
        if kind not in AS_STORED:
            return None
        tensor = self.tensors[name]
        k = int(tensor.shape[0])  # ggml lists the input width first
        blocks = np.asarray(tensor.data).reshape(-1, k // GGUF_BLOCK, _BLOCK_BYTES[kind])  # [N, K/32, bytes]
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
        if kind == "Q4_1":
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
            zero, qs = m + 8 * d, blocks[..., 4:]
        else:
            zero, qs = np.zeros_like(d), blocks[..., 2:]
        codes = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(blocks.shape[0], k)  # [N, K] 0..15
        parts = [self._unpermute(name, a) for a in (codes, d, zero)]
        return Int4Codes(*(torch.from_numpy(np.ascontiguousarray(a)) for a in parts), GGUF_BLOCK)

    def int8_weight(self, name: str) -> Int8Weight | None:
        """The tensor's own Q8_0 blocks as an int8 weight (rows un-permuted like ``transformers``), or None
        when it is stored otherwise."""
        if self.type_name(name) != "Q8_0" or INT8_GROUP != GGUF_BLOCK:
            return None
        tensor = self.tensors[name]
        k = int(tensor.shape[0])
        blocks = np.asarray(tensor.data).reshape(-1, k // GGUF_BLOCK, _BLOCK_BYTES["Q8_0"])  # [N, K/32, 34]
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [N, K/32]
        q = blocks[..., 2:].copy().view(np.int8).reshape(blocks.shape[0], k)  # [N, K]
        q, d = (np.ascontiguousarray(self._unpermute(name, a)) for a in (q, d))
        return Int8Weight(torch.from_numpy(q), torch.from_numpy(d))

    def _unpermute(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's Q/K row permutation, exactly as ``transformers``' LlamaTensorProcessor."""
        kind = name.split(".")[-2]
        if self.architecture != "llama" or kind not in self.heads:
            return rows
        n_head = self.heads[kind]
        w = rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:])
        return w.swapaxes(2, 1).reshape(rows.shape)
