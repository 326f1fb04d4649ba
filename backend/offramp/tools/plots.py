"""Charts drawn next to benchmark JSON files, and the Markdown of the ``offramp eval`` report."""

from __future__ import annotations

import json
from pathlib import Path


def _label(row: dict) -> str:
    label = f"{row.get('backend', row.get('engine'))} {row['dtype']}\nc={row['concurrency']}"
    if row.get("exit_policy", "none") != "none":
        label += f"\n{row['exit_policy']} {row['exit_threshold']}"
    return label


def quality_of(row: dict) -> tuple[float | None, str]:
    """A bench row's quality figure and its axis label: ``reference_agreement``, or in JSON written
    before it existed, the self-teacher agreement (``token_agreement`` then), which loops can pass."""
    if row.get("reference_agreement") is not None:
        return row["reference_agreement"], "reference agreement (teacher-forced along the full model's output)"
    value = row.get("self_teacher_agreement", row.get("token_agreement"))
    return value, "self-teacher agreement (along its own output; old JSON)"


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
    rows = [r for r in rows if r.get("full_depth_tokens_per_s") and quality_of(r)[0] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"propagate": "o", "recompute": "s"}
    for r in rows:
        policy = r["exit_policy"] + ("+gate" if r.get("exit_gate") else "")
        speedup = r["tokens_per_s"] / r["full_depth_tokens_per_s"]
        quality, xlabel = quality_of(r)
        ax.scatter(
            quality,
            speedup,
            marker=markers.get(r["kv_fill"], "x"),
            s=50,
            color={"softmax": "C0", "similarity": "C1", "softmax+gate": "C2"}.get(policy, "C3"),
        )
        ax.annotate(
            f"{policy} {r['exit_threshold']}",
            (quality, speedup),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(xlabel if rows else "agreement with full depth")
    ax.set_ylabel("speed / full depth (same run)")
    ax.set_title("early exit: speed vs quality (o propagate, s recompute)")
    fig.tight_layout()
    png = jsonl.with_name(jsonl.stem + "_tradeoff.png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


HEAD_LABELS = {"identity": "identity head", "one_jump": "one-jump shortcut", "per_level": "per-level shortcuts"}


def plot_agreement_by_depth(report: dict, png: Path) -> Path:
    """Held-out token agreement with the full model per exit depth, one line per exit head."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for head, curve in report["agreement_by_depth"].items():
        depths = sorted(curve, key=int)
        ax.plot([int(d) for d in depths], [curve[d] for d in depths], marker="o", label=HEAD_LABELS.get(head, head))
    ax.set_xlabel("exit depth (layers run)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("greedy token agreement with full depth")
    ax.set_ylim(0, 1)
    ax.set_title(f"exit heads by depth (held out, {report['settings']['num_eval_tokens']} tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def plot_agreement_by_category(report: dict, png: Path) -> Path:
    """One panel per prompt category: agreement per exit depth for each head."""
    plt = _pyplot()
    by_head = report["agreement_by_category"]
    categories = sorted({c for per_cat in by_head.values() for c in per_cat})
    cols = min(3, len(categories))
    rows = (len(categories) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    counts = report["settings"]["categories"]
    for ax, cat in zip(axes.flat, categories):
        for head, per_cat in by_head.items():
            curve = per_cat.get(cat, {})
            depths = sorted(curve, key=int)
            ax.plot([int(d) for d in depths], [curve[d] for d in depths], marker=".", label=HEAD_LABELS.get(head, head))
        ax.set_title(f"{cat} ({counts.get(cat, 0)} tokens)", fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(categories) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("exit depth (layers run)")
    fig.supylabel("token agreement")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def plot_eval_tradeoff(report: dict, png: Path) -> Path:
    """Simulated token agreement against estimated speedup (checks counted), per head and policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = {"softmax": "-", "classifier": "--", "similarity": ":"}
    colors = {"identity": "C0", "one_jump": "C1", "per_level": "C2"}
    for key, curve in report["curves"].items():
        head, policy = key.split("/")
        ax.plot(
            [r["est_speedup"] for r in curve],
            [r["token_agreement"] for r in curve],
            linestyle=styles.get(policy, "-"),
            color=colors.get(head, "C3"),
            label=f"{HEAD_LABELS.get(head, head)}, {policy}",
        )
    sim = report.get("calibrated_simulated")
    if sim:
        ax.scatter([sim["est_speedup"]], [sim["token_agreement"]], marker="*", s=160, color="black", zorder=5)
        ax.annotate(f"calibrated: {sim['policy']} {sim['threshold']:.3g}", (sim["est_speedup"], sim["token_agreement"]))
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("estimated speedup over full depth (MACs, checks counted)")
    ax.set_ylabel("token agreement with full depth (simulated, held out)")
    ax.set_title("early exit trade-off (threshold sweeps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows
    ]


def render_markdown(report: dict, pngs: list[str]) -> str:
    s, settings = report["summary"], report["settings"]
    depths = [str(d) for d in settings["depths"]]
    lines = [
        "# Early exit: offline trade-off report",
        "",
        f"Simulated on {settings['num_eval_tokens']} held-out tokens (teacher-forced full-depth prefixes) of a "
        f"{settings['num_layers']}-layer model; exit depths {settings['exit_depths']}. A token leaves at the first "
        "exit depth where its policy's score >= threshold and takes that depth's exit-head greedy token; "
        "otherwise it runs to full depth.",
        "",
        "- token agreement: share of tokens equal to the full model's greedy token;",
        "- layer speedup = num_layers / mean exit layer (checks free: an upper bound);",
        "- est. speedup = MACs per token at full depth / mean MACs per token with exits: decoder-layer and head "
        "matrix products plus every check (softmax: the exit head on the full vocabulary at each depth tried; "
        "classifier, similarity: one dot product); attention over the context and K/V fill are not counted.",
        "- thresholds were calibrated on these same held-out tokens: the calibrated agreement is in-sample.",
        "",
        "## Summary",
        "",
        *_table(["figure", "value"], [[k, v] for k, v in s.items()]),
        "",
        "## Agreement by exit depth",
        "",
        *_table(["head", *depths], [[h, *(c.get(d) for d in depths)] for h, c in report["agreement_by_depth"].items()]),
        "",
    ]
    at = str(s["at_20_depth"])
    cat_rows = [
        [
            cat,
            settings["categories"].get(cat),
            *(per.get(cat, {}).get(at) for per in report["agreement_by_category"].values()),
        ]
        for cat in settings["categories"]
    ]
    lines += [f"## Agreement at depth {at} by prompt category", ""]
    lines += _table(["category", "tokens", *report["agreement_by_category"]], cat_rows) + [""]
    rows = [
        [r["head"], r["policy"], r["threshold"], r["token_agreement"], r["exit_rate"], r["mean_exit_layer"],
         r["layer_speedup"], r["est_speedup"]]
        for r in report["sweeps"]
    ]  # fmt: skip
    lines += ["## Policies and thresholds (simulated)", ""]
    lines += _table(
        ["head", "policy", "threshold", "agreement", "exit rate", "mean exit layer", "layer speedup", "est. speedup"],
        rows,
    )
    if report["classifier_auc"]:
        auc_row = [settings["classifier_head"], *report["classifier_auc"].values()]
        lines += ["", "## Exit classifier: held-out AUC per depth", ""]
        lines += _table(["head", *report["classifier_auc"]], [auc_row])
    measured = report["measured"]
    lines += ["", "## Measured (offramp bench, calibrated policy then full depth, same process)", ""]
    if measured:
        keys = ["tokens_per_s", "full_depth_tokens_per_s", "speedup", "exit_rate", "mean_exit_layer"]
        keys += ["reference_agreement", "lcs_frac", "distinct2", "full_depth_distinct2", "sequence_match"]
        keys += ["self_teacher_agreement", "check_cost_frac", "num_requests", "concurrency", "max_tokens"]
        lines += _table(keys, [[measured.get(k) for k in keys]])
    else:
        lines.append("Not measured (run `offramp eval --measure`).")
    lines += ["", *(f"![{name}]({name})" for name in pngs), ""]
    return "\n".join(lines)


def plot_sparsity(report: dict, png: Path) -> Path:
    """Contextual sparsity: teacher-forced agreement and perplexity ratio against FFN density, one
    line per criterion and predictor (random selection dashed, the magnitude oracle dotted)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(1, 2, figsize=(11, 4.5))
    lines: dict[str, list[dict]] = {}
    for row in report["rows"]:
        name = "random" if row["predictor"] == "random" else f"{row['criterion']} / {row['predictor']}"
        lines.setdefault(name, []).append(row)
    for name, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["density"])
        style = "--" if name == "random" else ":" if name.endswith("oracle") else "-"
        xs = [r["density"] for r in rows]
        top.plot(xs, [r["token_agreement"] for r in rows], style, marker="o", label=name)
        bottom.plot(xs, [r["perplexity_ratio"] for r in rows], style, marker="o", label=name)
    top.axhline(0.95, color="grey", lw=0.8)
    top.axhline(0.90, color="grey", lw=0.8, ls=":")
    top.set_ylabel("teacher-forced agreement with dense")
    bottom.set_ylabel("perplexity ratio (sparse / dense)")
    bottom.set_yscale("log")
    for ax in (top, bottom):
        ax.set_xlabel("FFN density (share of neuron groups kept)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    top.legend(fontsize=8)
    fig.suptitle(f"contextual sparsity, held out ({report['summary']['num_held_tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
