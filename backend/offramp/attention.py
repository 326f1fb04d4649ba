"""Attention over the paged KV store, and the per-step metadata it needs.

Tokens of a batch are flat (``[num_tokens, ...]``) for every matrix product. For attention they
are split into groups that pad well: all decoding sequences (one new token each) form one group,
and each sequence that brings several new tokens (a prompt chunk) is a group of its own, so a long
prompt never pads the decodes beside it. The metadata (slots, gather indices, masks, RoPE rows) is
built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class SeqSlice:
    """What one sequence contributes to a step: new tokens ``[start, start + num_new)``."""

    start: int  # position of the first new token (= tokens already in the store)
    num_new: int
    page_table: list[int]


@dataclass(slots=True)
class AttentionGroup:
    """Consecutive token rows ``[row_start, row_end)`` attended as ``[num_seqs, max_new]`` queries."""

    row_start: int
    row_end: int
    num_seqs: int
    max_new: int
    kv_slots: torch.Tensor  # [num_seqs, max_context] long: slots of every visible key (0-padded)
    mask: torch.Tensor | None  # [num_seqs, 1, max_new, max_context] bool; None = everything visible


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [num_tokens] long
    slot_mapping: torch.Tensor  # [num_tokens] long: where each new token's K/V is written
    cos: torch.Tensor  # [num_tokens, 1, head_dim]
    sin: torch.Tensor  # [num_tokens, 1, head_dim] (signed, see modeling.rope_tables)
    groups: list[AttentionGroup]


def _seq_slots(s: SeqSlice, page_size: int) -> torch.Tensor:
    """Slots of positions ``0 .. start + num_new - 1``: [context] long."""
    pos = torch.arange(s.start + s.num_new)
    table = torch.tensor(s.page_table, dtype=torch.long)
    return table[pos // page_size] * page_size + pos % page_size


def _decode_group(seqs: list[SeqSlice], all_slots: list[torch.Tensor], row: int) -> AttentionGroup:
    lens = [s.start + 1 for s in seqs]
    max_ctx = max(lens)
    kv_slots = torch.zeros(len(seqs), max_ctx, dtype=torch.long)
    for i, slots in enumerate(all_slots):
        kv_slots[i, : len(slots)] = slots
    mask = None
    if min(lens) != max_ctx:
        visible = torch.arange(max_ctx)[None, :] < torch.tensor(lens)[:, None]  # [num_seqs, max_ctx]
        mask = visible[:, None, None, :]
    return AttentionGroup(row, row + len(seqs), len(seqs), 1, kv_slots, mask)


def _chunk_group(s: SeqSlice, slots: torch.Tensor, row: int) -> AttentionGroup:
    ctx = s.start + s.num_new
    qpos = torch.arange(s.start, ctx)  # query t sits at position start + t and sees keys 0..start + t
    mask = torch.arange(ctx)[None, :] <= qpos[:, None]  # [num_new, ctx]
    return AttentionGroup(row, row + s.num_new, 1, s.num_new, slots[None, :], mask[None, None])


def build_metadata(
    seqs: list[SeqSlice], page_size: int, cos_table: torch.Tensor, sin_table: torch.Tensor
) -> AttentionMetadata:
    """Index tensors for one step over ``seqs`` (all work is done once, not per layer)."""
    groups: list[AttentionGroup] = []
    positions, new_slots = [], []
    decode_run: list[SeqSlice] = []
    decode_slots: list[torch.Tensor] = []
    row = 0
    for s in seqs + [None]:
        if decode_run and (s is None or s.num_new != 1):
            groups.append(_decode_group(decode_run, decode_slots, row - len(decode_run)))
            decode_run, decode_slots = [], []
        if s is None:
            break
        slots = _seq_slots(s, page_size)
        positions.append(torch.arange(s.start, s.start + s.num_new))
        new_slots.append(slots[s.start :])
        if s.num_new == 1:
            decode_run.append(s)
            decode_slots.append(slots)
        else:
            groups.append(_chunk_group(s, slots, row))
        row += s.num_new
    pos = torch.cat(positions)
    return AttentionMetadata(
        positions=pos,
        slot_mapping=torch.cat(new_slots),
        cos=cos_table[pos].unsqueeze(1),
        sin=sin_table[pos].unsqueeze(1),
        groups=groups,
    )


def paged_attention(
    q: torch.Tensor,  # [num_tokens, heads, head_dim] (RoPE applied)
    k_store: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    v_store: torch.Tensor,  # [num_slots, kv_heads, head_dim]
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' cached keys: [num_tokens, heads * head_dim]."""
    outs = [_group_attention(q[g.row_start : g.row_end], k_store, v_store, g) for g in meta.groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _group_attention(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
    _, nh, hd = q.shape
    b, t, ctx = g.num_seqs, g.max_new, g.kv_slots.shape[1]
    flat = g.kv_slots.view(-1)
    k = k_store.index_select(0, flat).view(b, ctx, -1, hd)  # [b, ctx, kv_heads, head_dim]
    v = v_store.index_select(0, flat).view(b, ctx, -1, hd)
    out = F.scaled_dot_product_attention(
        q.view(b, t, nh, hd).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=g.mask, enable_gqa=True
    )  # [b, heads, t, head_dim]
    return out.transpose(1, 2).reshape(b * t, nh * hd)
