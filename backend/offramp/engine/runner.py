"""Runs one scheduled step: inputs, the walk down the blocks (``block_loop``), heads, sampling, and the
verification of drafts (lossless mode, ``spec.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from offramp.blocks.base import BlockBackend
from offramp.blocks.cuda_graphs import DecodeGraphs
from offramp.config import EngineConfig
from offramp.engine.block_loop import BlockLoop, ExitChoice, LoopResult, LoopStats, StepInput
from offramp.engine.page_manager import PageManager
from offramp.engine.sampling import Sampler
from offramp.engine.scheduler import ScheduledSeq, SchedulerOutput
from offramp.engine.spec import accept_greedy, accept_sampled
from offramp.exits import ExitHead, ExitPolicy, GatedExit, IdentityHead, LowRankHead, make_policy
from offramp.model.attention import SeqSlice, build_metadata
from offramp.model.decoder import ModelWeights, final_logits, rope_tables
from offramp.sparsity.executor import SparseExecutor, SparseStats
from offramp.sparsity.predictor import load_predictor


@dataclass(slots=True)
class RunnerOutput:
    """The one thing the runner hands back, per scheduled sequence: its new tokens (none for a prompt
    chunk that does not reach the end; several when drafts were accepted), the depth each left at,
    and how many of its drafts the full model accepted."""

    token_ids: list[list[int]]
    exit_layers: list[list[int]]
    num_accepted: list[int]


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
        self.sparse = self._sparse_executor()
        self.loop = BlockLoop(
            weights,
            backend,
            pages.page_size,
            self.cos,
            self.sin,
            config.exit_depths(self.num_layers),
            config.kv_fill,
            self.head,
            self.sparse,
        )
        scratch = backend.kv.scratch_page  # there only where the engine wants graphs (cuda_graphs, one GPU)
        if scratch is not None and self.sparse is None:
            self.loop.graphs = DecodeGraphs(backend, self.cos, self.sin, pages.page_size, max_model_len, scratch)

    def _sparse_executor(self) -> SparseExecutor | None:
        """Contextual sparsity's executor when a predictor is configured (its file is checked here)."""
        cfg = self.config
        if cfg.sparsity_predictor is None:
            return None
        pred = load_predictor(Path(cfg.sparsity_predictor), self.weights, cfg.sparsity_group_size)
        return SparseExecutor(
            self.weights,
            self.backend.kv,
            self.backend.block_ranges,
            pred,
            cfg.head_density,
            cfg.sparsity_floor,
            cfg.sparsity_batching,
            cfg.sparsity_max_gap,
        )

    @property
    def stats(self) -> LoopStats:
        return self.loop.stats

    def reset_stats(self) -> None:
        self.loop.stats = LoopStats()
        if self.sparse is not None:
            self.sparse.stats = SparseStats()

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
        rows, logits, depths, verify = self._logits(walked)  # rows: the step's items that sample
        params = [step.items[i].seq.params for i in rows]
        tokens = self.sampler(logits, params, [generators.get(step.items[i].seq.seq_id) for i in rows]) if rows else []
        out = self._output(order, rows, tokens, depths)
        for i, row_logits in verify.items():
            accepted = self._verify(step.items[i], row_logits, generators.get(step.items[i].seq.seq_id))
            out.token_ids[order[i]], out.exit_layers[order[i]] = accepted, [self.num_layers] * len(accepted)
            out.num_accepted[order[i]] = len(accepted) - 1
        return out

    def _verify(self, item: ScheduledSeq, logits: torch.Tensor, generator: torch.Generator | None) -> list[int]:
        """The item's accepted drafts and the full model's next token; ``logits`` [1 + drafts, vocab]."""
        drafts, params = item.draft_token_ids, item.seq.params
        if params.is_greedy:
            tokens = accept_greedy(logits, drafts)
        else:
            probs = torch.stack([self.sampler.probs(row, params) for row in logits])  # [1 + drafts, vocab]
            tokens = accept_sampled(probs, drafts, generator)
        stats = self.loop.stats
        stats.num_verifications += 1
        stats.num_draft_tokens += len(drafts)
        stats.num_accepted_tokens += len(tokens) - 1
        return tokens

    def _prepare(self, items: list[ScheduledSeq]) -> StepInput:
        slices, token_ids = [], []
        for item in items:
            start = item.seq.num_computed_tokens
            slices.append(SeqSlice(start, item.num_new_tokens, self.pages.page_table(item.seq.seq_id)))
            token_ids.extend(item.token_ids())
        choices = [self._exit_choice(item) for item in items]
        return StepInput(items, slices, token_ids, choices, [self._density(item) for item in items])

    def _density(self, item: ScheduledSeq) -> float | None:
        """The item's FFN density if its token runs sparse: decode tokens of requests past their
        prompt, never lossless ones (the full model verifies) nor prompt chunks."""
        seq = item.seq
        if self.sparse is None or item.num_new_tokens != 1 or not item.samples or seq.lossless:
            return None
        if seq.num_computed_tokens < seq.num_prompt_tokens or item.draft_token_ids:
            return None
        density = self.config.sparsity if seq.params.sparsity is None else seq.params.sparsity
        return None if density >= 1 and self.config.head_density >= 1 else density

    def _exit_choice(self, item: ScheduledSeq) -> ExitChoice | None:
        """The item's policy and threshold if its token may leave early: decode tokens only, and
        never in lossless mode."""
        seq = item.seq
        name = seq.params.exit_policy or self.config.exit_policy
        if name == "none" or item.num_new_tokens != 1 or not item.samples or seq.lossless:
            return None  # prompt chunks and recomputation after preemption run full depth
        if seq.num_computed_tokens < seq.num_prompt_tokens:
            return None
        threshold = seq.params.exit_threshold
        return ExitChoice(self.policy(name), self.config.exit_threshold if threshold is None else threshold)

    def _logits(self, walked: LoopResult) -> tuple[list[int], torch.Tensor | None, list[int], dict[int, torch.Tensor]]:
        """The one place that makes next-token logits: for the rows that sample, (their item indices,
        logits [k, vocab], depth each left at), and for items with drafts their rows' logits
        {item: [1 + drafts, vocab]}. Exited rows first go through their depth's exit head shortcut;
        then one LM head call serves every row, whatever its depth. Logits a policy already
        computed to decide (softmax) are reused."""
        made = {i: e.logits for i, e in walked.exited.items() if e.logits is not None}
        heads_in: dict[int, torch.Tensor] = dict(walked.final_rows)  # item -> [hidden] the LM head reads
        by_depth: dict[int, list[int]] = {}
        for i, e in walked.exited.items():
            if e.logits is None:
                by_depth.setdefault(e.depth, []).append(i)
        for depth, members in by_depth.items():  # [m, hidden] each depth's leavers through its shortcut
            moved = self.head.transform(torch.stack([walked.exited[i].hidden for i in members]), depth)
            heads_in.update(zip(members, moved))
        verify: dict[int, torch.Tensor] = {}
        if heads_in or walked.verify_rows:
            owners, checked = sorted(heads_in), sorted(walked.verify_rows)
            parts = [torch.stack([heads_in[i] for i in owners])] if owners else []
            parts += [walked.verify_rows[i] for i in checked]  # [1 + drafts, hidden] each
            out = final_logits(self.weights, parts[0] if len(parts) == 1 else torch.cat(parts))
            made.update(zip(owners, out[: len(owners)]))
            sizes = [walked.verify_rows[i].shape[0] for i in checked]
            verify = dict(zip(checked, out[len(owners) :].split(sizes)))
        rows = sorted(made)
        depths = [walked.exited[i].depth if i in walked.exited else self.num_layers for i in rows]
        logits = torch.stack([made[i] for i in rows]) if rows else None  # [k, vocab]
        return rows, logits, depths, verify

    @staticmethod
    def _output(order: list[int], rows: list[int], tokens: list[int], depths: list[int]) -> RunnerOutput:
        """Back in the scheduler's order: each scheduled sequence's tokens and exit depths (none this
        step for a prompt chunk that does not reach the end)."""
        token_ids: list[list[int]] = [[] for _ in order]
        exit_layers: list[list[int]] = [[] for _ in order]
        for row, token, depth in zip(rows, tokens, depths):
            token_ids[order[row]], exit_layers[order[row]] = [token], [depth]
        return RunnerOutput(token_ids, exit_layers, [0] * len(order))

    @torch.inference_mode()
    def full_depth_hidden(
        self, token_ids: list[int], page_table: list[int], first: int, depths: tuple[int, ...] = ()
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Teacher forcing: run all tokens as one full-depth prompt over the given pages and return
        the hidden states of rows ``first ..`` after each block end in ``depths`` and after the last
        layer: ({depth: [n, hidden]}, [n, hidden])."""
        meta = build_metadata([SeqSlice(0, len(token_ids), page_table)], self.pages.page_size, self.cos, self.sin)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.weights.embed.device)
        hidden = F.embedding(ids, self.weights.embed)  # [n, hidden]
        captured: dict[int, torch.Tensor] = {}
        for b, (_, end) in enumerate(self.backend.block_ranges):
            hidden = self.backend.run_block(b, hidden, meta)
            if end in depths:
                captured[end] = hidden[first:].clone()
        return captured, hidden[first:]
