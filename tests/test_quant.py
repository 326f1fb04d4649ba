"""Weight-only int8/int4 weights: quantization error bounds, GGUF blocks used as stored (checked
against ``transformers``' own de-quantization), the on-disk cache, and the engine with every format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.model import weight_cache
from offramp.model.decoder import final_logits, linear
from offramp.model.gguf_blocks import GGUFBlocks
from offramp.model.loader import default_gguf, load_weights
from offramp.model.quant import Int4Codes, Int4Weight, Int8Weight, int4_weight, nibbles, quantize_int4, quantize_int8
from offramp.model.weight_bytes import resident_weight_bytes, weight_bytes_per_token
from offramp.tools.teacher_forcing import teacher_forced_hidden

BF16_REL = 2.0**-8  # bfloat16 keeps 8 significant bits: round to nearest is within 2^-9 relative


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_CACHE", str(tmp_path / "cache"))


# -- the weight types ---------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_to_nearest_is_within_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05 + torch.linspace(-0.02, 0.02, 256)  # [N, K]
    codes = quantize_int4(w, group_size)
    assert codes.codes.dtype == torch.uint8 and int(codes.codes.max()) <= 15
    deq = codes.dequantize()  # [N, K] float32
    scale = codes.scale.repeat_interleave(group_size, dim=1)
    # Scale and zero are bfloat16 values chosen before the codes: half a step, plus the zero's rounding.
    lo = w.reshape(48, -1, group_size).amin(-1).repeat_interleave(group_size, dim=1)
    zero_rounding = (codes.zero.repeat_interleave(group_size, dim=1) - (lo + 8 * scale)).abs()
    assert ((w - deq).abs() <= scale / 2 + zero_rounding + 1e-7).all()
    assert (zero_rounding <= BF16_REL * codes.zero.abs().repeat_interleave(group_size, dim=1)).all()
    assert torch.equal(codes.scale.to(torch.bfloat16).float(), codes.scale)  # held exactly by the kernel


def test_int8_round_to_nearest_is_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(40, 96) * torch.logspace(-3, 1, 96)  # groups of very different ranges
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.scale.dtype == torch.float16 and q.scale.shape == (40, 3)
    scale = q.scale.float().repeat_interleave(32, dim=1)  # [40, 96]: one scale per 32 columns
    assert ((w - q.dequantize()).abs() <= scale / 2 * (1 + 1e-6)).all()
    group_max = w.abs().reshape(40, 3, 32).amax(-1)
    assert (q.scale.float() * 127 >= group_max).all() and (q.scale.float() * 127 <= group_max * (1 + 2**-9)).all()
    with pytest.raises(ValueError, match="weights int8: groups of 32 input columns do not divide the input width 72"):
        quantize_int8(torch.randn(4, 72))


@pytest.mark.parametrize("kernel", ["extension", "upcast"])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])  # one tile of 16 activation rows, and more
def test_int8_product_is_the_dequantized_product(rows, kernel, monkeypatch):
    """The extension's group-wise int8 product, and the upcast product that runs elsewhere (CUDA, CPUs
    without the extension), against float64."""
    from offramp.model import fused, quant

    ops = fused.kernels()
    if kernel == "extension" and (ops is None or not ops.int8_mm_fast()):
        pytest.skip("no fused kernels here")
    monkeypatch.setattr(
        quant, "INT8_MM", [(lambda x, q, s, act16: ops.int8_mm(x, q, s, 0, act16)) if kernel == "extension" else None]
    )
    torch.manual_seed(4)
    w = quantize_int8(torch.randn(130, 128) * torch.logspace(-2, 0, 128))  # 130 rows: not whole blocks of 64
    x = torch.randn(rows, 128).to(torch.bfloat16)
    exact = (x.double() @ w.dequantize().double().T).float()  # [rows, 130]
    # the extension: exact products (one rounding, of the output); the upcast: bfloat16-rounded weights
    atol = (1e-3 if kernel == "extension" else 2**-7) * exact.abs().max().item()
    torch.testing.assert_close(w.matmul(x).float(), exact, rtol=2**-7, atol=atol)


@pytest.mark.parametrize("rows", [48, 121, 192])  # 121: not a multiple of 16, padded for the kernel
def test_int4_kernel_layout_multiplies_like_its_codes(rows):
    torch.manual_seed(2)
    codes = quantize_int4(torch.randn(rows, 128), 32)
    w = int4_weight(nibbles(codes.codes), codes.scale_zero(), 32)
    assert w.shape == (rows, 128) and w.packed.shape[0] % 16 == 0
    assert torch.equal(w.dequantize(), codes.dequantize())  # bit-exact through the kernel's float32 path
    x = torch.randn(5, 128).to(torch.bfloat16)
    ref = x.float() @ codes.dequantize().t()  # [5, rows]
    torch.testing.assert_close(w.matmul(x).float(), ref, atol=0.02 * ref.abs().max().item(), rtol=0)
    assert linear(x, w).shape == (5, rows)


@pytest.mark.parametrize("rows", [72, 128, 200])
def test_int4_codes_read_back_out_of_the_cpu_layout(rows):
    """The CUDA kernel packs its own layout from the codes, so the CPU layout must give them back: every
    code where it was, padding rows at 8 (zero weight), whatever row interleave this CPU's packer uses."""
    torch.manual_seed(3)
    codes = quantize_int4(torch.randn(rows, 256), 64)
    w = int4_weight(nibbles(codes.codes), codes.scale_zero(), 64)
    back = w.codes()  # [N_pad, K]
    assert back.shape == (w.packed.shape[0], 256) and back.dtype == torch.uint8
    assert torch.equal(back[:rows], codes.codes)
    assert (back[rows:] == 8).all()
    pairs = back[:, 0::2] << 4 | back[:, 1::2]  # what to_cuda hands the CUDA packer: even columns high
    assert torch.equal(pairs[:rows] >> 4, codes.codes[:, 0::2]) and torch.equal(pairs[:rows] & 15, codes.codes[:, 1::2])


