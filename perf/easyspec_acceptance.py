"""EasySpec's fuzzy drafts (R5) with and without bonus calibration, against the exact draft of the same
depth, measured along the full model's own greedy text (Hugging Face float32 on the default model).

A draft of depth d runs the first d layers and the model's own head (the identity exit). EasySpec runs
those layers in groups of g consecutive layers that all read the group's input (so a group's layers can
run at once). What differs is the K/V the draft's attention reads for earlier positions:

- ``exact``: the exact first d layers (the depth-d exit draft);
- ``calibrated``: fuzzy groups for the current token, exact K/V for every earlier token: after each
  verification EasySpec recomputes the accepted tokens' draft K/V exactly (bonus calibration; in
  Offramp the verification pass writes them, one K/V store serving draft and full model);
- ``uncalibrated``: fuzzy groups everywhere, so every earlier token's K/V is the fuzzy draft's own and
  the errors accumulate along the text.

Acceptance here is the first draft token's: the share of positions (along HF float32 greedy answers to
the bundled prompts) where the draft's top token is the full model's next token. Prints one JSON line
per (d, g) and draws them next to ``--output``.

    .venv/bin/python perf/easyspec_acceptance.py --output docs/bench/easyspec_acceptance.jsonl
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from offramp.model.loader import resolve_model


def layer_out(layer, x: torch.Tensor, past: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One Llama decoder layer over T positions where position t's query, key and value come from ``x``
    [T, hidden] and the keys and values of positions < t from ``past`` [T, hidden] (``past is x``: the
    ordinary causal layer). Returns [T, hidden]."""
    attn, n = layer.self_attn, x.shape[0]
    hd = attn.head_dim
    groups = attn.num_key_value_groups

    def project(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = layer.input_layernorm(h)
        q = attn.q_proj(h).view(n, -1, hd).transpose(0, 1)  # [heads, T, hd]
        k = attn.k_proj(h).view(n, -1, hd).transpose(0, 1)  # [kv_heads, T, hd]
        v = attn.v_proj(h).view(n, -1, hd).transpose(0, 1)
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        return q[0], k[0].repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)

    q, k_own, v_own = project(x)
    _, k_past, v_past = (q, k_own, v_own) if past is x else project(past)
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)  # [T, T]: s < t
    scores = (q @ k_past.transpose(1, 2)).masked_fill(~earlier, float("-inf"))  # [heads, T, T]
    idx = torch.arange(n)
    scores[:, idx, idx] = (q * k_own).sum(-1)  # each position's own key
    probs = torch.softmax(scores * hd**-0.5, dim=-1)
    out = probs.masked_fill(~earlier, 0.0) @ v_past + probs[:, idx, idx, None] * v_own  # [heads, T, hd]
    h = x + attn.o_proj(out.transpose(0, 1).reshape(n, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def draft_hidden(model, exact: tuple, depth: int, group: int, calibrated: bool, cos, sin) -> torch.Tensor:
    """The draft's hidden state after ``depth`` layers run in fuzzy groups of ``group``."""
    layers, h = model.model.layers, exact[0][0]
    for first in range(0, depth, group):
        x, acc = h, h
        for i in range(first, min(first + group, depth)):
            acc = acc + (layer_out(layers[i], x, exact[i][0] if calibrated else x, cos, sin) - x)
        h = acc
    return h


def top(model, h: torch.Tensor, p: int, n: int) -> torch.Tensor:
    """The head's top token at positions p - 1 .. n - 2 (those predicting the answer's tokens)."""
    return model.lm_head(model.model.norm(h[p - 1 : n - 1])).argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="8,12,16,20,24,26")
    ap.add_argument("--groups", default="2,4")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--num-threads", type=int, default=2)
    ap.add_argument("--output", default=None, help="append the JSON lines here and draw a PNG beside it")
    args = ap.parse_args()
    torch.set_num_threads(args.num_threads)
    path = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with resources.files("offramp.data").joinpath("prompts.jsonl").open() as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.num_prompts]
    depths = [int(d) for d in args.depths.split(",")]
    if not all(0 < d < model.config.num_hidden_layers for d in depths):
        ap.error(f"--depths: each must be in 1..{model.config.num_hidden_layers - 1}")
    groups = [int(g) for g in args.groups.split(",")]
    hits: dict[tuple, int] = {}
    total, check = 0, 0.0
    with torch.inference_mode():
        for prompt in tqdm(prompts, desc="prompts"):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            seq = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            p, n = ids.shape[1], seq.shape[1]
            out = model(seq, output_hidden_states=True)
            exact = out.hidden_states  # [num_layers + 1] x [1, T, hidden]; [i] is layer i's input
            pos = torch.arange(n)[None]
            cos, sin = model.model.rotary_emb(exact[0], pos)  # [1, T, head_dim]
            target = seq[0, p:]  # the full model's greedy tokens, predicted at positions p - 1 .. n - 2
            total += n - p
            walk = draft_hidden(model, exact, max(depths), 1, True, cos, sin)  # groups of one: the exact layers
            check = max(check, (walk - exact[max(depths)][0]).abs().max().item())
            for d in depths:
                hits[(d, 1, "exact")] = hits.get((d, 1, "exact"), 0) + int(
                    (top(model, exact[d][0], p, n) == target).sum()
                )
                for g in groups:
                    for calibrated in (True, False):
                        h = draft_hidden(model, exact, d, g, calibrated, cos, sin)
                        key = (d, g, "calibrated" if calibrated else "uncalibrated")
                        hits[key] = hits.get(key, 0) + int((top(model, h, p, n) == target).sum())
    rows = []
    for d in depths:
        for g in groups:
            row = {
                "depth": d,
                "group": g,
                "num_prompts": len(prompts),
                "num_tokens": total,
                "exact_acceptance": round(hits[(d, 1, "exact")] / total, 4),
                "calibrated_acceptance": round(hits[(d, g, "calibrated")] / total, 4),
                "uncalibrated_acceptance": round(hits[(d, g, "uncalibrated")] / total, 4),
                "exact_walk_max_abs_diff": float(f"{check:.2e}"),  # groups of one against HF's hidden states
            }
            rows.append(row)
            print(json.dumps(row))
    if args.output:
        with open(args.output, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        draw(rows, Path(args.output).with_suffix(".png"))


def draw(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    depths = sorted({r["depth"] for r in rows})
    exact = {r["depth"]: r["exact_acceptance"] for r in rows}
    ax.plot(depths, [exact[d] for d in depths], "k-o", label="exact draft")
    for g in sorted({r["group"] for r in rows}):
        mine = sorted((r for r in rows if r["group"] == g), key=lambda r: r["depth"])
        ax.plot(depths, [r["calibrated_acceptance"] for r in mine], "-s", label=f"fuzzy g={g}, calibrated")
        ax.plot(depths, [r["uncalibrated_acceptance"] for r in mine], "--^", label=f"fuzzy g={g}, uncalibrated")
    ax.set_xlabel("draft depth d (layers)")
    ax.set_ylabel("first-draft acceptance")
    ax.set_title("EasySpec drafts along HF float32 greedy text (default model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
