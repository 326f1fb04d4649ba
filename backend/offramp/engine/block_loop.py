"""The walk down the blocks for one step, with early exits and the K/V of skipped layers.

Without exits the whole batch runs every block. With exits, after each exit point the decoding
tokens still running ask the policy the runner chose for them; leavers stop there and the
sub-batch shrinks. Their skipped layers' K/V is filled per ``kv_fill``:

- ``propagate`` (CALM): at once, from the exit hidden state through each skipped layer's input norm
  and K/V projections (approximate).
- ``recompute`` (EE-LLM/FREE): the exit hidden state is kept; when a later token of the sequence
  goes past that depth, the kept tokens re-enter the sub-batch at the block where they left and
  run together with it, writing exact K/V.

Lossless mode: an item with drafts never exits; all its rows (last token and drafts) come back after
full depth for verification (``LoopResult.verify_rows``). ``run_shallow`` is the draft pass of the
``exit`` source: the rows run blocks up to a depth and no further, and nothing fills the deeper
layers' K/V (verification rewrites every layer at those positions).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from offramp.blocks.base import BlockBackend
from offramp.blocks.cuda_graphs import DecodeGraphs
from offramp.engine.scheduler import ScheduledSeq
from offramp.exits import ExitCheck, ExitHead, ExitPolicy
from offramp.model.attention import AttentionMetadata, SeqSlice, build_metadata
from offramp.model.decoder import ModelWeights
from offramp.sparsity.executor import SparseExecutor


@dataclass(slots=True)
class ExitChoice:
    """How one row may leave this step: its policy and the request's threshold."""

    policy: ExitPolicy
    threshold: float


@dataclass(slots=True)
class StepInput:
    """One step's rows, decode rows first: per item its slice, tokens and exit choice."""

    items: list[ScheduledSeq]
    slices: list[SeqSlice]
    token_ids: list[int]  # every item's new tokens, in item order
    choices: list[ExitChoice | None]  # None: full depth (prompt chunks, recomputation, exits off)
    densities: list[float | None] = field(default_factory=list)  # contextual sparsity; None: dense


@dataclass(slots=True)
class Exit:
    """A token that left early."""

    depth: int  # layers it ran
    hidden: torch.Tensor  # [hidden] its state there
    logits: torch.Tensor | None = None  # [vocab] when its policy computed them to decide


@dataclass(slots=True)
class LoopResult:
    """Per sampling item (index into the step's items): its last row after full depth, or its exit;
    for an item with drafts, its last token's and drafts' rows after full depth."""

    final_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # item -> [hidden]
    exited: dict[int, Exit] = field(default_factory=dict)
    verify_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # item -> [1 + drafts, hidden]


@dataclass(slots=True)
class Pending:
    """A token whose K/V exists only below ``depth`` layers (recompute mode)."""

    position: int
    depth: int
    hidden: torch.Tensor  # [hidden] state after ``depth`` layers


@dataclass(slots=True)
class LoopStats:
    block_s: float = 0.0
    check_s: float = 0.0
    fill_s: float = 0.0
    recomputed_rows: int = 0  # kept tokens that re-entered a sub-batch (recompute)
    draft_s: float = 0.0  # draft passes (spec exit, easyspec)
    num_verifications: int = 0  # items verified (lossless mode with drafts)
    num_draft_tokens: int = 0  # drafts verified
    num_accepted_tokens: int = 0  # drafts the full model accepted


