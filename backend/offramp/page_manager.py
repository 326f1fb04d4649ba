"""Paged KV bookkeeping on ids only: a free list, and one page table per sequence."""

from __future__ import annotations

from collections import deque


class PageManager:
    """Hands out fixed-size KV pages. A page id indexes the same slot in every layer's store."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def page_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def num_missing_pages(self, seq_id: int, num_tokens: int) -> int:
        """Pages ``seq_id`` still needs to hold ``num_tokens`` tokens."""
        return max(0, self.pages_for(num_tokens) - len(self.page_table(seq_id)))

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.num_missing_pages(seq_id, num_tokens) <= len(self._free)

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grow ``seq_id``'s table to cover ``num_tokens`` tokens (admission or growth)."""
        missing = self.num_missing_pages(seq_id, num_tokens)
        if missing > len(self._free):
            raise MemoryError(f"sequence {seq_id} needs {missing} pages, {len(self._free)} are free")
        if missing == 0:
            return
        table = self._tables.setdefault(seq_id, [])
        for _ in range(missing):
            table.append(self._free.popleft())

    def free(self, seq_id: int) -> int:
        """Return all of ``seq_id``'s pages (finish, cancel, abort, preemption); returns how many."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(table)
        return len(table)

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` if a page is owned twice, leaked, or unknown."""
        owned = [p for table in self._tables.values() for p in table]
        free = list(self._free)
        if len(set(owned)) != len(owned):
            raise RuntimeError("a page is owned by two sequences (or twice by one)")
        if len(set(free)) != len(free):
            raise RuntimeError("a page is on the free list twice")
        if set(owned) & set(free):
            raise RuntimeError("a page is both owned and free")
        if len(owned) + len(free) != self.num_pages:
            raise RuntimeError(f"free {len(free)} + used {len(owned)} != total {self.num_pages}")
        if any(not 0 <= p < self.num_pages for p in owned + free):
            raise RuntimeError("a page id is out of range")
        if any(not table for table in self._tables.values()):
            raise RuntimeError("an empty page table is still registered")
