"""Early exit in the engine: policies, forced exits under batching, KV propagation for skipped layers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from offramp import EngineConfig, SamplingParams
from offramp.config import MIN_EXIT_FRACTION
from offramp.engine.llm_engine import LLMEngine
from offramp.exits import ClassifierExit, ExitCheck, IdentityHead, SimilarityExit, SoftmaxExit, make_policy
from offramp.tools.teacher_forcing import teacher_forced_agreement

PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [20, 21] * 8, [40]]
MAX_NEW = 16


def _engine(tiny_models, **kwargs) -> LLMEngine:
    kwargs.setdefault("layers_per_block", 1)
    kwargs.setdefault("min_exit_layer", 1)  # tokens may leave at every block end of the 4-layer model
    return LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, **kwargs))


def _leave_first_chance() -> SamplingParams:
    """Cosine similarity is always >= -1: every decode token leaves at the first exit point it
    reaches, which the ENGINE sets (its ``min_exit_layer`` / ``exit_points``), not the request."""
    return SamplingParams(max_tokens=MAX_NEW, exit_policy="similarity", exit_threshold=-1.0)


def test_threshold_never_met_is_identical_to_full_depth(tiny_models):
    engine = _engine(tiny_models)
    full = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW))
    never = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, exit_policy="softmax", exit_threshold=1.01))
    assert [o.token_ids for o in never] == [o.token_ids for o in full]
    assert all(o.exit_layers == [4] * MAX_NEW for o in never)


@pytest.mark.parametrize("min_exit_layer", [1, 2, 3])
def test_forced_exits_are_honoured_and_batching_does_not_change_them(tiny_models, min_exit_layer):
    batched = _engine(tiny_models, min_exit_layer=min_exit_layer)
    outs = batched.generate(PROMPTS, _leave_first_chance())
    single = _engine(tiny_models, min_exit_layer=min_exit_layer, max_num_seqs=1)
    for prompt, out in zip(PROMPTS, outs):
        # The first token comes from the prompt's prefill, which always runs full depth.
        assert out.exit_layers == [4] + [min_exit_layer] * (MAX_NEW - 1)
        assert single.generate([prompt], _leave_first_chance())[0].token_ids == out.token_ids
    full = batched.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW))
    assert any(o.token_ids != f.token_ids for o, f in zip(outs, full)), "exits at layer 1-3 changed nothing"
    batched.pages.check_invariants()
    assert batched.pages.num_used_pages == 0


def test_exit_points_and_min_exit_layer_select_depths(tiny_models):
    engine = _engine(tiny_models, exit_points=(3,))
    out = engine.generate([PROMPTS[1]], _leave_first_chance())[0]
    assert out.exit_layers == [4] + [3] * (MAX_NEW - 1)  # the only exit point, not min_exit_layer 1
    later = _engine(tiny_models, exit_points=(1, 3), min_exit_layer=2)
    assert later.generate([PROMPTS[1]], _leave_first_chance())[0].exit_layers == [4] + [3] * (MAX_NEW - 1)
    with pytest.raises(ValueError, match="exit_points"):
        _engine(tiny_models, layers_per_block=2, exit_points=(3,))


def test_default_min_exit_layer_is_the_block_end_nearest_the_chosen_share_of_layers(tiny_models):
    """Default: the block end before the last nearest 0.85 x layers (docs/early-exit.md says how it
    was chosen); explicit exit points are not filtered by it; an explicit value wins."""
    assert MIN_EXIT_FRACTION == 0.85
    assert EngineConfig().min_exit_depth(30) == 26  # the default model, 2 layers per block: 25.5 -> 26
    assert EngineConfig(layers_per_block=1).min_exit_depth(30) == 25  # 25.5: the lower on a tie
    assert EngineConfig(layers_per_block=4).min_exit_depth(30) == 24
    assert EngineConfig(layers_per_block=1).min_exit_depth(4) == 3
    assert EngineConfig(layers_per_block=4).min_exit_depth(4) == 4  # one block: no exits
    assert EngineConfig(exit_points=(10, 20)).min_exit_depth(30) == 1
    assert EngineConfig(min_exit_layer=7).min_exit_depth(30) == 7
    default = _engine(tiny_models, min_exit_layer=None)
    out = default.generate([PROMPTS[1]], _leave_first_chance())[0]
    assert out.exit_layers == [4] + [3] * (MAX_NEW - 1)  # 0.85 x 4 = 3.4 -> block end 3


def test_per_request_policy_in_one_batch(tiny_models):
    engine = _engine(tiny_models, min_exit_layer=2)
    params = [
        _leave_first_chance(),
        SamplingParams(max_tokens=MAX_NEW),
        _leave_first_chance(),
        SamplingParams(max_tokens=MAX_NEW),
    ]
    outs = engine.generate(PROMPTS, params)
    assert outs[0].exit_layers[1:] == [2] * (MAX_NEW - 1) and outs[2].exit_layers[1:] == [2] * (MAX_NEW - 1)
    assert outs[1].exit_layers == [4] * MAX_NEW and outs[3].exit_layers == [4] * MAX_NEW
    alone = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=MAX_NEW))[0]
    assert outs[1].token_ids == alone.token_ids  # a neighbour's exits do not touch a full-depth request


def test_propagated_kv_is_the_projection_of_the_exit_hidden_state(tiny_models):
    """After a forced exit at depth 2, layers 2 and 3 hold K/V projected from the layer-2 hidden state."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    depth = 2
    engine = _engine(tiny_models, min_exit_layer=depth)
    prompt = PROMPTS[1]
    seq = engine.add_request("kv", prompt, SamplingParams(max_tokens=3, exit_policy="similarity", exit_threshold=-1.0))
    engine.step()  # prefill: first token at full depth
    first = seq.output_token_ids[0]
    engine.step()  # decode of `first`: leaves at depth 2, its K/V for layers 2-3 are propagated
    assert seq.exit_layers == [4, depth]
    pos = len(prompt)  # position of `first`
    page = engine.pages.page_table(seq.seq_id)[pos // 4]
    slot = page * 4 + pos % 4

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    ids = torch.tensor([prompt + [first]])
    with torch.inference_mode():
        hidden = hf(ids, output_hidden_states=True).hidden_states[depth][0, -1]  # [hidden], exact: prompt KV is exact
        position = torch.tensor([[pos]])
        cos, sin = hf.model.rotary_emb(hidden[None, None], position)
        for layer in range(depth, 4):
            attn = hf.model.layers[layer].self_attn
            h = hf.model.layers[layer].input_layernorm(hidden[None, None])
            k = attn.k_proj(h).view(1, 1, -1, 16).transpose(1, 2)  # [1, kv_heads, 1, head_dim]
            v = attn.v_proj(h).view(-1, 16)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            torch.testing.assert_close(engine.kv.k[layer][slot], k[0, :, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(engine.kv.v[layer][slot], v, rtol=1e-5, atol=1e-5)
    while engine.has_work:
        engine.step()


def _check(n: int = 4, hidden: int = 8, thresholds: float = 0.5) -> ExitCheck:
    torch.manual_seed(0)
    return ExitCheck(
        hidden=torch.randn(n, hidden),
        hidden_before=torch.randn(n, hidden),
        layer=2,
        thresholds=torch.full((n,), thresholds),
        head=None,
    )


def test_similarity_policy_compares_cosine_with_threshold():
    check = _check()
    check.hidden_before[0] = check.hidden[0] * 3  # cosine 1
    check.hidden_before[1] = -check.hidden[1]  # cosine -1
    leave = SimilarityExit().decide(check).leave
    assert leave[0] and not leave[1]


def test_softmax_policy_uses_top1_probability(tiny_models):
    engine = _engine(tiny_models)
    check = _check(hidden=64)
    check.head = IdentityHead(engine.weights)
    probs = check.head.logits(check.hidden, 2).softmax(-1).max(-1).values
    check.thresholds = probs.clone()
    check.thresholds[0] += 1e-3
    decision = SoftmaxExit().decide(check)
    assert decision.leave.tolist() == [False, True, True, True]
    assert decision.logits.shape == (3, 121)  # the leavers' logits, handed on to sampling
    torch.testing.assert_close(decision.logits, check.head.logits(check.hidden, 2)[1:])


def test_classifier_policy_reads_its_file(tmp_path):
    path = tmp_path / "classifier.safetensors"
    save_file({"weight.2": torch.linspace(-1, 1, 8), "bias.2": torch.tensor([0.0])}, str(path))
    policy = ClassifierExit(path)
    check = _check()
    check.hidden[0] = torch.arange(8.0)  # aligned with the weight -> prob > 0.5
    check.hidden[1] = -torch.arange(8.0)
    leave = policy.decide(check).leave
    assert leave[0] and not leave[1]
    check.layer = 3  # no classifier for this depth: nobody leaves
    assert not policy.decide(check).leave.any()


def test_unknown_policy_and_missing_classifier():
    with pytest.raises(ValueError, match="exit_policy: 'fast'"):
        make_policy("fast")
    with pytest.raises(ValueError, match="exit_policy: 'classifier' needs"):
        make_policy("classifier")
    with pytest.raises(ValueError, match="exit_policy"):
        SamplingParams(exit_policy="fast")
    with pytest.raises(ValueError, match="exit_threshold"):
        SamplingParams(exit_threshold=float("nan"))


def test_gate_that_passes_everyone_equals_plain_softmax(tiny_models):
    params = SamplingParams(max_tokens=MAX_NEW, exit_policy="softmax", exit_threshold=0.05)
    plain = _engine(tiny_models).generate(PROMPTS, params)
    gated = _engine(tiny_models, exit_gate="similarity", exit_gate_threshold=-1.0).generate(PROMPTS, params)
    assert [o.exit_layers for o in gated] == [o.exit_layers for o in plain]
    assert [o.token_ids for o in gated] == [o.token_ids for o in plain]
    assert any(d < 4 for o in plain for d in o.exit_layers), "threshold 0.05 should let some tokens leave"


def test_gate_that_passes_nobody_skips_the_softmax_check(tiny_models):
    params = SamplingParams(max_tokens=MAX_NEW, exit_policy="softmax", exit_threshold=0.0)
    engine = _engine(tiny_models, exit_gate="similarity", exit_gate_threshold=1.01)
    calls = []
    engine.runner.head.logits = lambda h, layer: (
        calls.append(layer) or IdentityHead.logits(engine.runner.head, h, layer)
    )
    outs = engine.generate(PROMPTS, params)
    assert all(o.exit_layers == [4] * MAX_NEW for o in outs)
    assert calls == []  # the expensive check never ran
    with pytest.raises(ValueError, match="exit_gate"):
        EngineConfig(exit_gate="softmax")


def _slot(engine: LLMEngine, seq, pos: int) -> int:
    return engine.pages.page_table(seq.seq_id)[pos // 4] * 4 + pos % 4


def test_recompute_fills_exactly_the_full_model_kv(tiny_models):
    """Tokens that left at depth 2 are re-run through layers 2-3 by the next full-depth token:
    their K/V then equals the full model's (float32, 1e-5), and that token is the full model's choice."""
    from transformers import AutoModelForCausalLM

    engine = _engine(tiny_models, min_exit_layer=2, kv_fill="recompute")
    prompt = PROMPTS[1]
    seq = engine.add_request("re", prompt, SamplingParams(max_tokens=6, exit_policy="similarity", exit_threshold=-1.0))
    for _ in range(3):
        engine.step()  # prefill (full depth), then two decode tokens that leave at depth 2
    assert seq.exit_layers == [4, 2, 2]
    assert [p.position for p in engine.runner.loop.pending[seq.seq_id]] == [len(prompt), len(prompt) + 1]
    seq.params.exit_policy = "none"  # the next token goes full depth and pulls the kept tokens along
    engine.step()
    assert seq.exit_layers == [4, 2, 2, 4]
    assert seq.seq_id not in engine.runner.loop.pending

    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    tokens = prompt + seq.output_token_ids
    with torch.inference_mode():
        out = hf(torch.tensor([tokens[:-1]]), use_cache=True)
    assert out.logits[0, -1].argmax().item() == seq.output_token_ids[-1]
    cache = out.past_key_values
    for layer in (2, 3):
        k_ref, v_ref = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [kv_heads, seq, head_dim]
        for pos in range(len(prompt), len(tokens) - 1):
            torch.testing.assert_close(engine.kv.k[layer][_slot(engine, seq, pos)], k_ref[:, pos], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(engine.kv.v[layer][_slot(engine, seq, pos)], v_ref[:, pos], rtol=1e-5, atol=1e-5)
    engine.abort("re")
    assert seq.seq_id not in engine.runner.loop.pending and engine.pages.num_used_pages == 0


class _Scripted(SimilarityExit):
    """Leaves on a fixed pseudo-random pattern of calls: exits at varied depths, deterministic."""

    def __init__(self) -> None:
        self.calls = 0

    def decide(self, check):
        self.calls += 1
        leave = torch.tensor([(self.calls * 7 + r * 3) % 5 == 0 for r in range(check.hidden.shape[0])])
        return type(super().decide(check))(leave)


@pytest.mark.parametrize("kv_fill", ["recompute", "propagate"])
def test_full_depth_tokens_under_recompute_are_exact(tiny_models, kv_fill):
    """With recompute, every token that reaches full depth is the full model's greedy choice for its
    prefix (teacher-forced agreement 1.0), however its neighbours left; propagate only approximates."""
    engine = _engine(tiny_models, kv_fill=kv_fill)
    engine.runner._policies["similarity"] = _Scripted()
    params = SamplingParams(max_tokens=24, exit_policy="similarity")
    outs = engine.generate(PROMPTS, params)
    depths = [d for o in outs for d in o.exit_layers]
    assert len(set(depths)) >= 3, f"the pattern should exit at several depths, got {sorted(set(depths))}"
    agree_full = []
    for prompt, out in zip(PROMPTS, outs):
        agreement = teacher_forced_agreement(engine, prompt, out.token_ids)
        agree_full += [ok for ok, d in zip(agreement, out.exit_layers) if d == 4]
    if kv_fill == "recompute":
        assert all(agree_full), f"{agree_full.count(False)} full-depth tokens differ from the full model"
    else:  # propagate: every token is what a plain re-implementation of CALM's propagation picks
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
        for prompt, out in zip(PROMPTS, outs):
            picks = _propagate_reference(hf, prompt, out.token_ids, out.exit_layers)
            wrong = [i for i, (a, b) in enumerate(zip(picks, out.token_ids)) if a != b]
            assert not wrong, f"tokens {wrong} differ from the reference (exit depths {out.exit_layers})"
    assert engine.pages.num_used_pages == 0 and not engine.runner.loop.pending


def _propagate_reference(hf, prompt: list[int], tokens: list[int], depths: list[int]) -> list[int]:
    """Greedy picks, teacher-forced along ``tokens``, of decoding with propagated K/V written from
    scratch over the HF model's modules (one position at a time, K/V kept per layer): the prompt runs
    full depth; output token i-1 runs the layers below ``depths[i]``, writes K/V projected from that
    hidden state into every layer it skipped, and its next token is read by the final norm and LM
    head (the identity exit head)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, cfg = hf.model, hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    keys: list[list[torch.Tensor]] = [[] for _ in m.layers]  # per layer: [1, kv_heads, 1, head_dim] each
    values: list[list[torch.Tensor]] = [[] for _ in m.layers]

    def kv(layer, x, cos, sin):
        k = layer.self_attn.k_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)
        return apply_rotary_pos_emb(k, k, cos, sin)[1], v

    def run(token: int, pos: int, depth: int) -> int:
        h = m.embed_tokens(torch.tensor([[token]]))  # [1, 1, hidden]
        cos, sin = m.rotary_emb(h, torch.tensor([[pos]]))
        for i, layer in enumerate(m.layers):
            x = layer.input_layernorm(h)
            k, v = kv(layer, x, cos, sin)
            keys[i].append(k)
            values[i].append(v)
            if i >= depth:
                continue  # skipped: only its K/V, projected from the exit hidden state (h stays)
            q = layer.self_attn.q_proj(x).view(1, 1, -1, head_dim).transpose(1, 2)
            q = apply_rotary_pos_emb(q, q, cos, sin)[0]
            groups = cfg.num_attention_heads // cfg.num_key_value_heads
            key = torch.cat(keys[i], dim=2).repeat_interleave(groups, dim=1)
            value = torch.cat(values[i], dim=2).repeat_interleave(groups, dim=1)
            att = torch.nn.functional.scaled_dot_product_attention(q, key, value)  # one query: no mask
            h = h + layer.self_attn.o_proj(att.transpose(1, 2).reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return int(hf.lm_head(m.norm(h))[0, -1].argmax())  # h: the exit hidden state

    num_layers = len(m.layers)
    with torch.inference_mode():
        for pos, token in enumerate(prompt[:-1]):
            run(token, pos, num_layers)
        inputs = [prompt[-1], *tokens[:-1]]  # the token each step ran on, with its depth
        return [run(token, len(prompt) - 1 + i, depth) for i, (token, depth) in enumerate(zip(inputs, depths))]


def test_low_rank_head_from_file(tiny_models, tmp_path):
    from offramp.exits import LowRankHead

    engine = _engine(tiny_models)
    hidden = torch.randn(3, 64)
    identity = IdentityHead(engine.weights).logits(hidden, 2)
    zero = tmp_path / "zero.safetensors"
    save_file({"down": torch.randn(4, 64), "up": torch.zeros(64, 4)}, str(zero))
    torch.testing.assert_close(LowRankHead(engine.weights, zero).logits(hidden, 2), identity)
    trained = tmp_path / "heads.safetensors"
    down, up, down3, up3 = torch.randn(4, 64), torch.randn(64, 4), torch.randn(2, 64), torch.randn(64, 2)
    save_file({"down": down, "up": up, "down.3": down3, "up.3": up3}, str(trained))
    head = LowRankHead(engine.weights, trained)
    from offramp.model.decoder import final_logits

    torch.testing.assert_close(head.logits(hidden, 2), final_logits(engine.weights, hidden + hidden @ down.T @ up.T))
    torch.testing.assert_close(head.logits(hidden, 3), final_logits(engine.weights, hidden + hidden @ down3.T @ up3.T))
    bad = tmp_path / "bad.safetensors"
    save_file({"down": torch.randn(4, 63), "up": torch.randn(63, 4)}, str(bad))
    with pytest.raises(ValueError, match="exit_head: .* must be"):
        LowRankHead(engine.weights, bad)
    served = _engine(tiny_models, exit_head=str(trained), min_exit_layer=2)
    out = served.generate([PROMPTS[0]], SamplingParams(max_tokens=4, exit_policy="softmax", exit_threshold=0.0))[0]
    assert out.exit_layers == [4, 2, 2, 2] and served.runner.head.name == "low_rank"
    # Leavers whose policy computed no logits (similarity) share one LM head call with the full-depth
    # rows, after their depth's shortcut: the same tokens as the softmax policy's own head.logits.
    by_head = served.generate(PROMPTS[:2], SamplingParams(max_tokens=6, exit_policy="softmax", exit_threshold=0.0))
    shared = served.generate(PROMPTS[:2], SamplingParams(max_tokens=6, exit_policy="similarity", exit_threshold=-1.0))
    assert [o.exit_layers for o in shared] == [o.exit_layers for o in by_head] == [[4] + [2] * 5] * 2
    assert [o.token_ids for o in shared] == [o.token_ids for o in by_head]


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_recomputation_after_preemption_runs_full_depth(tiny_models, kv_fill):
    """After a preemption the sequence is recomputed one token per step (budget 1): those chunks
    reach no new token, so they must not exit and must not sample from old positions."""
    engine = _engine(tiny_models, kv_fill=kv_fill, max_num_batched_tokens=1)
    seq = engine.add_request(
        "p", PROMPTS[0], SamplingParams(max_tokens=8, exit_policy="similarity", exit_threshold=-1.0)
    )
    while len(seq.output_token_ids) < 4:
        engine.step()
    engine.scheduler.running.remove(seq)
    engine.scheduler._preempt(seq)  # pages freed; everything is recomputed from scratch
    known = seq.num_tokens
    while engine.has_work:
        engine.step()
        if seq.num_computed_tokens < known:  # still recomputing: no new token may appear
            assert len(seq.output_token_ids) == 4, f"sampled at old position {seq.num_computed_tokens}"
    assert len(seq.output_token_ids) == 8 and len(seq.exit_layers) == 8
    assert seq.exit_layers[0] == 4 and all(d == 1 for d in seq.exit_layers[1:])
    assert engine.pages.num_used_pages == 0 and not engine.runner.loop.pending


def test_policy_that_cannot_run_is_refused_at_admission(tiny_models):
    engine = _engine(tiny_models)
    with pytest.raises(ValueError, match="classifier"):
        engine.add_request("c", PROMPTS[0], SamplingParams(exit_policy="classifier"))
    assert not engine.has_work
    with pytest.raises(ValueError, match="classifier"):
        _engine(tiny_models, exit_policy="softmax", exit_gate="classifier")
