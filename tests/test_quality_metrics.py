"""The bench's quality measures (``tools/quality.py``): degenerate looping text scores low on
``reference_agreement``, ``lcs_frac`` and ``distinct2`` while the old self-teacher agreement scores
high; and ``reference_agreement`` on a real engine equals an independent offline computation."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.model.decoder import final_logits
from offramp.tools.quality import distinct2, lcs_frac, lcs_length, quality_metrics, reference_agreement
from offramp.tools.runs import run_engine
from offramp.tools.teacher_forcing import teacher_forced_hidden


def test_lcs_length():
    assert lcs_length([1, 2, 3, 4], [1, 3, 4]) == 3
    assert lcs_length([1, 2, 1, 2], [2, 1]) == 2
    assert lcs_length([], [1]) == 0 and lcs_length([5, 6], [7]) == 0


def test_lcs_frac_cuts_the_output_to_the_reference_and_counts_a_short_one_against_it():
    assert lcs_frac([[1, 2, 3, 9, 9]], [[1, 2, 3]]) == 1.0
    assert lcs_frac([[1, 2]], [[1, 2, 3, 4]]) == 0.5  # stopped early
    assert lcs_frac([[1, 2, 3], [7, 7]], [[1, 2, 3], [8, 9]]) == 3 / 5


def test_distinct2():
    assert distinct2([[1, 2, 3, 4, 5]]) == 1.0
    assert distinct2([[1, 2] * 10]) == pytest.approx(2 / 19)  # a period-2 loop: 2 distinct pairs
    assert distinct2([[1, 2, 3], [4, 4, 4]]) == pytest.approx((1.0 + 0.5) / 2)
    assert distinct2([[1], []]) is None


# -- a toy language model in which a loop fools teacher-forcing along its own output ------------
def full_model(prefix: list[int]) -> int:
    """Like an induction head: after a token seen before, the token that followed it then; else the
    next id. Its greedy text from [1, 2] is 3, 4, 5, ...; fed a loop, it continues the loop."""
    last = prefix[-1]
    for i in range(len(prefix) - 2, -1, -1):
        if prefix[i] == last:
            return prefix[i + 1]
    return last + 1


def shallow_exit(prefix: list[int]) -> int:
    """The early-exit configuration: repeats the token two back (text falls into an A B A B loop)."""
    return prefix[-2]


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    max_tokens: int
    output_token_ids: list[int] = field(default_factory=list)


class ToyEngine:
    """The engine calls ``quality_metrics`` makes, over the toy models: prefill runs full depth,
    decode steps use the exit configuration unless ``exit_policy`` is "none"."""

    def __init__(self):
        self.live: list[_Seq] = []
        self.policy: dict[str, str | None] = {}

    def add_request(self, request_id, prompt, params):
        self.live.append(_Seq(request_id, list(prompt), params.max_tokens))
        self.policy[request_id] = params.exit_policy

    def step(self):
        grown, finished = [], []
        for seq in list(self.live):
            prefix = seq.prompt + seq.output_token_ids
            full = not seq.output_token_ids or self.policy[seq.request_id] == "none"
            seq.output_token_ids.append(full_model(prefix) if full else shallow_exit(prefix))
            grown.append(seq)
            if len(seq.output_token_ids) >= seq.max_tokens:
                self.live.remove(seq)
                finished.append(seq)
        return grown, finished

    def teacher_forced_agreement(self, prompt, output):
        return [full_model(prompt + output[:i]) == token for i, token in enumerate(output)]


def _run(engine: ToyEngine, prompt: list[int], max_tokens: int, policy: str | None) -> list[int]:
    engine.add_request("run", prompt, SamplingParams(max_tokens=max_tokens, exit_policy=policy))
    seq = engine.live[-1]
    while engine.live:
        engine.step()
    return seq.output_token_ids


def test_a_looping_output_fools_self_teacher_agreement_but_not_the_reference_measures(monkeypatch):
    from offramp.tools import quality

    # the toy engine's own teacher forcing stands in for the real one-pass computation
    monkeypatch.setattr(quality, "teacher_forced_agreement", lambda engine, p, o: engine.teacher_forced_agreement(p, o))
    engine, prompts = ToyEngine(), [[1, 2], [10, 20]]
    loops = [_run(engine, p, 32, None) for p in prompts]
    full = [_run(engine, p, 32, "none") for p in prompts]
    assert loops[0][:6] == [3, 2, 3, 2, 3, 2] and full[0][:4] == [3, 4, 5, 6]  # the degenerate case
    q = quality_metrics(engine, prompts, loops, full, concurrency=2)
    assert q["self_teacher_agreement"] > 0.9  # the full model, fed the loop, continues it
    assert q["reference_agreement"] <= 1 / 32 + 1e-9  # only the first (full-depth) token
    assert q["lcs_frac"] <= 2 / 32
    assert q["distinct2"] < 0.1 < 0.9 < q["full_depth_distinct2"]
    assert q["sequence_match"] == 0.0


# -- on a real engine: the serving path against an offline computation --------------------------
@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
@pytest.mark.parametrize("depth", [1, 2])
def test_reference_agreement_is_the_exit_heads_pick_along_the_full_models_prefix(tiny_models, depth, kv_fill):
    """Every decode token forced out at ``depth``: what it runs is exact (layers below ``depth`` along
    the reference prefix), so each pick is the identity head's argmax over the full-depth pass's
    hidden state at ``depth`` (``teacher_forced_hidden``); the first token comes from the prefill."""
    config = EngineConfig(
        model=str(tiny_models["llama"]), page_size=4, layers_per_block=1, min_exit_layer=depth, kv_fill=kv_fill
    )
    engine = LLMEngine(config)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [20, 21] * 8, [40]]
    _, refs = run_engine(engine, prompts, 4, 12, progress=False, params=SamplingParams(max_tokens=12))
    forced = SamplingParams(exit_policy="similarity", exit_threshold=-1.0)
    got = reference_agreement(engine, prompts, refs, concurrency=3, params=forced)
    for prompt, ref, row in zip(prompts, refs, got):
        captured, _ = teacher_forced_hidden(engine, prompt, ref, (depth,))
        picks = final_logits(engine.weights, captured[depth]).argmax(-1).tolist()
        assert row == [True] + [p == r for p, r in zip(picks[1:], ref[1:])]
    assert 0 < sum(map(sum, got)) < sum(map(len, got))  # some picks differ: the check can fail
    assert engine.pages.num_used_pages == 0 and not engine.has_work
