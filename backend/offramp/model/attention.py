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

HOST = torch.device("cpu")  # metadata is built here from the page tables, then copied once


@dataclass(slots=True)
class SeqSlice:
    """What one sequence contributes to a step: new tokens ``[start, start + num_new)``, after
    ``redo`` (earlier positions whose deeper layers' K/V is being recomputed, in order)."""

    start: int  # position of the first new token (= tokens already in the store)
    num_new: int
    page_table: list[int]
    redo: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.redo) + self.num_new

    def positions(self) -> torch.Tensor:  # [num_rows] long
        new = torch.arange(self.start, self.start + self.num_new, device=HOST)
        return torch.cat((torch.tensor(self.redo, dtype=torch.long, device=HOST), new)) if self.redo else new


@dataclass(slots=True)
class AttentionGroup:
    """Consecutive token rows ``[row_start, row_end)`` attended as ``[num_seqs, max_new]`` queries."""

    row_start: int
    row_end: int
    num_seqs: int
    max_new: int
    kv_pages: torch.Tensor  # [num_seqs, max_pages] long: each sequence's page table (0-padded)
    mask: torch.Tensor | None  # [num_seqs, 1, max_new, max_pages * page_size] bool; None = all visible


@dataclass(slots=True)
class AttentionMetadata:
    positions: torch.Tensor  # [num_tokens] long
    slot_mapping: torch.Tensor  # [num_tokens] long: where each new token's K/V is written
    cos: torch.Tensor  # [num_tokens, 1, head_dim]
    sin: torch.Tensor  # [num_tokens, 1, head_dim] (signed, see modeling.rope_tables)
    groups: list[AttentionGroup]
    page_size: int


def _new_slots(s: SeqSlice, page_size: int) -> torch.Tensor:
    """Slots where the rows' K/V go: [num_rows] long."""
    pos = s.positions()
    table = torch.tensor(s.page_table, dtype=torch.long, device=HOST)
    return table[pos // page_size] * page_size + pos % page_size


def _page_tables(seqs: list[SeqSlice], page_size: int) -> tuple[torch.Tensor, int]:
    """[num_seqs, max_pages] page ids (0-padded; padding is masked) and the padded context length."""
    num_pages = [-(-(s.start + s.num_new) // page_size) for s in seqs]
    pages = torch.zeros(len(seqs), max(num_pages), dtype=torch.long, device=HOST)
    for i, (s, n) in enumerate(zip(seqs, num_pages)):
        pages[i, :n] = torch.tensor(s.page_table[:n], dtype=torch.long, device=HOST)
    return pages, max(num_pages) * page_size


def _decode_group(seqs: list[SeqSlice], row: int, page_size: int) -> AttentionGroup:
    pages, padded_ctx = _page_tables(seqs, page_size)
    lens = torch.tensor([s.start + 1 for s in seqs], device=HOST)
    mask = None
    if bool((lens != padded_ctx).any()):
        mask = (torch.arange(padded_ctx, device=HOST)[None, :] < lens[:, None])[
            :, None, None, :
        ]  # [num_seqs, 1, 1, ctx]
    return AttentionGroup(row, row + len(seqs), len(seqs), 1, pages, mask)


def _chunk_group(s: SeqSlice, row: int, page_size: int) -> AttentionGroup:
    pages, padded_ctx = _page_tables([s], page_size)
    qpos = s.positions()  # each query sees the keys at or before its position
    mask = torch.arange(padded_ctx, device=HOST)[None, :] <= qpos[:, None]  # [num_rows, ctx]
    return AttentionGroup(row, row + s.num_rows, 1, s.num_rows, pages, mask[None, None])


def build_metadata(
    seqs: list[SeqSlice], page_size: int, cos_table: torch.Tensor, sin_table: torch.Tensor
) -> AttentionMetadata:
    """Index tensors for one step over ``seqs`` (all work is done once, not per layer). They are built
    on the host from the page tables and copied to the RoPE tables' device in one go."""
    groups: list[AttentionGroup] = []
    positions, new_slots = [], []
    decode_run: list[SeqSlice] = []
    row = 0
    for s in seqs + [None]:
        if decode_run and (s is None or s.num_rows != 1):
            groups.append(_decode_group(decode_run, row - len(decode_run), page_size))
            decode_run = []
        if s is None:
            break
        positions.append(s.positions())
        new_slots.append(_new_slots(s, page_size))
        if s.num_rows == 1:
            decode_run.append(s)
        else:
            groups.append(_chunk_group(s, row, page_size))
        row += s.num_rows
    device = cos_table.device
    pos = torch.cat(positions).to(device, non_blocking=True)
    if device.type != "cpu":
        groups = [_group_to(g, device) for g in groups]
    return AttentionMetadata(
        positions=pos,
        slot_mapping=torch.cat(new_slots).to(device, non_blocking=True),
        cos=cos_table[pos].unsqueeze(1),
        sin=sin_table[pos].unsqueeze(1),
        groups=groups,
        page_size=page_size,
    )


def _group_to(g: AttentionGroup, device: torch.device) -> AttentionGroup:
    mask = None if g.mask is None else g.mask.to(device, non_blocking=True)
    return AttentionGroup(g.row_start, g.row_end, g.num_seqs, g.max_new, g.kv_pages.to(device, non_blocking=True), mask)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, heads, head_dim] (RoPE applied)
    k_store: torch.Tensor,  # [num_pages * page_size, kv_heads, head_dim]
    v_store: torch.Tensor,  # [num_pages * page_size, kv_heads, head_dim]
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' cached keys: [num_tokens, heads * head_dim]."""
    outs = [_group_attention(q[g.row_start : g.row_end], k_store, v_store, g, meta.page_size) for g in meta.groups]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _group_attention(
    q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, g: AttentionGroup, page_size: int
) -> torch.Tensor:
    _, nh, hd = q.shape
    b, t = g.num_seqs, g.max_new
    flat = g.kv_pages.view(-1)
    # Whole pages are gathered (one row per page, not per token): [b, pages * page_size, kv_heads, head_dim]
    k = k_store.view(-1, page_size * k_store.shape[1] * hd).index_select(0, flat).view(b, -1, k_store.shape[1], hd)
    v = v_store.view(-1, page_size * v_store.shape[1] * hd).index_select(0, flat).view(b, -1, v_store.shape[1], hd)
    q = q.view(b, t, nh, hd)
    if t == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
        # decode rows: torch's CPU attention kernel is up to 5-10x slower in bfloat16 than in float32
        # on machines without native bfloat16 arithmetic, growing with the context (perf/attention_dtype.py;
        # prompt chunks gain nothing); the upcast copies are small next to it
        out = _sdpa(q.float(), k.float(), v.float(), g.mask).to(q.dtype)
    else:
        out = _sdpa(q, k, v, g.mask)
    return out.transpose(1, 2).reshape(b * t, nh * hd)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q: [b, t, heads, head_dim]; k, v: [b, ctx, kv_heads, head_dim] -> [b, heads, t, head_dim]."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )
