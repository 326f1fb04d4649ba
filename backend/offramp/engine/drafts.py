"""Draft sources of the lossless mode, and the ``Speculator`` that runs them each step.

- ``ngram`` (prompt lookup): the continuation after the latest earlier occurrence of the last n
  tokens (n = 3, then 2, then 1) in prompt + output. Free to compute; strong where the answer copies
  from the prompt.
- ``exit`` (self-speculation, LayerSkip / Kangaroo): the first d layers (``spec_exit_depth``, a block
  end) and the exit head (identity, or the ``exit_head`` shortcut) draft greedily, one token per
  pass, for all drafting sequences together; a sequence stops drafting when the head's top-1
  probability falls below ``spec_draft_threshold`` (Kangaroo's double early exit). The passes write
  K/V of layers below d only; verification rewrites every layer at those positions.
- ``easyspec`` (R5, EasySpec's fuzzy speculation): as ``exit``, but the d draft layers run in groups of
  g (``spec_group_size``) consecutive layers that all read their group's input, so that a group's layers
  could run at once (on g devices, or as one grouped product). Their K/V is approximate; the
  verification pass rewrites every layer's K/V at the drafted positions exactly, which is EasySpec's
  bonus calibration (here it comes with verification: one KV store serves draft and full model, and
  the full model must read exact K/V to stay lossless). Torch backend only (it runs single layers).

Every source drafts deterministically (greedy), so the speculative-sampling rule in ``spec.py``
keeps sampled outputs distributed as plain sampling's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from offramp.blocks.base import BlockBackend
from offramp.config import EngineConfig
from offramp.engine.block_loop import BlockLoop
from offramp.engine.page_manager import PageManager
from offramp.engine.sampling import SamplingParams
from offramp.engine.scheduler import ScheduledSeq, SchedulerOutput
from offramp.engine.sequence import Sequence
from offramp.engine.spec import DraftLength, SpecState, resolve_spec, verify_costs
from offramp.exits import ExitHead
from offramp.model.attention import SeqSlice
from offramp.model.decoder import ModelShape
from offramp.model.device import cpu_vector_isa

NGRAM_SIZES = (3, 2, 1)  # longest match first


class DraftSource(ABC):
    name: str

    @abstractmethod
    def propose(self, items: list[ScheduledSeq]) -> list[list[int]]:
        """Drafts for each item (at most its ``num_draft_slots``; fewer or none are fine)."""


def ngram_lookup(tokens: list[int], k: int, sizes: tuple[int, ...] = NGRAM_SIZES) -> list[int]:
    """Up to ``k`` tokens following the latest earlier occurrence of the last n tokens of
    ``tokens``, for the largest n in ``sizes`` that has one with a continuation."""
    num = len(tokens)
    for n in sizes:
        if num <= n:
            continue
        tail = tokens[-n:]
        for start in range(num - n - 1, -1, -1):  # latest first; never the tail itself
            if tokens[start] == tail[0] and tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


class NgramDraft(DraftSource):
    """Prompt lookup; the lookup runs before scheduling (``plan``) so that slots match the drafts."""

    name = "ngram"

    @staticmethod
    def plan(seq: Sequence, k: int) -> tuple[int, ...]:
        return tuple(ngram_lookup(seq.prompt_token_ids + seq.output_token_ids, k))

    def propose(self, items: list[ScheduledSeq]) -> list[list[int]]:
        return [list(item.seq.spec.planned[: item.num_draft_slots]) for item in items]


class ExitDraft(DraftSource):
    """The first ``depth`` layers and the exit head draft greedily, all sequences in one pass per draft."""

    name = "exit"

    def __init__(self, loop: BlockLoop, head: ExitHead, pages: PageManager, depth: int, threshold: float) -> None:
        self.loop, self.head, self.pages = loop, head, pages
        self.depth, self.threshold = depth, threshold

    def propose(self, items: list[ScheduledSeq]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in items]
        live = list(range(len(items)))
        for j in range(max(item.num_draft_slots for item in items)):
            live = [i for i in live if len(drafts[i]) == j and j < items[i].num_draft_slots]
            if not live:
                break
            slices, token_ids = [], []
            for i in live:
                seq = items[i].seq
                start = seq.num_computed_tokens + j  # the last token, then each draft in turn
                slices.append(SeqSlice(start, 1, self.pages.page_table(seq.seq_id)))
                token_ids.append(seq.token_ids(start, start + 1)[0] if j == 0 else drafts[i][-1])
            hidden = self._draft_pass(slices, token_ids)  # [live, hidden]
            probs = self.head.logits(hidden, self.depth).softmax(-1)  # [live, vocab]
            top, picks = probs.max(dim=-1)
            for i, p, token in zip(live, top.tolist(), picks.tolist()):
                if p >= self.threshold:
                    drafts[i].append(token)
        return drafts

    def _draft_pass(self, slices: list[SeqSlice], token_ids: list[int]) -> torch.Tensor:
        return self.loop.run_shallow(slices, token_ids, self.depth)


class EasySpecDraft(ExitDraft):
    """The exit source's drafting with fuzzy layer groups (``BlockLoop.run_fuzzy``)."""

    name = "easyspec"

    def __init__(self, loop: BlockLoop, head: ExitHead, pages: PageManager, depth: int, threshold: float, group: int):
        super().__init__(loop, head, pages, depth, threshold)
        self.group = group

    def _draft_pass(self, slices: list[SeqSlice], token_ids: list[int]) -> torch.Tensor:
        return self.loop.run_fuzzy(slices, token_ids, self.depth, self.group)


