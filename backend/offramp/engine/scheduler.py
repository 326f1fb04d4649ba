"""Iteration-level (continuous) batching over ids only: who runs this step, with how many tokens.

Each step continues the running sequences (one decode token each, or the next chunk of a long
prompt), admits waiting ones while the token budget, ``max_num_seqs`` and free pages allow, and
preempts the newest running sequence (freeing its pages, to be recomputed later) when pages run
out. Finished sequences leave at once, so a new request never waits for a batch to end.

Reuse at admission. A sequence starts from the better of: its session's pages (``sessions.py``) and
the longest run of registered prefix pages of its prompt (``page_manager.py``); it then computes only
the rest (at least its last prompt token). Full prompt pages are registered in ``postprocess`` once
their K/V is computed. When the head of the queue needs a prefix page that a running sequence is
computing right now, admission pauses (FIFO is kept) for at most ``max_prefix_wait_steps`` steps so
that the page is computed once and shared rather than computed by every sequence that arrived
together. When pages run out, idle sessions are evicted (LRU) before any running sequence is
preempted.

Lossless mode (``spec.py``). A decoding sequence with a draft source may get draft slots: extra rows
after its last token, within the token budget, with their pages allocated here. Drafts never cause a
preemption or an eviction: they are given only from pages that leave one free page for each running
sequence still to be scheduled this step (beyond that, only the free slots of the page the sequence
needs anyway). ``postprocess`` appends the tokens the verification accepted, counts as computed only
the K/V of accepted rows, and releases the pages past them (draft rows lie beyond the prompt, so
such pages are never shared prefix pages).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from offramp.engine.kv_sessions import KVSessionTable
from offramp.engine.page_manager import PageManager
from offramp.engine.sequence import FinishReason, SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # rows run now: tokens from num_computed_tokens on, then the drafts
    num_draft_slots: int = 0  # draft rows this step may bring (their pages are allocated)
    draft_token_ids: list[int] = field(default_factory=list)  # the drafts, filled after scheduling

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids) == self.seq.num_tokens

    def set_drafts(self, token_ids: list[int]) -> None:
        """Bring these drafts (at most ``num_draft_slots``) after the last token."""
        if self.draft_token_ids or self.num_new_tokens != 1 or len(token_ids) > self.num_draft_slots:
            raise RuntimeError(f"seq {self.seq.seq_id}: {len(token_ids)} drafts do not fit this step's slots")
        self.draft_token_ids = list(token_ids)
        self.num_new_tokens = 1 + len(token_ids)

    def token_ids(self) -> list[int]:
        """The rows' tokens: the sequence's uncomputed ones this step covers, then the drafts."""
        start = self.seq.num_computed_tokens
        return self.seq.token_ids(start, start + self.num_new_tokens - len(self.draft_token_ids)) + self.draft_token_ids


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


@dataclass(slots=True)
class _Reuse:
    """Where an admitted sequence starts: registry pages to adopt, or a session prefix to take."""

    num_cached_tokens: int
    shared_pages: list[int]  # registered prefix pages (empty when the session's pages serve more)
    num_session_tokens: int  # tokens taken from the session's pages (0 when the registry wins)
    wait: bool  # a running sequence is computing the next prefix page right now


class Scheduler:
    def __init__(
        self,
        pages: PageManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        sessions: KVSessionTable | None = None,
        enable_prefix_sharing: bool = True,
        max_prefix_wait_steps: int = 4,
    ) -> None:
        self.pages = pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.sessions = sessions
        self.enable_prefix_sharing = enable_prefix_sharing
        self.max_prefix_wait_steps = max_prefix_wait_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefix_reused_tokens = 0  # prompt tokens served from shared prefix pages

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
                if self._make_room(self.pages.num_missing_pages(seq.seq_id, seq.num_computed_tokens + num_new)):
                    continue  # cached session pages go before any running sequence
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                slots = self._draft_slots(seq, num_new, budget, len(queue))
                self._grow(seq, num_new + slots)
                out.scheduled.append(ScheduledSeq(seq, num_new, slots))
                kept.append(seq)
                budget -= num_new + slots
        self.running = kept
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            reuse = self._reuse(seq)
            if reuse.wait:
                seq.num_prefix_waits += 1
                break
            num_new = min(seq.num_tokens - reuse.num_cached_tokens, budget)
            if not self._fits(reuse, num_new):
                if not self._make_room(self._missing(reuse, num_new), deep=not self.running, protect=seq.session_id):
                    break
                reuse = self._reuse(seq)  # eviction may have dropped pages the first plan reused
                num_new = min(seq.num_tokens - reuse.num_cached_tokens, budget)
                if not self._fits(reuse, num_new):
                    break
            self.waiting.popleft()
            self._attach(seq, reuse)
            self._grow(seq, num_new)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _reuse(self, seq: Sequence) -> _Reuse:
        """What ``seq`` can start from now (pure: nothing is moved until ``_attach``)."""
        size = self.pages.page_size
        limit = seq.num_prompt_tokens - 1  # the last prompt token always runs: its logits give a token
        session_tokens = 0
        if seq.session_id is not None and self.sessions is not None:
            session_tokens = self.sessions.reusable_tokens(seq.session_id, seq.prompt_token_ids)
        shared: list[int] = []
        wait = False
        if self.enable_prefix_sharing and limit // size * size > session_tokens:
            keys = self._keys(seq)[: limit // size]
            shared = self.pages.match_prefix(keys)
            if len(shared) < len(keys) and (len(shared) + 1) * size > session_tokens:
                wait = seq.num_prefix_waits < self.max_prefix_wait_steps and keys[len(shared)] in self._computing()
            if len(shared) * size <= session_tokens:
                shared = []
        cached = len(shared) * size if shared else session_tokens
        return _Reuse(cached, shared, 0 if shared else session_tokens, wait)

    def _keys(self, seq: Sequence) -> list[bytes]:
        if seq.prefix_keys is None:
            seq.prefix_keys = self.pages.prefix_keys(seq.prompt_token_ids)
        return seq.prefix_keys

    def _computing(self) -> set[bytes]:
        """Keys of the prompt pages running sequences are computing and have not registered yet."""
        keys: set[bytes] = set()
        for seq in self.running:
            if seq.prefix_keys and seq.num_computed_tokens < seq.num_prompt_tokens:
                keys.update(seq.prefix_keys[seq.num_registered_pages :])
        return keys

    def _missing(self, reuse: _Reuse, num_new: int) -> int:
        reused = len(reuse.shared_pages) or self.pages.pages_for(reuse.num_session_tokens)
        return self.pages.pages_for(reuse.num_cached_tokens + num_new) - reused

    def _fits(self, reuse: _Reuse, num_new: int) -> bool:
        return self._missing(reuse, num_new) <= self.pages.num_free_pages

    def _make_room(self, num_pages: int, deep: bool = True, protect: str | None = None) -> bool:
        """Evict cached session pages (LRU: idle sessions, then with ``deep`` those whose request is
        still queued) until ``num_pages`` are free; whether they are."""
        if self.pages.num_free_pages < num_pages and self.sessions is not None:
            self.sessions.reclaim(num_pages, include_waiting=deep, protect=protect)
        return self.pages.num_free_pages >= num_pages

    def _attach(self, seq: Sequence, reuse: _Reuse) -> None:
        """Give ``seq`` the pages of its reused prefix; it computes from there."""
        self.pages.adopt(seq.seq_id, reuse.shared_pages)  # first: the session may hold the same pages
        if seq.session_id is not None and self.sessions is not None and seq.session_id in self.sessions:
            self.sessions.attach(seq.session_id, seq.seq_id, reuse.num_session_tokens)
        seq.num_computed_tokens = seq.num_cached_tokens = reuse.num_cached_tokens
        seq.num_registered_pages = self.pages.pages_for(reuse.num_cached_tokens)  # earlier ones are not ours
        self.num_prefix_reused_tokens += len(reuse.shared_pages) * self.pages.page_size
        if self.enable_prefix_sharing:
            self._keys(seq)

    def _grow(self, seq: Sequence, num_new: int) -> None:
        end = seq.num_computed_tokens + num_new
        self.pages.allocate(seq.seq_id, end)
        self.pages.check_writable(seq.seq_id, seq.num_computed_tokens, end)  # no copy-on-write is ever due

    def _draft_slots(self, seq: Sequence, num_new: int, budget: int, num_others: int) -> int:
        """Draft rows a decoding sequence in lossless mode may bring now (the pages for its
        ``num_new`` are allocatable): what it wants, within the budget, in the page it needs anyway
        and in free pages beyond one for each of the ``num_others`` sequences still to schedule."""
        if seq.spec is None or num_new != 1 or seq.num_computed_tokens < seq.num_prompt_tokens:
            return 0
        k = min(seq.spec.num_wanted(seq.num_tokens), budget - num_new)
        if k <= 0:
            return 0
        end = seq.num_computed_tokens + num_new
        spare = self.pages.num_free_pages - self.pages.num_missing_pages(seq.seq_id, end) - num_others
        held = max(len(self.pages.page_table(seq.seq_id)), self.pages.pages_for(end))
        return max(0, min(k, (held + max(spare, 0)) * self.pages.page_size - end))

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s pages and queue it first in line; it is recomputed when readmitted."""
        self.pages.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(
        self,
        out: SchedulerOutput,
        token_ids: list[list[int]],
        exit_layers: list[list[int]],
        num_accepted: list[int] | None = None,
    ) -> list[Sequence]:
        """Account the step's work; append each sequence's new tokens (none, one, or with drafts the
        accepted ones and the bonus token) with the depth each left at. Only rows whose K/V is exact
        count as computed: the step's tokens and the first ``num_accepted`` drafts (and none beyond
        the tokens kept: the caller may cut them at a stop). Returns the sequences that got tokens."""
        grown, now = [], time.perf_counter()
        accepted = num_accepted if num_accepted is not None else [0] * len(out.scheduled)
        for item, tokens, depths, num_ok in zip(out.scheduled, token_ids, exit_layers, accepted, strict=True):
            seq = item.seq
            exact = item.num_new_tokens - len(item.draft_token_ids) + num_ok
            seq.num_run_tokens += item.num_new_tokens
            if tokens:
                seq.output_token_ids.extend(tokens)
                seq.exit_layers.extend(depths)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                grown.append(seq)
            seq.num_computed_tokens = min(seq.num_computed_tokens + exact, seq.num_tokens)
            if item.num_draft_slots:
                self._roll_back(seq)
            if seq.prefix_keys:
                self._register(seq)
        return grown

    def _roll_back(self, seq: Sequence) -> None:
        """Release the pages past the computed tokens (allocated for drafts; rejected rows' K/V in a
        kept page is masked and overwritten when those positions are computed)."""
        self.pages.truncate(seq.seq_id, self.pages.pages_for(seq.num_computed_tokens))

    def _register(self, seq: Sequence) -> None:
        """Offer the full prompt pages whose K/V this admission has now computed to the registry."""
        end = min(min(seq.num_computed_tokens, seq.num_prompt_tokens) // self.pages.page_size, len(seq.prefix_keys))
        if end > seq.num_registered_pages:
            table = self.pages.page_table(seq.seq_id)
            for i in range(seq.num_registered_pages, end):
                self.pages.register(table[i], seq.prefix_keys[i])
            seq.num_registered_pages = end

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
