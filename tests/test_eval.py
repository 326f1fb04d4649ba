"""``offramp eval``: the offline trade-off report (JSON summary, charts, Markdown) and its inputs."""

from __future__ import annotations

import json

import pytest

from offramp.cli.main import main
from offramp.tools.activations import load_prompt_rows

CATEGORIES = ("factual", "classification", "longform", "code")
SUMMARY_KEYS = {
    "identity_agreement_at_20",
    "one_jump_agreement_at_20",
    "per_level_agreement_at_20",
    "one_jump_params",
    "per_level_params",
    "calibrated_threshold",
    "calibrated_token_agreement",
    "calibrated_speedup",
    "measured_reference_agreement",
    "measured_lcs_frac",
    "measured_sequence_match",
    "measured_self_teacher_agreement",
}


@pytest.fixture(scope="module")
def calibration(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.jsonl"
    rows = [
        {"prompt": " ".join(f"w{(i * 13 + j) % 120}" for j in range(8)), "category": CATEGORIES[i // 4]}
        for i in range(16)
    ]  # prompts 3, 7, 11, 15 are held out: one per category
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["calibrate", "--model", str(tiny_models["llama"]), "--layers-per-block", "1", "--page-size", "4", "--raw"]
    argv += ["--min-exit-layer", "1"]
    argv += [
        "--out",
        str(root / "cal"),
        "--one-jump-depth",
        "2",
        "--rank",
        "8",
        "--steps",
        "40",
        "--classifier-steps",
        "60",
    ]
    argv += ["--max-tokens", "12", "--prompts-file", str(prompts), "--train-prompts-file", "none"]
    argv += ["--target-agreement", "0.6,0.9"]
    assert main(argv) == 0
    return root


def test_eval_writes_report_charts_and_markdown(calibration, capsys):
    capsys.readouterr()
    out = calibration / "report"
    assert main(["eval", "--calibration", str(calibration / "cal"), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert printed == summary and SUMMARY_KEYS <= set(summary)
    assert summary["at_20_depth"] == 3 and "nearest" in summary["at_20_note"]  # a 4-layer model has no depth 20
    cal = json.loads((calibration / "cal" / "calibration.json").read_text())
    for head in ("identity", "one_jump", "per_level"):
        assert summary[f"{head}_agreement_at_20"] == cal["agreement"][head]["3"]
    assert summary["per_level_params"] == 3 * summary["one_jump_params"]
    assert summary["calibrated_threshold"] == cal["calibrated"]["threshold"]
    assert summary["calibrated_token_agreement"] >= cal["calibrated"]["target"] == 0.6
    # the report simulates the calibrated config as served: from its first exit depth on
    assert summary["calibrated_token_agreement"] == cal["calibrated"]["token_agreement"]
    assert summary["calibrated_exit_rate"] == cal["calibrated"]["exit_rate"]
    assert summary["calibrated_speedup"] is None and report["measured"] is None
    assert set(report["agreement_by_category"]["identity"]) == set(CATEGORIES)
    assert {(r["head"], r["policy"]) for r in report["sweeps"]} >= {
        (h, p) for h in ("identity", "one_jump", "per_level") for p in ("softmax", "similarity")
    } | {("one_jump", "classifier")}
    depths = cal["exit_depths"]
    for row in report["sweeps"]:  # a token that leaves runs min(depths)..max(depths) layers, the rest 4
        rate, mean = row["exit_rate"], row["mean_exit_layer"]
        low, high = 4 - rate * (4 - min(depths)), 4 - rate * (4 - max(depths))
        assert low - 1e-3 <= mean <= high + 1e-3, row
        assert row["layer_speedup"] == pytest.approx(4 / row["mean_exit_layer"], rel=1e-3)
    for name, curve in report["curves"].items():  # thresholds ascending: below every score .. above all
        rates = [r["exit_rate"] for r in curve]
        assert rates == sorted(rates, reverse=True), name
        assert (curve[0]["exit_rate"], curve[0]["mean_exit_layer"]) == (1.0, min(depths)), name
        assert (curve[-1]["exit_rate"], curve[-1]["mean_exit_layer"], curve[-1]["token_agreement"]) == (0, 4, 1), name
    for png in ("agreement_by_depth", "agreement_by_category", "tradeoff"):
        assert (out / f"{png}.png").stat().st_size > 5000
        assert f"]({png}.png)" in (out / "report.md").read_text()
    assert "| calibrated_threshold |" in (out / "report.md").read_text()


def test_eval_measure_runs_the_calibrated_policy_against_full_depth(calibration, capsys):
    out = calibration / "measured"
    argv = ["eval", "--calibration", str(calibration / "cal"), "--output", str(out), "--measure"]
    assert main([*argv, "--num-requests", "4", "--concurrency", "2", "--max-tokens", "6", "--repeats", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    measured, summary = report["measured"], report["summary"]
    assert measured["exit_policy"] == summary["calibrated_policy"] != "none"
    assert measured["num_requests"] == 4 and measured["full_depth_tokens_per_s"] > 0
    assert summary["calibrated_speedup"] == pytest.approx(
        measured["tokens_per_s"] / measured["full_depth_tokens_per_s"], rel=1e-3
    )
    for key in ("reference_agreement", "lcs_frac", "sequence_match", "self_teacher_agreement"):
        assert summary[f"measured_{key}"] == measured[key]
    assert len(measured["tokens_per_s_runs"]) == len(measured["full_depth_tokens_per_s_runs"]) == 2  # medians of
    assert measured["num_output_tokens"] == 4 * 6  # every request runs to max_tokens on both sides


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--calibration", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offramp: error:") and "engine.calibrated.json" in err and "\n" not in err.strip()


def test_bundled_prompts_cover_the_categories_in_both_splits():
    rows = load_prompt_rows()
    held = rows[3::4]
    train = [r for i, r in enumerate(rows) if i % 4 != 3]
    for split in (held, train):
        assert set(CATEGORIES) <= {r["category"] for r in split}


def test_measure_with_no_calibrated_exit_reports_no_speedup(calibration):
    from offramp.engine.llm_engine import LLMEngine
    from offramp.serving.serving_config import load_serving_config
    from offramp.tools.evaluate import EvalConfig, measure

    cal = calibration / "cal"
    engine = LLMEngine(load_serving_config(cal / "engine.calibrated.json", {"exit_policy": "none"}).engine)
    cfg = EvalConfig(cal, num_requests=2, concurrency=2, max_tokens=3, repeats=2)
    result = measure(engine, ["w1 w2 w3", "w4 w5"], cfg, progress=False)
    assert result["speedup"] is None and result["exit_policy"] == "none" and result["num_output_tokens"] == 6


def test_measure_reports_quality_against_the_same_full_depth_run(calibration):
    """The measured quality block equals what the same two runs (same batches: same concurrency and
    order) give when compared by hand: outputs identical to full depth, and their LCS."""
    from offramp.engine.llm_engine import LLMEngine
    from offramp.engine.sampling import SamplingParams
    from offramp.serving.serving_config import load_serving_config
    from offramp.tools.evaluate import EvalConfig, measure
    from offramp.tools.quality import lcs_length
    from offramp.tools.runs import bench_prompt_ids, run_engine

    cal = calibration / "cal"
    config = load_serving_config(cal / "engine.calibrated.json").engine
    prompts = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w9 w10", "w11 w12 w13 w14"]
    result = measure(
        LLMEngine(config), prompts, EvalConfig(cal, num_requests=4, concurrency=2, max_tokens=8, repeats=1), False
    )
    engine = LLMEngine(config)
    ids = bench_prompt_ids(engine, prompts, 4)
    _, outs = run_engine(engine, ids, 2, 8, False, SamplingParams(max_tokens=8, ignore_eos=True))
    _, full = run_engine(engine, ids, 2, 8, False, SamplingParams(max_tokens=8, ignore_eos=True, exit_policy="none"))
    assert result["sequence_match"] == sum(o == f for o, f in zip(outs, full)) / 4
    assert result["lcs_frac"] == round(sum(lcs_length(o, f) for o, f in zip(outs, full)) / 32, 4)
    assert result["reference_agreement"] is not None and result["full_depth_distinct2"] is not None
