"""Which int4 weight-only form does ONNX Runtime run faster on this CPU? (issue "Fast weights", item 4)

One step's matrix products of the default model's shapes (30 layers: QKV, O, gate/up, down; plus
as ONNX graphs, the weights int4 in groups of 32 with a scale and a zero per group: ``MatMulNBits``
(ONNX Runtime's contrib op) with a float zero point (8 - zero / scale: the asymmetric zero in one op),
or with the integer zero point 8 plus the zeros as a second product of x's group sums (exactly the
same values); standard ``DequantizeLinear`` with block quantization (opset 21, uint4 codes, zero point
8, the same second product), which ONNX Runtime fuses into MatMulNBits itself; each at accuracy level
0 (float activations) and 4 (int8 activations); float32 ``MatMul`` on the same weights is the baseline. Median time per run for 1 and 16 rows, one JSON
line per form and row count, and the largest difference of each form from float32 on the same weights.

Usage: .venv/bin/python perf/onnx_int4_forms.py [--repeats 30] [--num-threads 2] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, GROUP = 576, 1536, 9, 3, 64, 30, 32
SHAPES = [((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTER, HIDDEN), (HIDDEN, INTER)]


def _weights(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes [N, K] in 0..15, scale and zero [N, K / GROUP] (w = (codes - 8) * scale + zero)."""
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.02, size=(n, k // GROUP)).astype(np.float32)
    zero = rng.normal(0, 0.01, size=(n, k // GROUP)).astype(np.float32)
    return codes, scale, zero


def _dequantized(codes, scale, zero) -> np.ndarray:  # [N, K] float32
    return (codes.astype(np.float32) - 8) * np.repeat(scale, GROUP, axis=1) + np.repeat(zero, GROUP, axis=1)


def _zero_term(name: str, x: str, zero, k: int, inits: list) -> tuple[list, str]:
    """x's group sums times the per-group zeros: [rows, K / g] @ [K / g, N] (the asymmetric part)."""
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(zero.T), f"{name}.z"),
        numpy_helper.from_array(np.array([0, k // GROUP, GROUP], dtype=np.int64), f"{name}.shape"),
    ]
    nodes = [
        helper.make_node("Reshape", [x, f"{name}.shape"], [f"{name}.grouped"]),  # [rows, K / g, g]
        helper.make_node("ReduceSum", [f"{name}.grouped", "axes_last"], [f"{name}.sums"], keepdims=0),
        helper.make_node("MatMul", [f"{name}.sums", f"{name}.z"], [f"{name}.zterm"]),
    ]
    return nodes, f"{name}.zterm"


def _matmulnbits(name: str, x: str, codes, scale, zero, accuracy: int, float_zp: bool, inits: list) -> tuple[list, str]:
    n, k = codes.shape
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // GROUP, GROUP // 2)  # low nibble first
    if float_zp:  # (q - zp) * s == (q - 8) * s + z: exact in one op
        zp = numpy_helper.from_array((8 - zero / scale).astype(np.float32).reshape(-1), f"{name}.zp")
    else:  # zero point 8 for every group (packed two per byte); the zeros go through _zero_term
        zp = numpy_helper.from_array(np.full(n * ((k // GROUP + 1) // 2), 0x88, dtype=np.uint8), f"{name}.zp")
    inits += [numpy_helper.from_array(packed, f"{name}.b"), numpy_helper.from_array(scale.reshape(-1), f"{name}.s"), zp]
    node = helper.make_node(
        "MatMulNBits",
        [x, f"{name}.b", f"{name}.s", f"{name}.zp"],
        [f"{name}.main" if not float_zp else f"{name}.y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=GROUP,
        accuracy_level=accuracy,
    )
    if float_zp:
        return [node], f"{name}.y"
    zterm, z = _zero_term(name, x, zero, k, inits)
    return [node, *zterm, helper.make_node("Add", [f"{name}.main", z], [f"{name}.y"])], f"{name}.y"


def _dequantize_linear(name: str, x: str, codes, scale, zero, inits: list) -> tuple[list, str]:
    n, k = codes.shape
    flat = np.ascontiguousarray(codes.T).reshape(-1)  # [K * N], packed two per byte, low nibble first
    q = helper.make_tensor(f"{name}.q", TensorProto.UINT4, [k, n], (flat[0::2] | (flat[1::2] << 4)).tobytes(), raw=True)
    zp = helper.make_tensor(
        f"{name}.zp", TensorProto.UINT4, [k // GROUP, n], bytes([0x88]) * (k // GROUP * n // 2), raw=True
    )
    inits += [q, zp, numpy_helper.from_array(np.ascontiguousarray(scale.T), f"{name}.s")]
    zterm, z = _zero_term(name, x, zero, k, inits)
    nodes = [
        helper.make_node(
            "DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.zp"], [f"{name}.w"], axis=0, block_size=GROUP
        ),
        helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}.main"]),
        *zterm,
        helper.make_node("Add", [f"{name}.main", z], [f"{name}.y"]),
    ]
    return nodes, f"{name}.y"


def _float(name: str, x: str, w: np.ndarray, inits: list) -> tuple[list, str]:
    inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.wt"))
    return [helper.make_node("MatMul", [x, f"{name}.wt"], [f"{name}.y"])], f"{name}.y"


def build(form: str, weights: list, accuracy: int) -> onnx.ModelProto:
    """Every product reads the graph input x (its own width); outputs are all products' results."""
    inits: list = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes_last")]
    nodes, outputs, inputs = [], [], {}
    for i, (codes, scale, zero) in enumerate(weights):
        n, k = codes.shape
        x = f"x{k}"
        inputs[x] = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["rows", k])
        if form.startswith("matmulnbits"):
            made, y = _matmulnbits(f"w{i}", x, codes, scale, zero, accuracy, form.endswith("float_zp"), inits)
        elif form.startswith("dequantizelinear"):
            made, y = _dequantize_linear(f"w{i}", x, codes, scale, zero, inits)
        else:
            made, y = _float(f"w{i}", x, _dequantized(codes, scale, zero), inits)
        nodes += made
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", n]))
    graph = helper.make_graph(nodes, form, list(inputs.values()), outputs, inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=LAYERS)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    weights = [_weights(rng, n, k) for _ in range(args.layers) for n, k in SHAPES]
    forms = {  # form -> (graph, MatMulNBits accuracy level: 0 float activations, 4 int8 activations)
        "float32": ("float32", 0),
        "matmulnbits_float_zp": ("matmulnbits_float_zp", 0),
        "matmulnbits_acc0": ("matmulnbits", 0),
        "matmulnbits_acc4": ("matmulnbits", 4),
        "dequantizelinear_acc0": ("dequantizelinear", 0),  # ORT fuses DQ + MatMul into MatMulNBits
        "dequantizelinear_acc4": ("dequantizelinear", 4),
    }
    sessions = {}
    for form, (graph, accuracy) in forms.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.num_threads
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy))
        model = build(graph, weights, accuracy).SerializeToString()
        sessions[form] = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    for rows in (1, 16):
        feeds = {f"x{k}": rng.standard_normal((rows, k), dtype=np.float32) for k in (HIDDEN, INTER)}
        reference = sessions["float32"].run(None, feeds)
        for form, session in sessions.items():
            outs = session.run(None, feeds)
            diff = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-9)) for a, b in zip(outs, reference))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                session.run(None, feeds)
                times.append(time.perf_counter() - start)
            print(
                json.dumps(
                    {
                        "form": form,
                        "rows": rows,
                        "layers": args.layers,
                        "num_threads": args.num_threads,
                        "accuracy_level": forms[form][1] if form != "float32" else None,
                        "ms": round(statistics.median(times) * 1000, 2),
                        "max_rel_diff_vs_float32": round(diff, 6),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
