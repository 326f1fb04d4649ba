"""Calibration: trained shortcuts and exit classifiers, threshold calibration, resumable runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from offramp import EngineConfig, SamplingParams
from offramp.cli.main import main
from offramp.engine.llm_engine import LLMEngine
from offramp.exits import ClassifierExit, LowRankHead
from offramp.serving.serving_config import load_serving_config
from offramp.tools import activations as acts
from offramp.tools.activations import load_activations
from offramp.tools.calibrate import TrainConfig, _SoftCrossEntropy, calibrate, engine_json
from offramp.tools.exit_sim import (
    HeadOutputs,
    SimResult,
    best_from_depth,
    exit_costs,
    full_tokens,
    head_outputs,
    pick_threshold,
    policy_scores,
    simulate,
    sweep,
)

TRAIN = [" ".join(f"w{(i * 7 + j) % 120}" for j in range(12)) for i in range(12)]
HELD = [" ".join(f"w{(i * 11 + j) % 120}" for j in range(12)) for i in range(3)]
TARGETS = (0.5, 0.8, 0.95, 1.0)
FAST = TrainConfig(rank=8, steps=20, classifier_steps=10)


def _engine(model, **kw) -> LLMEngine:
    kw.setdefault("min_exit_layer", 1)  # exits at every layer of the 4-layer model
    return LLMEngine(EngineConfig(model=str(model), layers_per_block=1, page_size=4, use_chat_template=False, **kw))


def _run(engine, out, **kw):
    cfg = kw.pop("cfg", TrainConfig(rank=8, steps=150, classifier_steps=100))
    return calibrate(engine, TRAIN, HELD, out, 2, cfg, 16, False, eval_categories=["a", "b", "a"], **kw)


@pytest.fixture(scope="module")
def calibrated(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal")
    engine = _engine(tiny_models["llama"])
    return engine, _run(engine, out, targets=TARGETS), out


def test_shortcuts_learn_and_load(calibrated, tiny_models):
    engine, report, out = calibrated
    assert report.depths == [1, 2, 3] and report.num_eval_tokens == 3 * 16
    ident, jump, level = (report.agreement[k] for k in ("identity", "one_jump", "per_level"))
    assert level[2] > ident[2] and jump[2] > ident[2]  # distillation helps where it was trained
    assert report.params["per_level"] == 3 * report.params["one_jump"]
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["agreement"]["one_jump"]["2"] == round(jump[2], 4)
    served = _engine(tiny_models["llama"], exit_head=str(out / "per_level.safetensors"), min_exit_layer=2)
    out = served.generate([[3, 4, 5]], SamplingParams(max_tokens=4, exit_policy="softmax", exit_threshold=0.0))[0]
    assert out.exit_layers == [4, 2, 2, 2]


def test_classifier_file_loads_and_serves(calibrated, tiny_models):
    engine, _, out = calibrated
    path = out / "classifier.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["offramp"])["head"] == "one_jump"  # the head whose correctness it predicts
    assert keys == {f"{k}.{d}" for k in ("weight", "bias") for d in (1, 2, 3)}
    policy = ClassifierExit(path)
    assert policy.weight[2].shape == (64,) and policy.bias[2].shape == (1,)
    served = _engine(tiny_models["llama"], exit_head=str(out / "one_jump.safetensors"), exit_classifier=str(path))
    for threshold, depths in ((0.0, [4, 1, 1, 1]), (1.5, [4, 4, 4, 4])):
        params = SamplingParams(max_tokens=4, exit_policy="classifier", exit_threshold=threshold)
        assert served.generate([[3, 4, 5]], params)[0].exit_layers == depths


def test_classifier_beats_the_base_rate(calibrated):
    """On its training data, the classifier's BCE is below that of always predicting the base rate."""
    engine, _, out = calibrated
    _, train, _ = load_activations(out / "activations.pt")
    w = engine.weights
    head = LowRankHead(w, out / "one_jump.safetensors")
    correct = head_outputs(w, head, train, [1, 2, 3]).tokens == full_tokens(w, train.final)  # [3, n]
    policy = ClassifierExit(out / "classifier.safetensors")
    mixed = 0
    for i, d in enumerate((1, 2, 3)):
        y = correct[i].float()
        if 0 < y.mean() < 1:
            mixed += 1
            ours = F.binary_cross_entropy(policy.probability(train.at_depth[d], d), y)
            base = F.binary_cross_entropy(torch.full_like(y, float(y.mean())), y)
            assert ours < base, (d, float(ours), float(base))
    assert mixed >= 2


