"""Runs one scheduled step: embed, every block in turn, the final head on sampled rows, sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offramp.attention import SeqSlice, build_metadata
from offramp.block_engine import BlockEngine
from offramp.modeling import ModelWeights, final_logits, rope_tables
from offramp.page_manager import PageManager
from offramp.sampling import Sampler
from offramp.scheduler import SchedulerOutput


@dataclass(slots=True)
class RunnerOutput:
    """The one thing the runner hands back: per scheduled sequence, its new token (or None)."""

    token_ids: list[int | None]
    exit_layers: list[int | None]


class ModelRunner:
    def __init__(self, weights: ModelWeights, blocks: BlockEngine, pages: PageManager, max_model_len: int) -> None:
        self.weights = weights
        self.blocks = blocks
        self.pages = pages
        self.sampler = Sampler()
        dtype = weights.embed.dtype
        self.cos, self.sin = rope_tables(weights.inv_freq, max_model_len, weights.attention_scaling, dtype)
        self.num_layers = weights.shape.num_layers

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, generators: dict[int, torch.Generator]) -> RunnerOutput:
        # Decoding sequences first, so that they form one attention group.
        order = sorted(range(len(batch.scheduled)), key=lambda i: batch.scheduled[i].num_new_tokens != 1)
        items = [batch.scheduled[i] for i in order]
        slices, token_ids, sample_rows, row = [], [], [], 0
        for item in items:
            seq, start = item.seq, item.seq.num_computed_tokens
            slices.append(SeqSlice(start, item.num_new_tokens, self.pages.page_table(seq.seq_id)))
            token_ids.extend(seq.token_ids(start, start + item.num_new_tokens))
            row += item.num_new_tokens
            if item.samples:
                sample_rows.append(row - 1)
        meta = build_metadata(slices, self.pages.page_size, self.cos, self.sin)
        hidden = F.embedding(torch.tensor(token_ids, dtype=torch.long), self.weights.embed)  # [n, hidden]
        for b in range(self.blocks.num_blocks):
            hidden = self.blocks.run_block(b, hidden, meta)
        tokens: list[int | None] = [None] * len(items)
        sampling = [i for i, item in enumerate(items) if item.samples]
        if sampling:
            rows = hidden if len(sample_rows) == hidden.shape[0] else hidden[sample_rows]
            logits = final_logits(self.weights, rows)  # [num_sampled, vocab]
            picked = self.sampler(
                logits,
                [items[i].seq.params for i in sampling],
                [generators.get(items[i].seq.seq_id) for i in sampling],
            )
            for i, token in zip(sampling, picked):
                tokens[i] = token
        # Back to the scheduler's order.
        result: list[int | None] = [None] * len(items)
        for pos, i in enumerate(order):
            result[i] = tokens[pos]
        exits = [self.num_layers if t is not None else None for t in result]
        return RunnerOutput(result, exits)
