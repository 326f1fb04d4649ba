"""Pipeline stages against one process on the same cores (issue 16), in one run:

- tokens/s at each concurrency for ``1 process x 2 threads`` and ``2 stages x 1 thread`` (gloo);
- the pipeline bubble: the share of each stage's wall time spent idle (stage 0 is idle while it waits
  for stage 1; stage 1 is idle whenever it is not computing), averaged over the stages;
- EE-LLM's early return at concurrency 1: time per output token when every decode token leaves at the
  end of stage 0 (stage 1 only fills its K/V, posted, with ``propagate``) against full depth;
- one decode step's per-stage timeline as a PNG.

Usage (a quiet machine; about 5 minutes on 2 cores with the default model):
  PYTHONPATH=backend:export:client python perf/pipeline_bench.py \
      --out docs/bench/pipeline.jsonl --png docs/bench/pipeline_timeline.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine
from offramp.pipeline.placement import place
from offramp.tools.runs import load_prompts, run_engine

SETUPS = {"1 process x 2 threads": {"num_threads": 2}, "2 stages x 1 thread": {"pipeline_stages": 2, "num_threads": 1}}


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="docs/bench/pipeline.jsonl")
    parser.add_argument("--png", default="docs/bench/pipeline_timeline.png")
    return parser.parse_args()


def _bubble(engine: LLMEngine, wall_start: float, wall_end: float) -> dict:
    """Idle share per stage over [wall_start, wall_end]: stage 0 idles while waiting for the others."""
    wall = wall_end - wall_start
    stages = engine.backend.stages
    waited = sum(e - s for st in stages[1:] for s, e in st.waits.intervals)
    idle = [waited / wall] + [1 - sum(e - s for s, e in st.busy.intervals) / wall for st in stages[1:]]
    return {"stage_idle_share": [round(x, 3) for x in idle], "bubble_share": round(sum(idle) / len(idle), 3)}


def _measure(engine: LLMEngine, prompts: list[list[int]], concurrency: int, params: SamplingParams) -> dict:
    piped = engine.placement is not None
    if piped:
        engine.backend.record_busy(True)
    start = time.time()
    metrics, _ = run_engine(engine, prompts, concurrency, params.max_tokens, progress=False, params=params)
    if piped:
        metrics.update(_bubble(engine, start, time.time()))
        engine.backend.record_busy(False)
    return metrics


def _early_return(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Time per output token at concurrency 1: every decode token leaves at the end of stage 0
    (similarity threshold -1: always confident) against full depth, same engine."""
    full = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    leave = SamplingParams(max_tokens=max_tokens, ignore_eos=True, exit_policy="similarity", exit_threshold=-1.0)
    a = run_engine(engine, prompts[:4], 1, max_tokens, progress=False, params=full)[0]
    b = run_engine(engine, prompts[:4], 1, max_tokens, progress=False, params=leave)[0]
    return {
        "tpot_ms_full_depth": a["tpot_ms_p50"],
        "tpot_ms_early_return": b["tpot_ms_p50"],
        "saved_ms_per_token": round(a["tpot_ms_p50"] - b["tpot_ms_p50"], 2),
        "mean_exit_layer": b["mean_exit_layer"],
        "kv_fill_cost_frac": b["kv_fill_cost_frac"],
    }


def _timeline(engine: LLMEngine, prompts: list[list[int]], path: Path, concurrency: int) -> None:
    """One decode step at ``concurrency`` with every stage's busy intervals, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for i, ids in enumerate(prompts[:concurrency]):
        engine.add_request(f"timeline-{i}", ids, SamplingParams(max_tokens=8, ignore_eos=True))
    while any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)
    ):
        engine.step()  # until every sequence decodes
    engine.backend.record_busy(True)
    start = time.time()
    engine.step()
    end = time.time()
    stages = engine.backend.stages
    rows = {
        "stage 0 (blocks)": stages[0].busy.intervals,
        "stage 0 waits": [w for st in stages[1:] for w in st.waits.intervals],
    }
    for k, st in enumerate(stages[1:], start=1):
        rows[f"stage {k} (blocks)"] = st.busy.intervals
    engine.backend.record_busy(False)
    while engine.has_work:
        engine.step()
    fig, ax = plt.subplots(figsize=(9, 2.6))
    for y, spans in enumerate(rows.values()):
        ax.broken_barh([((s - start) * 1e3, (e - s) * 1e3) for s, e in spans], (y - 0.35, 0.7))
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel(f"ms within one decode step ({concurrency} sequences, {end - start:.3f} s)")
    ax.set_xlim(0, (end - start) * 1e3)
    ax.set_title("Pipeline stages: busy intervals in one step (micro-batches in flight)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    args = _args()
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    for label, setup in SETUPS.items():
        config = EngineConfig(model=args.model, **setup)
        engine = LLMEngine(config)
        prompts = [engine.encode(p) for p in load_prompts()]
        try:
            for c in levels:
                batch = (prompts * (2 * c // len(prompts) + 1))[: max(8, 2 * c)]
                row = {"setup": label, "concurrency": c, **setup, **_measure(engine, batch, c, params)}
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if engine.placement is not None:
                _timeline(engine, prompts, Path(args.png), max(levels))
        finally:
            engine.close()
    stage_end = (
        place(
            config.block_ranges(engine.num_layers),
            ["cpu", "cpu"],
            [1.0] * len(config.block_ranges(engine.num_layers)),
            True,
        )
        .stages[0]
        .layers[1]
    )
    for fill in ("propagate", "recompute"):
        engine = LLMEngine(
            EngineConfig(model=args.model, pipeline_stages=2, num_threads=1, exit_points=(stage_end,), kv_fill=fill)
        )
        try:
            row = {"setup": "2 stages x 1 thread, early return", "kv_fill": fill, "exit_depth": stage_end}
            row.update(_early_return(engine, prompts, args.max_tokens))
        finally:
            engine.close()
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
