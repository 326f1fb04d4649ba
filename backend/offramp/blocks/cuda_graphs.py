"""CUDA graphs of the full-depth decode step (torch backend, one GPU).

An eager decode step launches about 1,100 kernels (30 layers of the default model, ~36 each) and on a
GPU the host cannot issue them as fast as the GPU runs them: measured on an H200, 20-35 ms of wall
time per step for 2 ms of kernel time (``perf/gpu/step_profile.py``). Here the step's embedding and
every block are captured once per bucket of (batch rows, pages per sequence) and replayed: one launch.

A bucket's graph reads fixed device buffers. Each step writes its rows into them with one host-to-device
copy: token ids, positions, K/V slots, context lengths and page tables. Rows past the batch (up to the
bucket) are padding: token 0 at position 0, writing its K/V to a scratch page that no sequence owns, over
a one-token context. Page-table columns past a sequence's own pages name the scratch page and are masked.
So a graph computes exactly what the eager step computes for the real rows; products over more rows or
more (masked) keys may round differently in the last bit, as any change of batch does.

Steps that do not fit (a prompt chunk or draft rows, more rows or longer contexts than the largest
bucket, exits, contextual sparsity) run eager. A capture that fails turns graphs off with one warning.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from offramp.blocks.base import BlockBackend
from offramp.model.attention import AttentionGroup, AttentionMetadata, SeqSlice

log = logging.getLogger("offramp")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # rows a graph takes (the next at or above the batch)
NUM_INPUTS = 4  # per row: token id, position, K/V slot, context length (then the page table)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)


class DecodeGraphs:
    """Full-depth decode steps as replays of captured graphs, bucketed by (rows, pages per sequence).

    ``capture=False`` runs the same padded, bucketed step eagerly: what a replay computes, on any device
    (the CPU tests check the padding against the plain step with it).
    """

    def __init__(
        self,
        backend: BlockBackend,
        cos: torch.Tensor,  # [max_len, head_dim] RoPE tables on the engine's device
        sin: torch.Tensor,
        page_size: int,
        max_model_len: int,
        scratch_page: int,
        capture: bool = True,
    ) -> None:
        self.backend, self.cos, self.sin = backend, cos, sin
        self.embed = backend.weights.embed  # [vocab, hidden]
        self.device = self.embed.device
        self.page_size, self.scratch_page, self.capture = page_size, scratch_page, capture
        self.max_rows = BATCH_BUCKETS[-1]
        pages = -(-max_model_len // page_size)
        self.page_buckets = tuple(sorted({min(1 << i, pages) for i in range(pages.bit_length() + 1)}))
        self.max_pages = self.page_buckets[-1]
        # [rows * NUM_INPUTS + rows * pages] long: each step's inputs, laid out for its bucket
        self.inputs = torch.zeros(self.max_rows * (NUM_INPUTS + self.max_pages), dtype=torch.long, device=self.device)
        self.key_positions = torch.arange(self.max_pages * page_size, device=self.device)  # [max_pages * page_size]
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.disabled: str | None = None  # why graphs were turned off (a failed capture)
        self.num_replays = 0

    def run(self, token_ids: list[int], slices: list[SeqSlice]) -> torch.Tensor | None:
        """[rows, hidden] after every block for a step of decode rows, or None where it does not fit."""
        n = len(slices)
        if self.disabled or not 0 < n <= self.max_rows or any(s.num_rows != 1 for s in slices):
            return None
        needed = max(-(-(s.start + 1) // self.page_size) for s in slices)
        if needed > self.max_pages:
            return None
        rows, pages = _bucket(n, BATCH_BUCKETS), _bucket(needed, self.page_buckets)
        host = self._host_inputs(rows, pages, token_ids, slices)  # [rows * (NUM_INPUTS + pages)]
        self.inputs[: host.numel()].copy_(host, non_blocking=True)
        if not self.capture:
            return self._body(rows, pages)[:n]
        entry = self.graphs.get((rows, pages)) or self._capture(rows, pages)
        if entry is None:
            return None
        graph, out = entry
        graph.replay()
        self.num_replays += 1
        return out[:n].clone()  # the next replay reuses ``out``

    def _host_inputs(self, rows: int, pages: int, token_ids: list[int], slices: list[SeqSlice]) -> torch.Tensor:
        ps, pad = self.page_size, rows - len(slices)
        positions = [s.start for s in slices]
        slots = [s.page_table[p // ps] * ps + p % ps for s, p in zip(slices, positions)]
        tables: list[int] = []
        for s, p in zip(slices, positions):
            own = s.page_table[: p // ps + 1]
            tables += own + [self.scratch_page] * (pages - len(own))
        scratch = self.scratch_page * ps
        values = (
            [*token_ids, *[0] * pad]
            + [*positions, *[0] * pad]
            + [*slots, *[scratch] * pad]
            + [p + 1 for p in positions]
            + [1] * pad
            + tables
            + [self.scratch_page] * (pages * pad)
        )
        return torch.tensor(values, dtype=torch.long)

    def _body(self, rows: int, pages: int) -> torch.Tensor:
        """The step on the bucket's inputs (what a graph records): [rows, hidden]."""
        ids, pos, slots, lens = self.inputs[: NUM_INPUTS * rows].view(NUM_INPUTS, rows)
        tables = self.inputs[NUM_INPUTS * rows : (NUM_INPUTS + pages) * rows].view(rows, pages)
        ctx = self.key_positions[: pages * self.page_size]
        mask = (ctx[None, :] < lens[:, None])[:, None, None, :]  # [rows, 1, 1, pages * page_size]
        meta = AttentionMetadata(
            positions=pos,
            slot_mapping=slots,
            cos=self.cos[pos].unsqueeze(1),
            sin=self.sin[pos].unsqueeze(1),
            groups=[AttentionGroup(0, rows, rows, 1, tables, mask)],
            page_size=self.page_size,
        )
        hidden = F.embedding(ids, self.embed)  # [rows, hidden]
        return self.backend.run_blocks(0, self.backend.num_blocks, hidden, meta)

    def _capture(self, rows: int, pages: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Record the bucket's graph. The inputs already hold this step's rows, so the warm-up run (eager,
        on the capturing stream, so that cuBLAS has its workspace there) computes this step's K/V, as the
        replay then does again. ``capture_begin`` directly: ``torch.cuda.graph`` would also synchronise the
        device and empty the allocator's caches on every capture."""
        try:
            with torch.cuda.device(self.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._body(rows, pages)
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=self.pool)
                    try:
                        out = self._body(rows, pages)
                    finally:
                        graph.capture_end()
                torch.cuda.current_stream().wait_stream(side)
        except RuntimeError as exc:
            self.disabled = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.warning("offramp: CUDA graphs off, decoding eager (capture failed: %s)", self.disabled)
            return None
        self.graphs[(rows, pages)] = (graph, out)
        return graph, out
