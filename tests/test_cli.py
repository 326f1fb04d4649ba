"""The ``offramp`` command line: JSON output, bench fields, one-line errors."""

from __future__ import annotations

import json

import pytest

from offramp.cli.main import main

BENCH_FIELDS = {
    "tokens_per_s",
    "cpu_vector",
    "requests_per_s",
    "ttft_ms_p50",
    "tpot_ms_p50",
    "num_layers",
    "mean_exit_layer",
    "concurrency",
    "backend",
}


def test_generate_json(tiny_models, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_models["llama"]),
            "--prompt",
            "w1 w2 w3",
            "--prompt",
            "w5",
            "--max-tokens",
            "6",
            "--page-size",
            "4",
            "--json",
        ]
    )
    assert rc == 0
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    assert [o["prompt"] for o in outputs] == ["w1 w2 w3", "w5"]
    for o in outputs:
        assert set(o) == {"prompt", "text", "token_ids", "finish_reason", "exit_layers"}
        assert len(o["token_ids"]) == 6 and o["finish_reason"] == "length"
        assert o["exit_layers"] == [4] * 6


def test_bench_json_and_output_files(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1}"}) for i in range(5)))
    out = tmp_path / "bench.jsonl"
    rc = main(
        [
            "bench",
            "--model",
            str(tiny_models["qwen2"]),
            "--prompts-file",
            str(prompts),
            "--num-requests",
            "6",
            "--concurrency",
            "3",
            "--max-tokens",
            "5",
            "--json",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert BENCH_FIELDS <= set(row)
    assert row["concurrency"] == 3 and row["num_layers"] == 4 and row["mean_exit_layer"] == 4.0
    assert row["num_output_tokens"] == 30 and row["tokens_per_s"] > 0
    assert json.loads(out.read_text()) == row
    assert out.with_suffix(".png").stat().st_size > 1000
    assert row["ignore_eos"] is False
    assert row["cpu_vector"] in ("avx512_bf16", "avx512", "avx2", "other")
    assert "weight_gb_per_s" not in row and "read_gb_per_s" not in row  # concurrency 1 only


def test_bench_at_concurrency_one_reports_weight_and_machine_bandwidth(tiny_models, capsys):
    argv = ["bench", "--model", str(tiny_models["llama"]), "--num-requests", "2", "--concurrency", "1"]
    assert main([*argv, "--max-tokens", "4", "--ignore-eos", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    effective = row["weight_bytes_per_token"] * row["tokens_per_s"] / 1e9
    assert row["weight_gb_per_s"] == pytest.approx(effective, abs=0.006)
    assert row["read_gb_per_s"] > 0.1  # a 1 GiB sum; any machine reads faster than this


def test_bench_ignore_eos_generates_max_tokens(tiny_models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1 w2"}))
    argv = [
        "bench",
        "--model",
        str(tiny_models["llama"]),
        "--prompts-file",
        str(prompts),
        "--num-requests",
        "2",
        "--concurrency",
        "2",
        "--max-tokens",
        "7",
        "--ignore-eos",
        "--json",
    ]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["ignore_eos"] is True and row["num_output_tokens"] == 14
    assert main([*argv, "--compare", "hf"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", "/does/not/exist", "--prompt", "x"], "model not found: /does/not/exist"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature: must be"),
        (["generate", "--prompt", "x", "--layers-per-block", "0"], "layers_per_block: must be a positive integer"),
        (["bench", "--prompts-file", "/nope.jsonl"], "No such file"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("offramp: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ([], "float32"),
        (["--weights", "int4"], "bfloat16"),
        (["--weights", "bf16"], "bfloat16"),
        (["--dtype", "bfloat16"], "bfloat16"),
    ],
)
def test_dtype_left_unset_follows_the_weights(flags, dtype):
    """`offramp bench --weights int4` computes in bfloat16 (the only activations int4 takes) without --dtype."""
    from offramp.cli.args import engine_config
    from offramp.cli.main import build_parser

    assert engine_config(build_parser().parse_args(["bench", *flags])).dtype == dtype


def test_float32_with_quantized_weights_is_one_error_line(capsys):
    assert main(["generate", "--prompt", "x", "--weights", "int4", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("offramp: error: weights: int4 computes with bfloat16 activations") and "\n" not in err
