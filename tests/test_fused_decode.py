"""The fused CPU decode kernels (model/fused.py) against the eager decoder layer they replace."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from offramp.config import EngineConfig
from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.model import attention, fused
from offramp.model.attention import SeqSlice, build_metadata
from offramp.model.decoder import decoder_layer, rope_tables
from offramp.model.kv_store import KVStore
from offramp.model.loader import load_weights

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler on this machine")

PAGE = 4


@pytest.fixture(scope="module")
def ops():
    built = fused.kernels()
    assert built is not None, f"the fused kernels did not build: {fused.unavailable_reason()}"
    return built


def _filled_store(shape, num_pages: int, seed: int) -> KVStore:
    kv = KVStore(shape, num_pages, PAGE, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    for t in kv.k + kv.v:
        t.copy_(torch.randn(t.shape, generator=gen))
    return kv


def _clone(kv: KVStore) -> KVStore:
    other = copy.copy(kv)
    other.k, other.v = [t.clone() for t in kv.k], [t.clone() for t in kv.v]
    return other


STEPS = {
    # three decoding sequences: contexts of 1, 6 and 13 tokens over scattered pages
    "decodes": [SeqSlice(0, 1, [7]), SeqSlice(5, 1, [3, 9]), SeqSlice(12, 1, [1, 10, 4, 6])],
    # a decode, a sequence verifying 4 rows (a draft) across a page boundary, another decode after it
    "verify": [SeqSlice(5, 1, [3, 9]), SeqSlice(6, 4, [1, 10, 4]), SeqSlice(0, 1, [7])],
    # recomputed deeper K/V of earlier positions (kv_fill recompute) before a sequence's new token
    "redo": [SeqSlice(9, 1, [2, 5, 11], redo=(6, 8)), SeqSlice(2, 1, [0])],
}


def _load(path, weights_format: str):
    """Weights in ``weights_format``; ``int4+act16``/``int8+act16``: with int16 activations (AVX2 kernels)."""
    fmt, _, act16 = weights_format.partition("+")
    if act16 and not fused.int16_activations_available():
        pytest.skip("int16 activations are the AVX2 kernels' (this CPU runs others)")
    weights, _ = load_weights(path, torch.bfloat16, fmt, 32)
    if act16:
        fused.use_int16_activations(weights)
    return weights


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("weights_format", ["bf16", "int8", "int4", "int8+act16", "int4+act16"])
def test_fused_layers_match_eager_layers(ops, tiny_models, model_type, weights_format, step, monkeypatch):
    """A step's rows through every layer: the hidden states agree within bfloat16 rounding and the K/V
    written to the store is the same. The fused kernel attends in float32; so does the eager layer for
    decode rows, while for several rows of one sequence it runs SDPA in bfloat16 (less exact): here
    it is made to attend in float32 for all rows, so both compute the same thing."""
    real_attention = attention._group_attention

    def float_attention(q, k_store, v_store, g, page_size):  # the eager decode rows' path, for every group
        return real_attention(q.float(), k_store.float(), v_store.float(), g, page_size).to(q.dtype)

    monkeypatch.setattr(attention, "_group_attention", float_attention)
    weights = _load(tiny_models[model_type], weights_format)
    s = weights.shape
    cos, sin = rope_tables(weights.inv_freq, 64, weights.attention_scaling, torch.bfloat16)
    meta = build_metadata(STEPS[step], PAGE, cos, sin)
    assert fused.can_fuse(torch.zeros(1, dtype=torch.bfloat16), meta)
    n = meta.positions.shape[0]
    x = torch.randn(n, s.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    eager_kv = _filled_store(s, 12, seed=2)
    fused_kv = _clone(eager_kv)
    eager = x
    for i in range(s.num_layers):
        eager = decoder_layer(weights.layers[i], eager, meta, eager_kv.k[i], eager_kv.v[i], s)
    out = fused.decode_layers(ops, weights.layers, x, meta, fused_kv.k, fused_kv.v, s)
    assert out.dtype == torch.bfloat16 and out.shape == eager.shape
    # a float32 sum in a different order can flip a bfloat16 rounding (1/128 relative) and carry on
    torch.testing.assert_close(out.float(), eager.float(), rtol=1 / 128, atol=0.01 * eager.float().abs().max().item())
    # the K/V written by later layers come from those hidden states after an RMSNorm, which scales a carried
    # flip up by max / rms (about 3 here): 2% of the largest value (a wrong rotation or slot is off by ~all of it)
    for i in range(s.num_layers):
        for got, want in (
            (fused_kv.k[i].float(), eager_kv.k[i].float()),
            (fused_kv.v[i].float(), eager_kv.v[i].float()),
        ):
            torch.testing.assert_close(got, want, rtol=1 / 128, atol=0.02 * want.abs().max().item())
    # slots nobody wrote are untouched
    written = set(meta.slot_mapping.tolist())
    untouched = [slot for slot in range(12 * PAGE) if slot not in written]
    assert torch.equal(fused_kv.k[0][untouched], eager_kv.k[0][untouched])
    # the first layer's K/V of the new rows comes from the same bfloat16 input: equal
    assert torch.equal(fused_kv.k[0][meta.slot_mapping], eager_kv.k[0][meta.slot_mapping])
    assert torch.equal(fused_kv.v[0][meta.slot_mapping], eager_kv.v[0][meta.slot_mapping])


@pytest.mark.parametrize("weights_format", ["int8", "int4", "int8+act16"])  # int4+act16: see below
def test_fused_rows_do_not_depend_on_the_rows_beside_them(ops, tiny_models, weights_format):
    """Batch invariance with int8/int4 weights: each sequence's rows through every layer alone, and in one
    step with the others (a long context over several attention slices, a 5-row verification, decodes),
    give the same bits. This is what makes lossless speculation token-identical to plain decoding in
    bfloat16: a verification step's rows compute exactly what decode steps would. (The outputs are
    bfloat16, so float32 sums taken in another order would only rarely show here; the sharp check is the
    bench's sequence_match against plain decoding on the default model, 64 tokens per request.)"""
    weights = _load(tiny_models["llama"], weights_format)
    s = weights.shape
    cos, sin = rope_tables(weights.inv_freq, 256, weights.attention_scaling, torch.bfloat16)
    seqs = [SeqSlice(150, 1, list(range(40))), SeqSlice(6, 5, [40, 41, 42]), SeqSlice(0, 1, [43])]
    x = torch.randn(7, s.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    kv = _filled_store(s, 48, seed=4)
    together = fused.decode_layers(
        ops, weights.layers, x, build_metadata(seqs, PAGE, cos, sin), _clone(kv).k, _clone(kv).v, s
    )
    row = 0
    for seq in seqs:
        alone_kv = _clone(kv)
        rows = slice(row, row + seq.num_rows)
        alone = fused.decode_layers(
            ops, weights.layers, x[rows], build_metadata([seq], PAGE, cos, sin), alone_kv.k, alone_kv.v, s
        )
        assert torch.equal(alone, together[rows]), seq
        row += seq.num_rows


def test_mixed_step_runs_decode_rows_fused_and_prompt_chunks_eager(ops, tiny_models):
    """A step holding a 20-row prompt chunk between decode rows: the decode rows get the bits they get in a
    step of their own (fused), the chunk the bits of an eager step of its own; the K/V store ends the same."""
    from offramp.blocks.torch_backend import TorchBackend

    weights, _ = load_weights(tiny_models["llama"], torch.bfloat16, "int4", 32)
    s = weights.shape
    cos, sin = rope_tables(weights.inv_freq, 64, weights.attention_scaling, torch.bfloat16)
    decodes = [SeqSlice(9, 1, [0, 1, 2]), SeqSlice(3, 1, [3])]
    chunk = SeqSlice(0, 20, [4, 5, 6, 7, 8])
    blocks = [(0, s.num_layers // 2), (s.num_layers // 2, s.num_layers)]
    x = torch.randn(22, s.hidden_size, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    kv = _filled_store(s, 12, seed=7)
    rows = {"d0": slice(0, 1), "chunk": slice(1, 21), "d1": slice(21, 22)}

    def run(seqs, hidden, store, fused_decode=True):
        backend = TorchBackend(weights, store, blocks, fused=fused_decode)
        meta = build_metadata(seqs, PAGE, cos, sin)
        for b in range(len(blocks)):
            hidden = backend.run_block(b, hidden, meta)
        return hidden

    mixed_kv = _clone(kv)
    mixed = run([decodes[0], chunk, decodes[1]], x, mixed_kv)
    apart_kv = _clone(kv)
    alone = run(decodes, torch.cat([x[rows["d0"]], x[rows["d1"]]]), apart_kv)
    chunk_alone = run([chunk], x[rows["chunk"]], apart_kv, fused_decode=False)
    assert torch.equal(mixed[rows["d0"]], alone[0:1]) and torch.equal(mixed[rows["d1"]], alone[1:2])
    assert torch.equal(mixed[rows["chunk"]], chunk_alone)
    for i in range(s.num_layers):
        assert torch.equal(mixed_kv.k[i], apart_kv.k[i]) and torch.equal(mixed_kv.v[i], apart_kv.v[i])


@pytest.mark.parametrize("weights_format", ["bf16", "int4"])
def test_batch_invariant_prompt_rows_do_not_depend_on_the_chunking(ops, tiny_models, weights_format, monkeypatch):
    """batch_invariant: prompt chunks run fused too, so a prompt's rows and K/V come out the same bits
    whether it runs in one chunk beside decode rows or in two chunks of its own, and within bfloat16
    rounding of the eager layers (attending in float32, as the fused kernel does)."""
    from offramp.blocks.torch_backend import TorchBackend

    weights, _ = load_weights(tiny_models["llama"], torch.bfloat16, weights_format, 32)
    s = weights.shape
    cos, sin = rope_tables(weights.inv_freq, 64, weights.attention_scaling, torch.bfloat16)
    blocks = [(0, s.num_layers // 2), (s.num_layers // 2, s.num_layers)]
    pages = [4, 5, 6, 7, 8]
    x = torch.randn(21, s.hidden_size, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    kv = _filled_store(s, 12, seed=9)

    def run(seqs, hidden, store, invariant=True):
        backend = TorchBackend(weights, store, blocks, fused=True, invariant=invariant)
        meta = build_metadata(seqs, PAGE, cos, sin)
        for b in range(len(blocks)):
            hidden = backend.run_block(b, hidden, meta)
        return hidden

    one_kv, two_kv = _clone(kv), _clone(kv)
    one = run([SeqSlice(3, 1, [3]), SeqSlice(0, 20, pages)], x, one_kv)[1:]  # a decode row, then the prompt
    run([SeqSlice(3, 1, [3])], x[:1], two_kv)  # the decode row in a step of its own
    first = run([SeqSlice(0, 7, pages)], x[1:8], two_kv)
    second = run([SeqSlice(7, 13, pages)], x[8:], two_kv)
    assert torch.equal(one, torch.cat([first, second]))
    for i in range(s.num_layers):
        assert torch.equal(one_kv.k[i], two_kv.k[i]) and torch.equal(one_kv.v[i], two_kv.v[i])
    real_attention = attention._group_attention
    monkeypatch.setattr(
        attention,
        "_group_attention",
        lambda q, k, v, g, p: real_attention(q.float(), k.float(), v.float(), g, p).to(q.dtype),
    )
    eager = run([SeqSlice(0, 20, pages)], x[1:], _clone(kv), invariant=False)  # the chunk runs eager
    torch.testing.assert_close(one.float(), eager.float(), rtol=1 / 128, atol=0.01 * eager.float().abs().max().item())


def test_fuzzy_draft_rows_run_fused(ops, tiny_models, monkeypatch):
    """easyspec's draft pass (``run_fuzzy``) takes the fused kernels for decode-like rows: group 1 gives
    the bits of the fused block walk, group 2 adds the fused layers' updates as the eager pass adds the
    eager layers' (within bfloat16 rounding of it), one kernel call per layer."""
    from offramp.blocks.torch_backend import TorchBackend

    weights, _ = load_weights(tiny_models["llama"], torch.bfloat16, "int4", 32)
    s = weights.shape
    cos, sin = rope_tables(weights.inv_freq, 64, weights.attention_scaling, torch.bfloat16)
    blocks = [(i, i + 1) for i in range(s.num_layers)]
    meta = build_metadata([SeqSlice(9, 1, [0, 1, 2]), SeqSlice(3, 2, [3, 4])], PAGE, cos, sin)
    x = torch.randn(3, s.hidden_size, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    kv = _filled_store(s, 12, seed=11)

    def backend(store, fused_decode=True):
        return TorchBackend(weights, store, blocks, fused=fused_decode, invariant=True)

    walk, walk_kv = x, _clone(kv)
    walked = backend(walk_kv)
    for b in range(len(blocks)):
        walk = walked.run_block(b, walk, meta)
    calls = []
    real = fused.decode_layers
    monkeypatch.setattr(fused, "decode_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    exact_kv = _clone(kv)
    assert torch.equal(backend(exact_kv).run_fuzzy(x, meta, s.num_layers, 1), walk)
    assert len(calls) == s.num_layers
    for i in range(s.num_layers):
        assert torch.equal(exact_kv.k[i], walk_kv.k[i]) and torch.equal(exact_kv.v[i], walk_kv.v[i])
    fuzzy = backend(_clone(kv)).run_fuzzy(x, meta, s.num_layers, 2)
    assert not torch.equal(fuzzy, walk)  # stale inputs: not the exact walk
    real_attention = attention._group_attention
    monkeypatch.setattr(
        attention,
        "_group_attention",
        lambda q, k, v, g, p: real_attention(q.float(), k.float(), v.float(), g, p).to(q.dtype),
    )
    eager = backend(_clone(kv), fused_decode=False).run_fuzzy(x, meta, s.num_layers, 2)
    torch.testing.assert_close(fuzzy.float(), eager.float(), rtol=1 / 64, atol=0.02 * eager.float().abs().max().item())


def test_batch_invariance_is_on_where_the_server_speculates(tiny_models):
    def backend(**kw):
        config = EngineConfig(model=str(tiny_models["llama"]), dtype="bfloat16", weights="int4", page_size=PAGE, **kw)
        return LLMEngine(config).runner.backend

    assert backend().max_rows == fused.MAX_ROWS_PER_SEQ
    assert backend(spec="ngram").max_rows == fused.ALL_ROWS
    assert backend(spec="ngram", batch_invariant=False).max_rows == fused.MAX_ROWS_PER_SEQ
    assert backend(batch_invariant=True).max_rows == fused.ALL_ROWS
    with pytest.raises(ValueError, match="batch_invariant: must be true, false or null"):
        EngineConfig(batch_invariant="yes")


def test_bad_metadata_is_refused_not_read_out_of_bounds(ops, tiny_models):
    weights, _ = load_weights(tiny_models["llama"], torch.bfloat16, "bf16", 32)
    s = weights.shape
    cos, sin = rope_tables(weights.inv_freq, 64, weights.attention_scaling, torch.bfloat16)
    kv = _filled_store(s, 4, seed=0)
    meta = build_metadata([SeqSlice(5, 1, [3, 99])], PAGE, cos, sin)  # page 99 is outside a 4-page store
    x = torch.zeros(1, s.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the KV store"):
        fused.decode_layers(ops, weights.layers, x, meta, kv.k, kv.v, s)


@pytest.mark.parametrize("hd", [64, 128, 48])  # the vector kernels' two head sizes, and the loops' path
def test_rope_attend_over_long_contexts_matches_float64(ops, hd):
    """RoPE + K/V write + attention of decode rows whose contexts span several 64-position slices (merged
    after), against float64 softmax attention over the same bfloat16 K/V: within bfloat16 rounding of the
    output. The written K is RoPE as the eager ops round it, bit for bit."""
    nh, nkv, page, lens = 6, 2, 16, [1, 64, 65, 150, 200]
    n, pps = len(lens), 13
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (nh + 2 * nkv) * hd, generator=gen).to(torch.bfloat16)
    ang = torch.rand(n, hd // 2, generator=gen) * 6
    cos = torch.cat([ang.cos(), ang.cos()], 1).to(torch.bfloat16)
    sin = torch.cat([-ang.sin(), ang.sin()], 1).to(torch.bfloat16)
    k_store = torch.randn(n * pps * page, nkv, hd, generator=gen).to(torch.bfloat16)
    v_store = torch.randn(n * pps * page, nkv, hd, generator=gen).to(torch.bfloat16)
    pages = torch.randperm(n * pps, generator=gen).view(n, pps)  # scattered pages
    ctx = torch.tensor(lens)
    slots = pages[torch.arange(n), (ctx - 1) // page] * page + (ctx - 1) % page
    out = ops.rope_attend(qkv, cos, sin, k_store, v_store, slots, pages, ctx, nh, nkv, hd, page)
    for r, length in enumerate(lens):
        x = qkv[r].float().view(nh + 2 * nkv, hd)
        c, s = cos[r].float(), sin[r].float()
        rot = ((x * c).bfloat16().float() + (torch.roll(x, hd // 2, -1) * s).bfloat16().float()).bfloat16()
        assert torch.equal(k_store[slots[r]], rot[nh : nh + nkv])
        assert torch.equal(v_store[slots[r]], qkv[r].view(nh + 2 * nkv, hd)[nh + nkv :])
        idx = (pages[r, :, None] * page + torch.arange(page)).flatten()[:length]
        keys = k_store[idx].double().transpose(0, 1).repeat_interleave(nh // nkv, 0)  # [nh, len, hd]
        values = v_store[idx].double().transpose(0, 1).repeat_interleave(nh // nkv, 0)
        q = rot[:nh].double().unsqueeze(1)  # [nh, 1, hd]
        want = (torch.softmax(q @ keys.transpose(1, 2) / hd**0.5, -1) @ values).reshape(-1)
        torch.testing.assert_close(out[r].double(), want, rtol=1 / 128, atol=1e-3)


def _greedy(model, fused_decode: bool, prompts: list[str]) -> list[list[int]]:
    engine = LLMEngine(
        EngineConfig(
            model=str(model), dtype="bfloat16", weights="int4", page_size=PAGE, fused_decode=fused_decode, seed=0
        )
    )
    assert (engine.runner.backend.fused is not None) == fused_decode
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)
    outs = engine.generate(prompts, params, chat=False)
    return [o.token_ids for o in outs]


def test_engine_with_fused_decode_generates_what_eager_does(ops, tiny_models, monkeypatch):
    """Batched greedy decoding on an int4 tiny model: fused and eager engines give the same tokens, and
    the fused engine's decode steps do take the fused path."""
    prompts = ["the cat sat on the mat", "a dog ran", "one two three four five six seven"]
    eager = _greedy(tiny_models["llama"], False, prompts)
    calls = []
    real = fused.decode_layers
    monkeypatch.setattr(fused, "decode_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _greedy(tiny_models["llama"], True, prompts) == eager
    assert len(calls) >= 11  # every decode step after the prompts (each block once per step)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16, 23])
def test_int8_product_matches_float32(ops, rows):
    """The group-wise int8 product (float16 scales per 32 columns; 1027 weight rows: not whole blocks of
    64) against float32 on the de-quantized weights, and group sizes 64/128 (made by hand: the engine keeps
    32); bad scales are refused. Up to 16 rows the products are exact in float32 (one rounding, of the
    output); more rows (23: a prompt chunk) multiply bfloat16-rounded weights, 2^-9 relative each."""
    from offramp.model.quant import Int8Weight, quantize_int8

    gen = torch.Generator().manual_seed(0)
    w = quantize_int8(torch.randn(1027, 96, generator=gen))
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    ours = ops.int8_mm(x, w.q, w.scale, 17, False)
    exact = x.float() @ w.dequantize().T  # [rows, 1027]
    assert ours.shape == (rows, 1027)
    atol = 1e-3 if rows <= 16 else 2**-7 * exact.abs().max().item()
    torch.testing.assert_close(ours.float(), exact, rtol=1 / 128, atol=atol)
    for group in (64, 128):
        q = torch.randint(-127, 128, (70, 256), generator=gen, dtype=torch.int8)
        scale = (torch.rand(70, 256 // group, generator=gen) * 0.01).to(torch.float16)
        wide = Int8Weight(q, scale)
        x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16)
        exact = x.float() @ wide.dequantize().T
        atol = 1e-3 if rows <= 16 else 2**-7 * exact.abs().max().item()
        torch.testing.assert_close(ops.int8_mm(x, q, scale, 17, False).float(), exact, rtol=1 / 128, atol=atol)
    with pytest.raises(RuntimeError, match="scale: float16"):
        ops.int8_mm(x, q, scale.float(), 0, False)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.int8_mm(x, q, torch.ones(70, 16, dtype=torch.float16), 0, False)


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 16, 45])
def test_int4_product_is_torchs_kernel(ops, rows):
    """int4_mm reads torch's CPU packing (checked on this machine) and gives torch's kernel's result within
    float32 summation order, and the exact product within the rounding of scales and zeros to bfloat16.
    Rows up to 6 unpack the weights in registers, more rows from a buffer (7, 16, 45: tiles of 6 and a rest)."""
    from offramp.model.quant import int4_weight, nibbles, quantize_int4

    if not ops.int4_mm_available():  # torch packs for the CPU's vector width; the engine then keeps its kernel
        pytest.skip(
            "int4_mm does not run here (neither AVX512-BF16 nor AVX2, or torch's int4 packing is not the one it reads)"
        )
    gen = torch.Generator().manual_seed(0)
    codes = quantize_int4(torch.randn(192, 128, generator=gen), 32)  # three blocks of 64 rows
    w = int4_weight(nibbles(codes.codes), codes.scale_zero(), 32)
    x = torch.randn(rows, 128, generator=gen).to(torch.bfloat16)
    ours = ops.int4_mm(x, w.packed, w.scale_zero, 32, w.out_features, 0, False)
    assert ours.shape == (rows, 192)
    ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, 32, w.scale_zero)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1 / 128, atol=1e-2)
    exact = x.float() @ codes.dequantize().T  # [rows, 192]: scales and zeros as held (before bfloat16)
    torch.testing.assert_close(ours.float(), exact, rtol=0.02, atol=0.05 * exact.abs().max().item())
    # a prompt chunk's path (from dense_from_rows rows): bfloat16-rounded weights and one oneDNN product
    dense = ops.int4_mm(x, w.packed, w.scale_zero, 32, w.out_features, 1, False)
    torch.testing.assert_close(dense.float(), exact, rtol=0.02, atol=0.05 * exact.abs().max().item())
    torch.testing.assert_close(dense.float(), ours.float(), rtol=2**-6, atol=2**-7 * exact.abs().max().item())
    # batch invariance: a row's result does not depend on the rows beside it (same sums at any batch size)
    alone = torch.cat(
        [ops.int4_mm(x[i : i + 1], w.packed, w.scale_zero, 32, w.out_features, 0, False) for i in range(rows)]
    )
    assert torch.equal(alone, ours)


def test_int4_product_group_sizes(ops):
    """Group sizes 64 and 128; a weight whose packed rows are not whole blocks of 64 keeps torch's kernel."""
    from offramp.model.quant import int4_weight, nibbles, quantize_int4

    if not ops.int4_mm_available():
        pytest.skip("int4_mm does not run here")
    gen = torch.Generator().manual_seed(1)
    for group in (64, 128):
        codes = quantize_int4(torch.randn(128, 256, generator=gen), group)
        w = int4_weight(nibbles(codes.codes), codes.scale_zero(), group)
        x = torch.randn(9, 256, generator=gen).to(torch.bfloat16)
        ours = ops.int4_mm(x, w.packed, w.scale_zero, group, w.out_features, 0, False)
        exact = x.float() @ codes.dequantize().T  # [9, 128]
        torch.testing.assert_close(ours.float(), exact, rtol=0.02, atol=0.05 * exact.abs().max().item())
    codes = quantize_int4(torch.randn(100, 256, generator=gen), 32)  # packed as 112 rows: not whole blocks
    w = int4_weight(nibbles(codes.codes), codes.scale_zero(), 32)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="unsupported shape"):
        ops.int4_mm(x, w.packed, w.scale_zero, 32, w.out_features, 0, False)
    exact = x.float() @ codes.dequantize().T  # [3, 100]
    torch.testing.assert_close(w.matmul(x).float(), exact, rtol=0.02, atol=0.05 * exact.abs().max().item())


def _q16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's activations as the AVX2 kernels quantize them: [m, K] -> codes [m, K / 32, 32], scales [m, K / 32]."""
    blocks = x.float().view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    inv = torch.where(amax > 0, 16383.0 / amax, torch.zeros_like(amax))
    return torch.round(blocks * inv[..., None]), amax / 16383.0


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_product_with_int16_activations(ops, group):
    """The AVX2 int4 product with int16 activations, for a lone row, against its definition (per block of 32
    columns d * sum q xq, per group y = s acc + (z - 8 s) sum x) in float64 and against the product with
    float32 activations: both within the output's bfloat16 rounding. Several rows run the float32 path
    (faster there): the same bits as without int16 activations."""
    from offramp.model.quant import int4_weight, nibbles, quantize_int4

    if not ops.int16_activations_available():
        pytest.skip("int16 activations are the AVX2 kernels' (this CPU runs others)")
    gen = torch.Generator().manual_seed(group)
    codes = quantize_int4(torch.randn(96, 256, generator=gen), group)  # three blocks of 32 rows
    w = int4_weight(nibbles(codes.codes), codes.scale_zero(), group)
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
    ours = ops.int4_mm(x, w.packed, w.scale_zero, group, 96, 0, True)
    xq, d = _q16(x)
    sums = torch.einsum("mbc,nbc->mnb", xq.double(), codes.codes.double().view(96, -1, 32)) * d.double()[:, None]
    acc = sums.view(1, 96, 256 // group, group // 32).sum(-1)  # [1, N, groups]
    sz = codes.scale_zero().double()  # [groups, N, 2] as the kernel reads them (bfloat16)
    s, z = sz[..., 0].t(), sz[..., 1].t()  # [N, groups]
    xs = x.double().view(1, 256 // group, group).sum(-1)  # [1, groups]
    ref = (acc * s + (z - 8 * s) * xs[:, None]).sum(-1)  # [1, N]
    torch.testing.assert_close(ours.double(), ref, rtol=2**-8, atol=2**-8 * ref.abs().max().item())
    floats = ops.int4_mm(x, w.packed, w.scale_zero, group, 96, 0, False).double()
    torch.testing.assert_close(ours.double(), floats, rtol=2**-7, atol=2**-7 * ref.abs().max().item())
    rows = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    several = ops.int4_mm(rows, w.packed, w.scale_zero, group, 96, 0, True)
    assert torch.equal(several, ops.int4_mm(rows, w.packed, w.scale_zero, group, 96, 0, False))


def test_batch_invariant_engines_keep_float32_activations_for_int4(tiny_models):
    """int4 takes int16 activations for lone rows only, so an engine that needs a row's bits to be the same in
    any batch (lossless speculation) keeps float32 activations there; its int8 LM head (int16 at any number
    of rows) takes them either way."""
    if not fused.int16_activations_available():
        pytest.skip("int16 activations are the AVX2 kernels' (this CPU runs others)")
    common = dict(model=str(tiny_models["llama"]), dtype="bfloat16", weights="int4")
    plain = LLMEngine(EngineConfig(**common))
    invariant = LLMEngine(EngineConfig(**common, batch_invariant=True))
    assert plain.weights.layers[0].qkv.int16_act and plain.weights.lm_head.int16_act
    assert not invariant.weights.layers[0].qkv.int16_act and invariant.weights.lm_head.int16_act
    off = LLMEngine(EngineConfig(**common, int16_activations=False))
    assert not off.weights.layers[0].qkv.int16_act and not off.weights.lm_head.int16_act


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_product_with_int16_activations(ops, rows):
    """The AVX2 int8 product with int16 activations (the LM head's): sum_b s[b] d[b] sum q xq, against float64."""
    from offramp.model.quant import quantize_int8

    if not ops.int16_activations_available():
        pytest.skip("int16 activations are the AVX2 kernels' (this CPU runs others)")
    gen = torch.Generator().manual_seed(rows)
    w = quantize_int8(torch.randn(1027, 96, generator=gen))
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    ours = ops.int8_mm(x, w.q, w.scale, 0, True)
    xq, d = _q16(x)
    ref = torch.einsum("mbc,nbc->mnb", xq.double(), w.q.double().view(1027, -1, 32)) * d.double()[:, None]
    ref = (ref * w.scale.double()[None]).sum(-1)  # [rows, N]
    torch.testing.assert_close(ours.double(), ref, rtol=2**-8, atol=2**-8 * ref.abs().max().item())
    alone = torch.cat([ops.int8_mm(x[i : i + 1], w.q, w.scale, 0, True) for i in range(rows)])
    assert torch.equal(alone, ours)


def test_int16_activations_are_checked():
    """Only int4/int8 weights on a CPU whose kernels take them; anything else is one error naming the option."""
    with pytest.raises(ValueError, match="int16_activations: only int4/int8 weights"):
        EngineConfig(weights="bf16", dtype="bfloat16", int16_activations=True)
    with pytest.raises(ValueError, match="int16_activations: must be true or false"):
        EngineConfig(weights="int4", dtype="bfloat16", int16_activations="yes")
    with pytest.raises(ValueError, match="int16_activations: only int4/int8 weights on the CPU"):
        fused.int16_activations_for(True, "int4", torch.device("cuda"))
    assert not fused.int16_activations_for(None, "bf16", torch.device("cpu"))
    if fused.int16_activations_available():
        assert fused.int16_activations_for(None, "int4", torch.device("cpu"))
        assert not fused.int16_activations_for(False, "int4", torch.device("cpu"))
    else:
        with pytest.raises(ValueError, match="int16_activations: they are the extension's AVX2 kernels"):
            fused.int16_activations_for(True, "int4", torch.device("cpu"))
