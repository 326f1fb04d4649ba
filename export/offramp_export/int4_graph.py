"""Weight-only int4 block graphs: each float32 product of a traced block becomes standard ONNX blocked
``DequantizeLinear`` (opset 21, uint4 codes) + ``MatMul``.

The engine's int4 weights are asymmetric per group, ``w = (q - 8) * scale + zero``. DequantizeLinear's
zero point is an integer, so it takes zero point 8 and the float zeros enter as a second, small
product of x's group sums: ``x @ w.T = x @ ((q - 8) * scale).T + group_sums(x) @ zero.T`` (the same
values). Measured on this CPU (``perf/onnx_int4_forms.py``, ``docs/bench/onnx_int4_forms.jsonl``):
ONNX Runtime fuses DequantizeLinear + MatMul into its own ``MatMulNBits`` and runs this form as fast
as a hand-written MatMulNBits graph (30 layers, one row: 9.9 ms against 12.0, float32 18.5), while
MatMulNBits' float zero point (the asymmetric zero in one op) takes a slow path (138 ms). The standard
form is also what TensorRT reads for weight-only int4, so one form serves both.

The traced graph holds the dequantized weights (``Int4Weight.dequantize``, exact), transposed for
``MatMul``; each is found by its bytes and replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from offramp.model.decoder import LayerWeights, ModelWeights
from offramp.model.quant import Int4Weight

INT4_OPSET = 21  # blocked DequantizeLinear and uint4 tensors


def int4_parts(w: Int4Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dequantized [N, K] float32, codes [N, K] uint8, scale [N, K / g] float32, zero [N, K / g] float32)."""
    dense = w.dequantize()  # [N, K] float32, exactly what the CPU kernel multiplies by
    n = w.out_features
    sz = w.scale_zero[:, :n].float()  # [K / g, N, 2]
    scale, zero = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()  # [N, K / g]
    g = w.group_size
    codes = torch.round((dense - zero.repeat_interleave(g, 1)) / scale.repeat_interleave(g, 1) + 8)
    return dense.numpy(), codes.clamp_(0, 15).to(torch.uint8).numpy(), scale.numpy(), zero.numpy()


def dense_weights(quantized: ModelWeights) -> ModelWeights:
    """The float32 weights the traced graphs start from: every product de-quantized exactly (int4 layers,
    the int8 LM head), norms and embedding in float32."""

    def dense(w):
        return w.float() if isinstance(w, torch.Tensor) else w.dequantize()

    layers = [
        dataclasses.replace(
            w,
            input_norm=w.input_norm.float(),
            qkv=dense(w.qkv),
            qkv_bias=None if w.qkv_bias is None else w.qkv_bias.float(),
            o_proj=dense(w.o_proj),
            post_norm=w.post_norm.float(),
            gate_up=dense(w.gate_up),
            down=dense(w.down),
        )
        for w in quantized.layers
    ]
    return dataclasses.replace(
        quantized,
        embed=quantized.embed.float(),
        layers=layers,
        final_norm=quantized.final_norm.float(),
        lm_head=dense(quantized.lm_head),
    )


def layer_int4(layers: list[LayerWeights]) -> list[Int4Weight]:
    """Every int4 product of the layers, in order (the traced graph's MatMul weights)."""
    out = []
    for w in layers:
        out += [p for p in (w.qkv, w.o_proj, w.gate_up, w.down) if isinstance(p, Int4Weight)]
    return out


def _key(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def quantize_products(model: onnx.ModelProto, weights: list[Int4Weight]) -> int:
    """Replace each MatMul whose weight initializer is one of ``weights`` (dequantized, transposed) by the
    int4 form; returns how many were replaced (every one of ``weights`` must be found)."""
    graph = model.graph
    parts = {}
    for w in weights:
        dense, codes, scale, zero = int4_parts(w)
        parts[_key(dense.T)] = (codes, scale, zero, w.group_size)
    inits = {init.name: init for init in graph.initializer}
    nodes, replaced, dropped = [], 0, set()
    for node in graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        found = parts.get(_key(numpy_helper.to_array(init))) if init is not None and len(init.dims) == 2 else None
        if found is None:
            nodes.append(node)
            continue
        nodes += _int4_matmul(graph, f"int4_{replaced}", node.input[0], node.output[0], *found)
        dropped.add(init.name)
        replaced += 1
    if replaced != len(weights):
        raise ValueError(f"int4 export: found {replaced} of the {len(weights)} products in the traced graph")
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, INT4_OPSET)
    return replaced


def _int4_matmul(graph, name: str, x: str, y: str, codes, scale, zero, group: int) -> list:
    """x [rows, K] -> y [rows, N]: DequantizeLinear(uint4 [K, N], scale [K / g, N], zero point 8) then
    MatMul, plus group_sums(x) [rows, K / g] @ zero [K / g, N]."""
    n, k = codes.shape
    flat = np.ascontiguousarray(codes.T).reshape(-1)  # [K * N], two per byte, low nibble first
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    graph.initializer.extend(
        [
            helper.make_tensor(f"{name}.q", TensorProto.UINT4, [k, n], packed, raw=True),
            helper.make_tensor(
                f"{name}.zp", TensorProto.UINT4, [k // group, n], bytes([0x88]) * (k // group * n // 2), raw=True
            ),
            numpy_helper.from_array(np.ascontiguousarray(scale.T), f"{name}.scale"),  # [K / g, N]
            numpy_helper.from_array(np.ascontiguousarray(zero.T), f"{name}.zero"),  # [K / g, N]
            numpy_helper.from_array(np.array([0, k // group, group], dtype=np.int64), f"{name}.groups"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}.last"),
        ]
    )
    return [
        helper.make_node(
            "DequantizeLinear", [f"{name}.q", f"{name}.scale", f"{name}.zp"], [f"{name}.w"], axis=0, block_size=group
        ),
        helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.main"]),
        helper.make_node("Reshape", [x, f"{name}.groups"], [f"{name}.grouped"]),  # [rows, K / g, g]
        helper.make_node("ReduceSum", [f"{name}.grouped", f"{name}.last"], [f"{name}.sums"], keepdims=0),
        helper.make_node("MatMul", [f"{name}.sums", f"{name}.zero"], [f"{name}.zterm"]),
        helper.make_node("Add", [f"{name}.main", f"{name}.zterm"], [y]),
    ]
