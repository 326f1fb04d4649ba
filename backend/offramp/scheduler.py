"""Iteration-level (continuous) batching over ids only: who runs this step, with how many tokens.

Each step continues the running sequences (one decode token each, or the next chunk of a long
prompt), admits waiting ones while the token budget, ``max_num_seqs`` and free pages allow, and
preempts the newest running sequence (freeing its pages, to be recomputed later) when pages run
out. Finished sequences leave at once, so a new request never waits for a batch to end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from offramp.page_manager import PageManager
from offramp.sequence import FinishReason, SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) run now

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """The one thing the scheduler hands to the runner each step."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, pages: PageManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pages = pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        queue = list(self.running)
        kept: list[Sequence] = []
        while queue:
            seq = queue.pop(0)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                kept.append(seq)
                continue
            while not self.pages.can_allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                self.pages.allocate(seq.seq_id, seq.num_computed_tokens + num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                kept.append(seq)
                budget -= num_new
        self.running = kept
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.pages.can_allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                break
            self.waiting.popleft()
            self.pages.allocate(seq.seq_id, seq.num_computed_tokens + num_new)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s pages and queue it first in line; it is recomputed when readmitted."""
        self.pages.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, out: SchedulerOutput, sampled: list[int | None]) -> list[Sequence]:
        """Account the step's work; append sampled tokens. Returns the sequences that got a token."""
        grown = []
        for item, token in zip(out.scheduled, sampled):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if token is not None:
                seq.output_token_ids.append(token)
                grown.append(seq)
        return grown

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire ``seq`` (done, stopped or aborted) and free its pages at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
