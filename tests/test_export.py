"""offramp export and the ONNX Runtime block engine: files, manifest, reuse, parity with PyTorch."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import onnx
import pytest
import torch

from offramp import EngineConfig, SamplingParams
from offramp.blocks.manifest import ExportManifest
from offramp.engine.llm_engine import LLMEngine
from offramp.model.attention import SeqSlice, build_metadata
from offramp_export import export_model

TOL = 1e-4  # float32: max abs error of an exported block against the PyTorch block


def _prompts(seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 121) for _ in range(n)] for n in (4, 11, 19, 33, 7)]


@pytest.fixture(scope="module")
def tiny_export(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llama"
    result = export_model(str(tiny_models["llama"]), [(0, 2), (2, 3), (3, 4)], 4, out, progress=False)
    return result


def test_export_writes_checked_graphs_and_manifest(tiny_export):
    m = ExportManifest.load(tiny_export.directory)
    assert not tiny_export.reused
    assert m.block_ranges == [(0, 2), (2, 3), (3, 4)] and m.page_size == 4 and m.opset == 18
    assert m.kv_layout == "head_major" and m.dtype == "float32" and len(m.source_checksum) == 64
    files = [b.file for b in m.blocks] + [m.embed, m.final_head]
    for f in files:
        onnx.checker.check_model(str(tiny_export.directory / f))
    first = onnx.load(str(tiny_export.directory / m.blocks[0].file), load_external_data=False)
    assert [i.name for i in first.graph.input] == [
        "hidden", "cos", "sin", "page_ids", "mask", "k_store.0", "v_store.0", "k_store.1", "v_store.1"
    ]  # fmt: skip
    assert m.dynamic_axes["mask"] == {"0": "num_seqs", "1": "rows_per_seq", "2": "context_plus_rows"}
    assert "tokenizer/tokenizer.json" in m.tokenizer_files
    assert (tiny_export.directory / "tokenizer" / "tokenizer.json").is_file()


def test_reexport_reuses_and_changes_redo(tiny_models, tiny_export, tmp_path):
    again = export_model(str(tiny_models["llama"]), [(0, 2), (2, 3), (3, 4)], 4, tiny_export.directory, progress=False)
    assert again.reused
    # Another layout in the same directory re-exports, and leaves no stale block files behind.
    out = tmp_path / "copy"
    shutil.copytree(tiny_export.directory, out)
    relaid = export_model(str(tiny_models["llama"]), [(0, 2), (2, 4)], 4, out, progress=False)
    assert not relaid.reused and relaid.manifest.block_ranges == [(0, 2), (2, 4)]
    assert sorted(p.name for p in out.glob("block_*.onnx")) == ["block_00.onnx", "block_01.onnx"]
    # Changed weights re-export too.
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (model / "config.json").write_text(json.dumps(config))
    other = export_model(str(model), [(0, 2), (2, 3), (3, 4)], 4, tiny_export.directory.parent / "m2", progress=False)
    assert other.manifest.source_checksum != tiny_export.manifest.source_checksum


def _engines(model, export_dir, **kw):
    common = dict(model=str(model), page_size=4, block_boundaries=(0, 2, 3), min_exit_layer=1, **kw)
    torch_engine = LLMEngine(EngineConfig(**common))
    ort_engine = LLMEngine(EngineConfig(backend="onnxruntime", export_dir=str(export_dir), **common))
    return torch_engine, ort_engine


def _copy_store(src: LLMEngine, dst: LLMEngine) -> None:
    for layer in range(src.num_layers):
        dst.kv.k[layer].copy_(src.kv.k[layer].transpose(0, 1))
        dst.kv.v[layer].copy_(src.kv.v[layer].transpose(0, 1))


@pytest.mark.parametrize("inputs", ["random", "real"])
def test_every_block_matches_torch(tiny_models, tiny_export, inputs):
    t_eng, o_eng = _engines(tiny_models["llama"], tiny_export.directory)
    gen = torch.Generator().manual_seed(0)
    if inputs == "random":
        for store in t_eng.kv.k + t_eng.kv.v:
            store.copy_(torch.randn(store.shape, generator=gen))
    else:  # the stores hold a real prompt's K/V
        t_eng.generate([_prompts()[3]], SamplingParams(max_tokens=1))
    _copy_store(t_eng, o_eng)
    # One step with three decodes (different lengths), a prompt chunk, and a chunk with redo rows.
    slices = [
        SeqSlice(9, 1, [1, 2, 3]),
        SeqSlice(5, 1, [4, 5]),
        SeqSlice(2, 1, [6]),
        SeqSlice(4, 6, [7, 8, 9]),
        SeqSlice(8, 2, [10, 11, 12], redo=(3, 6)),
    ]
    meta = build_metadata(slices, 4, t_eng.runner.cos, t_eng.runner.sin)
    n = sum(s.num_rows for s in slices)
    if inputs == "random":
        hidden = torch.randn(n, 64, generator=gen)
    else:
        hidden = torch.nn.functional.embedding(torch.randint(1, 121, (n,), generator=gen), t_eng.weights.embed)
    with torch.inference_mode():
        for b in range(t_eng.backend.num_blocks):
            ref = t_eng.backend.run_block(b, hidden.clone(), meta)
            out = o_eng.backend.run_block(b, hidden.clone(), meta)
            assert (out - ref).abs().max().item() <= TOL, f"block {b}"
            start, end = t_eng.block_ranges[b]
            for layer in range(start, end):
                written_ref = t_eng.kv.k[layer][meta.slot_mapping]  # [n, kv_heads, head_dim]
                written = o_eng.kv.k[layer][:, meta.slot_mapping].transpose(0, 1)
                assert (written - written_ref).abs().max().item() <= TOL
            hidden = ref


def test_embedding_and_head_graphs_match(tiny_models, tiny_export):
    import onnxruntime as ort

    from offramp.blocks.ort_backend import session_options

    t_eng, _ = _engines(tiny_models["llama"], tiny_export.directory)
    w = t_eng.weights
    ids = np.array([1, 5, 9, 120], dtype=np.int64)
    embed = ort.InferenceSession(str(tiny_export.directory / "embed.onnx"), session_options()).run(
        None, {"token_ids": ids}
    )[0]
    assert np.abs(embed - w.embed[torch.from_numpy(ids)].numpy()).max() == 0
    hidden = torch.randn(4, 64)
    head = ort.InferenceSession(str(tiny_export.directory / "final_head.onnx"), session_options()).run(
        None, {"hidden": hidden.numpy()}
    )[0]
    from offramp.model.decoder import final_logits

    assert np.abs(head - final_logits(w, hidden).numpy()).max() <= TOL


@pytest.mark.parametrize(
    "exit_config",
    [
        {},
        {"exit_policy": "softmax", "exit_threshold": 0.3, "kv_fill": "propagate"},
        {"exit_policy": "softmax", "exit_threshold": 0.3, "kv_fill": "recompute"},
    ],
    ids=["full-depth", "exits-propagate", "exits-recompute"],
)
def test_greedy_generation_matches_torch(tiny_models, tiny_export, exit_config):
    # 24 pages of 4 tokens for five sequences of up to 57 tokens: preemption happens too.
    t_eng, o_eng = _engines(tiny_models["llama"], tiny_export.directory, num_pages=24, **exit_config)
    params = SamplingParams(max_tokens=24)
    ref = t_eng.generate(_prompts(), params)
    out = o_eng.generate(_prompts(), params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert [o.exit_layers for o in out] == [r.exit_layers for r in ref]
    if exit_config:
        assert any(d < 4 for r in ref for d in r.exit_layers), "the threshold should make some tokens exit"
    assert o_eng.scheduler.num_preemptions > 0
    o_eng.pages.check_invariants()
    assert o_eng.pages.num_used_pages == 0


def test_exported_engine_config_errors(tiny_models, tiny_export):
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(backend="onnxruntime", dtype="bfloat16")
    with pytest.raises(ValueError, match="block layout"):  # the export's layout is checked at load
        from offramp.blocks.ort_backend import OrtBackend

        t_eng = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, layers_per_block=1))
        from offramp.model.kv_store import KVStore

        kv = KVStore(t_eng.weights.shape, 8, 4, torch.float32, head_major=True)
        OrtBackend(t_eng.weights, kv, t_eng.block_ranges, tiny_export.directory)
    with pytest.raises(ValueError, match="offramp export"):
        ExportManifest.load(tiny_export.directory / "tokenizer")


@pytest.fixture(scope="module")
def default_engines(default_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-default")
    common = dict(model="default", num_threads=2)
    torch_engine = LLMEngine(EngineConfig(**common))
    ort_engine = LLMEngine(EngineConfig(backend="onnxruntime", export_dir=str(out), **common))
    return torch_engine, ort_engine


@pytest.mark.default_model
def test_default_model_blocks_match_on_real_activations(default_engines, bundled_prompts):
    t_eng, o_eng = default_engines
    ids = t_eng.encode(bundled_prompts[0]["prompt"])
    t_eng.generate([ids], SamplingParams(max_tokens=1))  # warm, and real K/V in the store
    _copy_store(t_eng, o_eng)
    slices = [SeqSlice(0, len(ids), list(range(-(-len(ids) // 16))))]
    meta = build_metadata(slices, 16, t_eng.runner.cos, t_eng.runner.sin)
    hidden = torch.nn.functional.embedding(torch.tensor(ids), t_eng.weights.embed)
    worst = 0.0
    with torch.inference_mode():
        for b in range(t_eng.backend.num_blocks):
            ref = t_eng.backend.run_block(b, hidden.clone(), meta)
            out = o_eng.backend.run_block(b, hidden.clone(), meta)
            worst = max(worst, (out - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
            hidden = ref
    assert worst <= TOL, f"largest block error relative to the activations' scale: {worst:.2e}"


@pytest.mark.default_model
@pytest.mark.parametrize("policy", ["none", "softmax"])
def test_default_model_greedy_matches_torch(default_engines, bundled_prompts, policy):
    t_eng, o_eng = default_engines
    prompts = [p["prompt"] for p in bundled_prompts]
    params = SamplingParams(max_tokens=32, exit_policy=policy, exit_threshold=0.5)
    ref = t_eng.generate(prompts, params)
    out = o_eng.generate(prompts, params)
    mismatched = [i for i, (o, r) in enumerate(zip(out, ref)) if o.token_ids != r.token_ids]
    assert not mismatched, f"prompts {mismatched} differ between onnxruntime and torch"
    if policy != "none":
        assert [o.exit_layers for o in out] == [r.exit_layers for r in ref]
        assert any(d < 30 for r in ref for d in r.exit_layers)


@pytest.fixture(scope="module")
def tiny_int4_export(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_int4") / "llama"
    return export_model(
        str(tiny_models["llama"]), [(0, 2), (2, 3), (3, 4)], 4, out, progress=False, weights_format="int4"
    )


def test_int4_export_writes_dequantizelinear_blocks(tiny_int4_export):
    manifest = ExportManifest.load(tiny_int4_export.directory)
    assert (manifest.weights, manifest.weight_group_size) == ("int4", 32)
    graph = onnx.load(str(tiny_int4_export.directory / manifest.blocks[0].file)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") == 8  # 4 products x 2 layers
    uint4 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.UINT4]
    assert len(uint4) == 16  # codes and zero points of each product
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert len(floats) == 16 and all(i.name.endswith((".scale", ".zero")) for i in floats)  # no dense weights left


def test_int4_blocks_compute_the_dequantized_products(tiny_models, tiny_int4_export):
    """Each int4 block graph (ONNX Runtime) against the traced float32 module on the same de-quantized
    weights: the DequantizeLinear + zero-term rewrite changes nothing but float32 rounding."""
    import onnxruntime as ort

    from offramp.model.loader import load_weights
    from offramp_export.exporter import _block_sample_inputs
    from offramp_export.graphs import BlockGraph
    from offramp_export.int4_graph import dense_weights

    quantized, _ = load_weights(tiny_models["llama"], torch.bfloat16, "int4", 32)
    dense = dense_weights(quantized)
    manifest = ExportManifest.load(tiny_int4_export.directory)
    for entry in manifest.blocks:
        module = BlockGraph(dense, entry.start, entry.end, 4)
        inputs = _block_sample_inputs(dense, entry.end - entry.start, 4)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # as OrtBackend does
        session = ort.InferenceSession(
            str(tiny_int4_export.directory / entry.file), options, providers=["CPUExecutionProvider"]
        )
        feeds = {name: t.numpy() for name, t in zip(module.input_names(), inputs)}
        got = session.run(None, feeds)
        with torch.no_grad():
            want = module(*inputs)
        for g, w in zip(got, want):
            assert np.abs(g - w.numpy()).max() <= 1e-4 * max(1.0, float(w.abs().max())), entry.file


def test_int4_export_blocks_match_the_torch_int4_engine(tiny_models, tiny_int4_export):
    """Block parity on the same packed weights: the ONNX Runtime engine on the int4 export (float32
    activations) against the torch int4 engine (bfloat16 activations), one step of decodes, a prompt
    chunk and redo rows over random K/V. Tolerance: 3 % of the block output's largest value (bfloat16
    rounding of activations and K/V, carried through two layers)."""
    common = dict(model=str(tiny_models["llama"]), page_size=4, num_pages=64, block_boundaries=(0, 2, 3))
    ort_engine = LLMEngine(EngineConfig(backend="onnxruntime", export_dir=str(tiny_int4_export.directory), **common))
    assert ExportManifest.load(tiny_int4_export.directory).weights == "int4"  # the engine kept the int4 export
    torch_engine = LLMEngine(EngineConfig(dtype="bfloat16", weights="int4", **common))
    gen = torch.Generator().manual_seed(0)
    for store in torch_engine.kv.k + torch_engine.kv.v:
        store.copy_(torch.randn(store.shape, generator=gen))
    _copy_store(torch_engine, ort_engine)
    slices = [
        SeqSlice(9, 1, [1, 2, 3]),
        SeqSlice(5, 1, [4, 5]),
        SeqSlice(4, 6, [7, 8, 9]),
        SeqSlice(8, 2, [10, 11, 12], redo=(3, 6)),
    ]
    meta = build_metadata(slices, 4, ort_engine.runner.cos, ort_engine.runner.sin)
    meta_bf16 = build_metadata(slices, 4, torch_engine.runner.cos, torch_engine.runner.sin)
    hidden = torch.randn(sum(s.num_rows for s in slices), 64, generator=gen)
    with torch.inference_mode():
        for b in range(ort_engine.backend.num_blocks):
            out = ort_engine.backend.run_block(b, hidden.clone(), meta)
            ref = torch_engine.backend.run_block(b, hidden.to(torch.bfloat16), meta_bf16).float()
            assert (out - ref).abs().max().item() <= 0.03 * ref.abs().max().item(), f"block {b}"
            hidden = out
