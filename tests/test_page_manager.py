"""PageManager: randomized soaks against a shadow model (plain, and with shared prefixes, sessions and
eviction), targeted edge cases, and the invariant checker caught on deliberate corruptions."""

from __future__ import annotations

import random

import pytest

from offramp.engine.page_manager import PageManager

NUM_PAGES = 64
PAGE_SIZE = 4


def _check_against_shadow(pm: PageManager, shadow: dict[int, int], prev_tables: dict[int, list[int]]) -> None:
    """Compare ``pm`` with the shadow model ``seq_id -> tokens held``; ``prev_tables`` is the last snapshot."""
    pm.check_invariants()
    owners: dict[int, int] = {}
    used = 0
    for seq_id, tokens in shadow.items():
        table = pm.page_table(seq_id)
        assert len(table) == pm.pages_for(tokens), f"seq {seq_id}: {len(table)} pages for {tokens} tokens"
        assert table, f"live seq {seq_id} has an empty page table"
        # A table only ever grows at its end: pages already holding KV never move.
        old = prev_tables.get(seq_id, [])
        assert table[: len(old)] == old, f"seq {seq_id}: existing pages changed from {old} to {table}"
        for page in table:
            assert 0 <= page < NUM_PAGES
            assert page not in owners, f"page {page} owned by {owners[page]} and {seq_id}"
            owners[page] = seq_id
        used += len(table)
    assert pm.num_used_pages == used
    assert pm.num_free_pages == NUM_PAGES - used
    assert pm.num_free_pages + pm.num_used_pages == NUM_PAGES
    # No table is registered for a sequence the shadow does not know about.
    assert set(pm._tables) == set(shadow)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_ops_keep_invariants_and_match_shadow_model(seed: int) -> None:
    rng = random.Random(seed)
    pm = PageManager(NUM_PAGES, PAGE_SIZE)
    shadow: dict[int, int] = {}  # seq_id -> tokens its table covers
    next_id = 0
    counts = {"admit": 0, "grow": 0, "free": 0, "refused": 0}

    for _ in range(6000):
        prev_tables = {s: list(pm.page_table(s)) for s in shadow}
        op = rng.random()
        if op < 0.35 or not shadow:
            seq_id, next_id = next_id, next_id + 1
            tokens = rng.randint(1, 40)
            expect_ok = pm.pages_for(tokens) <= pm.num_free_pages
            assert pm.can_allocate(seq_id, tokens) == expect_ok
            if expect_ok:
                pm.allocate(seq_id, tokens)
                shadow[seq_id] = tokens
                counts["admit"] += 1
            else:
                with pytest.raises(MemoryError):
                    pm.allocate(seq_id, tokens)
                counts["refused"] += 1
        elif op < 0.75:
            seq_id = rng.choice(sorted(shadow))
            tokens = shadow[seq_id] + rng.randint(0, 12)
            missing = pm.pages_for(tokens) - pm.pages_for(shadow[seq_id])
            expect_ok = missing <= pm.num_free_pages
            assert pm.num_missing_pages(seq_id, tokens) == missing
            assert pm.can_allocate(seq_id, tokens) == expect_ok
            if expect_ok:
                pm.allocate(seq_id, tokens)
                shadow[seq_id] = tokens
                counts["grow"] += 1
            else:
                with pytest.raises(MemoryError):
                    pm.allocate(seq_id, tokens)
                counts["refused"] += 1
        elif op < 0.80:
            # Asking for fewer tokens than already held is a no-op.
            seq_id = rng.choice(sorted(shadow))
            pm.allocate(seq_id, rng.randint(0, shadow[seq_id]))
        else:
            seq_id = rng.choice(sorted(shadow))
            assert pm.free(seq_id) == pm.pages_for(shadow.pop(seq_id))
            assert pm.page_table(seq_id) == []
            counts["free"] += 1
        _check_against_shadow(pm, shadow, prev_tables)

    # The walk really exercised every path, including running out of pages.
    assert all(n > 100 for n in counts.values()), counts
    for seq_id in list(shadow):
        pm.free(seq_id)
    assert pm.num_free_pages == NUM_PAGES
    pm.check_invariants()


