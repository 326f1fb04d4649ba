"""Cost of a verification step with k = 0..8 draft rows, relative to a plain decode step.

One sequence of the default model; its draft source always drafts tokens the model rejects, so every
verification keeps one token and the step's shape stays fixed; step times are interleaved over k and
the median per k is divided by k = 0's. The printed ``costs`` tuple is what ``engine/spec.py``'s
``VERIFY_STEP_COST`` holds for the format. One JSON line.

Usage: .venv/bin/python perf/verify_cost.py --dtype bfloat16 --weights int4 [--rounds 12] [--num-threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from offramp.config import EngineConfig
from offramp.engine.drafts import DraftSource
from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MAX_K = 8


class RejectedDraft(DraftSource):
    """Drafts token 0 in every slot (never the model's choice after a real prompt)."""

    name = "exit"

    def propose(self, items):
        return [[0] * item.num_draft_slots for item in items]


def step_ms(engine: LLMEngine, k: int, steps: int) -> list[float]:
    """Times of ``steps`` decode steps of one fresh request with ``k`` drafts per step (k = 0: plain)."""
    engine.spec.lengths.max_draft = k
    mode = "lossless" if k else "early_exit"
    params = SamplingParams(max_tokens=256, mode=mode, ignore_eos=True)  # room for every draft slot
    request_id = f"k{k}-{time.monotonic_ns()}"
    engine.add_request(request_id, engine.encode(PROMPT), params)
    engine.step()  # the prompt
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1000)
    engine.abort(request_id)
    while engine.has_work:
        engine.step()
    return times[1:]  # not the first decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--weights", default="int4")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--num-threads", type=int, default=2)
    args = parser.parse_args()
    config = EngineConfig(
        model="default",
        dtype=args.dtype,
        weights=args.weights,
        spec="exit",
        spec_adaptive=False,
        spec_max_draft=MAX_K,
        num_threads=args.num_threads,
    )
    engine = LLMEngine(config)
    engine.spec.set_source("exit", RejectedDraft())
    samples: dict[int, list[float]] = {k: [] for k in range(MAX_K + 1)}
    with torch.inference_mode():
        step_ms(engine, 0, args.steps)  # warm-up
        for r in range(args.rounds):
            order = list(range(MAX_K + 1)) if r % 2 == 0 else list(range(MAX_K, -1, -1))
            for k in order:
                samples[k] += step_ms(engine, k, args.steps)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    row = {
        "dtype": args.dtype,
        "weights": args.weights,
        "num_threads": args.num_threads,
        "plain_step_ms": round(medians[0], 2),
        "step_ms": [round(medians[k], 2) for k in range(MAX_K + 1)],
        "costs": [round(medians[k] / medians[0], 2) for k in range(MAX_K + 1)],
        "samples_per_k": len(samples[0]),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
