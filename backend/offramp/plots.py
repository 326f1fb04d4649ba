"""Charts drawn next to benchmark JSON files."""

from __future__ import annotations

import json
from pathlib import Path


def _label(row: dict) -> str:
    label = f"{row['engine']} {row['dtype']}\nc={row['concurrency']}"
    if row.get("exit_policy", "none") != "none":
        label += f"\n{row['exit_policy']} {row['exit_threshold']}"
    return label


def plot_bench(jsonl: Path) -> Path:
    """Bar chart of tokens/s per run in a bench JSONL file (HF baseline beside it when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [_label(r) for r in rows]
    ours = [r["tokens_per_s"] for r in rows]
    hf = [r.get("hf_tokens_per_s") or 0 for r in rows]
    full = [r.get("full_depth_tokens_per_s") or 0 for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="Offramp")
    if any(hf):
        ax.bar([i + 0.2 for i in x], hf, width=0.4, label="HF transformers generate")
    elif any(full):
        ax.bar([i + 0.2 for i in x], full, width=0.4, label="Offramp, full depth (same run)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("generated tokens / s")
    ax.set_title("offramp bench")
    ax.legend()
    fig.tight_layout()
    png = jsonl.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def plot_tradeoff(jsonl: Path) -> Path:
    """Speed against quality for early-exit runs: speedup over full depth (same run) vs token agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("full_depth_tokens_per_s")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"propagate": "o", "recompute": "s"}
    for r in rows:
        policy = r["exit_policy"] + ("+gate" if r.get("exit_gate") else "")
        speedup = r["tokens_per_s"] / r["full_depth_tokens_per_s"]
        ax.scatter(
            r["token_agreement"],
            speedup,
            marker=markers.get(r["kv_fill"], "x"),
            s=50,
            color={"softmax": "C0", "similarity": "C1", "softmax+gate": "C2"}.get(policy, "C3"),
        )
        ax.annotate(
            f"{policy} {r['exit_threshold']}",
            (r["token_agreement"], speedup),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("token agreement with full depth (teacher-forced)")
    ax.set_ylabel("speed / full depth (same run)")
    ax.set_title("early exit: speed vs quality (o propagate, s recompute)")
    fig.tight_layout()
    png = jsonl.with_name(jsonl.stem + "_tradeoff.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
