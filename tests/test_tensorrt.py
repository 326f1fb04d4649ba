"""TensorRT path: CPU-side parts always; engine build and parity only with a GPU and tensorrt."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from offramp import EngineConfig, SamplingParams
from offramp.blocks.manifest import ExportManifest
from offramp.engine.llm_engine import LLMEngine
from offramp_export import export_model
from offramp_export.tensorrt_build import (
    ProfileLimits,
    TensorRTUnavailable,
    build_engines,
    check_tensorrt,
    profile_shapes,
)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt-export")
    return export_model(str(tiny_models["llama"]), [(0, 2), (2, 4)], 4, out, progress=False)


def test_profile_covers_every_step_the_scheduler_can_send(exported):
    limits = ProfileLimits(max_num_seqs=8, max_rows=64, max_context=100, num_slots=4 * 50)
    shapes = profile_shapes(exported.manifest, 2, 2, 16, limits)
    assert set(shapes) == {
        "hidden",
        "cos",
        "sin",
        "page_ids",
        "mask",
        "k_store.0",
        "v_store.0",
        "k_store.1",
        "v_store.1",
    }
    for name, (lo, opt, hi) in shapes.items():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
    assert shapes["hidden"][2] == (64, 64)  # a whole step of prefill rows
    assert shapes["page_ids"][2] == (8, 25)  # 100 tokens of context in pages of 4
    assert shapes["mask"][2] == (8, 64, 25 * 4 + 64)  # stored slots then the step's own rows
    assert shapes["k_store.0"][2] == (2, 200, 16)


def test_profile_limits_are_validated():
    with pytest.raises(ValueError, match="max_rows"):
        ProfileLimits(max_rows=0)


@pytest.mark.skipif(HAVE_TRT, reason="this machine has TensorRT and a GPU")
def test_without_tensorrt_the_path_is_skipped_with_one_message(exported, tiny_models):
    with pytest.raises(TensorRTUnavailable) as info:
        check_tensorrt()
    assert "tensorrt" in str(info.value).lower() or "gpu" in str(info.value).lower()
    with pytest.raises(TensorRTUnavailable):
        build_engines(exported.directory)
    with pytest.raises(ValueError, match="backend tensorrt: .*use backend onnxruntime or torch"):
        LLMEngine(EngineConfig(model=str(tiny_models["llama"]), backend="tensorrt", page_size=4))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs an NVIDIA GPU and the tensorrt package")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_generation_matches_torch(tiny_models, tmp_path, precision):
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 121) for _ in range(n)] for n in (4, 13, 29)]
    common = dict(model=str(tiny_models["llama"]), page_size=4, layers_per_block=2)
    ref = LLMEngine(EngineConfig(**common)).generate(prompts, SamplingParams(max_tokens=16))
    engine = LLMEngine(EngineConfig(backend="tensorrt", export_dir=str(tmp_path), trt_precision=precision, **common))
    assert ExportManifest.load(tmp_path).block_ranges == [(0, 2), (2, 4)]
    out = engine.generate(prompts, SamplingParams(max_tokens=16))
    same = sum(o.token_ids == r.token_ids for o, r in zip(out, ref))
    assert same == len(prompts) if precision == "fp32" else same >= 1