def test_allocate_beyond_free_pages_raises_and_changes_nothing() -> None:
    pm = PageManager(4, PAGE_SIZE)
    pm.allocate(1, 3 * PAGE_SIZE)  # 3 pages, 1 left
    table_before = list(pm.page_table(1))
    free_before = list(pm._free)

    assert not pm.can_allocate(1, 5 * PAGE_SIZE)
    with pytest.raises(MemoryError):
        pm.allocate(1, 5 * PAGE_SIZE)  # needs 2 more
    with pytest.raises(MemoryError):
        pm.allocate(2, 2 * PAGE_SIZE)  # new sequence needs 2

    assert pm.page_table(1) == table_before
    assert list(pm._free) == free_before
    assert 2 not in pm._tables
    assert pm.num_free_pages == 1
    pm.check_invariants()


def test_allocate_exactly_all_free_pages_succeeds() -> None:
    pm = PageManager(3, PAGE_SIZE)
    pm.allocate(7, 3 * PAGE_SIZE)
    assert sorted(pm.page_table(7)) == [0, 1, 2]
    assert pm.num_free_pages == 0
    assert pm.can_allocate(7, 3 * PAGE_SIZE)  # nothing missing
    assert not pm.can_allocate(7, 3 * PAGE_SIZE + 1)
    pm.check_invariants()


def test_free_of_unknown_id_returns_zero_and_changes_nothing() -> None:
    pm = PageManager(8, PAGE_SIZE)
    pm.allocate(1, 5)
    assert pm.free(99) == 0
    assert pm.num_free_pages == 6
    assert pm.free(1) == 2
    assert pm.free(1) == 0  # double free is harmless
    assert pm.num_free_pages == 8
    pm.check_invariants()


def test_allocate_with_no_missing_pages_registers_no_empty_table() -> None:
    pm = PageManager(8, PAGE_SIZE)
    pm.allocate(5, 0)
    assert 5 not in pm._tables
    assert pm.page_table(5) == []
    assert pm.num_free_pages == 8
    pm.check_invariants()

    pm.allocate(6, PAGE_SIZE)
    pm.allocate(6, PAGE_SIZE - 1)  # already covered
    assert len(pm.page_table(6)) == 1
    pm.check_invariants()


