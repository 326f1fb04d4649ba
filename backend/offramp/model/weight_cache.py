"""Quantized decoder linears and LM head: packed once per checkpoint and scheme, cached on disk.

The cache key is the checkpoint's checksum (the GGUF file's, or the safetensors files'), the scheme
(``int8``, or ``int4`` and its group size) and this module's format version. The file is written
under a temporary name and renamed, so a crash never leaves a half-written cache. What is cached is
portable (int4 codes as nibbles, scales and zeros in bfloat16); the CPU kernel's own packed layout is
made from it at every load (it depends on the CPU's vector width).

Sources, per tensor (recorded in the cache file's metadata under ``methods``):

* int4, decoder linears, from a GGUF file with ``weight_group_size`` 32: Q4_0/Q4_1 tensors use the
  file's own blocks as stored; F32/F16/BF16/Q8_0 tensors are re-quantized to int4 by round to nearest
  from their de-quantized values. With group 64/128 every tensor is re-quantized (GGUF's 4-bit blocks
  hold 32 weights).
* int4, the LM head: int8 (as below), as llama.cpp keeps the default model's head at 8 bits (Q8_0).
  Measured on the default model (12 bundled prompts, teacher-forced agreement with HF float32 greedy,
  with a per-channel int8 head then): int4 decoder + int4 head 0.878, + int8 head 0.974, + bf16 head
  0.974. The head is 21% of the default model's weights; int4 there costs more than it saves.
* int8 (a float16 scale per 32 input columns): a GGUF Q8_0 tensor's own blocks as stored (the default
  model's head); other tensors round to nearest from their de-quantized float32 values.
* Hugging Face safetensors checkpoints (float32/bfloat16/float16): round to nearest.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from offramp.model.decoder import ModelShape
from offramp.model.gguf_blocks import GGUFBlocks
from offramp.model.quant import (
    INT8_GROUP,
    Int8Weight,
    QuantWeight,
    concat_codes,
    int4_weight,
    nibbles,
    quantize_int4,
    quantize_int8,
)

FORMAT_VERSION = 3  # 3: int8 with a float16 scale per 32 columns (was per output channel)
# Our fused linear -> its parts: (Hugging Face name under model.layers.<i>., GGUF name under blk.<i>.)
LINEAR_PARTS = {
    "qkv": (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v")),
    "o_proj": (("self_attn.o_proj", "attn_output"),),
    "gate_up": (("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up")),
    "down": (("mlp.down_proj", "ffn_down"),),
}
Float = Callable[[str], torch.Tensor]  # a Hugging Face tensor name -> its float32 values


def linear_names(num_layers: int) -> list[str]:
    return [f"layers.{i}.{part}" for i in range(num_layers) for part in LINEAR_PARTS] + ["lm_head"]


def input_width(name: str, shape: ModelShape) -> int:
    part = name.split(".")[-1]
    return {"o_proj": shape.num_heads * shape.head_dim, "down": shape.intermediate_size}.get(part, shape.hidden_size)


def sources(name: str, shape: ModelShape, gguf: GGUFBlocks | None) -> list[tuple[str, str | None]]:
    """(Hugging Face name, GGUF name or None) of each part of our linear ``name``."""
    if name == "lm_head":
        hf = "model.embed_tokens.weight" if shape.tie_word_embeddings else "lm_head.weight"
        return [(hf, None if gguf is None else "output.weight" if gguf.has("output.weight") else "token_embd.weight")]
    _, layer, part = name.split(".")
    return [(f"model.layers.{layer}.{h}.weight", f"blk.{layer}.{g}.weight") for h, g in LINEAR_PARTS[part]]


def check_group_size(shape: ModelShape, weights: str, group_size: int) -> None:
    if weights == "int8":
        for name in ("layers.0.qkv", "layers.0.o_proj", "layers.0.down"):
            if input_width(name, shape) % INT8_GROUP:
                raise ValueError(
                    f"weights: int8 keeps a scale per {INT8_GROUP} input columns, which does not divide the input "
                    f"width {input_width(name, shape)} of {name}; use weights bf16 or none for this model"
                )
        return
    if weights != "int4":
        return
    widths = {input_width(part, shape) for part in LINEAR_PARTS}
    for name in ("layers.0.qkv", "layers.0.o_proj", "layers.0.down"):
        k = input_width(name, shape)
        if k % group_size:
            fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
            raise ValueError(
                f"weight_group_size: {group_size} does not divide the input width {k} of {name}; "
                f"supported here: {', '.join(map(str, fits)) or 'none (use weights int8)'}"
            )


def pack_linear(
    name: str, parts: list[tuple[str, str | None]], float_of: Float, scheme: tuple, gguf: GGUFBlocks | None
) -> tuple[dict[str, torch.Tensor], str]:
    """One linear in its on-disk form: ({tensor name: tensor}, how it was made)."""
    weights, group_size = scheme
    if weights == "int8" or name == "lm_head":  # int4's head is int8 too (see the module docstring)
        ws, methods = [], []
        for hf, gg in parts:
            stored = gguf.int8_weight(gg) if gguf is not None else None
            ws.append(stored if stored is not None else quantize_int8(float_of(hf)))
            methods.append("gguf-q8_0" if stored is not None else "rtn" if weights == "int8" else "rtn-int8")
        q, scale = torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws])
        return {f"{name}.q": q, f"{name}.scale": scale}, "+".join(methods)
    codes, methods = [], []
    for hf, gg in parts:
        if gguf is not None:
            gguf.check_int4(gg)
        stored = gguf.int4_codes(gg) if gguf is not None and group_size == 32 else None
        codes.append(stored if stored is not None else quantize_int4(float_of(hf), group_size))
        methods.append(f"gguf-{gguf.type_name(gg).lower()}" if stored is not None else "rtn")
    fused = concat_codes(codes)
    return {f"{name}.nibbles": nibbles(fused.codes), f"{name}.scale_zero": fused.scale_zero()}, "+".join(methods)


def pack_checkpoint(shape: ModelShape, float_of: Float, scheme: tuple, gguf: GGUFBlocks | None) -> tuple[dict, dict]:
    """Every decoder linear and the LM head in the on-disk form, with a progress bar."""
    tensors, methods = {}, {}
    names = linear_names(shape.num_layers)
    for name in tqdm(names, desc=f"offramp: packing {scheme_tag(scheme)} weights", unit="linear", disable=None):
        packed, methods[name] = pack_linear(name, sources(name, shape, gguf), float_of, scheme, gguf)
        tensors.update(packed)
    return tensors, methods


def scheme_tag(scheme: tuple) -> str:
    weights, group_size = scheme
    return f"int8-g{INT8_GROUP}" if weights == "int8" else f"int4-g{group_size}"


def source_checksum(ckpt: Path, gguf: Path | None) -> str:
    """The GGUF file's sha256 (recorded in its converted checkpoint), else the safetensors files'."""
    from offramp.model.loader import file_sha256

    files = sorted(ckpt.glob("*.safetensors"))
    if gguf is not None:
        with safe_open(files[0], framework="pt") as f:
            recorded = f.metadata() or {}
        return recorded.get("source_sha256") or file_sha256(gguf)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + file_sha256(f).encode())
    return digest.hexdigest()


def cache_path(ckpt: Path, gguf: Path | None, scheme: tuple) -> Path:
    from offramp.model.loader import cache_root

    stem = gguf.stem if gguf is not None else ckpt.name
    key = f"{stem}-{source_checksum(ckpt, gguf)[:16]}-{scheme_tag(scheme)}-v{FORMAT_VERSION}"
    return cache_root() / "weights" / key / "weights.safetensors"


def write_atomically(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from the server's user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_packed(path: Path, shape: ModelShape, scheme: tuple) -> dict[str, QuantWeight]:
    """The cached linears in the kernels' layouts. Tensors are copied out of the file's buffer: the
    kernels need aligned memory (an int8 weight at an odd offset of the file crashes them)."""
    weights, group_size = scheme
    out: dict[str, QuantWeight] = {}
    with safe_open(path, framework="pt") as f:
        for name in linear_names(shape.num_layers):
            if weights == "int8" or name == "lm_head":
                out[name] = Int8Weight(f.get_tensor(f"{name}.q").clone(), f.get_tensor(f"{name}.scale").clone())
            else:
                sz = f.get_tensor(f"{name}.scale_zero").clone()  # [K // g, N, 2] bfloat16
                out[name] = int4_weight(f.get_tensor(f"{name}.nibbles"), sz, group_size)
    return out


def load_quantized(
    ckpt: Path, shape: ModelShape, float_of: Float, weights: str, group_size: int, gguf: Path | None
) -> dict[str, QuantWeight]:
    """Our linear name -> its quantized weight, packed now (once) or read from the cache."""
    check_group_size(shape, weights, group_size)
    scheme = (weights, group_size if weights == "int4" else 0)
    path = cache_path(ckpt, gguf, scheme)
    if not path.is_file():
        print(f"offramp: packing {scheme_tag(scheme)} weights once (cached in {path.parent})", file=sys.stderr)
        blocks = GGUFBlocks(gguf, shape.num_heads, shape.num_kv_heads) if gguf is not None else None
        tensors, methods = pack_checkpoint(shape, float_of, scheme, blocks)
        meta = {"scheme": scheme_tag(scheme), "version": str(FORMAT_VERSION), "methods": json.dumps(methods)}
        write_atomically(path, tensors, meta)
    return read_packed(path, shape, scheme)
