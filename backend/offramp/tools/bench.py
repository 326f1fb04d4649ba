"""``offramp bench``: closed-loop throughput and latency of the engine, optionally against HF."""

from __future__ import annotations

import os
import statistics
import time

import torch

from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.model import fused
from offramp.model.device import cpu_vector_isa
from offramp.model.weight_bytes import resident_weight_bytes, weight_bytes_per_token
from offramp.tools.runs import bench_prompt_ids, run_engine, run_hf


def quality_vs_full_depth(
    engine: LLMEngine,
    prompt_ids: list[list[int]],
    outputs: list[list[int]],
    concurrency: int,
    max_tokens: int,
    progress: bool,
    ignore_eos: bool = False,
) -> dict:
    """After the timed run, against a full-depth greedy run of the same prompts (same ``ignore_eos``):
    ``reference_agreement``, ``lcs_frac``, ``distinct2`` beside ``full_depth_distinct2``,
    ``sequence_match`` and ``self_teacher_agreement`` (see ``tools/quality.py``)."""
    from offramp.tools.quality import quality_metrics

    full = SamplingParams(max_tokens=max_tokens, exit_policy="none", ignore_eos=ignore_eos)
    metrics, full_outputs = run_engine(engine, prompt_ids, concurrency, max_tokens, progress, params=full)
    quality = quality_metrics(engine, prompt_ids, outputs, full_outputs, concurrency)
    return {**quality, "full_depth_tokens_per_s": metrics["tokens_per_s"]}


def bench(
    engine: LLMEngine,
    prompts: list[str],
    num_requests: int,
    concurrency: int,
    max_tokens: int,
    compare_hf: bool = False,
    progress: bool = True,
    ignore_eos: bool = False,
    compare_llamacpp: bool = False,
    rounds: int = 1,
) -> dict:
    """One JSON-able result line: the engine's figures, and HF's or llama.cpp's when asked, measured
    back to back. With a draft source and ``rounds`` > 1, lossless and plain decoding run ``rounds``
    times each, interleaved (plain first in every other pair): tokens/s are medians, ``speedup`` the
    median of the pairs' ratios."""
    prompt_ids = bench_prompt_ids(engine, prompts, num_requests)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    metrics, outputs = run_engine(engine, prompt_ids, concurrency, max_tokens, progress, params=params)
    cfg = engine.config
    spec = _spec_metrics(engine, metrics) if cfg.spec != "none" else {}  # before other runs reset the stats
    result = {
        "backend": engine.config.backend,
        "model": engine.config.model,
        "dtype": engine.config.dtype,
        "weights": cfg.weights,
        "weight_group_size": cfg.weight_group_size if cfg.weights == "int4" else None,
        "int16_activations": bool(getattr(engine.weights.lm_head, "int16_act", False)),  # the AVX2 kernels' scheme
        "weight_bytes": resident_weight_bytes(engine.weights),
        "weight_bytes_per_token": weight_bytes_per_token(engine.weights),
        "layers_per_block": engine.config.layers_per_block,
        "batch_invariant": _batch_invariant(engine),
        "placement": None if engine.placement is None else engine.placement.as_dict(),  # devices / stages
        "device": str(engine.device),
        "cuda_graph_replays": None if engine.runner.loop.graphs is None else engine.runner.loop.graphs.num_replays,
        "concurrency": concurrency,
        "num_requests": num_requests,
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
        "num_threads": torch.get_num_threads(),
        "cpu_vector": cpu_vector_isa(),  # the CPU's, whatever the engine's device
        # the kernels built for a narrower CPU than this one (OFFRAMP_KERNELS_ISA; model/fused.py), if so
        **({"kernels_isa": os.environ["OFFRAMP_KERNELS_ISA"]} if os.environ.get("OFFRAMP_KERNELS_ISA") else {}),
        "exit_policy": cfg.exit_policy,
        "exit_threshold": cfg.exit_threshold if cfg.exit_policy != "none" else None,
        "min_exit_layer": cfg.min_exit_depth(engine.num_layers),
        "kv_fill": cfg.kv_fill,
        "exit_head": engine.runner.head.name,
        "exit_gate": cfg.exit_gate if cfg.exit_policy == "softmax" else None,
        "exit_gate_threshold": cfg.exit_gate_threshold if cfg.exit_gate and cfg.exit_policy == "softmax" else None,
        **metrics,
    }
    if spec:
        result.update(spec)
        result.update(_spec_vs_plain(engine, prompt_ids, outputs, concurrency, max_tokens, progress, ignore_eos))
        result["speedup"] = round(result["tokens_per_s"] / result["plain_tokens_per_s"], 3)
        if rounds > 1:  # each pair's ratio cancels the machine's drift; their median is the figure
            result.update(
                _spec_rounds(engine, prompt_ids, concurrency, max_tokens, progress, ignore_eos, rounds, result)
            )
            result["speedup"] = round(statistics.median(result["round_speedups"]), 3)
    if cfg.exit_policy != "none":
        result.update(quality_vs_full_depth(engine, prompt_ids, outputs, concurrency, max_tokens, progress, ignore_eos))
    if compare_hf:
        hf_metrics, hf_outputs = run_hf(
            engine.checkpoint, engine.dtype, prompt_ids, concurrency, max_tokens, engine.eos_ids, progress
        )
        result.update(hf_metrics)
        result["speedup_vs_hf"] = round(result["tokens_per_s"] / hf_metrics["hf_tokens_per_s"], 3)
        same = sum(a == b for a, b in zip(outputs, hf_outputs))
        result["hf_sequence_match"] = round(same / len(outputs), 3)
        if cfg.spec in HF_SPEC:
            result.update(_hf_spec(engine, prompt_ids, max_tokens, progress))
    if compare_llamacpp:
        result.update(_llamacpp(engine, prompt_ids, max_tokens, ignore_eos, result["tokens_per_s"]))
    if concurrency == 1 and engine.device.type == "cpu":  # each token reads every weight once
        result["weight_gb_per_s"] = round(result["weight_bytes_per_token"] * result["tokens_per_s"] / 1e9, 2)
        result["read_gb_per_s"] = read_bandwidth_gb_per_s()
    return result


