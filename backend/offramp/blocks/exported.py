"""What the backends over exported block graphs share (ONNX Runtime, TensorRT).

Each step's per-attention-group inputs (positions, pages, mask, RoPE rows) are built once and fed to
every block's graph; the graph writes the block's new K/V into tensors the backend then stores.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from offramp.blocks.base import BlockBackend
from offramp.model.attention import AttentionMetadata


def group_mask(
    positions: torch.Tensor,  # [B, T] long: each row's position in its sequence
    context: int,  # C: slots gathered per sequence (whole pages)
) -> torch.Tensor:  # [B, T, C + T] bool
    """What each row attends to: stored slots at or before its position that no row of this step
    rewrites, then the step's own rows at or before its position."""
    slots = torch.arange(context, device=positions.device)
    rewritten = (slots[None, None, :] == positions[:, :, None]).any(1, keepdim=True)  # [B, 1, C]
    past = (slots[None, None, :] <= positions[:, :, None]) & ~rewritten
    new = positions[:, None, :] <= positions[:, :, None]  # [B, T, T]
    return torch.cat((past, new), dim=-1).contiguous()


def group_inputs(meta: AttentionMetadata, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Per attention group of a step, the exported block graph's inputs besides the hidden states
    and the stores (shared by every block, so built once per step), plus the rows' ``slots``."""
    prepared = []
    for g in meta.groups:
        rows = slice(g.row_start, g.row_end)
        positions = meta.positions[rows].view(g.num_seqs, g.max_new)  # [B, T]
        host = {
            "cos": meta.cos[rows, 0].float(),  # [n, head_dim]
            "sin": meta.sin[rows, 0].float(),
            "page_ids": g.kv_pages,  # [B, P]
            "mask": group_mask(positions, g.kv_pages.shape[1] * meta.page_size),  # [B, T, C + T]
            "slots": meta.slot_mapping[rows],  # [n]
        }
        prepared.append({k: v.contiguous().to(device, non_blocking=True) for k, v in host.items()})
    return prepared


class ExportedBackend(BlockBackend):
    """What the backends over exported block graphs share: the step's group inputs (built once per
    step), the graph's inputs and outputs per group, and storing the new K/V. Subclasses run one
    block graph (``_execute``) on tensors of ``self.device``."""

    device: torch.device
    _prepared: tuple[AttentionMetadata, list[dict[str, torch.Tensor]]] | None = None

    def _group_inputs(self, meta: AttentionMetadata) -> list[dict[str, torch.Tensor]]:
        if self._prepared is None or self._prepared[0] is not meta:
            self._prepared = (meta, group_inputs(meta, self.device))
        return self._prepared[1]

    @abstractmethod
    def _execute(self, block_idx: int, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run block ``block_idx``'s graph from ``feeds`` into the preallocated ``outputs``."""

    def run_block(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        start, end = self.block_ranges[block_idx]
        s = self.weights.shape
        outs = []
        for g, inputs in zip(meta.groups, self._group_inputs(meta)):
            rows = hidden[g.row_start : g.row_end].to(self.device, torch.float32).contiguous()  # [n, hidden]
            n = rows.shape[0]
            feeds = {"hidden": rows, **{k: v for k, v in inputs.items() if k != "slots"}}
            outputs = {"hidden_out": torch.empty(n, s.hidden_size, device=self.device)}  # [n, hidden]
            for i, layer in enumerate(range(start, end)):
                feeds[f"k_store.{i}"], feeds[f"v_store.{i}"] = self.kv.k[layer], self.kv.v[layer]
                for kind in ("k", "v"):  # [n, kv_heads, head_dim]
                    outputs[f"{kind}_new.{i}"] = torch.empty(n, s.num_kv_heads, s.head_dim, device=self.device)
            self._execute(block_idx, feeds, outputs)
            for i, layer in enumerate(range(start, end)):
                self.kv.write(layer, inputs["slots"], outputs[f"k_new.{i}"], outputs[f"v_new.{i}"])
            outs.append(outputs["hidden_out"])
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.to(hidden.device, hidden.dtype)
