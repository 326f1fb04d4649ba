"""Contextual sparsity (R4): the sparse decode path against the plain model with the skipped heads and
neurons zeroed, density 1.0 against dense, batching, exits, criteria, predictor files and bad input."""

from __future__ import annotations

import pytest
import torch

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.model.loader import load_weights
from offramp.serving.requests import RequestError, parse_sampling_parameters
from offramp.sparsity import criteria
from offramp.sparsity.layout import SparseLayout, coactive_order, identity_layout, order_groups
from offramp.sparsity.masked import masked_forward
from offramp.sparsity.predictor import (
    UnifiedPredictor,
    load_predictor,
    make_predictor,
    normalise,
    save_predictor,
    spearman,
    train,
)
from offramp.sparsity.selection import fill_gaps, keep_top, runs
from offramp.sparsity.selectors import FixedSelector, PredictedSelector

PROMPTS = [[3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [20, 21] * 5]
MAX_NEW = 12
GROUP = 16  # the tiny model's FFN of 128 -> 8 groups; 4 heads


def _weights(path):
    return load_weights(path, torch.float32)[0]


def _layout(weights, seed: int = 0) -> SparseLayout:
    gen = torch.Generator().manual_seed(seed)
    s = weights.shape
    return SparseLayout(GROUP, [torch.randperm(s.intermediate_size, generator=gen) for _ in range(s.num_layers)])


def _constant_predictor(path, weights, scores: torch.Tensor) -> None:
    """A unified predictor whose scores ignore its input: the same masks for every token."""
    s = weights.shape
    model = UnifiedPredictor(s.hidden_size, s.num_layers, scores.shape[-1], width=4)
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.bias.fill_(1.0)
        model.fc2.weight.zero_()
        model.fc2.bias.copy_(scores.flatten())
    save_predictor(path, model, _layout(weights), weights, {"criterion": "test"})


def _fixed_scores(weights) -> torch.Tensor:  # [layers, heads + groups], distinct values
    s = weights.shape
    gen = torch.Generator().manual_seed(5)
    return torch.rand(s.num_layers, s.num_heads + s.intermediate_size // GROUP, generator=gen)


def _engine(tiny_models, **kw) -> LLMEngine:
    kw.setdefault("min_exit_layer", 1)
    return LLMEngine(EngineConfig(model=str(tiny_models["llama"]), page_size=4, num_pages=128, **kw))


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, **kw)


# -- selection ----------------------------------------------------------------------------------
def test_keep_top_runs_and_floor():
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.2]]])  # [rows, layers, units]
    assert keep_top(scores, torch.tensor([0.5])).tolist() == [[[False, True, True, False]]]
    assert keep_top(scores, torch.tensor([0.01])).sum() == 1  # at least one unit
    assert keep_top(scores, torch.tensor([0.5]), floor=0.9).all()  # kept 1.4 / 1.7 < 0.9: unsure -> dense
    assert runs([True, True, False, True]) == [(0, 2), (3, 4)] and runs([False]) == []
    keep = torch.tensor([True, False, True, False, False, True, False])
    assert fill_gaps(keep).tolist() == [True, True, True, False, False, True, False]
    assert fill_gaps(keep, 2).tolist() == [True, True, True, True, True, True, False]
    assert torch.equal(fill_gaps(keep, 0), keep)


def test_coactive_order_is_a_permutation_that_groups_coactive_neurons():
    torch.manual_seed(0)
    base = torch.rand(400, 2)  # two hidden causes; neurons 0-15 follow the first, 16-31 the second
    neurons = torch.cat([base[:, :1].expand(400, 16), base[:, 1:].expand(400, 16)], dim=1)
    mixed = torch.randperm(32)
    order = coactive_order((neurons + 0.01 * torch.rand(400, 32))[:, mixed], 16)
    assert sorted(order.tolist()) == list(range(32))
    first = set(mixed[order[:16]].tolist())
    assert first in ({*range(16)}, {*range(16, 32)})


