"""The ``offramp`` command: ``generate``, ``bench``, ``serve``, ``export``, ``calibrate``, ``eval``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offramp.cli.args import absolute_paths, add_config_flags, config_values, engine_args, engine_config
from offramp.cli.model_tools import cmd_calibrate, cmd_eval, cmd_export
from offramp.config import EngineConfig
from offramp.engine.sampling import SamplingParams
from offramp.model.loader import ModelLoadError
from offramp.serving.serving_config import ServingConfig

# What offramp export takes from the engine's options (the layout the graphs are cut to).
EXPORT_FIELDS = ("model", "layers_per_block", "block_boundaries", "page_size", "exit_head", "trt_precision")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offramp", description="Early-exit LLM engine for Triton.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline for one or more prompts (batched together)")
    engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="a stop string; repeat for several")
    gen.add_argument("--json", action="store_true", help="print one JSON object")

    bench = sub.add_parser("bench", help="measure throughput and latency (one JSON line)")
    engine_args(bench)
    bench.add_argument("--prompts-file", default=None, help="JSONL with a 'prompt' field (default: bundled set)")
    bench.add_argument("--num-requests", type=int, default=32)
    bench.add_argument("--concurrency", type=int, default=16)
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    bench.add_argument(
        "--compare",
        choices=["hf", "llamacpp"],
        default=None,
        help="also run HF transformers generate, or llama.cpp on the same GGUF (needs `make tools-env`)",
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --spec: lossless and plain decoding this many times each, interleaved; medians reported "
        "(speedup: the median of the pairs' ratios)",
    )
    bench.add_argument("--json", action="store_true", help="print only the JSON line")
    bench.add_argument("--output", default=None, help="append the JSON line to this file and draw a PNG beside it")
    cal = sub.add_parser("calibrate", help="train low-rank exit shortcuts (one-jump and per-level) by distillation")
    engine_args(cal, skip=("sparsity",))  # --sparsity switches calibrate to the sparsity predictors
    cal.add_argument(
        "--sparsity",
        dest="sparsity_mode",
        action="store_true",
        help="contextual sparsity instead of exits: importance criteria, neuron layout and predictors "
        "(groups of --sparsity-group-size, default 64)",
    )
    cal.add_argument("--predictor-steps", type=int, default=600, help="--sparsity: training steps per predictor")
    cal.add_argument(
        "--sparsity-train-prompts",
        type=int,
        default=120,
        help="--sparsity: most training prompts (memory: ~35 KB/token)",
    )
    cal.add_argument("--out", required=True, help="directory for the heads (safetensors) and calibration.json")
    cal.add_argument("--one-jump-depth", type=int, default=20, help="depth the one-jump shortcut is trained at")
    cal.add_argument("--rank", type=int, default=64)
    cal.add_argument("--steps", type=int, default=150)
    cal.add_argument("--batch-size", type=int, default=256)
    cal.add_argument("--lr", type=float, default=3e-3)
    cal.add_argument("--max-tokens", type=int, default=64, help="tokens generated per calibration prompt")
    cal.add_argument(
        "--prompts-file",
        default=None,
        help="JSONL with a 'prompt' field (default: bundled set); three in four train, every fourth is held out",
    )
    cal.add_argument(
        "--train-prompts-file",
        default=None,
        help="JSONL of extra prompts used for training only (default: the bundled calibration set of 200; "
        "'none' for no extra prompts)",
    )
    cal.add_argument(
        "--samples-per-prompt",
        type=int,
        default=0,
        help="sampled answers (temperature 0.8, top-p 0.95, seeded) per training prompt besides the greedy one",
    )
    cal.add_argument(
        "--target-agreement",
        action="append",
        default=None,
        help="token agreement the thresholds must keep (default 0.95); repeat or comma-separate for several",
    )
    cal.add_argument(
        "--classifier-head",
        default="one_jump",
        choices=["one_jump", "identity", "per_level"],
        help="the head you will serve with: the exit classifier predicts its correctness, thresholds are "
        "calibrated for it and engine.calibrated.json uses it",
    )
    cal.add_argument("--classifier-steps", type=int, default=300)
    cal.add_argument("--force", action="store_true", help="retrain even when files with the same settings exist")

    ev = sub.add_parser("eval", help="offline early-exit trade-off report from an offramp calibrate directory")
    ev.add_argument("--calibration", required=True, help="the directory offramp calibrate wrote")
    ev.add_argument("--output", default="docs/eval", help="directory for report.json, report.md and PNGs")
    only = ("model", "num_threads", "dtype", "weights", "head_density", "sparsity_floor", "sparsity_max_gap")
    add_config_flags(ev, EngineConfig, only=only, overrides=True)  # override the calibrated
    ev.add_argument("--thresholds", action="append", default=[], help="POLICY=T1,T2,... (replaces that policy's grid)")
    ev.add_argument("--measure", action="store_true", help="also run offramp bench: calibrated policy vs full depth")
    ev.add_argument("--repeats", type=int, default=3, help="measured pairs (calibrated, full depth); medians")
    ev.add_argument("--num-requests", type=int, default=32)
    ev.add_argument("--concurrency", type=int, default=16)
    ev.add_argument("--max-tokens", type=int, default=32)
    ev.add_argument(
        "--sparsity",
        dest="sparsity_mode",  # not EngineConfig.sparsity (a density)
        action="store_true",
        help="contextual sparsity report from an offramp calibrate --sparsity directory: sparsity.json and "
        "sparsity.png (speed in --dtype, default bfloat16; --no-measure-speed to skip)",
    )
    ev.add_argument("--no-measure-speed", dest="measure_speed", action="store_false", help="--sparsity: quality only")

    exp = sub.add_parser("export", help="write every block, the embedding and the heads as ONNX (TensorRT on GPUs)")
    add_config_flags(exp, EngineConfig, only=EXPORT_FIELDS)
    exp.add_argument("--output", default="model_repository/offramp/1/export", help="export directory")
    exp.add_argument("--force", action="store_true", help="re-export even when an up-to-date export is there")
    exp.add_argument(
        "--weights",
        dest="export_weights",
        choices=("none", "int4"),
        default="none",
        help="int4: the blocks' products as weight-only int4 (DequantizeLinear + MatMul, opset 21; the engine's own "
        "int4 weights, a GGUF's 4-bit blocks as stored); run them with --backend onnxruntime --export-dir",
    )
    exp.add_argument(
        "--weight-group-size",
        dest="export_group_size",
        type=int,
        choices=(32, 64, 128),
        default=32,
        help="int4: input columns sharing one scale and zero",
    )
    exp.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (NVIDIA GPU + tensorrt)")

    serve = sub.add_parser("serve", help="run tritonserver with the Offramp model repository")
    serve.add_argument("--model-repository", default="model_repository")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    serve.add_argument(
        "--openai-port", type=int, default=None, help="also serve the OpenAI-compatible API (/v1) on this port"
    )
    serve.add_argument("--openai-host", default="127.0.0.1", help="address of the OpenAI API (loopback by default)")
    add_config_flags(serve, EngineConfig, overrides=True)  # each overrides engine.json (of every model)
    add_config_flags(serve, ServingConfig, overrides=True)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from offramp.serving.serve import run_server

    overrides = config_values(args, EngineConfig, skip_unset=True) | config_values(args, ServingConfig, skip_unset=True)
    absolute_paths(overrides)  # the server runs elsewhere
    return run_server(
        Path(args.model_repository),
        overrides,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        args.ready_timeout,
        args.host,
        args.openai_port,
        args.openai_host,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from offramp.engine.llm_engine import LLMEngine

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
    )
    engine = LLMEngine(engine_config(args))
    try:
        outputs = engine.generate(args.prompt, params)
    finally:
        engine.close()  # pipeline stages stop with the command
    if args.json:
        rows = [
            {
                "prompt": o.prompt,
                "text": o.text,
                "token_ids": o.token_ids,
                "finish_reason": o.finish_reason,
                "exit_layers": o.exit_layers,
            }
            for o in outputs
        ]
        print(json.dumps({"outputs": rows}, ensure_ascii=False))
    else:
        for o in outputs:
            print(f"### {o.prompt}\n{o.text}\n[{len(o.token_ids)} tokens, finish_reason={o.finish_reason}]\n")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from offramp.engine.llm_engine import LLMEngine
    from offramp.tools.bench import bench
    from offramp.tools.runs import load_prompts

    for name in ("num_requests", "concurrency", "max_tokens", "rounds"):
        if getattr(args, name) <= 0:
            raise ValueError(f"{name.replace('_', '-')}: must be positive")
    if args.ignore_eos and args.compare == "hf":
        raise ValueError("ignore-eos: HF generate stops at EOS, so it cannot be compared with --compare hf")
    prompts = load_prompts(args.prompts_file)
    engine = LLMEngine(engine_config(args))
    try:
        result = bench(
            engine,
            prompts,
            args.num_requests,
            args.concurrency,
            args.max_tokens,
            compare_hf=args.compare == "hf",
            compare_llamacpp=args.compare == "llamacpp",
            progress=sys.stderr.isatty(),
            ignore_eos=args.ignore_eos,
            rounds=args.rounds,
        )
    finally:
        engine.close()
    line = json.dumps(result)
    print(line)
    if args.output:
        from offramp.tools.plots import plot_bench

        out = Path(args.output)
        with out.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(f"offramp: wrote {out} and {plot_bench(out)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "bench": cmd_bench, "serve": cmd_serve, "calibrate": cmd_calibrate}
        commands["eval"] = cmd_eval
        commands["export"] = cmd_export
        return commands[args.command](args)
    except (ModelLoadError, ValueError, OSError) as exc:  # OSError includes a failed pipeline stage
        print(f"offramp: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