@dataclass(slots=True)
class _Walk:
    """The sub-batch still running: items in ``active`` order, ``sizes`` rows each, as one
    contiguous tensor; re-gathered (and its metadata rebuilt) only when items leave or kept tokens
    join."""

    active: list[int]
    sizes: list[int]
    hidden: torch.Tensor  # [rows, hidden]
    kept: list[list[Pending]]  # per item: its tokens still pending (recompute)
    redo: list[tuple[int, ...]]  # per item: positions re-entered so far
    meta: AttentionMetadata | None = None

    @property
    def ends(self) -> list[int]:  # one past each active item's rows
        return list(itertools.accumulate(self.sizes))


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
        sparse: SparseExecutor | None = None,
    ) -> None:
        self.weights, self.backend, self.page_size = weights, backend, page_size
        self.sparse = sparse  # contextual sparsity for decode rows (torch backend only)
        self.cos, self.sin = cos, sin
        self.exit_depths, self.kv_fill, self.head = exit_depths, kv_fill, head
        self.device = weights.embed.device  # every tensor of a step is made here
        self.pending: dict[int, list[Pending]] = {}  # seq_id -> kept tokens (recompute)
        self.stats = LoopStats()
        self._sparse_step = False
        self.graphs: DecodeGraphs | None = None  # full-depth decode steps as CUDA graph replays

    def release(self, seq_id: int) -> None:
        """Forget a sequence's kept tokens (finished, aborted, or about to be recomputed)."""
        self.pending.pop(seq_id, None)

    def exact_prefix(self, seq_id: int, num_computed_tokens: int) -> int:
        """Tokens before the first one still pending: their K/V is in every layer (recompute mode;
        with propagate nothing is pending and skipped layers hold the propagated approximation)."""
        pending = self.pending.get(seq_id)
        return min(num_computed_tokens, pending[0].position) if pending else num_computed_tokens

    def run(self, step: StepInput) -> LoopResult:
        self._drop_recomputed(step.items)
        self._sparse_step = self.sparse is not None and any(d is not None for d in step.densities)
        if self._sparse_step:
            self.sparse.begin(step.densities)
        exiting = self.exit_depths and any(c is not None for c in step.choices)
        if exiting or any(it.seq.seq_id in self.pending for it in step.items):
            return self._run_with_exits(step)
        return self._run_full(step)

    def _drop_recomputed(self, items: list[ScheduledSeq]) -> None:
        """Positions at or after ``num_computed_tokens`` are being (re)computed anew."""
        for item in items:
            kept = self.pending.get(item.seq.seq_id)
            if kept and kept[-1].position >= item.seq.num_computed_tokens:
                kept = [p for p in kept if p.position < item.seq.num_computed_tokens]
                self.pending[item.seq.seq_id] = kept
                if not kept:
                    self.release(item.seq.seq_id)

    def _meta(self, slices: list[SeqSlice]) -> AttentionMetadata:
        return build_metadata(slices, self.page_size, self.cos, self.sin)

    def _embed(self, token_ids: list[int]) -> torch.Tensor:  # [n, hidden]
        return F.embedding(self._index(token_ids), self.weights.embed)

    def _index(self, values: list[int]) -> torch.Tensor:  # [n] long on the engine's device
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _run_full(self, step: StepInput) -> LoopResult:
        parts = self.backend.micro_batches([s.num_rows for s in step.slices])
        start = time.perf_counter()
        if self._sparse_step:  # single process (sparsity refuses pipeline stages): block by block
            hidden, meta = self._embed(step.token_ids), self._meta(step.slices)
            sizes = [s.num_rows for s in step.slices]
            hidden = self._blocks(0, self.backend.num_blocks, hidden, meta, list(range(len(step.items))), sizes)
        elif len(parts) == 1:
            hidden = None if self.graphs is None else self.graphs.run(step.token_ids, step.slices)
            if hidden is None:  # not a step of decode rows that a graph bucket holds: eager
                hidden, meta = self._embed(step.token_ids), self._meta(step.slices)
                hidden = self.backend.run_blocks(0, self.backend.num_blocks, hidden, meta)
        else:  # pipeline stages: micro-batches of items in flight across the stages
            rows = [0, *itertools.accumulate(s.num_rows for s in step.slices)]
            inputs = [(self._embed(step.token_ids[rows[a] : rows[b]]), self._meta(step.slices[a:b])) for a, b in parts]
            hidden = torch.cat(self.backend.run_pipelined(inputs))  # [rows, hidden], in item order
        self.stats.block_s += time.perf_counter() - start
        result, row = LoopResult(), 0
        for i, item in enumerate(step.items):
            row += item.num_new_tokens
            self._collect(result, i, item, hidden, row)
        return result

    @staticmethod
    def _collect(result: LoopResult, i: int, item: ScheduledSeq, hidden: torch.Tensor, row_end: int) -> None:
        """Item ``i``'s rows after full depth (ending at ``row_end``) that make tokens."""
        if item.draft_token_ids:
            result.verify_rows[i] = hidden[row_end - item.num_new_tokens : row_end]  # [1 + drafts, hidden]
        elif item.samples:
            result.final_rows[i] = hidden[row_end - 1]

    def run_shallow(self, slices: list[SeqSlice], token_ids: list[int], depth: int) -> torch.Tensor:
        """A draft pass: the rows through the blocks ending at or before ``depth`` (a block end),
        writing K/V of those layers only. Returns [rows, hidden] after ``depth`` layers."""
        start = time.perf_counter()
        hidden, meta = self._embed(token_ids), self._meta(slices)
        last = sum(end <= depth for _, end in self.backend.block_ranges)
        hidden = self.backend.run_blocks(0, last, hidden, meta)
        self.stats.draft_s += time.perf_counter() - start
        return hidden

    def run_fuzzy(self, slices: list[SeqSlice], token_ids: list[int], depth: int, group: int) -> torch.Tensor:
        """An easyspec draft pass: layers ``[0, depth)`` in groups of ``group`` that read one input
        (``BlockBackend.run_fuzzy``). Returns [rows, hidden]."""
        start = time.perf_counter()
        hidden = self.backend.run_fuzzy(self._embed(token_ids), self._meta(slices), depth, group)
        self.stats.draft_s += time.perf_counter() - start
        return hidden

    def _run_with_exits(self, step: StepInput) -> LoopResult:
        items = step.items
        walk = _Walk(
            active=list(range(len(items))),
            sizes=[s.num_new for s in step.slices],
            hidden=self._embed(step.token_ids),
            kept=[list(self.pending.get(it.seq.seq_id, [])) for it in items],
            redo=[() for _ in items],
        )
        result, ranges, b = LoopResult(), self.backend.block_ranges, 0
        while b < len(ranges):
            if self._joins_at(walk, ranges[b][0]):
                self._join(walk, ranges[b][0])
            if walk.meta is None:
                walk.meta = self._meta([dataclasses.replace(step.slices[i], redo=walk.redo[i]) for i in walk.active])
            last = self._span(walk, b)
            t0 = time.perf_counter()
            before, walk.hidden = walk.hidden, self._blocks(b, last, walk.hidden, walk.meta, walk.active, walk.sizes)
            self.stats.block_s += time.perf_counter() - t0
            b, end = last, ranges[last - 1][1]
            if end in self.exit_depths:
                leavers = self._check(walk, step.choices, before, end, result)
                if leavers:
                    self._fill(walk, items, leavers, end)
                    self._leave(walk, leavers)
            if not walk.active:
                break
        for i, row_end in zip(walk.active, walk.ends):
            self._collect(result, i, items[i], walk.hidden, row_end)
            self._keep(items[i], walk.kept[i])
        return result

    def _joins_at(self, walk: _Walk, depth: int) -> bool:
        return any(p.depth == depth for i in walk.active for p in walk.kept[i])

    def _span(self, walk: _Walk, b: int) -> int:
        """One past the blocks run in one call from block ``b``: up to the next exit check or join
        (a block that ends at an exit depth runs alone: its policy compares its input and output).
        A backend split over processes sends each stage one message per call."""
        ranges, last = self.backend.block_ranges, b + 1
        while (
            last < len(ranges)
            and ranges[last - 1][1] not in self.exit_depths
            and ranges[last][1] not in self.exit_depths
            and not self._joins_at(walk, ranges[last][0])
        ):
            last += 1
        return last

    def _blocks(
        self,
        first: int,
        last: int,
        hidden: torch.Tensor,  # [rows, hidden]
        meta: AttentionMetadata,
        active: list[int],
        sizes: list[int],
    ) -> torch.Tensor:  # [rows, hidden]
        """Blocks ``[first, last)`` on the rows of the ``active`` items (``sizes`` rows each): through the
        sparse executor, block by block, when the step has sparse rows (an item's single decode row; an
        item that brings recomputed rows along runs dense), else in one backend call."""
        if not self._sparse_step:
            return self.backend.run_blocks(first, last, hidden, meta)
        rows, owners, end = [], [], 0
        for i, size in zip(active, sizes):
            end += size
            if size == 1 and self.sparse.is_sparse(i):
                rows.append(end - 1)
                owners.append(i)
        for b in range(first, last):
            hidden = self.sparse.run_block(b, hidden, meta, rows, owners)
        return hidden

    def _join(self, walk: _Walk, depth: int) -> None:
        """Kept tokens whose K/V stops at ``depth`` re-enter before their item's rows (recompute)."""
        rows = list(torch.split(walk.hidden, walk.sizes))
        for k, i in enumerate(walk.active):
            joins = [p for p in walk.kept[i] if p.depth == depth]
            if joins:
                walk.kept[i] = [p for p in walk.kept[i] if p.depth != depth]
                rows[k] = torch.cat((torch.stack([p.hidden for p in joins]), rows[k]))
                walk.redo[i] = tuple(p.position for p in joins) + walk.redo[i]
                self.stats.recomputed_rows += len(joins)
        walk.hidden, walk.sizes, walk.meta = torch.cat(rows), [r.shape[0] for r in rows], None

    def _check(self, walk: _Walk, choices, before: torch.Tensor, depth: int, result: LoopResult) -> set[int]:
        """Ask each candidate's policy about its newest token; record leavers in ``result``."""
        groups: dict[int, tuple[ExitPolicy, list[int], list[int], list[float]]] = {}
        for i, row_end in zip(walk.active, walk.ends):
            if choices[i] is not None:
                policy, members, rows, thresholds = groups.setdefault(
                    id(choices[i].policy), (choices[i].policy, [], [], [])
                )
                members.append(i)
                rows.append(row_end - 1)
                thresholds.append(choices[i].threshold)
        if not groups:
            return set()
        t0 = time.perf_counter()
        leavers: set[int] = set()
        for policy, members, rows, thresholds in groups.values():
            idx = self._index(rows)
            newest = walk.hidden.index_select(0, idx)  # [m, hidden]
            check = ExitCheck(
                newest,
                before.index_select(0, idx),
                depth,
                torch.tensor(thresholds, dtype=torch.float32, device=self.device),
                self.head,
            )
            decision = policy.decide(check)
            for k, j in enumerate(decision.leave.nonzero().flatten().tolist()):
                logits = None if decision.logits is None else decision.logits[k]
                result.exited[members[j]] = Exit(depth, newest[j], logits)
                leavers.add(members[j])
        self.stats.check_s += time.perf_counter() - t0
        return leavers

    def _fill(self, walk: _Walk, items: list[ScheduledSeq], leavers: set[int], depth: int) -> None:
        """K/V of the layers the leavers skip: propagate now, or keep their rows for recompute."""
        t0 = time.perf_counter()
        ends = walk.ends
        if self.kv_fill == "propagate":
            idx = self._index([ends[k] - 1 for k, i in enumerate(walk.active) if i in leavers])
            meta = walk.meta
            self.backend.propagate_kv(
                walk.hidden.index_select(0, idx), meta.cos[idx], meta.sin[idx], meta.slot_mapping[idx], depth
            )
        else:
            for k, i in enumerate(walk.active):
                if i in leavers:
                    start = items[i].seq.num_computed_tokens
                    positions = walk.redo[i] + tuple(range(start, start + items[i].num_new_tokens))
                    rows = walk.hidden[ends[k] - walk.sizes[k] : ends[k]]
                    walk.kept[i] = walk.kept[i] + [Pending(p, depth, h) for p, h in zip(positions, rows)]
                    self._keep(items[i], walk.kept[i])
        self.stats.fill_s += time.perf_counter() - t0

    @staticmethod
    def _leave(walk: _Walk, leavers: set[int]) -> None:
        """Take the leavers' rows out of the running sub-batch."""
        ends = walk.ends
        stay = [k for k, i in enumerate(walk.active) if i not in leavers]
        rows = [r for k in stay for r in range(ends[k] - walk.sizes[k], ends[k])]
        walk.hidden = walk.hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=walk.hidden.device))
        walk.active, walk.sizes = [walk.active[k] for k in stay], [walk.sizes[k] for k in stay]
        walk.meta = None

    def _keep(self, item: ScheduledSeq, pending: list[Pending]) -> None:
        if pending:
            self.pending[item.seq.seq_id] = sorted(pending, key=lambda p: p.position)
        else:
            self.release(item.seq.seq_id)