def test_order_groups_puts_commonly_important_groups_first():
    perm = torch.arange(8)
    importance = torch.tensor([[0.0, 0, 5, 5, 1, 1, 9, 9]] * 3)  # groups of 2: means 0, 5, 1, 9
    assert order_groups(perm, importance, 2).tolist() == [6, 7, 2, 3, 4, 5, 0, 1]


# -- execution against the zeroing reference -----------------------------------------------------
def _fixed_masks(weights, density: float, head_density: float, fill: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What the constant predictor keeps: heads [layers, heads], groups [layers, groups] bool."""
    scores, nh = _fixed_scores(weights), weights.shape.num_heads
    heads = keep_top(scores[None, :, :nh], torch.tensor([head_density]))[0]
    heads[0] = True  # layer 0's attention feeds the predictor: always dense
    groups = keep_top(scores[None, :, nh:], torch.tensor([density]))[0]
    return heads, fill_gaps(groups, 2) if fill else groups


class _Capture:
    """Wraps the runner's sampler to keep every step's logits."""

    def __init__(self, sampler) -> None:
        self.sampler, self.logits = sampler, []

    def __call__(self, logits, params, generators):
        self.logits.append(logits.clone())
        return self.sampler(logits, params, generators)


@pytest.mark.parametrize("batching", ["union", "per_row", "union+fill", "union+chunked", "per_row+chunked"])
def test_fixed_mask_equals_the_zeroed_reference(tiny_models, tmp_path, batching):
    """Batched sparse decode with fixed masks picks, at every step, what the plain model with the
    skipped heads' attention and the skipped neurons' activations zeroed picks."""
    path = tmp_path / "const.safetensors"
    weights = _weights(tiny_models["llama"])
    _constant_predictor(path, weights, _fixed_scores(weights))
    pred = load_predictor(path, weights)
    batching, fill, chunked = batching.split("+")[0], batching.endswith("+fill"), batching.endswith("+chunked")
    heads, groups = _fixed_masks(weights, 0.5, 0.5, fill)
    engine = _engine(
        tiny_models,
        max_num_batched_tokens=5 if chunked else 1024,  # prompt chunks in the same steps as sparse decodes
        sparsity=0.5,
        head_density=0.5,
        sparsity_predictor=str(path),
        sparsity_batching=batching,
        sparsity_max_gap=2 if fill else 0,
    )
    outs = engine.generate(PROMPTS, _greedy())
    assert engine.runner.sparse.stats.mean_density == round(groups.float().mean().item(), 4)
    assert engine.runner.sparse.stats.mean_head_density < 1
    changed = False
    for prompt, out in zip(PROMPTS, outs):
        ids = prompt + out.token_ids
        n = len(ids)
        sel = FixedSelector(pred.layout, heads.expand(n, -1, -1), groups.expand(n, -1, -1))
        ref = masked_forward(weights, ids, sel, sparse_from=len(prompt)).logits
        assert ref[len(prompt) - 1 : n - 1].argmax(-1).tolist() == out.token_ids
        plain = masked_forward(weights, ids).logits
        changed |= (ref[len(prompt) :] - plain[len(prompt) :]).abs().max().item() > 1e-2
    assert changed, "the masks changed nothing: the test would pass for a dense engine"


def test_sparse_logits_match_the_reference_closely(tiny_models, tmp_path):
    """One request: every decode step's logits equal the zeroed reference's (float32 tolerance)."""
    path = tmp_path / "const.safetensors"
    weights = _weights(tiny_models["llama"])
    _constant_predictor(path, weights, _fixed_scores(weights))
    pred = load_predictor(path, weights)
    engine = _engine(tiny_models, sparsity=0.4, head_density=0.5, sparsity_predictor=str(path))
    engine.runner.sampler = capture = _Capture(engine.runner.sampler)
    prompt = PROMPTS[1]
    out = engine.generate([prompt], _greedy())[0]
    heads, groups = _fixed_masks(weights, 0.4, 0.5)
    ids = prompt + out.token_ids
    sel = FixedSelector(pred.layout, heads.expand(len(ids), -1, -1), groups.expand(len(ids), -1, -1))
    ref = masked_forward(weights, ids, sel, sparse_from=len(prompt)).logits[len(prompt) - 1 : -1]
    ours = torch.cat(capture.logits)  # [steps, vocab]: the prefill's (dense), then the sparse decodes
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_density_one_is_token_identical_to_dense(tiny_models, tmp_path):
    path = tmp_path / "const.safetensors"
    weights = _weights(tiny_models["llama"])
    _constant_predictor(path, weights, _fixed_scores(weights))
    dense = _engine(tiny_models).generate(PROMPTS, _greedy())
    with_predictor = _engine(tiny_models, sparsity_predictor=str(path))
    assert [o.token_ids for o in with_predictor.generate(PROMPTS, _greedy())] == [o.token_ids for o in dense]
    # 0.99 keeps every group (round(0.99 * 8) = 8) but runs the sparse path: still identical
    full = with_predictor.generate(PROMPTS, _greedy(sparsity=0.99))
    assert with_predictor.runner.sparse.stats.mean_density == 1.0
    assert [o.token_ids for o in full] == [o.token_ids for o in dense]
    half = with_predictor.generate(PROMPTS, _greedy(sparsity=0.3))
    assert [o.token_ids for o in half] != [o.token_ids for o in dense]


@pytest.mark.parametrize("kind", ["unified", "per_layer"])
def test_per_row_batching_equals_each_request_alone(tiny_models, tmp_path, kind):
    """An input-dependent predictor: per-row masks under batching equal each request decoded alone,
    and the reference with the predictor's own masks."""
    path = tmp_path / "random.safetensors"
    weights = _weights(tiny_models["llama"])
    s = weights.shape
    torch.manual_seed(3)
    model = make_predictor(kind, s, s.intermediate_size // GROUP, width=16)
    save_predictor(path, model, _layout(weights), weights, {"criterion": "test"})
    kw = dict(sparsity=0.5, head_density=0.75, sparsity_predictor=str(path), sparsity_batching="per_row")
    batched = _engine(tiny_models, **kw).generate(PROMPTS, _greedy())
    alone = _engine(tiny_models, max_num_seqs=1, **kw)
    assert [o.token_ids for o in batched] == [alone.generate([p], _greedy())[0].token_ids for p in PROMPTS]
    pred = load_predictor(path, weights)
    for prompt, out in zip(PROMPTS, batched):  # and equal the reference with the predictor's masks
        ids = prompt + out.token_ids
        ref = masked_forward(weights, ids, PredictedSelector(pred, s.num_heads, 0.5, 0.75), sparse_from=len(prompt))
        assert ref.logits[len(prompt) - 1 : -1].argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_sparsity_composes_with_early_exit(tiny_models, tmp_path, kv_fill):
    """Sparse rows exit; with recompute, exited tokens re-enter (dense) beside the sparse rows."""
    path = tmp_path / "const.safetensors"
    weights = _weights(tiny_models["llama"])
    _constant_predictor(path, weights, _fixed_scores(weights))
    kw = dict(layers_per_block=1, sparsity=0.5, sparsity_predictor=str(path), kv_fill=kv_fill)
    engine = _engine(tiny_models, **kw)
    leave = _greedy(exit_policy="similarity", exit_threshold=-1.0)  # every decode token leaves at layer 1
    outs = engine.generate(PROMPTS, leave)
    assert all(o.exit_layers[1:] == [1] * (MAX_NEW - 1) for o in outs)
    mixed = _engine(tiny_models, **kw).generate(PROMPTS, [leave, _greedy(), leave])  # one goes full depth
    assert mixed[1].exit_layers == [4] * MAX_NEW
    assert engine.runner.sparse.stats.num_row_layers > 0
    engine.pages.check_invariants()
    assert engine.pages.num_used_pages == 0


# -- criteria and predictors ---------------------------------------------------------------------
def test_criteria_and_predictor_training(tiny_models, tmp_path):
    weights = _weights(tiny_models["llama"])
    s = weights.shape
    layout = identity_layout(s, GROUP)
    ids = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    imp = criteria.collect(weights, ids, 4, layout)
    rows, units = len(ids) - 1 - 4, s.num_heads + s.intermediate_size // GROUP
    for name in criteria.CRITERIA:
        assert imp.scores[name].shape == (rows, s.num_layers, units) and (imp.scores[name] >= 0).all()
    assert imp.o0.shape == (rows, s.hidden_size) and imp.inputs.shape == (rows, s.num_layers, s.hidden_size)
    assert imp.neurons == [] and len(criteria.collect(weights, ids, 4, layout, False, True).neurons) == s.num_layers
    # magnitude is exactly |silu(gate) * up| summed per group: check one against the trace
    trace = masked_forward(weights, ids)
    assert torch.allclose(trace.o0[4:-1], imp.o0, atol=1e-5)
    target = normalise(imp.scores["magnitude"], s.num_heads)
    model = make_predictor("unified", s, s.intermediate_size // GROUP, width=32)
    losses = train(model, imp.o0, target, steps=60, lr=1e-2, batch=64, seed=0)
    assert losses[-1] < losses[0]
    assert -1 <= spearman(model(imp.o0), target) <= 1
    per_layer = make_predictor("per_layer", s, s.intermediate_size // GROUP, width=8)
    assert per_layer(imp.inputs).shape == target.shape


def test_predictor_file_checks_model_and_layout(tiny_models, tmp_path):
    path = tmp_path / "p.safetensors"
    weights = _weights(tiny_models["llama"])
    _constant_predictor(path, weights, _fixed_scores(weights))
    assert load_predictor(path, weights).meta["group_size"] == GROUP
    with pytest.raises(ValueError, match="trained for another model"):
        load_predictor(path, _weights(tiny_models["mistral"]))
    with pytest.raises(ValueError, match="trained for neuron groups of 16, not 32"):
        _engine(tiny_models, sparsity_predictor=str(path), sparsity_group_size=32)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="sparsity_predictor"):
        load_predictor(tmp_path / "junk.safetensors", weights)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, True, "half"])
def test_density_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match=r"sparsity: must be a number in \(0, 1\]"):
        EngineConfig(sparsity=value, sparsity_predictor="p.safetensors")
    with pytest.raises(ValueError, match=r"sparsity: must be a number in \(0, 1\]"):
        SamplingParams(sparsity=value)


