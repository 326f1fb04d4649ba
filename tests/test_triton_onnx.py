"""The served model on exported ONNX blocks (engine onnxruntime), end to end through tritonserver."""

from __future__ import annotations

import json

import pytest

from live_server import serve
from offramp import EngineConfig, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.default_model]
PROMPTS = ["Name three primary colors.", "Write a Python function that reverses a string."]


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory, default_checkpoint):
    root = tmp_path_factory.mktemp("triton-onnx")
    yield from serve(
        root / "server.log", default_checkpoint, "--engine", "onnxruntime", "--export-dir", str(root / "export")
    )


@pytest.fixture(scope="module")
def torch_outputs(default_checkpoint):
    from offramp.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(default_checkpoint)))
    return {
        policy: engine.generate(PROMPTS, SamplingParams(max_tokens=32, exit_policy=policy, exit_threshold=0.5))
        for policy in ("none", "softmax")
    }


@pytest.mark.parametrize("policy", ["none", "softmax"])
def test_onnx_served_output_matches_the_torch_engine(onnx_server, torch_outputs, policy):
    for prompt, ref in zip(PROMPTS, torch_outputs[policy]):
        params = {"max_tokens": 32, "exit_policy": policy, "exit_threshold": 0.5}
        status, body = onnx_server.post(
            "generate",
            {"text_input": prompt, "exclude_input_in_output": True, "sampling_parameters": json.dumps(params)},
        )
        assert status == 200, body
        assert body["text_output"] == ref.text
        assert body["exit_layers"] == ref.exit_layers
    log = onnx_server.log.read_text()
    assert (onnx_server.log.parent / "export" / "manifest.json").is_file(), log[-2000:]