def test_row_slices_of_packed_weights():
    torch.manual_seed(3)
    dense = torch.randn(192, 64)
    w4 = int4_weight(nibbles(quantize_int4(dense, 32).codes), quantize_int4(dense, 32).scale_zero(), 32)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(w4.rows(64).matmul(x), w4.matmul(x)[:, 64:])
    assert w4.rows(32) is None  # inside a 64-row block of the CPU layout: the caller runs the whole product
    w8 = quantize_int8(dense)
    assert torch.equal(w8.rows(100).matmul(x), w8.matmul(x)[:, 100:])


# -- GGUF blocks as stored ----------------------------------------------------------------------
def _tiny_gguf(path, kinds: dict[str, str], shapes: dict[str, tuple[int, int]]):
    """A GGUF file holding only the named tensors (arch llama), quantized by gguf-py; returns the
    float32 values ``transformers`` would load for each (de-quantized, Q/K rows un-permuted)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    writer = gguf.GGUFWriter(str(path), "llama")
    expected = {}
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    rng = np.random.default_rng(0)
    for name, kind in kinds.items():
        qtype = gguf.GGMLQuantizationType[kind]
        raw = gguf.quants.quantize((rng.standard_normal(shapes[name]) * 0.1).astype(np.float32), qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        values = gguf.quants.dequantize(raw, qtype)
        expected[name] = torch.from_numpy(np.copy(processor.process(weights=values, name=name).weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _exact(codes: Int4Codes) -> torch.Tensor:
    """Codes de-quantized in float64, then rounded once to float32 (as ggml's ``d * q + m`` is)."""
    g = codes.group_size
    scale, zero = codes.scale.double().repeat_interleave(g, 1), codes.zero.double().repeat_interleave(g, 1)
    return ((codes.codes.double() - 8) * scale + zero).float()


def test_gguf_4bit_blocks_are_the_values_transformers_loads(tmp_path):
    kinds = {"blk.0.attn_q.weight": "Q4_1", "blk.0.attn_k.weight": "Q4_0", "blk.0.attn_v.weight": "Q4_1"}
    kinds |= {"token_embd.weight": "Q8_0", "blk.0.ffn_down.weight": "Q5_0"}
    shapes = {"blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64), "blk.0.attn_v.weight": (32, 64)}
    shapes |= {"token_embd.weight": (16, 64), "blk.0.ffn_down.weight": (64, 128)}
    expected = _tiny_gguf(tmp_path / "tiny.gguf", kinds, shapes)
    blocks = GGUFBlocks(tmp_path / "tiny.gguf", num_heads=4, num_kv_heads=2)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        codes = blocks.int4_codes(name)
        # Exact in float32: same codes, scale d and zero m + 8d (Q4_0: zero 0), rows un-permuted.
        assert torch.equal(_exact(codes), expected[name]), name
    assert not torch.equal(expected["blk.0.attn_q.weight"], _exact(_unpermuted_off(blocks, "blk.0.attn_q.weight")))
    assert blocks.int4_codes("token_embd.weight") is None  # Q8_0: re-quantized by the caller for int4
    blocks.check_int4("token_embd.weight")
    head = blocks.int8_weight("token_embd.weight")  # ... and used as stored for int8: d * q exactly
    assert head.scale.dtype == torch.float16 and torch.equal(head.dequantize(), expected["token_embd.weight"])
    assert blocks.int8_weight("blk.0.attn_q.weight") is None
    with pytest.raises(ValueError, match=r"weights: GGUF tensor 'blk.0.ffn_down.weight' .* Q5_0; .*Q4_1"):
        blocks.check_int4("blk.0.ffn_down.weight")


def _unpermuted_off(blocks: GGUFBlocks, name: str) -> Int4Codes:
    arch, blocks.architecture = blocks.architecture, "qwen2"  # no permutation for other architectures
    try:
        return blocks.int4_codes(name)
    finally:
        blocks.architecture = arch


@pytest.mark.default_model
def test_default_gguf_int4_packs_decode_to_transformers_tensors(default_checkpoint):
    """The packed Q4_1 weights of the default model against the float32 tensors ``transformers``
    de-quantized from the same file: exact in float32 for the codes with their fp16 scales; through
    the kernel's bfloat16 scale/zero, within that rounding (|q - 8| * |d - d'| + |z - z'|)."""
    from safetensors import safe_open

    weights, _ = load_weights(default_checkpoint, torch.bfloat16, "int4", 32, default_gguf())
    blocks = GGUFBlocks(default_gguf(), 9, 3)
    with safe_open(default_checkpoint / "model.safetensors", framework="pt") as f:
        hf = {n: f.get_tensor(f"model.layers.29.self_attn.{n}_proj.weight") for n in "qkv"}
    parts = [blocks.int4_codes(f"blk.29.attn_{n}.weight") for n in "qkv"]
    for n, codes in zip("qkv", parts):
        assert torch.equal(_exact(codes), hf[n]), n
    fused = torch.cat([hf[n] for n in "qkv"])  # [960, 576]
    packed = weights.layers[29].qkv
    assert isinstance(packed, Int4Weight) and packed.shape == (960, 576)
    d = torch.cat([c.scale for c in parts]).repeat_interleave(32, 1)
    z = torch.cat([c.zero for c in parts]).repeat_interleave(32, 1)
    bound = 8 * (d - d.to(torch.bfloat16).float()).abs() + (z - z.to(torch.bfloat16).float()).abs()
    assert ((packed.dequantize() - fused).abs() <= bound + 1e-6 * fused.abs()).all()
    assert isinstance(weights.lm_head, Int8Weight) and weights.embed.dtype == torch.bfloat16
    methods = _methods(default_checkpoint)
    assert methods["layers.0.qkv"] == "gguf-q4_1+gguf-q4_1+gguf-q4_1" and methods["lm_head"] == "gguf-q8_0"
    with safe_open(default_checkpoint / "model.safetensors", framework="pt") as f:  # the head: Q8_0 as stored
        assert torch.equal(weights.lm_head.dequantize(), f.get_tensor("model.embed_tokens.weight"))


def _methods(ckpt) -> dict:
    import json

    from safetensors import safe_open

    path = weight_cache.cache_path(ckpt, default_gguf(), ("int4", 32))
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["methods"])


# -- the cache ----------------------------------------------------------------------------------
def test_packing_is_cached_and_reused(tiny_models, monkeypatch, tmp_path):
    ckpt = tiny_models["llama"]
    first, _ = load_weights(ckpt, torch.bfloat16, "int4", 32)
    files = list((tmp_path / "cache" / "weights").rglob("*"))
    assert [f.name for f in files if f.is_file()] == ["weights.safetensors"]  # no temporary left over

    def no_packing(*args, **kwargs):
        raise AssertionError("packed again")

    monkeypatch.setattr(weight_cache, "pack_checkpoint", no_packing)
    again, _ = load_weights(ckpt, torch.bfloat16, "int4", 32)
    assert torch.equal(again.layers[1].gate_up.packed, first.layers[1].gate_up.packed)
    with pytest.raises(AssertionError, match="packed again"):  # another scheme is another cache entry
        load_weights(ckpt, torch.bfloat16, "int4", 64)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_quantize_from_their_own_values(tiny_models, tmp_path, stored):
    import shutil

    from safetensors.torch import load_file

    src = tiny_models["qwen2"]
    half = tmp_path / "half"
    shutil.copytree(src, half)
    tensors = {k: v.to(stored) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(tensors, str(half / "model.safetensors"), metadata={"format": "pt"})
    weights, _ = load_weights(half, torch.bfloat16, "int4", 32)
    down = tensors["model.layers.2.mlp.down_proj.weight"].float()  # [64, 128]
    expected = quantize_int4(down, 32)
    assert torch.equal(weights.layers[2].down.dequantize(), expected.dequantize())
    assert torch.equal(weights.lm_head.q, quantize_int8(tensors["lm_head.weight"].float()).q)


def test_failed_packing_leaves_nothing_behind(tiny_models, monkeypatch, tmp_path):
    calls = []

    def failing(w, group_size):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return quantize_int4(w, group_size)

    monkeypatch.setattr(weight_cache, "quantize_int4", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        load_weights(tiny_models["llama"], torch.bfloat16, "int4", 32)
    assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]


def test_group_size_that_does_not_divide_a_layer(tiny_models):
    with pytest.raises(ValueError, match=r"weight_group_size: 128 does not divide .* 64 .*supported here: 32, 64"):
        load_weights(tiny_models["llama"], torch.bfloat16, "int4", 128)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": "int4"}, r"weights: int4 computes with bfloat16 activations \(x86 .*--dtype bfloat16"),
        ({"weights": "int8"}, r"weights: int8 .*--dtype bfloat16"),
        ({"weights": "bf16"}, r"weights: bf16 computes with bfloat16 activations; use --dtype bfloat16"),
        ({"weights": "int3", "dtype": "bfloat16"}, r"weights: 'int3' is not one of none, bf16, int8, int4"),
        ({"weights": "int4", "dtype": "bfloat16", "weight_group_size": 16}, r"weight_group_size: 16 .* 32, 64, 128"),
    ],
)
def test_bad_weight_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_weights_flow_through_engine_json_and_serve_overrides(tmp_path):
    import json

    from offramp.serving.serving_config import load_serving_config

    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"model": "default", "dtype": "bfloat16", "weights": "int4"}))
    cfg = load_serving_config(path, {"weight_group_size": 64})
    assert (cfg.engine.weights, cfg.engine.weight_group_size) == ("int4", 64)
    path.write_text(json.dumps({"weights": "int4"}))
    with pytest.raises(ValueError, match="weights: int4 computes with bfloat16 activations"):
        load_serving_config(path)


