"""Scheduler driven by a fake runner: no model, no tensors, only ids and a fake paged KV store.

The fake model's next token is a function of ALL tokens of the sequence so far, read back from
the fake KV pages, so any bookkeeping error (a stale page, a page shared by two sequences, a
chunk skipped or run twice, a lost token after preemption) changes some output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from offramp.engine.kv_sessions import KVSessionTable, session_owner
from offramp.engine.page_manager import PageManager
from offramp.engine.sampling import SamplingParams
from offramp.engine.scheduler import Scheduler, SchedulerOutput
from offramp.engine.sequence import FinishReason, SeqStatus, Sequence


def next_token(tokens: list[int]) -> int:
    return sum((i + 1) * t for i, t in enumerate(tokens)) % 1000


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    """What one sequence generates when run alone, token by token, with no scheduler at all."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def make_seq(prompt: list[int], max_tokens: int, session_id: str | None = None) -> Sequence:
    return Sequence(prompt_token_ids=list(prompt), params=SamplingParams(max_tokens=max_tokens), session_id=session_id)


@dataclass
class Step:
    out: SchedulerOutput
    chunks: dict[int, int]  # seq_id -> num_new_tokens
    samples: dict[int, bool]  # seq_id -> whether a token was sampled
    num_running: int  # right after schedule()
    num_waiting: int  # right after schedule()
    finished: list[Sequence] = field(default_factory=list)


