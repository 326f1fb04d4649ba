"""Where a decode step's time goes on a GPU: host (Python, launches) or the kernels themselves.

Runs ``--concurrency`` requests to steady decode on ``--model`` (float32 or bfloat16, ``--weights``), then
profiles ``--steps`` engine steps with ``torch.profiler`` (CPU and CUDA activity), twice: the first pass
captures the CUDA graphs of the buckets that the second, reported, replays. Reports the wall
time per step, the GPU's busy time per step (the sum of kernel durations) and kernel launches per step:
a wall time far above the busy time says the step is bound by the host, which CUDA graphs (one replay
per step instead of hundreds of launches) removes. One JSON line per concurrency.

Usage: python perf/gpu/step_profile.py --model PATH [--dtype bfloat16] [--concurrency 1 16] [--steps 20]
       [--no-cuda-graphs]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from offramp import EngineConfig, SamplingParams
from offramp.engine.llm_engine import LLMEngine


def measure(engine: LLMEngine, concurrency: int, steps: int) -> dict:
    params = SamplingParams(max_tokens=steps * 2 + 8, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(f"p{concurrency}-{i}", [3 + i, 4, 5, 6, 7, 8], params)
    for _ in range(4):  # prefill and warm-up decode steps
        engine.step()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    while engine.has_work:
        engine.step()
    return {
        "device": str(engine.device),
        "dtype": engine.config.dtype,
        "weights": engine.config.weights,
        "concurrency": concurrency,
        "cuda_graphs": engine.runner.loop.graphs is not None,
        "wall_ms_per_step": round(wall_ms, 3),
        "gpu_busy_ms_per_step": round(busy_us / 1e3 / steps, 3),
        "kernels_per_step": round(len(kernels) / steps, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    config = EngineConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        max_num_seqs=64,
        cuda_graphs=args.cuda_graphs,
    )
    engine = LLMEngine(config)
    for c in args.concurrency:
        measure(engine, c, args.steps)  # a warm pass: captures the graphs that the measured pass replays
        print(json.dumps(measure(engine, c, args.steps)), flush=True)


if __name__ == "__main__":
    main()