def default_exit_depth(block_ranges: list[tuple[int, int]], num_layers: int) -> int:
    """The block end nearest half the layers (not the last)."""
    ends = [end for _, end in block_ranges if end < num_layers]
    if not ends:
        raise ValueError("spec_exit_depth: the model has one block; the exit source needs a block end before the last")
    return min(ends, key=lambda end: (abs(2 * end - num_layers), end))


def exit_draft_cost(shape: ModelShape, depth: int) -> float:
    """One draft token of ``depth`` layers and the LM head relative to a decode step, by weight
    bytes (decode is memory-bound): (d * layer + head) / (L * layer + head)."""
    h, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * shape.intermediate_size
    head = shape.vocab_size * h
    return (depth * layer + head) / (shape.num_layers * layer + head)


class Speculator:
    """Runs the lossless mode around each step: ``new_request`` (a request's mode and source), ``plan``
    (before scheduling), ``propose`` (fill the scheduled draft slots) and ``record`` (adapt lengths)."""

    def __init__(
        self,
        config: EngineConfig,
        loop: BlockLoop,
        head: ExitHead,
        pages: PageManager,
        shape: ModelShape,
        block_ranges: list[tuple[int, int]],
        max_model_len: int,
    ) -> None:
        self.config, self.loop, self.head, self.pages = config, loop, head, pages
        self.shape, self.block_ranges, self.max_model_len = shape, block_ranges, max_model_len
        cpu = cpu_vector_isa() if loop.device.type == "cpu" else None  # the tables are per CPU kind
        costs = verify_costs(config.dtype, config.weights, config.spec_verify_row_cost, config.spec_max_draft, cpu)
        self.lengths = DraftLength(costs, config.spec_retry_steps, config.spec_adaptive)
        self._sources: dict[str, tuple[DraftSource, float]] = {}
        if config.spec_exit_depth is not None or config.spec == "exit":
            self._source("exit")  # a depth that cannot draft fails at load
        if config.spec != "none":
            self._source(config.spec)

    def _source(self, name: str) -> tuple[DraftSource, float]:
        """The source called ``name`` and the cost of one of its draft tokens (built once)."""
        if name not in self._sources:
            if name == "ngram":
                self._sources[name] = (NgramDraft(), 0.0)
                return self._sources[name]
            depth, threshold = self.exit_depth(), self.config.spec_draft_threshold
            if name == "easyspec":
                if type(self.loop.backend).run_fuzzy is BlockBackend.run_fuzzy:
                    raise ValueError(
                        "spec: easyspec runs single layers in one process: --backend torch without pipeline "
                        f"stages (not {type(self.loop.backend).__name__})"
                    )
                group = self.config.spec_group_size
                source = EasySpecDraft(self.loop, self.head, self.pages, depth, threshold, group)
            else:
                source = ExitDraft(self.loop, self.head, self.pages, depth, threshold)
            # on one device a fuzzy group costs what its layers cost; g devices would divide the draft's layers by g
            self._sources[name] = (source, exit_draft_cost(self.shape, depth))
        return self._sources[name]

    def set_source(self, name: str, source: DraftSource, draft_cost: float = 0.0) -> None:
        """Serve the draft source called ``name`` (``exit``, ``easyspec`` or ``ngram``) with ``source`` instead:
        for tests and experiments (e.g. an oracle that drafts the known continuation)."""
        self._sources[name] = (source, draft_cost)

    def exit_depth(self) -> int:
        """The layers that draft for the exit source (``spec_exit_depth``, checked, or the default)."""
        depth, num_layers = self.config.spec_exit_depth, self.shape.num_layers
        if depth is None:
            return default_exit_depth(self.block_ranges, num_layers)
        ends = sorted(end for _, end in self.block_ranges if end < num_layers)
        if depth not in ends:
            raise ValueError(f"spec_exit_depth: {depth} is not a block end before the last layer ({ends})")
        return depth

    def new_request(self, params: SamplingParams, num_prompt_tokens: int) -> tuple[bool, SpecState | None]:
        """A new request's mode (lossless?) and speculation state; ``ValueError`` if its draft source
        cannot run."""
        exits_on = (params.exit_policy or self.config.exit_policy) != "none"
        lossless, source = resolve_spec(params.mode, params.spec, self.config.spec, exits_on)
        if source == "none":
            return lossless, None
        _, cost = self._source(source)
        limit = min(self.max_model_len, num_prompt_tokens + params.max_tokens)
        return lossless, self.lengths.new_state(source, limit, cost)

    def plan(self, running: list[Sequence]) -> None:
        """Before scheduling: n-gram drafts are looked up now, so their slots match what exists."""
        for seq in running:
            state = seq.spec
            if state is not None and state.source == "ngram":
                decoding = seq.num_uncomputed_tokens == 1 and not state.pause
                state.planned = NgramDraft.plan(seq, state.num_draft) if decoding else ()

    @torch.inference_mode()
    def propose(self, batch: SchedulerOutput) -> None:
        """Fill each scheduled sequence's draft slots from its source (all sequences of a source at once)."""
        by_source: dict[str, list[ScheduledSeq]] = {}
        for item in batch.scheduled:
            if item.num_draft_slots:
                by_source.setdefault(item.seq.spec.source, []).append(item)
        for name, items in by_source.items():
            source, _ = self._source(name)
            for item, drafts in zip(items, source.propose(items)):
                item.set_drafts(drafts)

    def record(self, batch: SchedulerOutput, num_accepted: list[int]) -> None:
        """After verification: count each sequence's drafts and acceptances and adapt its length."""
        size = len(batch.scheduled)  # sequences sharing the step: what an extra row is weighed against
        for item, accepted in zip(batch.scheduled, num_accepted):
            state: SpecState | None = item.seq.spec
            if state is None:
                continue
            if item.draft_token_ids:
                self.lengths.record(state, len(item.draft_token_ids), accepted, size)
            elif state.pause:
                self.lengths.tick(state)