class FakeEngine:
    """The engine loop with a fake runner that writes and reads a fake paged KV store."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        sessions: bool = False,
        **kwargs,
    ) -> None:
        self.pages = PageManager(num_pages, page_size)
        self.sessions = KVSessionTable(self.pages, max_sessions=64, idle_timeout_s=600.0) if sessions else None
        self.sched = Scheduler(self.pages, max_num_seqs, max_num_batched_tokens, self.sessions, **kwargs)
        self.kv: dict[int, list[int | None]] = {p: [None] * page_size for p in range(num_pages)}
        self.steps: list[Step] = []

    def _slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        table = self.pages.page_table(seq.seq_id)
        return table[pos // self.pages.page_size], pos % self.pages.page_size

    def _run(self, seq: Sequence, num_new: int, samples: bool) -> int | None:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        assert len(self.pages.page_table(seq.seq_id)) >= self.pages.pages_for(end), "chunk runs past its pages"
        for pos, tok in zip(range(start, end), seq.token_ids(start, end), strict=True):
            page, off = self._slot(seq, pos)
            assert self.pages.is_writable(page), f"seq {seq.seq_id} writes into shared/registered page {page}"
            self.kv[page][off] = tok
        if not samples:
            return None
        cached = [self.kv[page][off] for page, off in (self._slot(seq, pos) for pos in range(end))]
        assert cached == seq.token_ids(0, end), f"seq {seq.seq_id}: KV pages do not hold its tokens"
        return next_token(cached)

    def step(self) -> Step:
        sched = self.sched
        running_before = list(sched.running)
        out = sched.schedule()

        # Limits of one step.
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        assert len(out.scheduled) <= sched.max_num_seqs
        ids = [item.seq.seq_id for item in out.scheduled]
        assert len(ids) == len(set(ids)), "a sequence was scheduled twice in one step"
        assert all(item.num_new_tokens > 0 for item in out.scheduled)
        assert all(item.seq.status is SeqStatus.RUNNING for item in out.scheduled)
        # Preemption takes the newest running sequences and queues them first in line, oldest first
        # (and nothing is admitted in a step that had to preempt, so they are still waiting).
        assert out.preempted == running_before[::-1][: len(out.preempted)]
        assert list(sched.waiting)[: len(out.preempted)] == out.preempted[::-1]
        for victim in out.preempted:
            assert victim.status is SeqStatus.WAITING
            assert victim.num_computed_tokens == 0
            assert self.pages.page_table(victim.seq_id) == []
            assert victim.seq_id not in ids

        sampled = [self._run(item.seq, item.num_new_tokens, item.samples) for item in out.scheduled]
        record = Step(
            out,
            {item.seq.seq_id: item.num_new_tokens for item in out.scheduled},
            {item.seq.seq_id: tok is not None for item, tok in zip(out.scheduled, sampled, strict=True)},
            len(sched.running),
            len(sched.waiting),
        )
        depths = [None if tok is None else 1 + tok % 4 for tok in sampled]  # a made-up exit depth per token
        grown = sched.postprocess(
            out, [[] if t is None else [t] for t in sampled], [[] if d is None else [d] for d in depths]
        )
        assert grown == [item.seq for item, tok in zip(out.scheduled, sampled, strict=True) if tok is not None]
        for seq, tok, depth in zip(out.scheduled, sampled, depths):  # token and depth appended together
            if tok is not None:
                assert seq.seq.output_token_ids[-1] == tok and seq.seq.exit_layers[-1] == depth
                assert len(seq.seq.exit_layers) == len(seq.seq.output_token_ids)
        for seq in grown:
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                self.finish(seq, FinishReason.LENGTH)
                record.finished.append(seq)

        self.pages.check_invariants()
        for seq in sched.running:
            assert len(self.pages.page_table(seq.seq_id)) >= self.pages.pages_for(seq.num_computed_tokens)
        for seq in sched.waiting:
            assert seq.status is SeqStatus.WAITING
            assert seq.num_computed_tokens == 0
            assert self.pages.page_table(seq.seq_id) == []
        self.check_sessions()
        self.steps.append(record)
        return record

    def check_sessions(self) -> None:
        """Each session's own pages hold exactly the tokens it claims (read back from the fake store)."""
        for session in self.sessions._sessions.values() if self.sessions else ():
            table = self.pages.page_table(session_owner(session.session_id))
            assert len(table) == self.pages.pages_for(len(session.token_ids))
            size = self.pages.page_size
            held = [self.kv[table[pos // size]][pos % size] for pos in range(len(session.token_ids))]
            assert held == session.token_ids, f"session {session.session_id}: pages lost its tokens"

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """What the engine does: a session's request leaves its computed pages to the session."""
        if seq.session_id is not None and not seq.is_finished:
            self.sessions.detach(seq.session_id, seq.seq_id, seq.token_ids(0, seq.num_computed_tokens))
        self.sched.finish(seq, reason)

    def run_to_completion(self, max_steps: int = 10_000) -> None:
        while self.sched.has_work:
            assert len(self.steps) < max_steps, "scheduler made no progress"
            self.step()


def step_first_scheduled(eng: FakeEngine, seq: Sequence) -> int:
    return next(i for i, s in enumerate(eng.steps) if seq.seq_id in s.chunks)


def step_finished(eng: FakeEngine, seq: Sequence) -> int:
    return next(i for i, s in enumerate(eng.steps) if seq in s.finished)


# -- basics -------------------------------------------------------------------------------------


def test_single_sequence_matches_reference() -> None:
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=256)
    seq = make_seq([5, 7, 11, 13, 17], max_tokens=9)
    eng.sched.add(seq)
    eng.run_to_completion()
    assert seq.output_token_ids == reference_output([5, 7, 11, 13, 17], 9)
    assert seq.finish_reason is FinishReason.LENGTH
    assert len(eng.steps) == 9  # one prefill step then one decode step per further token
    assert eng.pages.num_free_pages == 64


def test_reference_depends_on_every_token() -> None:
    # Guard for the fake model itself: changing any earlier token changes the next one.
    base = [3, 1, 4, 1, 5, 9, 2, 6]
    for i in range(len(base)):
        changed = list(base)
        changed[i] += 1
        assert next_token(changed) != next_token(base)


# -- continuous batching ------------------------------------------------------------------------


def test_new_request_takes_a_freed_slot_without_waiting_for_the_batch() -> None:
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=2, max_num_batched_tokens=256)
    seqs = [make_seq([i + 1] * 4, max_tokens=m) for i, m in enumerate([3, 12, 5, 5])]
    for seq in seqs:
        eng.sched.add(seq)
    eng.run_to_completion()

    first, long_one, third, fourth = seqs
    # The third request runs in the step right after the first one finished ...
    assert step_first_scheduled(eng, third) == step_finished(eng, first) + 1
    # ... while the long request of the first batch is still generating.
    assert step_finished(eng, long_one) > step_first_scheduled(eng, third)
    # The fourth takes the next freed slot (the third finishes before the long one).
    assert step_first_scheduled(eng, fourth) == min(step_finished(eng, long_one), step_finished(eng, third)) + 1
    for i, seq in enumerate(seqs):
        assert seq.output_token_ids == reference_output([i + 1] * 4, seq.params.max_tokens)


def test_free_slots_are_always_filled_when_pages_and_budget_allow() -> None:
    rng = random.Random(7)
    eng = FakeEngine(num_pages=256, page_size=4, max_num_seqs=3, max_num_batched_tokens=512)
    for _ in range(10):
        eng.sched.add(make_seq([rng.randint(0, 99) for _ in range(rng.randint(1, 8))], rng.randint(1, 10)))
    eng.run_to_completion()
    assert eng.sched.num_preemptions == 0
    assert any(s.num_waiting for s in eng.steps)
    for s in eng.steps:
        if s.num_waiting:
            assert s.num_running == eng.sched.max_num_seqs


# -- step limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_num_seqs, budget", [(1, 4), (2, 7), (3, 16), (8, 10)])
def test_max_num_seqs_and_token_budget_are_never_exceeded(max_num_seqs: int, budget: int) -> None:
    rng = random.Random(max_num_seqs * 100 + budget)
    eng = FakeEngine(num_pages=128, page_size=4, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    prompts = {}
    for _ in range(16):
        seq = make_seq([rng.randint(0, 999) for _ in range(rng.randint(1, 25))], rng.randint(4, 16))
        prompts[seq.seq_id] = (seq, list(seq.prompt_token_ids))
        eng.sched.add(seq)
    eng.run_to_completion()

    # The limits are checked in every step by FakeEngine.step; also make sure they were reached.
    assert max(s.out.num_batched_tokens for s in eng.steps) == budget
    assert max(s.num_running for s in eng.steps) == max_num_seqs
    for seq, prompt in prompts.values():
        assert seq.output_token_ids == reference_output(prompt, seq.params.max_tokens)


# -- chunked prefill ----------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_and_samples_only_on_the_last() -> None:
    prompt = [(7 * i + 3) % 50 for i in range(30)]
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    seq = make_seq(prompt, max_tokens=4)
    eng.sched.add(seq)
    eng.run_to_completion()

    chunks = [s.chunks[seq.seq_id] for s in eng.steps]
    samples = [s.samples[seq.seq_id] for s in eng.steps]
    assert chunks == [8, 8, 8, 6, 1, 1, 1]
    assert samples == [False, False, False, True, True, True, True]
    assert seq.output_token_ids == reference_output(prompt, 4)

    unchunked = FakeEngine(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=1024)
    whole = make_seq(prompt, max_tokens=4)
    unchunked.sched.add(whole)
    unchunked.run_to_completion()
    assert [s.chunks[whole.seq_id] for s in unchunked.steps] == [30, 1, 1, 1]
    assert seq.output_token_ids == whole.output_token_ids


def test_chunked_prefill_shares_the_budget_with_running_decodes() -> None:
    short_prompt, long_prompt = [1, 2, 3], [(5 * i + 1) % 97 for i in range(23)]
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=6)
    short, long_ = make_seq(short_prompt, max_tokens=12), make_seq(long_prompt, max_tokens=5)
    eng.sched.add(short)
    eng.sched.add(long_)
    eng.run_to_completion()

    # While the short one decodes (1 token a step), the long prompt gets the remaining 5 of the budget.
    long_chunks = [s.chunks[long_.seq_id] for s in eng.steps if long_.seq_id in s.chunks]
    assert long_chunks[:5] == [3, 5, 5, 5, 5]
    assert sum(long_chunks[:5]) == 23
    assert [s.samples[long_.seq_id] for s in eng.steps if long_.seq_id in s.chunks][:5] == [False] * 4 + [True]
    assert short.output_token_ids == reference_output(short_prompt, 12)
    assert long_.output_token_ids == reference_output(long_prompt, 5)


# -- preemption ---------------------------------------------------------------------------------


def test_preemption_by_recomputation_gives_identical_outputs() -> None:
    prompts = [[(3 * s + 5 * i) % 41 + 1 for i in range(6)] for s in range(4)]
    eng = FakeEngine(num_pages=8, page_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [make_seq(p, max_tokens=12) for p in prompts]
    for seq in seqs:
        eng.sched.add(seq)
    eng.run_to_completion()

    assert eng.sched.num_preemptions > 0
    assert sum(seq.num_preemptions for seq in seqs) == eng.sched.num_preemptions
    for seq, prompt in zip(seqs, prompts, strict=True):
        assert seq.is_finished and seq.finish_reason is FinishReason.LENGTH
        assert seq.output_token_ids == reference_output(prompt, 12)
    assert eng.pages.num_free_pages == 8
    assert not eng.sched.running and not eng.sched.waiting


def test_preempted_sequence_output_matches_its_solo_scheduler_run() -> None:
    prompt = [9, 8, 7, 6, 5, 4]
    solo = FakeEngine(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    alone = make_seq(prompt, max_tokens=12)
    solo.sched.add(alone)
    solo.run_to_completion()

    crowded = FakeEngine(num_pages=8, page_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    others = [make_seq([i] * 6, max_tokens=12) for i in range(1, 4)]
    mine = make_seq(prompt, max_tokens=12)
    for seq in [*others, mine]:
        crowded.sched.add(seq)
    crowded.run_to_completion()

    assert mine.num_preemptions > 0
    assert mine.output_token_ids == alone.output_token_ids


# -- finish -------------------------------------------------------------------------------------


def test_finish_of_waiting_sequence_removes_it_and_frees_its_pages() -> None:
    eng = FakeEngine(num_pages=16, page_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    a, b, c = make_seq([1, 2, 3], 4), make_seq([4, 5, 6], 4), make_seq([7, 8, 9], 4)
    for seq in (a, b, c):
        eng.sched.add(seq)
    eng.step()
    assert list(eng.sched.waiting) == [b, c]

    eng.pages.allocate(b.seq_id, 8)  # pretend b still holds KV pages
    free_before = eng.pages.num_free_pages
    eng.sched.finish(b, FinishReason.ABORT)

    assert list(eng.sched.waiting) == [c]
    assert b.status is SeqStatus.FINISHED and b.finish_reason is FinishReason.ABORT
    assert eng.pages.page_table(b.seq_id) == []
    assert eng.pages.num_free_pages == free_before + 2
    eng.pages.check_invariants()

    eng.run_to_completion()
    assert all(b.seq_id not in s.chunks for s in eng.steps)
    assert b.output_token_ids == []
    assert a.output_token_ids == reference_output([1, 2, 3], 4)
    assert c.output_token_ids == reference_output([7, 8, 9], 4)
    assert eng.pages.num_free_pages == 16


def test_finish_of_running_sequence_frees_pages_and_its_slot_at_once() -> None:
    eng = FakeEngine(num_pages=16, page_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_seq([1] * 9, 20), make_seq([2] * 3, 2)
    eng.sched.add(a)
    eng.sched.add(b)
    eng.step()
    eng.step()
    assert eng.pages.num_free_pages == 16 - 3
    eng.sched.finish(a, FinishReason.ABORT)
    assert eng.pages.num_free_pages == 16
    assert a not in eng.sched.running
    assert eng.step().chunks == {b.seq_id: 3}
    eng.run_to_completion()
    assert b.output_token_ids == reference_output([2] * 3, 2)


def test_finish_twice_keeps_the_first_reason() -> None:
    eng = FakeEngine(num_pages=16, page_size=4, max_num_seqs=2, max_num_batched_tokens=64)
    seq = make_seq([1, 2], 5)
    eng.sched.add(seq)
    eng.step()
    eng.sched.finish(seq, FinishReason.STOP)
    eng.sched.finish(seq, FinishReason.ABORT)
    assert seq.finish_reason is FinishReason.STOP
    assert not eng.sched.has_work
    assert eng.pages.num_free_pages == 16


def test_finish_of_preempted_sequence_leaves_the_queue_consistent() -> None:
    eng = FakeEngine(num_pages=8, page_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [make_seq([s + 1] * 6, max_tokens=12) for s in range(4)]
    for seq in seqs:
        eng.sched.add(seq)
    for _ in range(200):  # bounded: the 4 sequences outgrow 8 pages within a few dozen steps
        if any(s.out.preempted for s in eng.steps):
            break
        eng.step()
    assert any(s.out.preempted for s in eng.steps), "no preemption happened"
    victim = eng.steps[-1].out.preempted[0]
    assert victim in eng.sched.waiting
    eng.sched.finish(victim, FinishReason.ABORT)
    assert victim not in eng.sched.waiting
    eng.run_to_completion()
    for seq in seqs:
        if seq is not victim:
            assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 12)
    assert eng.pages.num_free_pages == 8


# -- randomized soak ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_randomized_soak_with_arrivals_and_aborts(seed: int) -> None:
    rng = random.Random(seed)
    num_pages, page_size = rng.randint(7, 10), 4
    eng = FakeEngine(num_pages, page_size, max_num_seqs=rng.randint(2, 5), max_num_batched_tokens=rng.randint(4, 24))
    sched = eng.sched

    pending: list[tuple[int, list[int], int]] = []  # (arrival step, prompt, max_tokens)
    for _ in range(40):
        prompt = [rng.randint(0, 999) for _ in range(rng.randint(1, 20))]
        max_tokens = rng.randint(1, 16)
        if eng.pages.pages_for(len(prompt) + max_tokens) <= num_pages:  # what the engine admits
            pending.append((rng.randint(0, 150), prompt, max_tokens))
    pending.sort(key=lambda x: x[0])

    prompts: dict[int, list[int]] = {}
    all_seqs: list[Sequence] = []
    aborted: set[int] = set()
    aborted_waiting = aborted_running = 0
    step = 0
    while pending or sched.has_work:
        assert step < 5000, "scheduler made no progress"
        while pending and pending[0][0] <= step:
            _, prompt, max_tokens = pending.pop(0)
            seq = make_seq(prompt, max_tokens)
            prompts[seq.seq_id] = prompt
            all_seqs.append(seq)
            sched.add(seq)
        live = list(sched.waiting) + list(sched.running)
        if live and rng.random() < 0.06:
            victim = rng.choice(live)
            if victim.status is SeqStatus.WAITING:
                aborted_waiting += 1
            else:
                aborted_running += 1
            sched.finish(victim, FinishReason.ABORT)
            aborted.add(victim.seq_id)
            assert victim not in sched.waiting and victim not in sched.running
            assert eng.pages.page_table(victim.seq_id) == []
            eng.pages.check_invariants()
        eng.step()
        step += 1

    assert aborted_waiting > 0 and aborted_running > 0
    assert sched.num_preemptions > 0
    assert eng.pages.num_free_pages == num_pages
    eng.pages.check_invariants()
    for seq in all_seqs:
        assert seq.is_finished
        prompt = prompts[seq.seq_id]
        if seq.seq_id in aborted:
            assert seq.finish_reason is FinishReason.ABORT
            # Whatever it produced before the abort is a prefix of its solo output.
            assert seq.output_token_ids == reference_output(prompt, seq.params.max_tokens)[: len(seq.output_token_ids)]
        else:
            assert seq.finish_reason is FinishReason.LENGTH
            assert seq.output_token_ids == reference_output(prompt, seq.params.max_tokens)


# -- prefix sharing -----------------------------------------------------------------------------

PREFIX = [(11 * i + 7) % 97 + 1 for i in range(20)]  # five full pages of 4


def test_shared_prefix_is_computed_once_and_adopted_by_later_arrivals() -> None:
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    seqs = [make_seq(PREFIX + [i + 1, i + 2, i + 3], max_tokens=5) for i in range(8)]
    for seq in seqs:
        eng.sched.add(seq)
    peak = 0
    while eng.sched.has_work:
        eng.step()
        peak = max(peak, eng.pages.num_used_pages)

    # Step 0 runs the first prompt alone: the others wait one step for its prefix pages ...
    assert eng.steps[0].chunks == {seqs[0].seq_id: 23}
    # ... then adopt all five of them and compute only their own 3 tokens.
    assert all(eng.steps[1].chunks[s.seq_id] == 3 for s in seqs[1:])
    assert [s.num_cached_tokens for s in seqs] == [0] + [20] * 7
    assert [s.num_prefix_waits for s in seqs] == [0, 1] + [0] * 6  # only the head of the queue waited
    assert eng.sched.num_prefix_reused_tokens == 7 * 20
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 5)
    # 28 tokens = 7 pages each: 5 shared + 2 own, instead of 8 x 7 = 56.
    assert peak == 5 + 8 * 2
    assert eng.pages.num_free_pages == 64 and eng.pages.num_registered_pages == 0


def test_without_prefix_sharing_every_sequence_computes_its_prompt() -> None:
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=256, enable_prefix_sharing=False)
    seqs = [make_seq(PREFIX + [i + 1], max_tokens=3) for i in range(4)]
    for seq in seqs:
        eng.sched.add(seq)
    eng.step()
    assert eng.steps[0].chunks == {s.seq_id: 21 for s in seqs}
    assert eng.pages.num_used_pages == 4 * 6 and eng.pages.num_shared_pages == 0
    eng.run_to_completion()
    assert all(s.output_token_ids == reference_output(s.prompt_token_ids, 3) for s in seqs)


def test_prefix_wait_keeps_fifo_order() -> None:
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    a, b, c = make_seq(PREFIX + [1], 3), make_seq(PREFIX + [2], 3), make_seq([50, 51, 52], 3)
    for seq in (a, b, c):
        eng.sched.add(seq)
    eng.step()
    assert eng.steps[0].chunks == {a.seq_id: 21}  # b waits for a's pages; c does not overtake b
    eng.step()
    assert eng.steps[1].chunks == {a.seq_id: 1, b.seq_id: 1, c.seq_id: 3}
    eng.run_to_completion()
    for seq in (a, b, c):
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 3)


@pytest.mark.parametrize(("max_waits", "waits", "cached", "first_step"), [(4, 1, 20, 3), (0, 0, 16, 2)])
def test_prefix_wait_while_the_prefix_is_prefilled_in_chunks(max_waits, waits, cached, first_step) -> None:
    eng = FakeEngine(
        num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=8, max_prefix_wait_steps=max_waits
    )
    a, b = make_seq(PREFIX + [1, 2, 3], 4), make_seq(PREFIX + [4, 5, 6], 4)
    eng.sched.add(a)
    eng.sched.add(b)
    eng.run_to_completion()
    # a's prompt runs 8 + 8 + 7, leaving budget for b only in the third step. b then either waits one
    # step for a's last prefix page, or (no waiting allowed) takes the 4 registered pages and computes
    # the fifth itself (its key is taken by then: that page simply stays private).
    assert [s.chunks.get(a.seq_id) for s in eng.steps[:3]] == [8, 8, 7]
    assert (b.num_prefix_waits, b.num_cached_tokens) == (waits, cached)
    assert step_first_scheduled(eng, b) == first_step
    for seq in (a, b):
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 4)


def test_a_preempted_sequence_readopts_the_shared_prefix() -> None:
    eng = FakeEngine(num_pages=12, page_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [make_seq(PREFIX + [i + 1], max_tokens=14) for i in range(3)]
    for seq in seqs:
        eng.sched.add(seq)
    eng.run_to_completion()
    assert eng.sched.num_preemptions > 0
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, 14)
    assert eng.pages.num_free_pages == 12


# -- sessions -----------------------------------------------------------------------------------


def _turn(eng: FakeEngine, session_id: str, prompt: list[int], max_tokens: int) -> Sequence:
    eng.sessions.open(session_id, f"{session_id}-{len(prompt)}")
    seq = make_seq(prompt, max_tokens, session_id=session_id)
    eng.sched.add(seq)
    eng.run_to_completion()
    assert seq.output_token_ids == reference_output(prompt, max_tokens)
    return seq


def test_session_turns_prefill_only_the_new_tokens() -> None:
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=256, sessions=True)
    history: list[int] = []
    for turn in range(5):
        prompt = history + [turn + 1] * 3  # the caller sends the whole conversation each turn
        seq = _turn(eng, "chat", prompt, max_tokens=4)
        expected_cached = 0 if turn == 0 else len(history) - 1  # the last output token has no K/V yet
        assert seq.num_cached_tokens == expected_cached
        assert seq.num_run_tokens == len(prompt) - expected_cached + 3
        history = prompt + seq.output_token_ids
        session = eng.sessions.get("chat")
        assert session.token_ids == history[:-1] and session.request_id is None
    assert eng.pages.num_used_pages == eng.pages.pages_for(len(history) - 1)
    eng.sessions.end("chat")
    assert eng.pages.num_free_pages == 64


def test_a_diverging_turn_keeps_only_the_common_prefix() -> None:
    eng = FakeEngine(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=256, sessions=True)
    first = _turn(eng, "s", list(range(1, 15)), max_tokens=3)
    edited = list(range(1, 10)) + [99, 98]  # the user edited an earlier message
    second = _turn(eng, "s", edited, max_tokens=3)
    assert first.num_cached_tokens == 0
    # 9 tokens match, but page 2 (tokens 8-11) is a registered prompt page: start at its beginning.
    assert second.num_cached_tokens == 8
    assert eng.sessions.get("s").token_ids == edited + second.output_token_ids[:-1]


def test_idle_sessions_are_evicted_before_running_sequences_are_preempted() -> None:
    eng = FakeEngine(num_pages=10, page_size=4, max_num_seqs=4, max_num_batched_tokens=64, sessions=True)
    prompt = list(range(1, 21))
    first = _turn(eng, "s", prompt, max_tokens=4)
    assert eng.pages.num_used_pages == 6  # 23 computed tokens stay with the idle session
    other = make_seq([7, 7, 7, 7], max_tokens=20)  # grows to 6 pages while running
    eng.sched.add(other)
    eng.run_to_completion()
    assert other.num_preemptions == 0 and eng.sched.num_preemptions == 0
    assert eng.sessions.num_evictions == 1 and eng.sessions.get("s").token_ids == []
    assert other.output_token_ids == reference_output([7, 7, 7, 7], 20)
    # The evicted session's next turn re-prefills everything and gives the same output.
    again = _turn(eng, "s", prompt + first.output_token_ids + [5], max_tokens=4)
    assert again.num_cached_tokens == 0


def test_a_session_whose_request_waits_is_not_evicted_for_admission_while_work_runs() -> None:
    eng = FakeEngine(num_pages=8, page_size=4, max_num_seqs=1, max_num_batched_tokens=64, sessions=True)
    first = _turn(eng, "s", list(range(1, 13)), max_tokens=2)  # 13 tokens: 4 pages stay
    busy = make_seq([3] * 4, max_tokens=6)
    eng.sched.add(busy)
    eng.step()
    eng.sessions.open("s", "next")
    nxt = make_seq(first.prompt_token_ids + first.output_token_ids + [9], 2, session_id="s")
    eng.sched.add(nxt)
    eng.run_to_completion()
    assert eng.sessions.num_evictions == 0 and nxt.num_cached_tokens == 13
    assert nxt.output_token_ids == reference_output(nxt.prompt_token_ids, 2)


@pytest.mark.parametrize("seed", range(4))
def test_randomized_soak_with_shared_prefixes_sessions_and_aborts(seed: int) -> None:
    rng = random.Random(seed)
    num_pages = rng.randint(14, 20)
    eng = FakeEngine(
        num_pages, 4, max_num_seqs=rng.randint(2, 5), max_num_batched_tokens=rng.randint(6, 24), sessions=True
    )
    sched = eng.sched
    bases = [[rng.randint(1, 999) for _ in range(rng.randint(8, 16))] for _ in range(3)]
    history: dict[str, list[int]] = {}  # session -> the conversation so far
    all_seqs: list[Sequence] = []
    aborted: set[int] = set()
    for step in range(400):
        if rng.random() < 0.3:
            idle = [
                s
                for s in (f"s{i}" for i in range(5))
                if (eng.sessions.get(s) is None or eng.sessions.get(s).request_id is None)
            ]
            session_id = rng.choice(idle + [None]) if idle else None
            if session_id is not None and history.get(session_id):
                prompt = history[session_id] + [rng.randint(1, 999) for _ in range(rng.randint(1, 4))]
            else:
                prompt = list(rng.choice(bases)) + [rng.randint(1, 999) for _ in range(rng.randint(1, 4))]
            max_tokens = rng.randint(1, 8)
            if eng.pages.pages_for(len(prompt) + max_tokens) > num_pages:
                history.pop(session_id, None)
                if session_id is not None and eng.sessions.get(session_id) is not None:
                    eng.sessions.end(session_id)
                continue
            if session_id is not None:
                eng.sessions.open(session_id, f"r{step}")
            seq = make_seq(prompt, max_tokens, session_id=session_id)
            all_seqs.append(seq)
            sched.add(seq)
        live = list(sched.waiting) + list(sched.running)
        if live and rng.random() < 0.04:
            victim = rng.choice(live)
            eng.finish(victim, FinishReason.ABORT)
            aborted.add(victim.seq_id)
        for seq in all_seqs:
            if seq.is_finished and seq.session_id is not None and seq.finish_reason is FinishReason.LENGTH:
                history[seq.session_id] = seq.prompt_token_ids + seq.output_token_ids
            elif seq.is_finished and seq.session_id is not None:
                history[seq.session_id] = []
        if sched.has_work:
            eng.step()
        elif rng.random() < 0.1 and eng.sessions.get("s0") is not None and eng.sessions.get("s0").request_id is None:
            eng.sessions.end("s0")
            history.pop("s0", None)
    eng.run_to_completion()

    assert sum(s.num_cached_tokens > 0 for s in all_seqs) > 5
    assert eng.sched.num_prefix_reused_tokens > 0 and eng.sessions.num_reused_tokens > 0
    assert eng.sessions.num_evictions > 0 and eng.sched.num_preemptions > 0 and aborted
    for seq in all_seqs:
        assert seq.is_finished
        expected = reference_output(seq.prompt_token_ids, seq.params.max_tokens)
        assert seq.output_token_ids == expected[: len(seq.output_token_ids)]
        if seq.seq_id not in aborted:
            assert seq.output_token_ids == expected
    for session_id in list(eng.sessions._sessions):
        eng.sessions.end(session_id)
    eng.pages.check_invariants()
    assert eng.pages.num_free_pages == num_pages