# -- the engine with every format ---------------------------------------------------------------
def _logits(engine: LLMEngine, prompt: list[int], output: list[int]) -> torch.Tensor:
    _, final = teacher_forced_hidden(engine, prompt, output)
    return final_logits(engine.weights, final)  # [len(output), vocab] float32


def _dequantized_engine(model, quantized: LLMEngine) -> LLMEngine:
    """A float32 engine holding the quantized engine's weights, de-quantized: the same math exactly."""
    ref = LLMEngine(EngineConfig(model=str(model)))
    for mine, theirs in zip(ref.weights.layers, quantized.weights.layers):
        for field in ("qkv", "o_proj", "gate_up", "down"):
            setattr(mine, field, getattr(theirs, field).dequantize())
    ref.weights.lm_head = quantized.weights.lm_head.dequantize()
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


TOKENS = torch.Generator().manual_seed(5)
PROMPT = torch.randint(1, 121, (8,), generator=TOKENS).tolist()
OUTPUT = torch.randint(1, 121, (24,), generator=TOKENS).tolist()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # tied head (its own packed copy) / untied, biases
@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("int16_act", [False, True])
def test_quantized_engine_computes_its_weights_in_bfloat16(tiny_models, model_type, weights, int16_act):
    """Quantized engine vs float32 on the de-quantized weights: only bfloat16 activation rounding
    differs (the bf16 engine vs float32 on the same weights: ~0.03 relative), so 0.08 relative RMS and
    90% of teacher-forced argmax, with float32 or int16 activations (the AVX2 kernels' integer products)."""

    from offramp.model import fused

    if int16_act and not (fused.kernels() and fused.int16_activations_available()):
        pytest.skip("int16 activations are the AVX2 kernels' (this CPU runs others)")
    config = EngineConfig(
        model=str(tiny_models[model_type]), dtype="bfloat16", weights=weights, int16_activations=int16_act
    )
    engine = LLMEngine(config)
    kind = Int8Weight if weights == "int8" else Int4Weight
    assert isinstance(engine.weights.layers[0].qkv, kind) and isinstance(engine.weights.lm_head, Int8Weight)
    assert engine.weights.layers[0].qkv.int16_act == int16_act and engine.weights.lm_head.int16_act == int16_act
    assert isinstance(engine.weights.embed, torch.Tensor) and engine.weights.embed.dtype == torch.bfloat16
    ours, ref = (
        _logits(engine, PROMPT, OUTPUT),
        _logits(_dequantized_engine(tiny_models[model_type], engine), PROMPT, OUTPUT),
    )
    assert _rel(ours, ref) < 0.08
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_int8_engine_stays_close_to_bfloat16(tiny_models):
    """int8 (a scale per 32 columns) against the bf16 engine on the tiny model (random weights, std 0.2): measured
    0.06 relative RMS on the logits; tolerance 0.15 and 80% teacher-forced argmax agreement. (int4 on
    these random weights is ~0.6 off by its quantization alone: its quality is measured on the real
    model by the bench; its computation is checked exactly above.)"""
    model = str(tiny_models["llama"])
    bf16 = LLMEngine(EngineConfig(model=model, dtype="bfloat16", weights="bf16"))
    int8 = LLMEngine(EngineConfig(model=model, dtype="bfloat16", weights="int8"))
    a, b = _logits(int8, PROMPT, OUTPUT), _logits(bf16, PROMPT, OUTPUT)
    assert _rel(a, b) < 0.15 and (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    greedy = [o.token_ids for o in int8.generate([PROMPT], SamplingParams(max_tokens=8))]
    assert len(greedy[0]) == 8


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_early_exit_with_int4_weights(tiny_models, tmp_path, kv_fill):
    trained = tmp_path / "heads.safetensors"
    save_file({"down": torch.randn(4, 64) * 0.1, "up": torch.randn(64, 4) * 0.1}, str(trained))
    for head in (None, str(trained)):
        engine = LLMEngine(
            EngineConfig(
                model=str(tiny_models["llama"]),
                dtype="bfloat16",
                weights="int4",
                layers_per_block=1,
                page_size=4,
                kv_fill=kv_fill,
                exit_head=head,
                min_exit_layer=2,
            )
        )
        params = SamplingParams(max_tokens=6, exit_policy="softmax", exit_threshold=0.0)
        outs = engine.generate([[3, 4, 5], [7, 8, 9, 10]], params)
        assert [o.exit_layers for o in outs] == [[4, 2, 2, 2, 2, 2]] * 2
        assert engine.runner.head.name == ("identity" if head is None else "low_rank")
        engine.pages.check_invariants()


def test_weight_bytes(tiny_models):
    model = str(tiny_models["llama"])
    f32 = LLMEngine(EngineConfig(model=model)).weights
    int4 = LLMEngine(EngineConfig(model=model, dtype="bfloat16", weights="int4")).weights
    shape = f32.shape
    linears = sum(getattr(layer, n).numel() for layer in f32.layers for n in ("qkv", "o_proj", "gate_up", "down"))
    norms = (2 * shape.num_layers + 1) * shape.hidden_size
    vocab_rows = shape.vocab_size * shape.hidden_size
    assert resident_weight_bytes(f32) == 4 * (linears + norms + vocab_rows)  # tied: the table counts once
    assert weight_bytes_per_token(f32) == 4 * (linears + norms + vocab_rows + shape.hidden_size)
    # int4: half a byte per weight plus a bf16 scale and zero per 32; the head int8 plus a float16 scale per 32.
    head = vocab_rows + vocab_rows // 32 * 2
    expected = linears // 2 + linears // 32 * 4 + 2 * norms + head + 2 * shape.hidden_size
    assert weight_bytes_per_token(int4) == expected
    assert resident_weight_bytes(int4) == expected - 2 * shape.hidden_size + 2 * vocab_rows
    assert resident_weight_bytes(int4) < 0.3 * resident_weight_bytes(f32)


def test_llamacpp_comparison_is_skipped_with_one_line(monkeypatch, capsys, tmp_path):
    import sys

    from offramp.tools import llamacpp

    assert llamacpp.compare(None, [[1, 2]], 4, True, 2, {2}) == {"llamacpp_skipped": llamacpp.SKIP_NO_GGUF}
    monkeypatch.setenv("OFFRAMP_TOOLS_PYTHON", sys.executable)  # the project env has no llama_cpp
    found = llamacpp.compare(tmp_path / "x.gguf", [[1, 2]], 4, True, 2, {2})
    assert found == {"llamacpp_skipped": "llama.cpp comparison skipped: run `make tools-env`"}
    assert capsys.readouterr().err.count("\n") == 2