def test_bad_sparsity_settings_are_one_clear_line(tiny_models):
    with pytest.raises(ValueError, match="needs a predictor"):
        EngineConfig(sparsity=0.5)
    with pytest.raises(ValueError, match="head_density"):
        EngineConfig(head_density=0)
    with pytest.raises(ValueError, match="float weights"):
        EngineConfig(sparsity_predictor="p.safetensors", dtype="bfloat16", weights="int4")
    with pytest.raises(ValueError, match=r"not over pipeline stages \(2\)"):
        EngineConfig(sparsity_predictor="p.safetensors", pipeline_stages=2)
    with pytest.raises(ValueError, match=r"devices \(cpu,cpu\)"):
        EngineConfig(sparsity_predictor="p.safetensors", devices=("cpu", "cpu"))
    with pytest.raises(RequestError, match=r"sampling_parameters.sparsity: must be a number in \(0, 1\]"):
        parse_sampling_parameters('{"sparsity": 2}', 16)
    assert parse_sampling_parameters('{"sparsity": "0.5"}', 16).sparsity == 0.5
    with pytest.raises(ValueError, match="no sparsity predictor"):
        _engine(tiny_models).add_request("r", [3, 4], _greedy(sparsity=0.5))


# -- the commands ---------------------------------------------------------------------------------
def test_calibrate_and_eval_sparsity_commands(tiny_models, tmp_path):
    import json
    import random

    from offramp.cli.main import main
    from offramp.tools.sparsity_calibrate import predictor_file

    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    words = [" ".join(f"w{rng.randint(0, 119)}" for _ in range(8)) for _ in range(8)]
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in words))
    cal, out = tmp_path / "cal", tmp_path / "eval"
    argv = ["calibrate", "--sparsity", "--model", str(tiny_models["llama"]), "--out", str(cal), "--prompts-file"]
    argv += [str(prompts), "--train-prompts-file", "none", "--max-tokens", "6", "--predictor-steps", "20"]
    assert main(argv + ["--sparsity-group-size", "16", "--page-size", "4", "--num-pages", "64"]) == 0
    for criterion in criteria.CRITERIA:
        for kind in ("unified", "per_layer"):
            assert (cal / predictor_file(criterion, kind)).is_file()
    assert main(["eval", "--sparsity", "--calibration", str(cal), "--output", str(out), "--no-measure-speed"]) == 0
    report = json.loads((out / "sparsity.json").read_text())
    assert {"agreement_95", "agreement_90", "comparisons", "num_held_tokens"} <= report["summary"].keys()
    kinds = {(r["criterion"], r["predictor"]) for r in report["rows"]}
    assert ("random", "random") in kinds and ("magnitude", "oracle") in kinds and len(kinds) == 6
    assert {r["density"] for r in report["rows"]} == {1.0, 0.95, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3}
    assert {r["density_used"] for r in report["rows"] if r["density"] == 0.5} == {0.5}  # 4 of 8 groups
    assert (out / "sparsity.png").stat().st_size > 0
    speed = ["eval", "--sparsity", "--calibration", str(cal), "--output", str(tmp_path / "speed"), "--repeats", "1"]
    assert main(speed + ["--max-tokens", "3"]) == 0  # dense vs sparse in one engine, c1 and c16
    measured = json.loads((tmp_path / "speed" / "sparsity.json").read_text())["summary"]["speed_at_reference_density"]
    assert measured["density"] == 0.5 and measured["c1"]["speedup"] > 0 and measured["c16"]["faster_batching"]
    assert measured["c1"]["density_used"] == 0.5


