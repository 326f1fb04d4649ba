"""Teacher-forced agreement of each weight format with Hugging Face float32 greedy output.

HF ``transformers`` (float32, greedy, up to EOS) answers the bundled prompts once; then each Offramp
format reads prompt + HF's answer in one full-depth pass, and we count the positions where its argmax
is HF's token (``token_agreement_vs_hf_float32``). ``decode_agreement_vs_hf_float32`` counts the same
along decode steps (16 requests at a time, or --decode-concurrency, each step fed HF's previous token, as serving computes
them: the fused CPU kernels where they apply). One JSON line per format.

Usage: .venv/bin/python perf/weights_quality.py [--formats none:float32,bf16:bfloat16,int8:bfloat16,int4:bfloat16]
       [--num-prompts 40] [--max-tokens 64] [--num-threads 2] [--model default] [--no-fused-decode]
       [--[no-]int16-activations] [--decode-concurrency 16]
"""

from __future__ import annotations

import argparse
import json

import torch

from offramp.config import EngineConfig
from offramp.engine.llm_engine import LLMEngine
from offramp.tools.quality import reference_agreement
from offramp.tools.runs import bench_prompt_ids, load_prompts, run_hf
from offramp.tools.teacher_forcing import teacher_forced_agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="none:float32,bf16:bfloat16,int8:bfloat16,int4:bfloat16")
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument(
        "--decode-concurrency", type=int, default=16, help="requests at a time along decode steps (1: lone rows)"
    )
    parser.add_argument("--weight-group-size", type=int, default=32)
    parser.add_argument("--fused-decode", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--int16-activations", action=argparse.BooleanOptionalAction, default=None, help="default: the engine's"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    prompts = load_prompts()[: args.num_prompts]
    reference = None
    for spec in args.formats.split(","):
        weights, dtype = spec.split(":")
        config = EngineConfig(
            model=args.model,
            dtype=dtype,
            weights=weights,
            weight_group_size=args.weight_group_size,
            num_threads=args.num_threads,
            fused_decode=args.fused_decode,
            int16_activations=args.int16_activations if weights in ("int4", "int8") else None,
        )
        engine = LLMEngine(config)
        ids = bench_prompt_ids(engine, prompts, len(prompts))
        if reference is None:
            _, reference = run_hf(engine.checkpoint, torch.float32, ids, 1, args.max_tokens, engine.eos_ids, False)
        agree = [ok for p, o in zip(ids, reference) for ok in teacher_forced_agreement(engine, p, o)]
        decode = [ok for row in reference_agreement(engine, ids, reference, args.decode_concurrency) for ok in row]
        row = {
            "dtype": dtype,
            "weights": weights,
            "weight_group_size": args.weight_group_size if weights == "int4" else None,
            "num_prompts": len(prompts),
            "num_tokens": len(agree),
            "fused_decode": args.fused_decode and dtype == "bfloat16",
            "int16_activations": bool(getattr(engine.weights.lm_head, "int16_act", False)),
            "token_agreement_vs_hf_float32": round(sum(agree) / len(agree), 4),
            "decode_agreement_vs_hf_float32": round(sum(decode) / len(decode), 4),
            "decode_concurrency": args.decode_concurrency,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
