"""The walk down the blocks for one step, with early exits and the K/V of skipped layers.

Without exits the whole batch runs every block. With exits, after each exit point the decoding
tokens still running ask their policy; leavers stop there and the sub-batch shrinks. Their skipped
layers' K/V is filled per ``kv_fill``:

- ``propagate`` (CALM): at once, from the exit hidden state through each skipped layer's input norm
  and K/V projections (approximate).
- ``recompute`` (EE-LLM/FREE): the exit hidden state is kept; when a later token of the sequence
  goes past that depth, the kept tokens re-enter the sub-batch at the block where they left and
  run together with it, writing exact K/V.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from offramp.blocks.base import BlockBackend
from offramp.engine.scheduler import ScheduledSeq
from offramp.exits import ExitCheck, ExitHead, ExitPolicy
from offramp.model.attention import SeqSlice, build_metadata
from offramp.model.decoder import ModelWeights


@dataclass(slots=True)
class Pending:
    """A token whose K/V exists only below ``depth`` layers (recompute mode)."""

    position: int
    depth: int
    hidden: torch.Tensor  # [hidden] state after ``depth`` layers


@dataclass(slots=True)
class LoopResult:
    """Per item (index into the step's items): its last row after full depth, or where it left."""

    final_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # item -> [hidden]
    exited: dict[int, tuple[int, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


@dataclass(slots=True)
class LoopStats:
    block_s: float = 0.0
    check_s: float = 0.0
    fill_s: float = 0.0
    recomputed_rows: int = 0  # kept tokens that re-entered a sub-batch (recompute)


class BlockLoop:
    def __init__(
        self,
        weights: ModelWeights,
        backend: BlockBackend,
        page_size: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        exit_depths: set[int],
        kv_fill: str,
        head: ExitHead,
        policy_of: Callable[[ScheduledSeq], tuple[ExitPolicy, float] | None],
    ) -> None:
        self.weights, self.backend, self.page_size = weights, backend, page_size
        self.cos, self.sin = cos, sin
        self.exit_depths, self.kv_fill, self.head = exit_depths, kv_fill, head
        self.policy_of = policy_of  # (policy, threshold) for items that may leave now, else None
        self.pending: dict[int, list[Pending]] = {}  # seq_id -> kept tokens (recompute)
        self.stats = LoopStats()

    def release(self, seq_id: int) -> None:
        """Forget a sequence's kept tokens (finished, aborted, or about to be recomputed)."""
        self.pending.pop(seq_id, None)

    def exact_prefix(self, seq_id: int, num_computed_tokens: int) -> int:
        """Tokens before the first one still pending: their K/V is in every layer (recompute mode;
        with propagate nothing is pending and skipped layers hold the propagated approximation)."""
        pending = self.pending.get(seq_id)
        return min(num_computed_tokens, pending[0].position) if pending else num_computed_tokens

    def _meta(self, slices: list[SeqSlice]):
        return build_metadata(slices, self.page_size, self.cos, self.sin)

    def _embed(self, token_ids: list[int]) -> torch.Tensor:  # [n, hidden]
        return F.embedding(torch.tensor(token_ids, dtype=torch.long), self.weights.embed)

    def run(self, items: list[ScheduledSeq], slices: list[SeqSlice], token_ids: list[int]) -> LoopResult:
        for item in items:  # positions at or after num_computed_tokens are being (re)computed anew
            kept = self.pending.get(item.seq.seq_id)
            if kept and kept[-1].position >= item.seq.num_computed_tokens:
                kept = [p for p in kept if p.position < item.seq.num_computed_tokens]
                self.pending[item.seq.seq_id] = kept
                if not kept:
                    self.release(item.seq.seq_id)
        exiting = self.exit_depths and any(self.policy_of(it) is not None for it in items)
        if exiting or any(it.seq.seq_id in self.pending for it in items):
            return self._run_with_exits(items, slices, token_ids)
        return self._run_full(items, slices, token_ids)

    def _run_full(self, items, slices, token_ids) -> LoopResult:
        hidden = self._embed(token_ids)
        meta = self._meta(slices)
        start = time.perf_counter()
        for b in range(self.backend.num_blocks):
            hidden = self.backend.run_block(b, hidden, meta)
        self.stats.block_s += time.perf_counter() - start
        result, row = LoopResult(), 0
        for i, item in enumerate(items):
            row += item.num_new_tokens
            if item.samples:
                result.final_rows[i] = hidden[row - 1]
        return result

    def _run_with_exits(self, items, slices, token_ids) -> LoopResult:
        """The walk with exits. The rows of the items still running stay one contiguous tensor
        (items in ``active`` order, ``sizes`` rows each); it is re-gathered only when items leave or
        kept tokens join, and so is the attention metadata."""
        choices = [self.policy_of(it) for it in items]  # fixed for the step
        kept = {i: list(self.pending.get(it.seq.seq_id, [])) for i, it in enumerate(items)}
        redo: list[tuple[int, ...]] = [() for _ in items]  # positions re-entered so far, per item
        active, sizes = list(range(len(items))), [s.num_new for s in slices]
        hidden = self._embed(token_ids)  # [rows, hidden]
        result, meta = LoopResult(), None
        for b, (start_layer, end) in enumerate(self.backend.block_ranges):
            if any(p.depth == start_layer for i in active for p in kept[i]):
                hidden, sizes = self._join(items, active, sizes, hidden, kept, redo, start_layer)
                meta = None
            if meta is None:
                meta = self._meta([dataclasses.replace(slices[i], redo=redo[i]) for i in active])
            t0 = time.perf_counter()
            before, hidden = hidden, self.backend.run_block(b, hidden, meta)
            self.stats.block_s += time.perf_counter() - t0
            if end not in self.exit_depths:
                continue
            ends = list(itertools.accumulate(sizes))  # one past each active item's rows
            leavers = self._check(items, choices, active, ends, hidden, before, end, result)
            if not leavers:
                continue
            self._fill(items, leavers, active, ends, sizes, hidden, redo, meta, kept, end)
            stay = [k for k, i in enumerate(active) if i not in leavers]
            rows = [r for k in stay for r in range(ends[k] - sizes[k], ends[k])]
            hidden = hidden.index_select(0, torch.tensor(rows, dtype=torch.long))
            active, sizes, meta = [active[k] for k in stay], [sizes[k] for k in stay], None
            if not active:
                break
        for i, row_end in zip(active, itertools.accumulate(sizes)):
            if items[i].samples:
                result.final_rows[i] = hidden[row_end - 1]
            self.release(items[i].seq.seq_id) if not kept[i] else self._keep(items[i], kept[i])
        return result

    def _join(self, items, active, sizes, hidden, kept, redo, depth):
        """Kept tokens whose K/V stops at ``depth`` re-enter before their item's rows (recompute)."""
        rows = list(torch.split(hidden, sizes))
        for k, i in enumerate(active):
            joins = [p for p in kept[i] if p.depth == depth]
            if joins:
                kept[i] = [p for p in kept[i] if p.depth != depth]
                rows[k] = torch.cat((torch.stack([p.hidden for p in joins]), rows[k]))
                redo[i] = tuple(p.position for p in joins) + redo[i]
                self.stats.recomputed_rows += len(joins)
        return torch.cat(rows), [r.shape[0] for r in rows]

    def _check(self, items, choices, active, ends, hidden, before, depth, result: LoopResult) -> set[int]:
        """Ask each candidate's policy about its newest token; record leavers in ``result``."""
        groups: dict[int, tuple[ExitPolicy, list[int], list[int], list[float]]] = {}
        for k, i in enumerate(active):
            if choices[i] is not None:
                policy, threshold = choices[i]
                group = groups.setdefault(id(policy), (policy, [], [], []))
                group[1].append(i)
                group[2].append(ends[k] - 1)
                group[3].append(threshold)
        if not groups:
            return set()
        t0 = time.perf_counter()
        leavers: set[int] = set()
        for policy, members, last_rows, thresholds in groups.values():
            idx = torch.tensor(last_rows, dtype=torch.long)
            newest = hidden.index_select(0, idx)  # [m, hidden]
            check = ExitCheck(
                newest, before.index_select(0, idx), depth, torch.tensor(thresholds, dtype=torch.float32), self.head
            )
            decision = policy.decide(check)
            for j in decision.leave.nonzero().flatten().tolist():
                i = members[j]
                result.exited[i] = (depth, newest[j], decision.row_logits(j))
                leavers.add(i)
        self.stats.check_s += time.perf_counter() - t0
        return leavers

    def _fill(self, items, leavers, active, ends, sizes, hidden, redo, meta, kept, depth) -> None:
        """K/V of the layers the leavers skip: propagate now, or keep their rows for recompute."""
        t0 = time.perf_counter()
        if self.kv_fill == "propagate":
            idx = torch.tensor([ends[k] - 1 for k, i in enumerate(active) if i in leavers], dtype=torch.long)
            self.backend.propagate_kv(
                hidden.index_select(0, idx), meta.cos[idx], meta.sin[idx], meta.slot_mapping[idx], depth
            )
        else:
            for k, i in enumerate(active):
                if i not in leavers:
                    continue
                start = items[i].seq.num_computed_tokens
                positions = redo[i] + tuple(range(start, start + items[i].num_new_tokens))
                rows = hidden[ends[k] - sizes[k] : ends[k]]
                self._keep(items[i], kept[i] + [Pending(p, depth, h) for p, h in zip(positions, rows)])
        self.stats.fill_s += time.perf_counter() - t0

    def _keep(self, item: ScheduledSeq, pending: list[Pending]) -> None:
        self.pending[item.seq.seq_id] = sorted(pending, key=lambda p: p.position)
