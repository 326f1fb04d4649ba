"""The PyTorch engine on CUDA (skipped without a GPU; ``perf/gpu_check.sh`` runs these on one).

- float32 on CUDA is token-identical to Hugging Face greedy generate (tiny models; the default model);
- bfloat16 on CUDA agrees with float32 teacher-forced (the same bar as on CPU);
- with exits on, CPU and CUDA float32 take the same exit decisions and the same tokens;
- a greedy decode step with exits off (a CUDA graph replay) synchronises the host at most twice (measured
  with ``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.tools.teacher_forcing import teacher_forced_agreement, teacher_forced_hidden

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13], [20, 21] * 6, [30]]


def _hf_greedy(path, prompt_ids: list[int], max_tokens: int, device: str) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ids = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_float32_on_cuda_is_token_identical_to_hf(tiny_models, model_type):
    path = tiny_models[model_type]
    engine = LLMEngine(EngineConfig(model=str(path), page_size=4, device="cuda", use_chat_template=False))
    assert engine.weights.embed.device.type == "cuda" and engine.kv.k[0].device.type == "cuda"
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == _hf_greedy(path, prompt, 12, "cuda")


@pytest.mark.default_model
def test_default_model_on_cuda_float32_matches_hf_and_bfloat16_agrees(default_checkpoint):
    engine = LLMEngine(EngineConfig(model=str(default_checkpoint), device="cuda"))
    prompt = engine.encode("Name three primary colors.")
    ours = engine.generate([prompt], SamplingParams(max_tokens=24))[0]
    assert ours.token_ids == _hf_greedy(default_checkpoint, prompt, len(ours.token_ids), "cuda")
    bf16 = LLMEngine(EngineConfig(model=str(default_checkpoint), device="cuda", dtype="bfloat16"))
    out = bf16.generate([prompt], SamplingParams(max_tokens=24))[0]
    agree = teacher_forced_agreement(engine, prompt, out.token_ids)
    assert sum(agree) / len(agree) >= 0.9


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_exits_take_the_same_decisions_on_cpu_and_cuda(tiny_models, kv_fill):
    common = dict(
        model=str(tiny_models["llama"]),
        page_size=4,
        layers_per_block=1,
        min_exit_layer=1,
        exit_policy="softmax",
        exit_threshold=0.2,
        kv_fill=kv_fill,
        use_chat_template=False,
    )
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    cpu = LLMEngine(EngineConfig(device="cpu", **common)).generate(PROMPTS, params)
    engine = LLMEngine(EngineConfig(device="cuda", **common))
    gpu = engine.generate(PROMPTS, params)
    assert engine.runner.loop.graphs.num_replays == 0  # steps with exits walk the blocks eagerly, never a graph
    assert [o.exit_layers for o in gpu] == [o.exit_layers for o in cpu]
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    assert any(d < 4 for o in gpu for d in o.exit_layers)  # exits did happen


def test_a_greedy_decode_step_synchronises_at_most_twice(tiny_models):
    engine = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, device="cuda"))
    engine.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))  # captures the steps' CUDA graphs
    replays = engine.runner.loop.graphs.num_replays
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()  # prefill
    torch.cuda.synchronize()
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while engine.has_work:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"host synchronisations per decode step: {counts}")
    assert counts and max(counts) <= 2
    assert engine.runner.loop.graphs.num_replays >= replays + len(counts) - 1  # the decode steps replayed graphs


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_devices_cuda_and_cpu_equal_one_device(tiny_models, kv_fill):
    """``--devices cuda:0,cpu``: blocks 0-1 and their K/V on the GPU, blocks 2-3 on the CPU (real
    transfers at the boundary); greedy tokens and exit depths equal the single-GPU engine's."""
    base = dict(model=str(tiny_models["llama"]), page_size=4, layers_per_block=1, num_pages=64, kv_fill=kv_fill)
    base["min_exit_layer"] = 1
    exits = SamplingParams(max_tokens=12, exit_policy="similarity", exit_threshold=0.6)
    results = []
    for placement in ({"device": "cuda:0"}, {"devices": ("cuda:0", "cpu")}):
        engine = LLMEngine(EngineConfig(**base, **placement))
        greedy = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
        exited = engine.generate(PROMPTS, exits)
        results.append(([o.token_ids for o in greedy], [(o.token_ids, o.exit_layers) for o in exited]))
        if "devices" in placement:
            assert [str(engine.kv.k[layer].device) for layer in range(4)] == ["cuda:0", "cuda:0", "cpu", "cpu"]
            assert engine.weights.layers[3].down.device.type == "cpu"
        engine.close()
    assert results[0] == results[1]


def test_int8_weights_on_cuda_compute_what_the_cpu_engine_does(tiny_models):
    """int8 (a float16 scale per 32 columns) on CUDA runs the upcast float32 product; on the CPU the
    extension's int8 product (or the same upcast): both exact products of the same weights, so the
    teacher-forced logits agree to bfloat16 activation rounding and greedy tokens mostly match."""
    from offramp.model.decoder import final_logits

    path = str(tiny_models["llama"])
    prompt, output = [3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]
    logits = []
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(model=path, dtype="bfloat16", weights="int8", device=device))
        assert engine.weights.layers[0].qkv.q.device.type == device
        _, final = teacher_forced_hidden(engine, prompt, output)
        logits.append(final_logits(engine.weights, final).float().cpu())
    cpu, cuda = logits
    assert ((cuda - cpu).norm() / cpu.norm()).item() < 0.05
    assert (cuda.argmax(-1) == cpu.argmax(-1)).float().mean() >= 0.85


def test_int4_weights_on_cuda_compute_what_the_cpu_engine_does(tiny_models):
    """int4 on CUDA: the CPU layout's codes repacked for torch's tensor-core kernel (``_weight_int4pack_mm``),
    the same scales and zeros; both sum bfloat16 products in float32 in their own order, so the logits
    agree to bfloat16 activation rounding and greedy tokens mostly match."""
    from offramp.model.decoder import final_logits
    from offramp.model.quant import Int4CudaWeight

    path = str(tiny_models["llama"])
    prompt, output = [3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]
    logits, down = [], None
    for device in ("cpu", "cuda"):
        engine = LLMEngine(EngineConfig(model=path, dtype="bfloat16", weights="int4", device=device))
        if device == "cpu":
            down = engine.weights.layers[0].down.dequantize()  # [N, K] float32, exact (the CPU kernel's path)
        else:
            layer = engine.weights.layers[0]
            assert isinstance(layer.qkv, Int4CudaWeight) and layer.qkv.packed.device.type == "cuda"
            x = torch.randn(3, down.shape[1], device="cuda").to(torch.bfloat16)
            ref = x.float() @ down.cuda().t()  # [3, N]: the CPU weights' values
            got = layer.down.matmul(x).float()
            torch.testing.assert_close(got, ref, atol=0.02 * ref.abs().max().item(), rtol=0)
            torch.testing.assert_close(layer.down.dequantize().cpu(), down, atol=0.01 * down.abs().max().item(), rtol=0)
        _, final = teacher_forced_hidden(engine, prompt, output)
        logits.append(final_logits(engine.weights, final).float().cpu())
    cpu, cuda = logits
    assert ((cuda - cpu).norm() / cpu.norm()).item() < 0.05
    assert (cuda.argmax(-1) == cpu.argmax(-1)).float().mean() >= 0.85
