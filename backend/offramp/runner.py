"""Runs one scheduled step: embed, the blocks in turn on a shrinking sub-batch, heads, sampling.

After each exit point the decoding tokens still running are checked by their exit policy; those
that leave do no further block work this step, get their token from the exit head, and have the
K/V of the layers they skipped filled. Prompt chunks always run full depth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.attention import SeqSlice, build_metadata
from offramp.block_engine import BlockEngine
from offramp.config import EngineConfig
from offramp.exits import ExitCheck, ExitHead, ExitPolicy, GatedExit, IdentityHead, make_policy
from offramp.modeling import ModelWeights, final_logits, rope_tables
from offramp.page_manager import PageManager
from offramp.sampling import Sampler
from offramp.scheduler import ScheduledSeq, SchedulerOutput


@dataclass(slots=True)
class RunnerOutput:
    """The one thing the runner hands back: per scheduled sequence, its new token and exit depth."""

    token_ids: list[int | None]
    exit_layers: list[int | None]


@dataclass(slots=True)
class RunnerStats:
    """Time spent, for benchmarks: block work vs exit checks (and KV fill)."""

    block_s: float = 0.0
    check_s: float = 0.0
    fill_s: float = 0.0
    layers_run: int = 0  # token-layers actually computed for sampled decode tokens
    layers_full: int = 0  # token-layers full depth would have computed
    extra: dict = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self, weights: ModelWeights, blocks: BlockEngine, pages: PageManager, config: EngineConfig, max_model_len: int
    ) -> None:
        self.weights = weights
        self.blocks = blocks
        self.pages = pages
        self.config = config
        self.sampler = Sampler()
        self.head: ExitHead = IdentityHead(weights)
        self.cos, self.sin = rope_tables(
            weights.inv_freq, max_model_len, weights.attention_scaling, weights.embed.dtype
        )
        self.num_layers = weights.shape.num_layers
        self.exit_depths = config.exit_depths(self.num_layers)
        self._policies: dict[str, ExitPolicy] = {}
        self.stats = RunnerStats()

    def policy(self, name: str) -> ExitPolicy:
        if name not in self._policies:
            path = None if self.config.exit_classifier is None else Path(self.config.exit_classifier)
            policy = make_policy(name, path)
            if self.config.exit_gate is not None and name == "softmax":
                gate = make_policy(self.config.exit_gate, path)
                policy = GatedExit(gate, self.config.exit_gate_threshold, policy)
            self._policies[name] = policy
        return self._policies[name]

    def _policy_name(self, item: ScheduledSeq) -> str:
        return item.seq.params.exit_policy or self.config.exit_policy

    def _threshold(self, item: ScheduledSeq) -> float:
        t = item.seq.params.exit_threshold
        return self.config.exit_threshold if t is None else t

    @torch.inference_mode()
    def full_depth_argmax(self, token_ids: list[int], page_table: list[int], first: int) -> list[int]:
        """Greedy choice of the full model after each prefix ``token_ids[:k + 1]``, ``k >= first``.

        Runs all tokens as one full-depth prompt over the given pages (teacher forcing).
        """
        meta = build_metadata([SeqSlice(0, len(token_ids), page_table)], self.pages.page_size, self.cos, self.sin)
        hidden = F.embedding(torch.tensor(token_ids, dtype=torch.long), self.weights.embed)  # [n, hidden]
        for b in range(self.blocks.num_blocks):
            hidden = self.blocks.run_block(b, hidden, meta)
        return final_logits(self.weights, hidden[first:]).argmax(-1).tolist()

    def _may_exit(self, item: ScheduledSeq) -> bool:
        """Only decode tokens (past the prompt) may leave early; prompt chunks run full depth."""
        seq = item.seq
        return (
            item.num_new_tokens == 1
            and seq.num_computed_tokens >= seq.num_prompt_tokens
            and self._policy_name(item) != "none"
        )

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, generators: dict[int, torch.Generator]) -> RunnerOutput:
        # Decoding sequences first: they form one attention group, and only they may exit.
        order = sorted(range(len(batch.scheduled)), key=lambda i: batch.scheduled[i].num_new_tokens != 1)
        items = [batch.scheduled[i] for i in order]
        slices, token_ids = [], []
        for item in items:
            start = item.seq.num_computed_tokens
            slices.append(SeqSlice(start, item.num_new_tokens, self.pages.page_table(item.seq.seq_id)))
            token_ids.extend(item.seq.token_ids(start, start + item.num_new_tokens))
        exitable = [i for i, it in enumerate(items) if self._may_exit(it)]
        if exitable and self.exit_depths:
            exited = self._run_blocks_with_exits(items, slices, token_ids, exitable)
        else:
            exited = self._run_blocks(slices, token_ids)
        logits, exit_layers = self._logits(items, exited)
        return self._sample(batch, order, items, logits, exit_layers, generators)

    def _run_blocks(self, slices: list[SeqSlice], token_ids: list[int]) -> dict[int, tuple]:
        meta = build_metadata(slices, self.pages.page_size, self.cos, self.sin)
        hidden = F.embedding(torch.tensor(token_ids, dtype=torch.long), self.weights.embed)  # [n, hidden]
        start = time.perf_counter()
        for b in range(self.blocks.num_blocks):
            hidden = self.blocks.run_block(b, hidden, meta)
        self.stats.block_s += time.perf_counter() - start
        self._final_hidden = hidden
        self._final_items = list(range(len(slices)))
        return {}

    def _run_blocks_with_exits(
        self, items: list[ScheduledSeq], slices: list[SeqSlice], token_ids: list[int], exitable: list[int]
    ) -> dict[int, tuple]:
        """Blocks on a shrinking sub-batch. Returns item index -> (exit depth, hidden row, logits or None)."""
        active = list(range(len(items)))  # item indices still running, decodes first (one row each)
        meta = build_metadata(slices, self.pages.page_size, self.cos, self.sin)
        hidden = F.embedding(torch.tensor(token_ids, dtype=torch.long), self.weights.embed)  # [n, hidden]
        can_exit = set(exitable)
        exited: dict[int, tuple] = {}
        for b, (_, end) in enumerate(self.blocks.block_ranges):
            start = time.perf_counter()
            before = hidden
            hidden = self.blocks.run_block(b, hidden, meta)
            self.stats.block_s += time.perf_counter() - start
            if end not in self.exit_depths:
                continue
            rows = [r for r, i in enumerate(active) if i in can_exit]  # a decode item's row is its position
            if not rows:
                continue
            start = time.perf_counter()
            leave_rows = self._check(items, active, rows, hidden, before, end, exited)
            self.stats.check_s += time.perf_counter() - start
            if not leave_rows:
                continue
            start = time.perf_counter()
            idx = torch.tensor(leave_rows, dtype=torch.long)
            self.blocks.propagate_kv(hidden[idx], meta.cos[idx], meta.sin[idx], meta.slot_mapping[idx], end)
            self.stats.fill_s += time.perf_counter() - start
            gone = set(leave_rows)
            keep = [r for r in range(len(active)) if r not in gone]
            active = [active[r] for r in keep]
            if not active:
                break
            hidden = hidden[self._rows_of(keep, active, slices)]
            meta = build_metadata([slices[i] for i in active], self.pages.page_size, self.cos, self.sin)
        self._final_hidden = hidden
        self._final_items = active if active else []
        return exited

    @staticmethod
    def _rows_of(keep: list[int], active: list[int], slices: list[SeqSlice]) -> torch.Tensor:
        """Hidden rows of the kept items. Decodes (one row each) come first, so only they can leave:
        the kept decode rows are their positions, followed by every prompt-chunk row unchanged."""
        num_decode_kept = sum(1 for i in active if slices[i].num_new == 1)
        decode_rows = keep[:num_decode_kept]
        tail_start = keep[num_decode_kept] if num_decode_kept < len(keep) else None
        rows = list(decode_rows)
        if tail_start is not None:
            num_tail = sum(slices[i].num_new for i in active[num_decode_kept:])
            rows.extend(range(tail_start, tail_start + num_tail))
        return torch.tensor(rows, dtype=torch.long)

    def _check(self, items, active, rows, hidden, before, depth, exited) -> list[int]:
        """Ask each policy about its rows; record the leavers in ``exited``; return their rows."""
        by_policy: dict[str, list[int]] = {}
        for r in rows:
            by_policy.setdefault(self._policy_name(items[active[r]]), []).append(r)
        leave_rows = []
        for name, group in by_policy.items():
            idx = torch.tensor(group, dtype=torch.long)
            thresholds = torch.tensor([self._threshold(items[active[r]]) for r in group], dtype=torch.float32)
            decision = self.policy(name).decide(ExitCheck(hidden[idx], before[idx], depth, thresholds, self.head))
            for j in decision.leave.nonzero().flatten().tolist():
                r = group[j]
                logits = decision.row_logits(j)
                exited[active[r]] = (depth, hidden[r], logits)
                leave_rows.append(r)
        return sorted(leave_rows)

    def _logits(self, items: list[ScheduledSeq], exited: dict[int, tuple]) -> tuple[dict[int, torch.Tensor], dict]:
        """Logits of every sampling item: exit head for leavers, final head for the rest."""
        logits: dict[int, torch.Tensor] = {}
        depths: dict[int, int] = {}
        rows, owners, row = [], [], 0
        for i in self._final_items:
            row += items[i].num_new_tokens
            if items[i].samples:
                rows.append(row - 1)
                owners.append(i)
        if owners:
            h = self._final_hidden
            final = final_logits(self.weights, h if len(rows) == h.shape[0] else h[rows])  # [k, vocab]
            for i, lg in zip(owners, final):
                logits[i], depths[i] = lg, self.num_layers
        pending = [(i, d, h) for i, (d, h, lg) in exited.items() if lg is None]
        for i, (d, _, lg) in exited.items():
            if lg is not None:
                logits[i], depths[i] = lg, d
        for i, d, h in pending:
            logits[i], depths[i] = self.head.logits(h[None], d)[0], d
        return logits, depths

    def _sample(self, batch, order, items, logits, depths, generators) -> RunnerOutput:
        sampling = sorted(logits)
        tokens: list[int | None] = [None] * len(items)
        if sampling:
            picked = self.sampler(
                torch.stack([logits[i] for i in sampling]),
                [items[i].seq.params for i in sampling],
                [generators.get(items[i].seq.seq_id) for i in sampling],
            )
            for i, token in zip(sampling, picked):
                tokens[i] = token
                if items[i].num_new_tokens == 1:
                    self.stats.layers_run += depths[i]
                    self.stats.layers_full += self.num_layers
        result: list[int | None] = [None] * len(items)
        exit_layers: list[int | None] = [None] * len(items)
        for pos, i in enumerate(order):
            result[i] = tokens[pos]
            exit_layers[i] = depths.get(pos) if tokens[pos] is not None else None
        return RunnerOutput(result, exit_layers)
