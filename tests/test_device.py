"""Device discipline: the engine creates every tensor of a step on its own device."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.model.device import available_devices, resolve_device


class DeviceRecorder(TorchDispatchMode):
    """Records the device of every tensor each op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.setdefault(str(t.device), set()).add(str(func))
        return out


@pytest.mark.parametrize("exits", ["none", "softmax", "similarity"])
@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_a_step_creates_tensors_on_the_engine_device_only(tiny_models, exits, kv_fill):
    """Every step runs with the default device set to ``meta``: a tensor made without the engine's
    device would land there (and mixing it with the engine's tensors fails or shows up below)."""
    config = EngineConfig(
        model=str(tiny_models["llama"]),
        page_size=4,
        layers_per_block=1,
        min_exit_layer=1,
        exit_policy=exits,
        exit_threshold=0.0 if exits == "similarity" else 0.01,
        kv_fill=kv_fill,
        device="cpu",
    )
    engine = LLMEngine(config)
    greedy = SamplingParams(max_tokens=6, stop=["w999"])
    sampled = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=3)
    engine.add_request("a", [3, 4, 5, 6, 7], greedy)
    engine.add_request("b", [9, 10] * 5, sampled)
    recorder = DeviceRecorder()
    with recorder:
        torch.set_default_device("meta")
        try:
            while engine.has_work:
                engine.step()
        finally:
            torch.set_default_device(None)
    assert set(recorder.outputs) == {"cpu"}, {d: sorted(ops)[:8] for d, ops in recorder.outputs.items()}
    assert engine.pages.num_used_pages == 0


def test_default_device_is_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    assert resolve_device(None) == torch.device("cpu") and available_devices() == ["cpu"]


@pytest.mark.parametrize("name", ["cuda", "cuda:3"])
def test_a_missing_device_is_one_error_naming_the_devices_here(name):
    if name == "cuda" and torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    if name == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip("this host has four GPUs")
    with pytest.raises(ValueError, match=rf"device: {name} is not available on this host; devices here: cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu:0", ""])
def test_a_malformed_device_is_refused_by_the_config(name):
    with pytest.raises(ValueError, match="device:"):
        EngineConfig(device=name)


def test_cli_names_the_devices_here_in_one_line(tiny_models, capsys):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    from offramp.cli.main import main

    assert main(["generate", "--model", str(tiny_models["llama"]), "--prompt", "w1", "--device", "cuda:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["offramp: error: device: cuda:3 is not available on this host; devices here: cpu"]
