"""``offramp export``, ``offramp calibrate`` and ``offramp eval``: the commands that prepare a model
for serving (exported blocks, trained exits and their thresholds, the trade-off report). The
parser lives in ``cli``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offramp.cli.args import config_values, engine_config
from offramp.config import EngineConfig


def cmd_export(args: argparse.Namespace) -> int:
    from offramp_export import export_model

    config = engine_config(args)
    from offramp.model.loader import load_config, model_shape, resolve_model

    num_layers = model_shape(load_config(resolve_model(config.model))).num_layers
    exit_head = Path(args.exit_head) if args.exit_head else None
    result = export_model(
        config.model,
        config.block_ranges(num_layers),
        config.page_size,
        Path(args.output),
        exit_head,
        args.force,
        weights_format=args.export_weights,
        group_size=args.export_group_size,
    )
    summary = {
        "directory": str(result.directory),
        "reused": result.reused,
        "seconds": round(result.seconds, 2),
        "blocks": len(result.manifest.blocks),
        "exit_heads": sorted(result.manifest.exit_heads),
        "bytes": sum(p.stat().st_size for p in result.directory.rglob("*") if p.is_file()),
        "weights": result.manifest.weights,
    }
    if args.tensorrt:
        from offramp_export.tensorrt_build import TensorRTUnavailable, build_engines

        try:
            built = build_engines(result.directory, args.trt_precision)
            summary["tensorrt"] = {"engines": len(built.engines), "reused": built.reused, "seconds": built.seconds}
        except TensorRTUnavailable as exc:
            summary["tensorrt"] = f"skipped: {exc}"
            print(f"offramp export: TensorRT skipped: {exc}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.sparsity_mode:
        return cmd_calibrate_sparsity(args)
    from offramp.engine.llm_engine import LLMEngine
    from offramp.tools.activations import load_calibration_rows, load_prompt_rows
    from offramp.tools.calibrate import TrainConfig, calibrate, report_json

    cfg = TrainConfig(
        rank=args.rank,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        classifier_steps=args.classifier_steps,
    )
    rows = load_prompt_rows(args.prompts_file)
    held = rows[3::4]  # every fourth prompt is held out for evaluation
    train = [r["prompt"] for i, r in enumerate(rows) if i % 4 != 3]
    if not held or not train:
        raise ValueError("prompts-file: needs at least 4 prompts (one in four is held out)")
    if args.train_prompts_file != "none":
        train += [r["prompt"] for r in load_calibration_rows(args.train_prompts_file)]
    try:
        targets = tuple(float(t) for arg in args.target_agreement or ["0.95"] for t in arg.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"target_agreement: expected numbers, got {args.target_agreement}") from None
    engine = LLMEngine(engine_config(args))
    report = calibrate(
        engine,
        train,
        [r["prompt"] for r in held],
        Path(args.out),
        args.one_jump_depth,
        cfg,
        args.max_tokens,
        sys.stderr.isatty(),
        eval_categories=[r["category"] for r in held],
        targets=targets,
        serve_head=args.classifier_head,
        force=args.force,
        samples=args.samples_per_prompt,
    )
    summary = report_json(report)
    summary["thresholds"] = summary["thresholds"]["policies"]  # the sweeps are in calibration.json
    print(json.dumps(summary))
    return 0


def cmd_calibrate_sparsity(args: argparse.Namespace) -> int:
    from offramp.engine.llm_engine import LLMEngine
    from offramp.tools.activations import load_calibration_rows, load_prompt_rows
    from offramp.tools.sparsity_calibrate import SparsityTrainConfig, calibrate_sparsity

    cfg = SparsityTrainConfig(
        group_size=args.sparsity_group_size or 64, steps=args.predictor_steps, lr=2e-3, seed=args.seed
    )
    rows = load_prompt_rows(args.prompts_file)
    held = [r["prompt"] for r in rows[3::4]]  # the same split as the exits' calibration
    train = [r["prompt"] for i, r in enumerate(rows) if i % 4 != 3]
    if args.train_prompts_file != "none":
        train += [r["prompt"] for r in load_calibration_rows(args.train_prompts_file)]
    if not held or not train:
        raise ValueError("prompts-file: needs at least 4 prompts (one in four is held out)")
    engine = LLMEngine(engine_config(args))
    report = calibrate_sparsity(
        engine, train[: args.sparsity_train_prompts], held, Path(args.out), cfg, args.max_tokens, sys.stderr.isatty()
    )
    brief = [
        {k: p[k] for k in ("file", "spearman", "params", "flops_per_token", "step_ms")} for p in report["predictors"]
    ]
    print(json.dumps({"group_size": report["group_size"], "predictors": brief}))
    return 0


def cmd_eval_sparsity(args: argparse.Namespace) -> int:
    from offramp.tools.sparsity_eval import SparsityEvalConfig, evaluate_sparsity, write_sparsity_report

    overrides = config_values(args, EngineConfig, skip_unset=True)
    speed = {k: overrides[k] for k in ("model", "dtype", "weights", "num_threads") if k in overrides}
    cfg = SparsityEvalConfig(
        Path(args.calibration),
        Path(args.output),
        head_density=overrides.get("head_density", 1.0),
        floor=overrides.get("sparsity_floor", 0.0),
        max_gap=overrides.get("sparsity_max_gap", 0),
        measure=args.measure_speed,
        repeats=args.repeats,
        max_tokens=args.max_tokens,
        speed_config=speed,
    )
    report = evaluate_sparsity(cfg, sys.stderr.isatty(), overrides.get("num_threads"))
    paths = write_sparsity_report(report, cfg.output_dir)
    print(json.dumps(report["summary"]))
    print(f"offramp: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.sparsity_mode:
        return cmd_eval_sparsity(args)
    from offramp.engine.llm_engine import LLMEngine
    from offramp.serving.serving_config import load_serving_config
    from offramp.tools.activations import load_activations
    from offramp.tools.calibrate import FILES
    from offramp.tools.evaluate import EvalConfig, evaluate, write_report
    from offramp.tools.exit_sim import DEFAULT_THRESHOLDS

    cal_dir = Path(args.calibration)
    thresholds = dict(DEFAULT_THRESHOLDS)
    for item in args.thresholds:
        policy, _, values = item.partition("=")
        try:
            thresholds[policy.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"thresholds: expected POLICY=T1,T2,..., got {item!r}") from None
    cfg = EvalConfig(
        cal_dir,
        Path(args.output),
        thresholds,
        measure=args.measure,
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
    )
    overrides = config_values(args, EngineConfig, skip_unset=True)
    engine = LLMEngine(load_serving_config(cal_dir / FILES["engine"], overrides).engine)
    _, _, held = load_activations(cal_dir / FILES["activations"])
    report = evaluate(engine, held, cfg, sys.stderr.isatty())
    paths = write_report(report, cfg.output_dir)
    print(json.dumps(report["summary"]))
    print(f"offramp: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0
