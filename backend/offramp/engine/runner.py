"""Runs one scheduled step: inputs, the walk down the blocks (``block_loop``), heads, sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.blocks.base import BlockBackend
from offramp.config import EngineConfig
from offramp.engine.block_loop import BlockLoop, ExitChoice, LoopResult, LoopStats, StepInput
from offramp.engine.page_manager import PageManager
from offramp.engine.sampling import Sampler
from offramp.engine.scheduler import ScheduledSeq, SchedulerOutput
from offramp.exits import ExitHead, ExitPolicy, GatedExit, IdentityHead, LowRankHead, make_policy
from offramp.model.attention import SeqSlice, build_metadata
from offramp.model.decoder import ModelWeights, final_logits, rope_tables


@dataclass(slots=True)
class RunnerOutput:
    """The one thing the runner hands back: per scheduled sequence, its new token and exit depth."""

    token_ids: list[int | None]
    exit_layers: list[int | None]


class ModelRunner:
    def __init__(
        self, weights: ModelWeights, backend: BlockBackend, pages: PageManager, config: EngineConfig, max_model_len: int
    ) -> None:
        self.weights = weights
        self.backend = backend
        self.pages = pages
        self.config = config
        self.sampler = Sampler()
        self.head: ExitHead = (
            IdentityHead(weights) if config.exit_head is None else LowRankHead(weights, Path(config.exit_head))
        )
        self.cos, self.sin = rope_tables(
            weights.inv_freq, max_model_len, weights.attention_scaling, weights.embed.dtype
        )
        self.num_layers = weights.shape.num_layers
        self._policies: dict[str, ExitPolicy] = {}
        self.loop = BlockLoop(
            weights,
            backend,
            pages.page_size,
            self.cos,
            self.sin,
            config.exit_depths(self.num_layers),
            config.kv_fill,
            self.head,
        )

    @property
    def stats(self) -> LoopStats:
        return self.loop.stats

    def reset_stats(self) -> None:
        self.loop.stats = LoopStats()

    def policy(self, name: str) -> ExitPolicy:
        """The policy called ``name`` (built once; raises ``ValueError`` if it cannot run)."""
        if name not in self._policies:
            path = None if self.config.exit_classifier is None else Path(self.config.exit_classifier)
            policy = make_policy(name, path)
            if self.config.exit_gate is not None and name == "softmax":
                policy = GatedExit(make_policy(self.config.exit_gate, path), self.config.exit_gate_threshold, policy)
            self._policies[name] = policy
        return self._policies[name]

    def release(self, seq_id: int) -> None:
        self.loop.release(seq_id)

    def exact_prefix(self, seq_id: int, num_computed_tokens: int) -> int:
        """How many leading computed tokens have exact K/V in every layer (recompute mode keeps
        early-exited tokens pending until a deeper token pulls them along)."""
        return self.loop.exact_prefix(seq_id, num_computed_tokens)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, generators: dict[int, torch.Generator]) -> RunnerOutput:
        """One step: inputs (decode rows first, each row's exit choice), the walk down the blocks,
        logits, sampling."""
        order = sorted(range(len(batch.scheduled)), key=lambda i: batch.scheduled[i].num_new_tokens != 1)
        step = self._prepare([batch.scheduled[i] for i in order])
        walked = self.loop.run(step)
        rows, logits, depths = self._logits(walked)  # rows: the step's items that sample
        params = [step.items[i].seq.params for i in rows]
        tokens = self.sampler(logits, params, [generators.get(step.items[i].seq.seq_id) for i in rows]) if rows else []
        return self._output(order, rows, tokens, depths)

    def _prepare(self, items: list[ScheduledSeq]) -> StepInput:
        slices, token_ids = [], []
        for item in items:
            start = item.seq.num_computed_tokens
            slices.append(SeqSlice(start, item.num_new_tokens, self.pages.page_table(item.seq.seq_id)))
            token_ids.extend(item.seq.token_ids(start, start + item.num_new_tokens))
        return StepInput(items, slices, token_ids, [self._exit_choice(item) for item in items])

    def _exit_choice(self, item: ScheduledSeq) -> ExitChoice | None:
        """The item's policy and threshold if its token may leave early: decode tokens only."""
        seq = item.seq
        name = seq.params.exit_policy or self.config.exit_policy
        if name == "none" or item.num_new_tokens != 1 or not item.samples:
            return None  # prompt chunks and recomputation after preemption run full depth
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            return None
        threshold = seq.params.exit_threshold
        return ExitChoice(self.policy(name), self.config.exit_threshold if threshold is None else threshold)

    def _logits(self, walked: LoopResult) -> tuple[list[int], torch.Tensor, list[int]]:
        """The one place that makes next-token logits: for the rows that sample, (their item indices,
        logits [k, vocab], depth each left at). Exited rows first go through their depth's exit head
        shortcut; then one LM head call serves every row, whatever its depth. Logits a policy
        already computed to decide (softmax) are reused."""
        made = {i: e.logits for i, e in walked.exited.items() if e.logits is not None}
        heads_in: dict[int, torch.Tensor] = dict(walked.final_rows)  # item -> [hidden] the LM head reads
        by_depth: dict[int, list[int]] = {}
        for i, e in walked.exited.items():
            if e.logits is None:
                by_depth.setdefault(e.depth, []).append(i)
        for depth, members in by_depth.items():  # [m, hidden] each depth's leavers through its shortcut
            moved = self.head.transform(torch.stack([walked.exited[i].hidden for i in members]), depth)
            heads_in.update(zip(members, moved))
        if heads_in:
            owners = sorted(heads_in)
            made.update(zip(owners, final_logits(self.weights, torch.stack([heads_in[i] for i in owners]))))
        rows = sorted(made)
        depths = [walked.exited[i].depth if i in walked.exited else self.num_layers for i in rows]
        logits = torch.stack([made[i] for i in rows]) if rows else torch.empty(0)  # [k, vocab]
        return rows, logits, depths

    @staticmethod
    def _output(order: list[int], rows: list[int], tokens: list[int], depths: list[int]) -> RunnerOutput:
        """Back in the scheduler's order: each scheduled sequence's token and exit depth (None: no
        token this step, a prompt chunk that does not reach the end)."""
        token_ids: list[int | None] = [None] * len(order)
        exit_layers: list[int | None] = [None] * len(order)
        for row, token, depth in zip(rows, tokens, depths):
            token_ids[order[row]], exit_layers[order[row]] = token, depth
        return RunnerOutput(token_ids, exit_layers)

    @torch.inference_mode()
    def full_depth_hidden(
        self, token_ids: list[int], page_table: list[int], first: int, depths: tuple[int, ...] = ()
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Teacher forcing: run all tokens as one full-depth prompt over the given pages and return
        the hidden states of rows ``first ..`` after each block end in ``depths`` and after the last
        layer: ({depth: [n, hidden]}, [n, hidden])."""
        meta = build_metadata([SeqSlice(0, len(token_ids), page_table)], self.pages.page_size, self.cos, self.sin)
        hidden = F.embedding(torch.tensor(token_ids, dtype=torch.long), self.weights.embed)  # [n, hidden]
        captured: dict[int, torch.Tensor] = {}
        for b, (_, end) in enumerate(self.backend.block_ranges):
            hidden = self.backend.run_block(b, hidden, meta)
            if end in depths:
                captured[end] = hidden[first:].clone()
        return captured, hidden[first:]