def test_pages_for_rounds_up() -> None:
    pm = PageManager(8, PAGE_SIZE)
    assert [pm.pages_for(n) for n in range(10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


@pytest.mark.parametrize("num_pages, page_size", [(0, 4), (4, 0), (-1, 4)])
def test_constructor_rejects_non_positive_sizes(num_pages: int, page_size: int) -> None:
    with pytest.raises(ValueError):
        PageManager(num_pages, page_size)


def test_check_invariants_passes_on_healthy_state() -> None:
    pm = PageManager(8, PAGE_SIZE)
    pm.allocate(1, 9)
    pm.allocate(2, 4)
    pm.check_invariants()


def test_check_invariants_detects_page_owned_by_two_sequences() -> None:
    pm = PageManager(8, PAGE_SIZE)
    pm.allocate(1, 2 * PAGE_SIZE)
    pm.allocate(2, 2 * PAGE_SIZE)
    # Corrupt: seq 2 also gets seq 1's first page; one of its own pages goes back to the free list
    # so the page count still adds up and only the double ownership is wrong.
    stolen = pm._tables[2].pop()
    pm._free.append(stolen)
    pm._tables[2].append(pm._tables[1][0])
    with pytest.raises(RuntimeError, match="refcount 1 but 2 owner tables"):
        pm.check_invariants()


def test_check_invariants_detects_page_both_owned_and_free() -> None:
    pm = PageManager(4, PAGE_SIZE)
    pm.allocate(1, PAGE_SIZE)
    pm._free.append(pm._tables[1][0])
    pm._free.popleft()
    with pytest.raises(RuntimeError, match="both owned and free"):
        pm.check_invariants()


def test_check_invariants_detects_leaked_page() -> None:
    pm = PageManager(4, PAGE_SIZE)
    pm._free.popleft()  # a page that nobody owns and that is not free
    with pytest.raises(RuntimeError, match="total"):
        pm.check_invariants()


def test_check_invariants_detects_duplicate_on_free_list() -> None:
    pm = PageManager(4, PAGE_SIZE)
    pm._free.popleft()
    pm._free.append(1)
    with pytest.raises(RuntimeError, match="free list twice"):
        pm.check_invariants()


def test_check_invariants_detects_empty_registered_table() -> None:
    pm = PageManager(4, PAGE_SIZE)
    pm._tables[3] = []
    with pytest.raises(RuntimeError, match="empty page table"):
        pm.check_invariants()


def test_check_invariants_detects_out_of_range_page() -> None:
    pm = PageManager(4, PAGE_SIZE)
    pm._free.popleft()
    pm._free.append(4)
    with pytest.raises(RuntimeError, match="out of range"):
        pm.check_invariants()


# -- reference counts, prefix registry, copy-on-write --------------------------------------------


def _computed(pm: PageManager, owner, tokens: list[int], kv: dict[int, list[int | None]] | None = None) -> None:
    """Allocate and 'compute' ``tokens`` for ``owner`` (writing them into a fake store when given)."""
    pm.allocate(owner, len(tokens))
    pm.check_writable(owner, 0, len(tokens))
    if kv is not None:
        for pos, tok in enumerate(tokens):
            kv[pm.page_table(owner)[pos // PAGE_SIZE]][pos % PAGE_SIZE] = tok


def _register_full_pages(pm: PageManager, owner, tokens: list[int]) -> None:
    for page, key in zip(pm.page_table(owner), pm.prefix_keys(tokens)):
        pm.register(page, key)


def test_shared_page_returns_to_the_free_list_only_when_its_last_owner_lets_go() -> None:
    pm = PageManager(8, PAGE_SIZE)
    prompt = list(range(10))
    _computed(pm, "a", prompt)
    _register_full_pages(pm, "a", prompt)  # two full pages; the third (2 tokens) is not offered
    assert pm.num_registered_pages == 2
    shared = pm.match_prefix(pm.prefix_keys(prompt))
    assert shared == pm.page_table("a")[:2]
    pm.adopt(1, shared)
    pm.allocate(1, 12)  # one page of its own after the shared two
    assert [pm.refcount(p) for p in pm.page_table(1)] == [2, 2, 1]
    assert pm.num_shared_pages == 2 and pm.num_used_pages == 4
    pm.check_invariants()

    assert pm.free("a") == 1  # only its unshared last page goes back
    assert pm.num_used_pages == 3 and pm.num_shared_pages == 0
    assert pm.num_registered_pages == 2  # still held (by 1), still registered
    pm.check_invariants()
    assert pm.free(1) == 3
    assert pm.num_free_pages == 8 and pm.num_registered_pages == 0  # freed pages leave the registry
    assert pm.match_prefix(pm.prefix_keys(prompt)) == []
    pm.check_invariants()


def test_prefix_keys_chain_the_whole_prefix() -> None:
    pm = PageManager(8, PAGE_SIZE)
    a = pm.prefix_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = pm.prefix_keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert len(a) == 2 and len(b) == 2  # full pages only
    assert a[0] != b[0] and a[1] != b[1]  # page 2 holds the same tokens, but the prefix differs
    assert pm.prefix_keys([1, 2, 3, 4, 5, 6, 7, 8]) == a
    _computed(pm, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    _register_full_pages(pm, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    assert pm.match_prefix(b) == []
    assert pm.match_prefix(pm.prefix_keys([1, 2, 3, 4, 9, 9, 9, 9])) == pm.page_table("a")[:1]
    assert not pm.register(pm.page_table("a")[0], b[0])  # a page is registered once
    _computed(pm, "c", [1, 2, 3, 4])
    assert not pm.register(pm.page_table("c")[0], a[0])  # a key names one page
    with pytest.raises(RuntimeError, match="free page"):
        pm.register(7, b"k")
    with pytest.raises(RuntimeError, match="cannot adopt"):
        pm.adopt(9, [7])  # a free page cannot be adopted
    pm.check_invariants()


def test_move_hands_pages_over_without_changing_counts_and_drops_the_tail() -> None:
    pm = PageManager(8, PAGE_SIZE)
    _computed(pm, 1, list(range(14)))  # 4 pages
    table = list(pm.page_table(1))
    pm.move(1, ("session", "s"), 2)
    assert pm.page_table(1) == [] and pm.page_table(("session", "s")) == table[:2]
    assert [pm.refcount(p) for p in table[:2]] == [1, 1] and pm.num_used_pages == 2
    _computed(pm, 2, [0])
    with pytest.raises(RuntimeError, match="already holds pages"):
        pm.move(("session", "s"), 2, 1)
    assert pm.page_table(("session", "s")) == table[:2]  # refused: nothing changed
    assert pm.truncate(("session", "s"), 1) == 1 and pm.page_table(("session", "s")) == table[:1]
    pm.move(("session", "s"), 3, 0)  # keep nothing: the page is freed
    assert pm.num_used_pages == 1
    pm.check_invariants()


def test_writes_into_shared_or_registered_pages_are_refused() -> None:
    pm = PageManager(8, PAGE_SIZE)
    prompt = list(range(8))
    _computed(pm, "a", prompt)
    pm.check_writable("a", 0, 8)  # held once, unregistered: fine
    _register_full_pages(pm, "a", prompt)
    with pytest.raises(RuntimeError, match="copy-on-write"):
        pm.check_writable("a", 7, 8)  # registered, even if held once
    pm.adopt(1, pm.match_prefix(pm.prefix_keys(prompt))[:1])
    pm.allocate(1, 6)
    pm.check_writable(1, 4, 6)  # its own page
    with pytest.raises(RuntimeError, match=r"refcount 2, registered True"):
        pm.check_writable(1, 3, 6)  # the shared page
    assert not pm.is_writable(pm.page_table(1)[0]) and pm.is_writable(pm.page_table(1)[1])


def _corrupted(pm: PageManager, how: str) -> None:
    shared, own = pm.page_table(1)[0], pm.page_table(1)[-1]
    if how == "refcount":
        pm._refs[own] += 1
    elif how == "freed while shared":
        pm._free.append(shared)
    elif how == "dropped reference":
        pm._tables[1].remove(shared)
    elif how == "free page registered":
        free = pm._free[0]
        pm._by_key[b"stale"], pm._key_of[free] = free, b"stale"
    elif how == "registry maps":
        pm._key_of[shared] = b"other"
    elif how == "shared count":
        pm._num_shared += 1
    elif how == "held twice":
        pm._tables[1].append(own)
        pm._refs[own] += 1
    else:
        raise ValueError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("refcount", "refcount 2 but 1 owner"),
        ("freed while shared", "both owned and free"),
        ("dropped reference", "refcount 2 but 1 owner"),
        ("free page registered", "free page is still registered"),
        ("registry maps", "registry's two maps"),
        ("shared count", "shared-page count"),
        ("held twice", "holds a page twice"),
    ],
)
def test_check_invariants_detects_refcount_and_registry_corruption(how: str, message: str) -> None:
    pm = PageManager(8, PAGE_SIZE)
    prompt = list(range(8))
    _computed(pm, "a", prompt)
    _register_full_pages(pm, "a", prompt)
    pm.adopt(1, pm.match_prefix(pm.prefix_keys(prompt)))
    pm.allocate(1, 10)
    pm.check_invariants()
    _corrupted(pm, how)
    with pytest.raises(RuntimeError, match=message):
        pm.check_invariants()


class _SharingSoak:
    """Sequences that adopt registered prefixes and compute chunks into a fake K/V store, sessions
    that take over and hand back pages, eviction: every op is checked against a shadow model."""

    def __init__(self, rng: random.Random, num_pages: int) -> None:
        self.rng = rng
        self.pm = PageManager(num_pages, PAGE_SIZE)
        self.kv: dict[int, list[int | None]] = {p: [None] * PAGE_SIZE for p in range(num_pages)}
        self.bases = [[rng.randint(1, 60) for _ in range(rng.randint(6, 22))] for _ in range(3)]
        self.tables: dict[object, list[int]] = {}  # shadow page tables
        self.seqs: dict[int, dict] = {}  # seq id -> tokens, prompt length, computed, registered pages
        self.sessions: dict[tuple[str, str], list[int]] = {}  # session owner -> tokens its pages hold
        self.next_id = 0
        self.counts = dict.fromkeys(("admit", "adopted", "compute", "refused", "to_session", "turn", "cut", "evict"), 0)

    def _new_seq(self, prompt: list[int], computed: int) -> int:
        seq_id, self.next_id = self.next_id, self.next_id + 1
        self.seqs[seq_id] = {"tokens": prompt, "prompt": len(prompt), "computed": computed}
        self.seqs[seq_id]["registered"] = self.pm.pages_for(computed)
        return seq_id

    def admit(self) -> None:
        base = self.rng.choice(self.bases)
        prompt = base[: self.rng.randint(1, len(base))] + [
            self.rng.randint(1, 60) for _ in range(self.rng.randint(0, 6))
        ]
        keys = self.pm.prefix_keys(prompt)[: (len(prompt) - 1) // PAGE_SIZE]
        shared = self.pm.match_prefix(keys)
        for i, page in enumerate(shared):  # content addressing: the pages hold exactly this prefix
            assert self.kv[page] == prompt[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        seq_id = self._new_seq(prompt, len(shared) * PAGE_SIZE)
        self.pm.adopt(seq_id, shared)
        if shared:
            self.tables[seq_id] = list(shared)
        self.counts["admit"] += 1
        self.counts["adopted"] += len(shared)

    def compute(self, seq_id: int) -> None:
        seq = self.seqs[seq_id]
        start = seq["computed"]
        end = start + self.rng.randint(1, 6)
        while len(seq["tokens"]) < end:  # past the prompt: 'generated' tokens
            seq["tokens"].append(self.rng.randint(1, 60))
        if not self.pm.can_allocate(seq_id, end):
            with pytest.raises(MemoryError):
                self.pm.allocate(seq_id, end)
            self.counts["refused"] += 1
            return
        self.pm.allocate(seq_id, end)
        self.tables[seq_id] = list(self.pm.page_table(seq_id))
        self.pm.check_writable(seq_id, start, end)
        for pos in range(start, end):
            self.kv[self.tables[seq_id][pos // PAGE_SIZE]][pos % PAGE_SIZE] = seq["tokens"][pos]
        seq["computed"] = end
        keys = self.pm.prefix_keys(seq["tokens"][: seq["prompt"]])
        for i in range(seq["registered"], min(end, seq["prompt"]) // PAGE_SIZE):
            self.pm.register(self.tables[seq_id][i], keys[i])
        seq["registered"] = max(seq["registered"], min(end, seq["prompt"]) // PAGE_SIZE)
        self.counts["compute"] += 1

    def to_session(self, seq_id: int) -> None:
        """The request finished: its session keeps the pages of its computed tokens."""
        owner = ("session", f"s{seq_id}")
        seq = self.seqs.pop(seq_id)
        keep = self.pm.pages_for(seq["computed"])
        self.pm.move(seq_id, owner, keep)
        table = self.tables.pop(seq_id, [])
        if keep:
            self.tables[owner] = table[:keep]
        self.sessions[owner] = seq["tokens"][: seq["computed"]]
        self.counts["to_session"] += 1

    def turn(self, owner) -> None:
        """The session's next request: the longest common prefix moves to a new sequence."""
        held = self.sessions.pop(owner)
        prompt = held[: self.rng.randint(0, len(held))] + [
            self.rng.randint(1, 60) for _ in range(self.rng.randint(1, 5))
        ]
        n = next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), min(len(held), len(prompt)))
        n = min(n, len(prompt) - 1)
        if n % PAGE_SIZE and not self.pm.is_writable(self.tables[owner][n // PAGE_SIZE]):
            n -= n % PAGE_SIZE  # the next write would land in a shared or registered page
            self.counts["cut"] += 1
        seq_id = self._new_seq(prompt, n)
        self.pm.move(owner, seq_id, self.pm.pages_for(n))
        table = self.tables.pop(owner, [])
        if n:
            self.tables[seq_id] = table[: self.pm.pages_for(n)]
        self.counts["turn"] += 1

    def drop(self, owner) -> None:
        """Free a sequence (finish, abort, preemption) or evict a session."""
        expect = sum(1 for p in self.tables.get(owner, []) if self.pm.refcount(p) == 1)
        assert self.pm.free(owner) == expect
        self.tables.pop(owner, None)
        self.seqs.pop(owner, None)
        if self.sessions.pop(owner, None) is not None:
            self.counts["evict"] += 1

    def random_op(self) -> None:
        rng, op = self.rng, self.rng.random()
        if op < 0.2 or not self.seqs:
            self.admit()
        elif op < 0.65:
            self.compute(rng.choice(sorted(self.seqs)))
        elif op < 0.75:
            self.to_session(rng.choice(sorted(self.seqs)))
        elif op < 0.85 and self.sessions:
            self.turn(rng.choice(sorted(self.sessions)))
        elif op < 0.92 and self.sessions:
            self.drop(rng.choice(sorted(self.sessions)))
        else:
            self.drop(rng.choice(sorted(self.seqs)))

    def check(self) -> None:
        pm = self.pm
        pm.check_invariants()
        refs: dict[int, int] = {}
        for owner, table in self.tables.items():
            assert pm.page_table(owner) == table, f"{owner!r}: table {pm.page_table(owner)} != shadow {table}"
            for page in table:
                refs[page] = refs.get(page, 0) + 1
        assert set(pm._tables) == set(self.tables)
        assert all(pm.refcount(p) == refs.get(p, 0) for p in range(pm.num_pages))
        assert pm.num_used_pages == len(refs) and pm.num_free_pages + pm.num_used_pages == pm.num_pages
        assert pm.num_shared_pages == sum(1 for n in refs.values() if n > 1)
        for seq_id, seq in self.seqs.items():
            assert len(self.tables.get(seq_id, [])) >= pm.pages_for(seq["computed"])
        for owner, tokens in self.sessions.items():
            assert len(self.tables.get(owner, [])) == pm.pages_for(len(tokens))
        owners = [(i, s["tokens"][: s["computed"]]) for i, s in self.seqs.items()] + list(self.sessions.items())
        for owner, tokens in owners:  # nobody's K/V was overwritten by someone else's write
            table = self.tables.get(owner, [])
            got = [self.kv[table[pos // PAGE_SIZE]][pos % PAGE_SIZE] for pos in range(len(tokens))]
            assert got == tokens, f"{owner!r}: its pages no longer hold its tokens"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_ops_with_shared_prefixes_sessions_and_eviction(seed: int) -> None:
    rng = random.Random(seed)
    soak = _SharingSoak(rng, num_pages=48)
    for _ in range(3000):
        soak.random_op()
        soak.check()
    assert all(n > 20 for n in soak.counts.values()), soak.counts
    assert soak.counts["adopted"] > 200, soak.counts
    for owner in list(soak.tables):
        soak.drop(owner)
    soak.check()
    assert soak.pm.num_free_pages == 48 and soak.pm.num_registered_pages == 0 and soak.pm.num_shared_pages == 0


def test_the_soak_catches_a_write_into_a_shared_page(monkeypatch) -> None:
    """Mutation check: if writability were not enforced (a session turn diverging inside a shared
    page writes into it), the shadow's content check finds another owner's K/V overwritten."""
    monkeypatch.setattr(PageManager, "is_writable", lambda self, page: True)
    rng = random.Random(0)
    soak = _SharingSoak(rng, num_pages=48)
    with pytest.raises(AssertionError, match="no longer hold its tokens"):
        for _ in range(3000):
            soak.random_op()
            soak.check()
