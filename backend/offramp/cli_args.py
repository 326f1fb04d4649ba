"""The engine options every ``offramp`` command shares, and their translation into an ``EngineConfig``."""

from __future__ import annotations

import argparse

from offramp.config import DTYPES, ENGINES, EXIT_POLICIES, KV_FILLS, EngineConfig


def engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a checkpoint dir or a .gguf")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument(
        "--engine", default="torch", choices=ENGINES, help="block engine (exported ones export on first use)"
    )
    g.add_argument("--export-dir", default=None, help="exported blocks (default: a cache directory per model/layout)")
    g.add_argument("--block-size", type=int, default=2, help="decoder layers per block")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--num-pages", type=int, default=None, help="KV budget in pages (overrides --kv-budget-mb)")
    g.add_argument("--kv-budget-mb", type=int, default=512, help="KV budget in MiB")
    g.add_argument("--max-num-seqs", type=int, default=32)
    g.add_argument("--max-num-batched-tokens", type=int, default=1024)
    g.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--raw", action="store_true", help="send prompts as raw text, without the chat template")
    e = p.add_argument_group("early exit")
    e.add_argument("--exit-policy", default="none", choices=EXIT_POLICIES)
    e.add_argument("--exit-threshold", type=float, default=0.9, help="softmax: top-1 prob; similarity: cosine")
    e.add_argument("--min-exit-layer", type=int, default=1, help="no token leaves before this many layers")
    e.add_argument(
        "--exit-points", default=None, help="comma-separated layer depths (block ends) where tokens may leave"
    )
    e.add_argument("--kv-fill", default="propagate", choices=KV_FILLS, help="K/V of skipped layers")
    e.add_argument("--exit-classifier", default=None, help="safetensors file for --exit-policy classifier")
    e.add_argument("--exit-head", default=None, help="safetensors file of trained low-rank shortcut heads")
    e.add_argument(
        "--exit-gate",
        default=None,
        choices=["similarity", "classifier"],
        help="cheap gate before the softmax check: softmax runs only where the gate passes",
    )
    e.add_argument("--exit-gate-threshold", type=float, default=0.95)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        engine=args.engine,
        export_dir=args.export_dir,
        block_size=args.block_size,
        page_size=args.page_size,
        num_pages=args.num_pages,
        kv_budget_bytes=args.kv_budget_mb * 1024 * 1024,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_threads=args.num_threads,
        use_chat_template=not args.raw,
        exit_policy=args.exit_policy,
        exit_threshold=args.exit_threshold,
        min_exit_layer=args.min_exit_layer,
        exit_points=int_list("exit-points", args.exit_points),
        kv_fill=args.kv_fill,
        exit_classifier=args.exit_classifier,
        exit_head=args.exit_head,
        exit_gate=args.exit_gate,
        exit_gate_threshold=args.exit_gate_threshold,
    )


def int_list(name: str, text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None
