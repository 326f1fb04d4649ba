"""PageManager: a randomized soak against a shadow model, plus targeted edge cases."""

from __future__ import annotations

import random

import pytest

from offramp.page_manager import PageManager

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
    with pytest.raises(RuntimeError, match="owned by two"):
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
