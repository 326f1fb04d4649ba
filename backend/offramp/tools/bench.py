"""``offramp bench``: closed-loop throughput and latency of the engine, optionally against HF."""

from __future__ import annotations

import json
import statistics
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.engine.sequence import Sequence


def load_prompts(path: str | None = None, bundled: str = "prompts.jsonl") -> list[str]:
    """Prompts from a JSONL file (one object with a "prompt" field per line), or a bundled set."""
    if path is None:
        text = resources.files("offramp").joinpath(f"data/{bundled}").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"prompts-file: line {number} is not a JSON object with a 'prompt' field") from exc
    if not prompts:
        raise ValueError("prompts-file: holds no prompts")
    return prompts


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1e3, 2) if values else None


def run_engine(
    engine: LLMEngine,
    prompt_ids: list[list[int]],
    concurrency: int,
    max_tokens: int,
    progress: bool = True,
    params: SamplingParams | None = None,
) -> tuple[dict, list[list[int]]]:
    """Keep ``concurrency`` requests in flight until all are done. Returns metrics and outputs."""
    params = params or SamplingParams(max_tokens=max_tokens)
    engine.generate([prompt_ids[0][:8]], SamplingParams(max_tokens=4))  # warm-up
    engine.runner.reset_stats()
    pending = list(enumerate(prompt_ids))
    done: dict[int, Sequence] = {}
    inflight: dict[str, int] = {}
    bar = tqdm(total=len(prompt_ids), desc="offramp", unit="req", disable=not progress, leave=False)
    start = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            index, ids = pending.pop(0)
            inflight[f"bench-{index}"] = index
            engine.add_request(f"bench-{index}", ids, params)
        _, finished = engine.step()
        for seq in finished:
            done[inflight.pop(seq.request_id)] = seq
            bar.update(1)
    wall = time.perf_counter() - start
    bar.close()
    seqs = [done[i] for i in range(len(prompt_ids))]
    num_tokens = sum(len(s.output_token_ids) for s in seqs)
    exits = [d for s in seqs for d in s.exit_layers]
    stats = engine.runner.stats
    ttft = [s.first_token_time - s.arrival_time for s in seqs if s.first_token_time]
    tpot = [
        (s.finish_time - s.first_token_time) / (len(s.output_token_ids) - 1)
        for s in seqs
        if len(s.output_token_ids) > 1
    ]
    metrics = {
        "tokens_per_s": round(num_tokens / wall, 2),
        "requests_per_s": round(len(seqs) / wall, 3),
        "ttft_ms_p50": _p50(ttft),
        "tpot_ms_p50": _p50(tpot),
        "num_layers": engine.num_layers,
        "mean_exit_layer": round(sum(exits) / len(exits), 3) if exits else None,
        "exit_rate": round(sum(d < engine.num_layers for d in exits) / len(exits), 4) if exits else None,
        "layers_saved_frac": round(1 - sum(exits) / (len(exits) * engine.num_layers), 4) if exits else None,
        "check_cost_frac": round(stats.check_s / wall, 4),
        "kv_fill_cost_frac": round(stats.fill_s / wall, 4),
        "recomputed_rows": stats.recomputed_rows,
        "num_output_tokens": num_tokens,
        "num_preemptions": sum(s.num_preemptions for s in seqs),
        "wall_s": round(wall, 3),
    }
    return metrics, [s.output_token_ids for s in seqs]


def run_hf(
    checkpoint: Path,
    dtype: torch.dtype,
    prompt_ids: list[list[int]],
    batch_size: int,
    max_tokens: int,
    eos_ids: set[int],
    progress: bool = True,
) -> tuple[dict, list[list[int]]]:
    """HF ``generate`` on static, left-padded batches of ``batch_size`` (greedy), tokens counted up to EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else min(eos_ids)

    def generate(batch: list[list[int]]) -> list[list[int]]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=pad,
                top_p=None,
                top_k=None,
                temperature=None,
            )
        return [_until_eos(row[width:].tolist(), eos_ids) for row in out]

    generate([prompt_ids[0][:8]])  # warm-up
    outputs: list[list[int]] = []
    batches = [prompt_ids[i : i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    start = time.perf_counter()
    for batch in tqdm(batches, desc="hf", unit="batch", disable=not progress, leave=False):
        outputs.extend(generate(batch))
    wall = time.perf_counter() - start
    num_tokens = sum(len(o) for o in outputs)
    return {"hf_tokens_per_s": round(num_tokens / wall, 2), "hf_wall_s": round(wall, 3)}, outputs


def quality_vs_full_depth(
    engine: LLMEngine,
    prompt_ids: list[list[int]],
    outputs: list[list[int]],
    concurrency: int,
    max_tokens: int,
    progress: bool,
    ignore_eos: bool = False,
) -> dict:
    """After the timed run: teacher-forced token agreement with the full model, and the share of
    outputs identical to a full-depth greedy run of the same prompts (same ``ignore_eos``)."""
    agree = [ok for p, o in zip(prompt_ids, outputs) for ok in engine.teacher_forced_agreement(p, o)]
    full = SamplingParams(max_tokens=max_tokens, exit_policy="none", ignore_eos=ignore_eos)
    metrics, full_outputs = run_engine(engine, prompt_ids, concurrency, max_tokens, progress, params=full)
    same = sum(a == b for a, b in zip(outputs, full_outputs))
    return {
        "token_agreement": round(sum(agree) / len(agree), 4) if agree else None,
        "sequence_match": round(same / len(outputs), 4),
        "full_depth_tokens_per_s": metrics["tokens_per_s"],
    }


def bench_prompt_ids(engine: LLMEngine, prompts: list[str], num_requests: int) -> list[list[int]]:
    """The token ids of ``num_requests`` requests cycling through ``prompts``."""
    return [engine.encode(prompts[i % len(prompts)]) for i in range(num_requests)]


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def bench(
    engine: LLMEngine,
    prompts: list[str],
    num_requests: int,
    concurrency: int,
    max_tokens: int,
    compare_hf: bool = False,
    progress: bool = True,
    ignore_eos: bool = False,
) -> dict:
    """One JSON-able result line: the engine's figures, and HF's when asked, measured back to back."""
    prompt_ids = bench_prompt_ids(engine, prompts, num_requests)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    metrics, outputs = run_engine(engine, prompt_ids, concurrency, max_tokens, progress, params=params)
    cfg = engine.config
    result = {
        "backend": engine.config.backend,
        "model": engine.config.model,
        "dtype": engine.config.dtype,
        "layers_per_block": engine.config.layers_per_block,
        "concurrency": concurrency,
        "num_requests": num_requests,
        "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
        "num_threads": torch.get_num_threads(),
        "exit_policy": cfg.exit_policy,
        "exit_threshold": cfg.exit_threshold if cfg.exit_policy != "none" else None,
        "min_exit_layer": cfg.min_exit_layer,
        "kv_fill": cfg.kv_fill,
        "exit_head": engine.runner.head.name,
        "exit_gate": cfg.exit_gate if cfg.exit_policy == "softmax" else None,
        "exit_gate_threshold": cfg.exit_gate_threshold if cfg.exit_gate and cfg.exit_policy == "softmax" else None,
        **metrics,
    }
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
    return result