def read_bandwidth_gb_per_s(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """The machine's read bandwidth as torch sees it on the current threads: the median time of a
    sum over a ``size_bytes`` float32 tensor (too large for any cache), in GB/s."""
    data = torch.ones(size_bytes // 4)  # [n] float32
    data.sum()  # pages touched before timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return round(size_bytes / statistics.median(times) / 1e9, 2)


HF_SPEC = {  # our draft source -> HF generate's own form of it (batch size 1 only in HF)
    "exit": "assistant_early_exit",  # LayerSkip: the first d layers and the LM head draft
    "ngram": "prompt_lookup_num_tokens",  # prompt lookup
}


def _hf_spec(engine: LLMEngine, prompt_ids: list[list[int]], max_tokens: int, progress: bool) -> dict:
    """HF ``generate`` with its own speculative decoding of the same kind as ``--spec`` against plain HF
    ``generate``, both one request at a time (HF's assisted generation refuses larger batches), same prompts."""
    cfg = engine.config
    value = engine.spec.exit_depth() if cfg.spec == "exit" else cfg.spec_max_draft
    args = (engine.checkpoint, engine.dtype, prompt_ids, 1, max_tokens, engine.eos_ids, progress)
    plain, plain_out = run_hf(*args)
    spec, spec_out = run_hf(*args, **{HF_SPEC[cfg.spec]: value})
    same = sum(a == b for a, b in zip(plain_out, spec_out))
    return {
        "hf_spec": f"{HF_SPEC[cfg.spec]}={value}",
        "hf_spec_tokens_per_s": spec["hf_tokens_per_s"],
        "hf_batch1_tokens_per_s": plain["hf_tokens_per_s"],
        "hf_spec_speedup": round(spec["hf_tokens_per_s"] / plain["hf_tokens_per_s"], 3),
        "hf_spec_sequence_match": round(same / len(plain_out), 3),
    }


def _llamacpp(engine: LLMEngine, prompt_ids: list[list[int]], max_tokens: int, ignore_eos: bool, ours: float) -> dict:
    """llama.cpp on the same GGUF, same token ids, one request at a time (``tools/llamacpp.py``)."""
    from offramp.model.loader import source_gguf
    from offramp.tools import llamacpp

    gguf = source_gguf(engine.config.model)
    found = llamacpp.compare(gguf, prompt_ids, max_tokens, ignore_eos, torch.get_num_threads(), engine.eos_ids)
    if "llamacpp_tokens_per_s" in found:
        found["speedup_vs_llamacpp"] = round(ours / found["llamacpp_tokens_per_s"], 3)
    return found


def _spec_metrics(engine: LLMEngine, metrics: dict) -> dict:
    """Lossless mode's figures of the timed run (``--spec``)."""
    stats, cfg = engine.runner.stats, engine.config
    drafts, accepted, verified = stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_verifications
    return {
        "spec": cfg.spec,
        "spec_max_draft": cfg.spec_max_draft,
        "spec_adaptive": cfg.spec_adaptive,
        "spec_exit_depth": engine.spec.exit_depth() if cfg.spec in ("exit", "easyspec") else None,
        "spec_group_size": cfg.spec_group_size if cfg.spec == "easyspec" else None,
        "spec_verify_costs": [round(c, 3) for c in engine.spec.lengths.costs],  # verification step, k drafts
        "draft_tokens": drafts,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / drafts, 4) if drafts else None,
        "num_verifications": verified,
        "mean_accepted_per_verify": round(accepted / verified, 3) if verified else None,
        "draft_cost_frac": round(stats.draft_s / metrics["wall_s"], 4) if metrics["wall_s"] else None,
    }


def _batch_invariant(engine: LLMEngine) -> bool:
    """Whether every row runs the fused per-row kernels (``batch_invariant`` in effect)."""
    backend = engine.runner.backend
    return getattr(backend, "fused", None) is not None and getattr(backend, "max_rows", 0) == fused.ALL_ROWS


def _plain_params(max_tokens: int, ignore_eos: bool) -> SamplingParams:
    """Plain decoding for the comparison: full depth, no drafts, whatever the server's settings."""
    return SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, exit_policy="none", mode="early_exit")


