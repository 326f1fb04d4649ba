"""The KV tensors behind the page manager: one K and one V store per layer."""

from __future__ import annotations

import torch

from offramp.model.decoder import ModelShape


def bytes_per_token_per_layer(shape: ModelShape, dtype: torch.dtype) -> int:
    """K and V of one token in one layer."""
    return 2 * shape.num_kv_heads * shape.head_dim * torch.finfo(dtype).bits // 8


def pages_for_budget(
    shape: ModelShape, dtype: torch.dtype, page_size: int, budget_bytes: int, num_layers: int | None = None
) -> int:
    """Pages that ``budget_bytes`` hold for ``num_layers`` layers (default: all of them), at least one."""
    return max(1, budget_bytes // page_bytes(shape, dtype, page_size, num_layers))


def page_bytes(shape: ModelShape, dtype: torch.dtype, page_size: int, num_layers: int | None = None) -> int:
    """Bytes of one page over ``num_layers`` layers (default: all of them)."""
    layers = shape.num_layers if num_layers is None else num_layers
    return bytes_per_token_per_layer(shape, dtype) * layers * page_size


class KVStore:
    """``num_pages * page_size`` slots per layer; a page id addresses the same slots in every layer.

    Each layer's store is a flat ``[num_slots, kv_heads, head_dim]`` tensor (``head_major=False``,
    what the PyTorch engine reads), or ``[kv_heads, num_slots, head_dim]`` (``head_major=True``,
    what the exported block graphs read: their gathered pages need no transpose). Either way a slot
    index ``page * page_size + offset`` addresses one token's K or V.

    ``layers`` (default: all) are the layers this store holds, e.g. one pipeline stage's; the others
    get empty tensors. ``devices`` gives each layer's device (layers split over devices). With
    ``scratch_page`` one more page (id ``num_pages``) follows the ones the page manager hands out.
    """

    def __init__(
        self,
        shape: ModelShape,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        devices: list[torch.device] | None = None,
        head_major: bool = False,
        layers: range | None = None,
        scratch_page: bool = False,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        # one more page that no sequence owns, for the padding rows of CUDA graph steps to write to
        self.scratch_page = num_pages if scratch_page else None
        num_slots = (num_pages + (1 if scratch_page else 0)) * page_size
        devices = devices or [torch.device("cpu")] * shape.num_layers
        self.head_major = head_major
        dims = (
            (shape.num_kv_heads, num_slots, shape.head_dim)
            if head_major
            else (num_slots, shape.num_kv_heads, shape.head_dim)
        )
        held = range(shape.num_layers) if layers is None else layers
        self.layers = held
        self.k = [torch.zeros(dims if i in held else (0,), dtype=dtype, device=d) for i, d in enumerate(devices)]
        self.v = [torch.zeros(dims if i in held else (0,), dtype=dtype, device=d) for i, d in enumerate(devices)]
        self.bytes_per_token_per_layer = bytes_per_token_per_layer(shape, dtype)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(
        self,
        layer: int,
        slots: torch.Tensor,  # [n] long
        k: torch.Tensor,  # [n, kv_heads, head_dim]
        v: torch.Tensor,  # [n, kv_heads, head_dim]
    ) -> None:
        """Store the K/V of ``n`` tokens of ``layer`` at ``slots`` (moved to the store's device)."""
        device = self.k[layer].device
        if k.device != device:
            slots, k, v = slots.to(device), k.to(device, self.dtype), v.to(device, self.dtype)
        if self.head_major:
            self.k[layer].index_copy_(1, slots, k.transpose(0, 1))
            self.v[layer].index_copy_(1, slots, v.transpose(0, 1))
        else:
            self.k[layer].index_copy_(0, slots, k)
            self.v[layer].index_copy_(0, slots, v)