def test_crossing_density_interpolates_between_the_measured_points():
    from offramp.tools.sparsity_eval import crossing_density, not_reached

    curve = {"0.95": 0.97, "0.9": 0.93, "0.8": 0.71}
    assert crossing_density(curve, 0.95) == pytest.approx(0.925)  # between 0.95 (0.97) and 0.9 (0.93)
    assert crossing_density(curve, 0.90) == pytest.approx(0.886, abs=1e-3)  # 0.8 + 0.19/0.22 * 0.1
    assert crossing_density({"0.8": 0.5}, 0.95) == pytest.approx(0.98)  # from dense (1.0, 1.0)
    assert crossing_density({"0.5": 0.96}, 0.95) is None  # never falls below within the measured densities
    rows = [
        {"predictor": p, "density": d, "token_agreement": a}
        for p, d, a in [("unified", 0.9, 0.8), ("per_layer", 0.9, 0.85), ("oracle", 0.9, 0.92), ("random", 0.9, 0.1)]
    ]
    out = not_reached(rows, 0.95)
    assert out["agreement_by_density"] == {"best_predictor": {"0.9": 0.85}, "oracle": {"0.9": 0.92}}
    assert out["crosses_target_at_density"] == {
        "best_predictor": pytest.approx(0.967, abs=1e-3),
        "oracle": pytest.approx(0.9375, abs=1e-3),
    }


def test_bench_fields_and_the_triton_gauge_report_density(tiny_models, tmp_path):
    from offramp.serving.events import EngineStats
    from offramp.serving.triton_adapter import Metrics
    from offramp.tools.runs import run_engine
    from test_serving_units import _FakePb

    path = tmp_path / "const.safetensors"
    weights = _weights(tiny_models["llama"])
    _constant_predictor(path, weights, _fixed_scores(weights))
    engine = _engine(tiny_models, sparsity=0.5, sparsity_predictor=str(path))
    metrics, _ = run_engine(engine, PROMPTS, 2, 6, progress=False, params=_greedy())
    assert metrics["density"] == 0.5 and metrics["head_density"] == 1.0 and metrics["predictor_cost_frac"] >= 0
    plain, _ = run_engine(_engine(tiny_models), PROMPTS, 2, 6, progress=False, params=_greedy())
    assert (plain["density"], plain["predictor_cost_frac"]) == (1.0, 0.0)
    pb = _FakePb()
    gauge = Metrics(pb, "offramp", 4)
    gauge.update(EngineStats(0, 0, 0, 0, 0, sparsity_density=0.42))
    assert pb.metrics["offramp_sparsity_mean_density"].value == 0.42
