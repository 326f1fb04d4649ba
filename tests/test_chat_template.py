"""``LLMEngine.encode`` and ``encode_for_serving`` with a tiny tokenizer that has a chat template: the
template is applied, text that already carries its markup is not wrapped twice, and without a
template (or with ``use_chat_template`` off) the text is tokenized as it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from offramp import EngineConfig
from offramp.engine.llm_engine import LLMEngine

SPECIALS = ["<|user|>", "<|assistant|>", "<|end|>"]
# The markup appears literally, as in real templates (ChatML, Llama 3): encode_for_serving recognizes
# text that already carries the template's special tokens by looking for them in the template.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {% else %}<|assistant|> {% endif %}"
    "{{ m['content'] }} <|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _templated_tokenizer(path: Path) -> None:
    """The tiny word-level vocabulary with its last three words replaced by the template's markup."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(117)] + SPECIALS  # 120 entries, the same ids as the tiny models
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", additional_special_tokens=SPECIALS)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def chat_checkpoint(tiny_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "llama-chat"
    shutil.copytree(tiny_models["llama"], path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    _templated_tokenizer(path)
    return path


def _engine(path: Path, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), page_size=4, **kwargs))


def _ids(engine: LLMEngine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def test_the_template_wraps_a_prompt(chat_checkpoint):
    engine = _engine(chat_checkpoint)
    assert engine.tokenizer.chat_template == TEMPLATE
    wrapped = _ids(engine, "<|user|> w1 w2 <|end|> <|assistant|>")
    assert wrapped == [118, 2, 3, 120, 119]  # the markup tokens are the vocabulary's last three ids
    assert engine.encode("w1 w2") == wrapped
    assert engine.encode("w1 w2", chat=False) == [2, 3]
    assert engine.encode_for_serving("w1 w2") == wrapped


def test_text_that_carries_the_markup_is_not_wrapped_again(chat_checkpoint):
    """What an OpenAI-compatible frontend sends after applying the template itself."""
    engine = _engine(chat_checkpoint)
    rendered = "<|user|> w1 w2 <|end|> <|assistant|>"
    assert engine.encode_for_serving(rendered) == _ids(engine, rendered) == [118, 2, 3, 120, 119]
    assert engine.encode_for_serving("  " + rendered) == _ids(engine, rendered)  # leading space
    assert engine.encode_for_serving("w1 <|user|>") == engine.encode("w1 <|user|>")  # markup later: wrapped


def test_use_chat_template_off_sends_raw_text(chat_checkpoint):
    engine = _engine(chat_checkpoint, use_chat_template=False)
    assert engine.encode("w1 w2") == [2, 3]
    assert engine.encode("w1 w2", chat=True) == [118, 2, 3, 120, 119]  # asked for explicitly
    assert engine.encode_for_serving("w1 w2") == [2, 3]


def test_a_tokenizer_without_a_template_tokenizes_as_is(tiny_models):
    engine = _engine(tiny_models["llama"])
    assert not getattr(engine.tokenizer, "chat_template", None)
    assert engine.encode("w1 w2") == engine.encode("w1 w2", chat=False) == [2, 3]
    assert engine.encode_for_serving("w1 w2") == [2, 3]
