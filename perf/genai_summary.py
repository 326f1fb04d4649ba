"""Summarize genai-perf runs (``perf/genai_perf.sh``) into ``genai_perf.json`` and ``genai_perf.md``.

Each run argument is ``TARGET=CONCURRENCY=ARTIFACT_DIR``; the directory holds genai-perf's
``profile_export_genai_perf.json`` (in a subfolder). The table puts the two ways in side by side
per concurrency, with the gateway's output tokens/s as a fraction of Triton gRPC's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

FIELDS = {  # our name -> (genai-perf metric, statistic)
    "ttft_ms_avg": ("time_to_first_token", "avg"),
    "ttft_ms_p50": ("time_to_first_token", "p50"),
    "ttft_ms_p99": ("time_to_first_token", "p99"),
    "itl_ms_avg": ("inter_token_latency", "avg"),
    "itl_ms_p99": ("inter_token_latency", "p99"),
    "latency_ms_p50": ("request_latency", "p50"),
    "latency_ms_p90": ("request_latency", "p90"),
    "latency_ms_p99": ("request_latency", "p99"),
    "output_tokens_per_s": ("output_token_throughput", "avg"),
    "requests_per_s": ("request_throughput", "avg"),
    "requests": ("request_count", "avg"),
    "output_tokens_avg": ("output_sequence_length", "avg"),
}


def read_run(spec: str) -> dict:
    target, concurrency, directory = spec.split("=", 2)
    found = sorted(Path(directory).rglob("profile_export_genai_perf.json"))
    if not found:
        raise SystemExit(f"genai_summary: no profile_export_genai_perf.json under {directory}")
    metrics = json.loads(found[0].read_text(encoding="utf-8"))
    row = {"target": target, "concurrency": int(concurrency)}
    for name, (metric, stat) in FIELDS.items():
        value = metrics.get(metric, {}).get(stat)
        row[name] = None if value is None else round(float(value), 3)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| way in | concurrency | requests | output tok/s | vs Triton | TTFT avg / p99 (ms) "
        "| ITL avg (ms) | latency p50 / p99 (ms) |\n|---|---|---|---|---|---|---|---|\n"
    )
    triton = {r["concurrency"]: r["output_tokens_per_s"] for r in rows if r["target"] == "triton"}
    lines = []
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["target"] != "triton")):
        base = triton.get(r["concurrency"])
        ratio = f"{r['output_tokens_per_s'] / base:.2f}x" if base and r["target"] != "triton" else ""
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {r['requests']:.0f} | {r['output_tokens_per_s']:.1f} | {ratio} "
            f"| {r['ttft_ms_avg']:.0f} / {r['ttft_ms_p99']:.0f} | {r['itl_ms_avg']:.1f} "
            f"| {r['latency_ms_p50']:.0f} / {r['latency_ms_p99']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", help="TARGET=CONCURRENCY=ARTIFACT_DIR")
    parser.add_argument("--isl", type=int, required=True)
    parser.add_argument("--osl", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [read_run(spec) for spec in args.runs]
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    meta = {"tool": "genai-perf 0.0.16", "isl": args.isl, "osl": args.osl, "when_utc": when, "host": platform.node()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "genai_perf.json").write_text(json.dumps({**meta, "runs": rows}, indent=1) + "\n", encoding="utf-8")
    intro = (
        f"genai-perf 0.0.16, {args.isl} input / {args.osl} output tokens per request (fixed), streaming; "
        f"triton = gRPC `--endpoint-type kserve --backend vllm`, openai = the gateway's /v1/completions (the same prompt text), "
        f"openai-chat = its /v1/chat/completions (the chat template adds a system message). "
        f"{when} UTC, `make perf-genai`.\n\n"
    )
    (args.out / "genai_perf.md").write_text(intro + table(rows), encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