def _exit_by_hand(engine, out, held, policy: str, threshold: float) -> float:
    """Token agreement of the policy at ``threshold``, one token at a time with the serving code."""
    w = engine.weights
    head = LowRankHead(w, out / "one_jump.safetensors")
    classifier = ClassifierExit(out / "classifier.safetensors")
    full = full_tokens(w, held.final).tolist()
    same = 0
    for t in range(held.num_tokens):
        token = full[t]
        for d in (1, 2, 3):
            h = held.at_depth[d][t : t + 1]
            logits = head.logits(h, d)
            score = logits.softmax(-1).max() if policy == "softmax" else classifier.probability(h, d)[0]
            if score >= threshold:
                token = int(logits.argmax())
                break
        same += token == full[t]
    return same / held.num_tokens


def test_thresholds_meet_target_and_are_monotone(calibrated):
    engine, report, out = calibrated
    _, _, held = load_activations(out / "activations.pt")
    choices = report.thresholds["policies"]
    assert set(choices) == {"softmax", "classifier", "similarity"}
    for policy, by_target in choices.items():
        rows = [by_target[str(t)] for t in TARGETS]
        for target, row in zip(TARGETS, rows):
            assert row["token_agreement"] >= target
        thresholds = [r["threshold"] for r in rows]
        assert thresholds == sorted(thresholds), (policy, thresholds)
        assert rows[0]["exit_rate"] > 0  # a loose target lets tokens leave
    for policy in ("softmax", "classifier"):  # the simulation agrees with a token-by-token walk
        for target in (0.5, 0.8):
            row = choices[policy][str(target)]
            assert _exit_by_hand(engine, out, held, policy, row["threshold"]) == pytest.approx(row["token_agreement"])


def test_pick_threshold_needs_every_higher_threshold_to_qualify():
    rows = [SimResult("softmax", t, a, 0, 0, 1, 1) for t, a in ((0.1, 0.9), (0.2, 0.5), (0.3, 0.92), (0.4, 1.0))]
    assert pick_threshold(rows, 0.9).threshold == 0.3  # 0.1 meets it, but 0.2 above it does not
    assert pick_threshold(rows, 0.5).threshold == 0.1
    assert pick_threshold(rows, 1.0).threshold == 0.4
    with pytest.raises(ValueError, match="target_agreement"):
        pick_threshold(rows, 1.2)


def test_calibrated_engine_json_serves(calibrated):
    engine, report, out = calibrated
    served = load_serving_config(out / "engine.calibrated.json").engine
    chosen = report.calibrated
    assert chosen["target"] == TARGETS[0] and served.exit_policy == chosen["policy"] != "none"
    assert (
        served.exit_threshold
        == chosen["threshold"]
        == report.thresholds["policies"][chosen["policy"]]["0.5"]["threshold"]
    )
    assert served.exit_head == str((out / "one_jump.safetensors").resolve())
    assert served.exit_classifier == str((out / "classifier.safetensors").resolve())
    assert served.layers_per_block == 1 and served.use_chat_template is False
    result = LLMEngine(served).generate([[3, 4, 5]], SamplingParams(max_tokens=6))[0]
    assert len(result.exit_layers) == 6 and min(result.exit_layers[1:]) < 4  # the calibrated policy exits


def test_rerun_reuses_the_cache(tiny_models, tmp_path, monkeypatch):
    engine = _engine(tiny_models["llama"])
    calls = []
    real_collect = acts.collect
    monkeypatch.setattr(acts, "collect", lambda *a, **k: calls.append(1) or real_collect(*a, **k))
    first = _run(engine, tmp_path, cfg=FAST)
    assert len(calls) == 2 and first.reused == []  # train and held
    files = ("one_jump", "per_level", "classifier")
    stamps = {f: (tmp_path / f"{f}.safetensors").stat().st_mtime_ns for f in files}
    again = _run(engine, tmp_path, cfg=FAST)
    assert len(calls) == 2  # not collected again
    assert again.reused == ["activations.pt", *(f"{f}.safetensors" for f in files)]
    assert stamps == {f: (tmp_path / f"{f}.safetensors").stat().st_mtime_ns for f in files}
    assert again.agreement == first.agreement and again.thresholds == first.thresholds
    changed = _run(engine, tmp_path, cfg=TrainConfig(rank=8, steps=20, classifier_steps=20))
    assert changed.reused == ["activations.pt", "one_jump.safetensors", "per_level.safetensors"]
    assert _run(engine, tmp_path, cfg=FAST, force=True).reused == ["activations.pt"]
    assert len(calls) == 2
    _run(
        engine, tmp_path, cfg=TrainConfig(rank=8, steps=20, classifier_steps=10, seed=1)
    )  # another seed: collected again
    assert len(calls) == 4


def test_calibrate_cli_errors(tiny_models, tmp_path, capsys):
    argv = [
        "calibrate",
        "--model",
        str(tiny_models["llama"]),
        "--layers-per-block",
        "2",
        "--out",
        str(tmp_path),
        "--one-jump-depth",
        "3",
        "--steps",
        "1",
        "--max-tokens",
        "2",
    ]
    assert main(argv) == 2
    assert "one_jump_depth: 3 is not an exit depth" in capsys.readouterr().err
    assert main([*argv[:-6], "--steps", "0"]) == 2
    assert main([*argv[:-5], "2", "--target-agreement", "1.5"]) == 2
    assert "target_agreement: each must be in (0, 1]" in capsys.readouterr().err


def test_soft_cross_entropy_matches_torch():
    logits = torch.randn(5, 40, requires_grad=True)
    target = torch.softmax(torch.randn(5, 40), -1)
    ours = _SoftCrossEntropy.apply(logits, target)
    (grad,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits, target)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_sampled_answers_add_rows_of_the_same_prompts(tiny_models):
    engine = _engine(tiny_models["llama"])
    params = acts.answer_params(3, 6, 2, seed=5)
    assert [p.temperature for p in params] == [0.0] * 3 + [acts.SAMPLE_TEMPERATURE] * 6
    assert len({p.seed for p in params[3:]}) == 6  # every sampled answer has its own seed
    assert [p.seed for p in acts.answer_params(3, 6, 2, seed=5)] == [p.seed for p in params]  # reproducible
    greedy = acts.collect(engine, TRAIN[:3], (2, 3), 6, False)
    more = acts.collect(engine, TRAIN[:3], (2, 3), 6, False, samples=2, seed=5)
    assert more.num_tokens > greedy.num_tokens
    assert sorted(set(more.prompt_index.tolist())) == [0, 1, 2]  # rows point at their prompt
    n = greedy.num_tokens  # the greedy answers come first, unchanged
    torch.testing.assert_close(more.at_depth[2][:n], greedy.at_depth[2])
    key = acts.activation_key(engine, {"train": TRAIN[:3]}, (2, 3), 6, 0)
    assert key != acts.activation_key(engine, {"train": TRAIN[:3]}, (2, 3), 6, 0, samples=2)


def test_bundled_calibration_prompts_are_training_only():
    rows = acts.load_calibration_rows()
    assert len(rows) == 200 and len({r["prompt"] for r in rows}) == 200
    assert {r["category"] for r in rows} == {"factual", "classification", "longform", "code", "summarize"}
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in acts.load_prompt_rows()}


def test_best_from_depth_meets_the_target_and_serves(calibrated):
    engine, report, out = calibrated
    _, _, held = load_activations(out / "activations.pt")
    w = engine.weights
    head = LowRankHead(w, out / "one_jump.safetensors")
    depths = report.exit_depths
    outputs, full = head_outputs(w, head, held, depths), full_tokens(w, held.final)
    costs = exit_costs(w, head)
    score = policy_scores(outputs, held, ClassifierExit(out / "classifier.safetensors"))["classifier"]
    for target in (0.5, 0.8):
        row = best_from_depth("classifier", score, outputs, full, costs, (target,))[str(target)]
        assert row["token_agreement"] >= target and row["min_exit_layer"] in depths
        j = depths.index(row["min_exit_layer"])  # the row is the simulation with exits from there on only
        sub = HeadOutputs(depths[j:], outputs.tokens[j:], outputs.top1[j:])
        again = simulate("classifier", score[j:], sub, full, row["threshold"], costs).row()
        assert again == {k: v for k, v in row.items() if k != "min_exit_layer"}
        for m in range(j):  # no earlier first depth estimates faster at the target
            earlier = HeadOutputs(depths[m:], outputs.tokens[m:], outputs.top1[m:])
            runs = sweep("classifier", score[m:], earlier, full, costs)
            assert pick_threshold(runs, target).est_speedup <= row["est_speedup"]
    chosen = {"policy": "classifier", "threshold": 0.7, "min_exit_layer": 3}
    served = engine_json(engine, chosen, out / "one_jump.safetensors", out / "classifier.safetensors")
    assert served["min_exit_layer"] == 3 and served["exit_threshold"] == 0.7