def _spec_rounds(
    engine: LLMEngine,
    prompt_ids: list[list[int]],
    concurrency: int,
    max_tokens: int,
    progress: bool,
    ignore_eos: bool,
    rounds: int,
    first: dict,
) -> dict:
    """``rounds`` - 1 more pairs of lossless and plain runs after the first (``first``: its tokens/s),
    in alternating order, so that drift on a noisy machine falls on both sides; medians of each and
    every pair's ratio. Draft counters stay those of the first lossless run."""
    lossless = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    plain = _plain_params(max_tokens, ignore_eos)
    speeds = {"lossless": [first["tokens_per_s"]], "plain": [first["plain_tokens_per_s"]]}
    for i in range(1, rounds):
        order = (("plain", plain), ("lossless", lossless)) if i % 2 else (("lossless", lossless), ("plain", plain))
        for name, params in order:
            metrics, _ = run_engine(engine, prompt_ids, concurrency, max_tokens, progress, params=params)
            speeds[name].append(metrics["tokens_per_s"])
    return {
        "rounds": rounds,
        "round_speedups": [round(a / b, 3) for a, b in zip(speeds["lossless"], speeds["plain"])],
        "tokens_per_s": round(statistics.median(speeds["lossless"]), 2),
        "plain_tokens_per_s": round(statistics.median(speeds["plain"]), 2),
    }


def _spec_vs_plain(
    engine: LLMEngine,
    prompt_ids: list[list[int]],
    outputs: list[list[int]],
    concurrency: int,
    max_tokens: int,
    progress: bool,
    ignore_eos: bool,
) -> dict:
    """The same prompts decoded plainly (full depth, no drafts) in the same run: its speed, and the
    share of outputs identical to the lossless run's (1.0 unless a float near-tie flips)."""
    plain = _plain_params(max_tokens, ignore_eos)
    metrics, plain_outputs = run_engine(engine, prompt_ids, concurrency, max_tokens, progress, params=plain)
    same = sum(a == b for a, b in zip(outputs, plain_outputs))
    return {"plain_tokens_per_s": metrics["tokens_per_s"], "sequence_match": round(same / len(outputs), 4)}
