"""How fast prompt lookup (``--spec ngram``) could possibly decode, given each weight format's measured
verification cost: plain greedy outputs of a prompt set, then, along each output, the drafts the n-gram
lookup proposes and how many of them the full model's own text accepts. Three policies are costed in
decode steps (a verification of k drafts costs ``spec.VERIFY_STEP_COST[k]`` plain steps):

- ``oracle``: at every step the draft length that knows in advance how many drafts will hold (the bound
  for any adaptive length with this draft source and these costs);
- ``fixed_k``: always k drafts where the lookup finds them;
- plain decoding: one step per token.

The ratio plain / policy is the decode speedup before the prompt's own time (which speculation does not
shorten). Prints one JSON line per cost table.

    .venv/bin/python perf/ngram_bound.py --formats int4,none --output docs/bench/spec_bound.jsonl
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

from offramp import EngineConfig, SamplingParams
from offramp.engine.drafts import ngram_lookup
from offramp.engine.llm_engine import LLMEngine
from offramp.engine.spec import VERIFY_STEP_COST


def accepted(prompt: list[int], out: list[int], i: int, k: int) -> tuple[int, int]:
    """(drafts proposed, drafts the output accepts) at output position ``i`` with up to k drafts."""
    drafts = ngram_lookup(prompt + out[:i], k)
    n = 0
    while n < len(drafts) and i + n < len(out) and drafts[n] == out[i + n]:
        n += 1
    return len(drafts), n


def costed(prompt: list[int], out: list[int], cost: tuple[float, ...], k: int | None) -> float:
    """Decode steps (in plain-step units) to produce ``out`` after its first token; k None: oracle."""
    i, steps = 1, 0.0
    while i < len(out):
        proposed, good = accepted(prompt, out, i, len(cost) - 1 if k is None else k)
        if k is None:  # the best length knowing that `good` drafts hold
            proposed = max(range(good + 1), key=lambda j: (j + 1) / cost[j])
            good = proposed
        steps += cost[proposed]
        i += good + 1
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int4,none", help="weights of the bfloat16 cost tables (int4, int8, none)")
    ap.add_argument("--prompts-file", default=None, help="JSONL with a 'prompt' field (default: the copy set)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--output", default=None, help="append the JSON lines here")
    args = ap.parse_args()
    path = args.prompts_file or resources.files("offramp.data").joinpath("copy_prompts.jsonl")
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    engine = LLMEngine(EngineConfig(model="default", dtype="bfloat16", weights="int4", num_threads=args.num_threads))
    ids = [engine.encode(p) for p in prompts]
    outs = [o.token_ids for o in engine.generate(ids, SamplingParams(max_tokens=args.max_tokens))]
    plain = sum(len(o) - 1 for o in outs)
    for weights in args.formats.split(","):
        cost = VERIFY_STEP_COST[("bfloat16", weights)]
        row = {
            "prompts": str(path).rsplit("/", 1)[-1],
            "num_prompts": len(prompts),
            "num_output_tokens": sum(map(len, outs)),
            "verify_costs": "bfloat16/" + weights,
            "plain_decode_steps": plain,
            "oracle_speedup": round(plain / sum(costed(p, o, cost, None) for p, o in zip(ids, outs)), 3),
        }
        for k in (1, 2, 3, 4, 8):
            row[f"fixed_{k}_speedup"] = round(plain / sum(costed(p, o, cost, k) for p, o in zip(ids, outs)), 3)
        line = json.dumps(row)
        print(line)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
