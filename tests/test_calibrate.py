"""Calibration: trained shortcuts beat the identity head on held-out data, and the engine loads them."""

from __future__ import annotations

import json

from offramp import EngineConfig, SamplingParams
from offramp.calibrate import TrainConfig, calibrate
from offramp.cli import main
from offramp.engine import LLMEngine

TRAIN = [" ".join(f"w{(i * 7 + j) % 120}" for j in range(12)) for i in range(12)]
HELD = [" ".join(f"w{(i * 11 + j) % 120}" for j in range(12)) for i in range(3)]


def test_shortcuts_learn_and_load(tiny_models, tmp_path):
    engine = LLMEngine(
        EngineConfig(model=str(tiny_models["llama"]), block_size=1, page_size=4, use_chat_template=False)
    )
    report = calibrate(
        engine,
        TRAIN,
        HELD,
        tmp_path,
        one_jump_depth=2,
        cfg=TrainConfig(rank=8, steps=150),
        max_tokens=16,
        progress=False,
    )
    assert report.depths == [1, 2, 3] and report.num_eval_tokens == 3 * 16
    ident, jump, level = (report.agreement[k] for k in ("identity", "one_jump", "per_level"))
    assert level[2] > ident[2] and jump[2] > ident[2]  # distillation helps where it was trained
    assert report.params["per_level"] == 3 * report.params["one_jump"]
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["agreement"]["one_jump"]["2"] == round(jump[2], 4)
    served = LLMEngine(
        EngineConfig(
            model=str(tiny_models["llama"]),
            block_size=1,
            page_size=4,
            exit_head=str(tmp_path / "per_level.safetensors"),
            min_exit_layer=2,
        )
    )
    out = served.generate([[3, 4, 5]], SamplingParams(max_tokens=4, exit_policy="softmax", exit_threshold=0.0))[0]
    assert out.exit_layers == [4, 2, 2, 2]


def test_calibrate_cli_errors(tiny_models, tmp_path, capsys):
    argv = [
        "calibrate",
        "--model",
        str(tiny_models["llama"]),
        "--block-size",
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
