"""Model resolution and loading: clear one-line errors, GGUF cache reuse, supported families."""

from __future__ import annotations

import json

import pytest

from offramp.model.loader import ModelLoadError, default_gguf, load_weights, resolve_model


def test_missing_model(tmp_path):
    with pytest.raises(ModelLoadError, match="model not found"):
        resolve_model(str(tmp_path / "nope"))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a .gguf"):
        resolve_model(str(f))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported model type 'gpt2'"):
        load_weights(tmp_path, dtype=None)


def test_checkpoint_without_weights(tmp_path, tiny_models):
    (tmp_path / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no .safetensors"):
        load_weights(tmp_path, dtype=None)


@pytest.mark.default_model
def test_gguf_is_dequantized_once_and_reused(default_checkpoint, monkeypatch):
    import transformers

    def no_second_time(*args, **kwargs):
        raise AssertionError("the GGUF was de-quantized again")

    assert default_gguf().suffix == ".gguf"
    stamp = (default_checkpoint / "model.safetensors").stat().st_mtime
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_second_time)
    again = resolve_model(str(default_gguf()))
    assert again == default_checkpoint
    assert (again / "model.safetensors").stat().st_mtime == stamp  # a checksum, not a de-quantization
