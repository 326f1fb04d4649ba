"""The timed runs a benchmark is made of: prompts, the engine in a closed loop, HF ``generate``."""

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
        **_sparsity_metrics(engine, wall),
        "kv_fill_cost_frac": round(stats.fill_s / wall, 4),
        "recomputed_rows": stats.recomputed_rows,
        "num_output_tokens": num_tokens,
        "num_preemptions": sum(s.num_preemptions for s in seqs),
        "wall_s": round(wall, 3),
    }
    return metrics, [s.output_token_ids for s in seqs]


def _sparsity_metrics(engine: LLMEngine, wall: float) -> dict:
    """Contextual sparsity in the timed run: ``density`` (mean share of FFN groups the sparse decode
    rows computed; 1.0 without sparsity) and ``predictor_cost_frac`` (predictor time / wall time)."""
    sparse = engine.runner.sparse
    if sparse is None or sparse.stats.mean_density is None:
        return {"density": 1.0, "head_density": 1.0, "predictor_cost_frac": 0.0}
    return {
        "density": sparse.stats.mean_density,
        "head_density": sparse.stats.mean_head_density,
        "predictor_cost_frac": round(sparse.stats.predictor_s / wall, 4) if wall else None,
        "ffn_runs_per_layer": sparse.stats.runs_per_layer,
    }


def run_hf(
    checkpoint: Path,
    dtype: torch.dtype,
    prompt_ids: list[list[int]],
    batch_size: int,
    max_tokens: int,
    eos_ids: set[int],
    progress: bool = True,
    **generate_kwargs,
) -> tuple[dict, list[list[int]]]:
    """HF ``generate`` on static, left-padded batches of ``batch_size`` (greedy), tokens counted up to EOS;
    ``generate_kwargs`` go to ``generate`` (HF's own speculative decoding, e.g. ``assistant_early_exit``)."""
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
                **generate_kwargs,
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


def bench_prompt_ids(engine: LLMEngine, prompts: list[str], num_requests: int) -> list[list[int]]:
    """The token ids of ``num_requests`` requests cycling through ``prompts``."""
    return [engine.encode(prompts[i % len(prompts)]) for i in range(num_requests)]


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens
