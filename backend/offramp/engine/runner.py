"""Runs one scheduled step: inputs, the walk down the blocks (``block_loop``), heads, sampling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.blocks.base import BlockBackend
from offramp.config import EngineConfig
from offramp.engine.block_loop import BlockLoop
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
            self._exit_choice,
        )

    @property
    def stats(self):
        return self.loop.stats

    def policy(self, name: str) -> ExitPolicy:
        if name not in self._policies:
            path = None if self.config.exit_classifier is None else Path(self.config.exit_classifier)
            policy = make_policy(name, path)
            if self.config.exit_gate is not None and name == "softmax":
                policy = GatedExit(make_policy(self.config.exit_gate, path), self.config.exit_gate_threshold, policy)
            self._policies[name] = policy
        return self._policies[name]

    def _exit_choice(self, item: ScheduledSeq) -> tuple[ExitPolicy, float] | None:
        """The item's (policy, threshold) if its token may leave early: decode tokens only."""
        seq = item.seq
        name = seq.params.exit_policy or self.config.exit_policy
        if name == "none" or item.num_new_tokens != 1 or not item.samples:
            return None  # prompt chunks and recomputation after preemption run full depth
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            return None
        threshold = seq.params.exit_threshold
        return self.policy(name), self.config.exit_threshold if threshold is None else threshold

    def release(self, seq_id: int) -> None:
        self.loop.release(seq_id)

    def exact_prefix(self, seq_id: int, num_computed_tokens: int) -> int:
        """How many leading computed tokens have exact K/V in every layer (recompute mode keeps
        early-exited tokens pending until a deeper token pulls them along)."""
        return self.loop.exact_prefix(seq_id, num_computed_tokens)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, generators: dict[int, torch.Generator]) -> RunnerOutput:
        # Decoding sequences first: they form one attention group.
        order = sorted(range(len(batch.scheduled)), key=lambda i: batch.scheduled[i].num_new_tokens != 1)
        items = [batch.scheduled[i] for i in order]
        slices, token_ids = [], []
        for item in items:
            start = item.seq.num_computed_tokens
            slices.append(SeqSlice(start, item.num_new_tokens, self.pages.page_table(item.seq.seq_id)))
            token_ids.extend(item.seq.token_ids(start, start + item.num_new_tokens))
        result = self.loop.run(items, slices, token_ids)
        logits: dict[int, torch.Tensor] = {}
        depths: dict[int, int] = {i: self.num_layers for i in result.final_rows}
        heads_in: dict[int, torch.Tensor] = dict(result.final_rows)  # rows the final LM head reads
        by_depth: dict[int, list[int]] = {}
        for i, (depth, _, row) in result.exited.items():
            depths[i] = depth
            if row is not None:  # the policy already computed this row's logits
                logits[i] = row
            else:
                by_depth.setdefault(depth, []).append(i)
        for depth, members in by_depth.items():  # each depth's shortcut on its leavers: [m, hidden]
            moved = self.head.transform(torch.stack([result.exited[i][1] for i in members]), depth)
            heads_in.update(zip(members, moved))
        if heads_in:  # one LM head call for every row, whatever its depth
            owners = sorted(heads_in)
            final = final_logits(self.weights, torch.stack([heads_in[i] for i in owners]))  # [k, vocab]
            logits.update(zip(owners, final))
        return self._sample(order, items, logits, depths, generators)

    def _sample(self, order, items, logits, depths, generators) -> RunnerOutput:
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
        result: list[int | None] = [None] * len(items)
        exit_layers: list[int | None] = [None] * len(items)
        for pos, i in enumerate(order):
            result[i] = tokens[pos]
            exit_layers[i] = depths.get(pos) if tokens[pos] is not None else None
        return RunnerOutput(result, exit_layers)

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
