"""Draw ``docs/bench/gpu.jsonl`` (``perf/gpu_check.sh``'s bench lines): tokens/s per format and
concurrency, each step eager against CUDA graph replays. Writes ``gpu.png`` next to the JSONL.

Usage: python perf/gpu/plot.py [docs/bench/gpu.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: Path) -> Path:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest: dict[tuple[str, str, bool, int], float] = {}  # (dtype, weights, graphs, concurrency) -> tok/s
    for r in rows:  # later runs replace earlier ones
        latest[(r["dtype"], r.get("weights") or "none", bool(r.get("cuda_graph_replays")), r["concurrency"])] = r[
            "tokens_per_s"
        ]
    formats = sorted({(d, w) for d, w, _, _ in latest}, key=lambda f: (f[1], f[0]))
    concurrencies = sorted({c for *_, c in latest})
    fig, axes = plt.subplots(1, len(concurrencies), figsize=(4.2 * len(concurrencies), 3.8))
    for ax, c in zip(axes if len(concurrencies) > 1 else [axes], concurrencies):
        labels = [f"{d}\n{w}" if w != "none" else d for d, w in formats]
        for shift, graphs, color in ((-0.2, False, "#999999"), (0.2, True, "#1f77b4")):
            values = [latest.get((d, w, graphs, c), 0.0) for d, w in formats]
            ax.bar(
                [i + shift for i in range(len(formats))],
                values,
                0.4,
                color=color,
                label="CUDA graphs" if graphs else "eager",
            )
        ax.set_xticks(range(len(formats)), labels, fontsize=8)
        ax.set_title(f"concurrency {c}")
        ax.set_ylabel("tokens/s")
    axes_list = axes if len(concurrencies) > 1 else [axes]
    axes_list[0].legend(fontsize=8)
    gpu = rows[-1].get("gpu", "GPU")
    fig.suptitle(f"Offramp decode on {gpu} (SmolLM2-135M shapes, 64 new tokens per request)", fontsize=10)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench/gpu.jsonl")))
