"""Paged KV bookkeeping on ids only: a free list, one page table per owner, reference counts, and a
content-addressed registry of full prompt pages for prefix sharing.

Owners are sequence ids (``int``) and session keys (any other hashable, see ``sessions.py``). A page
may sit in several owners' tables; its reference count is the number of tables holding it, and it
goes back to the free list only when that count reaches zero.

Prefix sharing. A full page of prompt tokens whose K/V has been computed (at full depth: prompts
never exit early) can be registered under a key that hashes the chain of ALL token ids from position
0 to the page's end, so two sequences share a page only when their whole prefixes up to it are
identical. A new sequence adopts the longest registered run of its own keys (``match_prefix`` then
``adopt``). The registry holds no reference: a page leaves it when its last owner lets go.

Copy-on-write. A write into a page held by several owners, or into a registered page, would change
K/V that someone else reads (or that the key vouches for), so it would have to copy the page first.
This never happens, and ``check_writable`` proves it on every scheduled write:

- only FULL pages are registered, and only after every slot of theirs was written; owners adopt only
  registered pages and start computing after them, so nobody writes into an adopted page again;
- pages reach a second owner only through the registry (``adopt``); a session hands its pages to its
  next request with ``move`` (ownership changes, the count does not), so a partial last page is
  always held once;
- when a session's next request diverges inside a page that is shared or registered, the reused
  prefix is cut back to that page's start (``is_writable``), so the new tokens go to a fresh page.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, deque
from collections.abc import Hashable, Sequence

Owner = Hashable  # a sequence id (int) or a session key


class PageManager:
    """Hands out fixed-size KV pages. A page id indexes the same slot in every layer's store."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._tables: dict[Owner, list[int]] = {}
        self._refs: list[int] = [0] * num_pages  # page -> number of tables holding it
        self._num_shared = 0  # pages with refcount > 1
        self._by_key: dict[bytes, int] = {}  # prefix key -> registered page
        self._key_of: dict[int, bytes] = {}  # registered page -> its key

    # -- counts -----------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_shared_pages(self) -> int:
        """Pages held by more than one owner right now (what prefix sharing saves)."""
        return self._num_shared

    @property
    def num_registered_pages(self) -> int:
        return len(self._by_key)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def page_table(self, owner: Owner) -> list[int]:
        return self._tables.get(owner, [])

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def num_missing_pages(self, owner: Owner, num_tokens: int) -> int:
        """Pages ``owner`` still needs to hold ``num_tokens`` tokens."""
        return max(0, self.pages_for(num_tokens) - len(self.page_table(owner)))

    def can_allocate(self, owner: Owner, num_tokens: int) -> bool:
        return self.num_missing_pages(owner, num_tokens) <= len(self._free)

    # -- ownership --------------------------------------------------------------------------------
    def allocate(self, owner: Owner, num_tokens: int) -> None:
        """Grow ``owner``'s table with fresh pages to cover ``num_tokens`` tokens."""
        missing = self.num_missing_pages(owner, num_tokens)
        if missing > len(self._free):
            raise MemoryError(f"owner {owner!r} needs {missing} pages, {len(self._free)} are free")
        if missing == 0:
            return
        table = self._tables.setdefault(owner, [])
        for _ in range(missing):
            page = self._free.popleft()
            self._refs[page] = 1
            table.append(page)

    def adopt(self, owner: Owner, pages: Sequence[int]) -> None:
        """Append pages already in use (registered prefix pages) to ``owner``'s table: refcount + 1."""
        table = self._tables.get(owner, [])
        for page in pages:
            if self._refs[page] == 0 or page in table:
                raise RuntimeError(f"owner {owner!r} cannot adopt page {page}: free or already held")
        if not pages:
            return
        table = self._tables.setdefault(owner, table)
        for page in pages:
            self._incref(page)
            table.append(page)

    def move(self, src: Owner, dst: Owner, num_pages: int) -> None:
        """Hand the first ``num_pages`` of ``src``'s pages to ``dst`` (counts unchanged) and let go
        of the rest. ``dst`` must hold nothing (a session and its request take turns)."""
        table = self._tables.pop(src, [])
        keep, drop = table[:num_pages], table[num_pages:]
        if keep:
            if dst in self._tables:
                self._tables[src] = table
                raise RuntimeError(f"owner {dst!r} already holds pages; cannot move {src!r}'s to it")
            self._tables[dst] = keep
        for page in drop:
            self._decref(page)

    def truncate(self, owner: Owner, num_pages: int) -> int:
        """Keep ``owner``'s first ``num_pages`` pages; returns how many went back to the free list."""
        table = self._tables.get(owner)
        if table is None or len(table) <= num_pages:
            return 0
        drop = table[num_pages:]
        del table[num_pages:]
        if not table:
            del self._tables[owner]
        return sum(self._decref(page) for page in drop)

    def free(self, owner: Owner) -> int:
        """Let go of all of ``owner``'s pages (finish, abort, preemption, eviction); returns how many
        went back to the free list (shared pages stay with their other owners)."""
        return self.truncate(owner, 0)

    def _incref(self, page: int) -> None:
        self._refs[page] += 1
        if self._refs[page] == 2:
            self._num_shared += 1

    def _decref(self, page: int) -> int:
        """Drop one reference; 1 if the page went back to the free list."""
        self._refs[page] -= 1
        if self._refs[page] == 1:
            self._num_shared -= 1
        if self._refs[page] > 0:
            return 0
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._by_key[key]
        self._free.append(page)
        return 1

    # -- prefix registry --------------------------------------------------------------------------
    def prefix_keys(self, token_ids: Sequence[int]) -> list[bytes]:
        """One key per FULL page of ``token_ids``: a hash chain over every token up to the page end."""
        keys, parent = [], b""
        for end in range(self.page_size, len(token_ids) + 1, self.page_size):
            chunk = array("q", token_ids[end - self.page_size : end]).tobytes()
            parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
            keys.append(parent)
        return keys

    def match_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """Registered pages for the longest leading run of ``keys``."""
        pages = []
        for key in keys:
            page = self._by_key.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def register(self, page: int, key: bytes) -> bool:
        """Offer a full page whose K/V is computed under ``key``; False if the key or page is taken."""
        if self._refs[page] == 0:
            raise RuntimeError(f"cannot register free page {page}")
        if key in self._by_key or page in self._key_of:
            return False
        self._by_key[key] = page
        self._key_of[page] = key
        return True

    def is_registered(self, page: int) -> bool:
        return page in self._key_of

    def is_writable(self, page: int) -> bool:
        """Whether K/V may be written into ``page``: held once and not vouched for by a key."""
        return self._refs[page] == 1 and page not in self._key_of

    def check_writable(self, owner: Owner, start: int, end: int) -> None:
        """Raise ``RuntimeError`` if writing tokens ``[start, end)`` of ``owner`` would touch a shared
        or registered page (copy-on-write would be needed; by construction it never is)."""
        table = self.page_table(owner)
        for index in range(start // self.page_size, self.pages_for(end)):
            page = table[index]
            if not self.is_writable(page):
                raise RuntimeError(
                    f"copy-on-write: owner {owner!r} would write tokens [{start}, {end}) into page {page} "
                    f"(refcount {self._refs[page]}, registered {page in self._key_of})"
                )

    # -- invariants -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` if a count is wrong, a page leaked, or the registry is stale."""
        free = list(self._free)
        if len(set(free)) != len(free):
            raise RuntimeError("a page is on the free list twice")
        holders: Counter[int] = Counter()
        for owner, table in self._tables.items():
            if not table:
                raise RuntimeError("an empty page table is still registered")
            if len(set(table)) != len(table):
                raise RuntimeError(f"owner {owner!r} holds a page twice")
            holders.update(table)
        if any(not 0 <= p < self.num_pages for p in [*holders, *free, *self._key_of]):
            raise RuntimeError("a page id is out of range")
        if set(holders) & set(free):
            raise RuntimeError("a page is both owned and free")
        for page in range(self.num_pages):
            if self._refs[page] != holders[page]:
                raise RuntimeError(f"page {page}: refcount {self._refs[page]} but {holders[page]} owner tables hold it")
        used = sum(1 for r in self._refs if r > 0)
        if len(free) + used != self.num_pages:
            raise RuntimeError(f"free {len(free)} + used {used} != total {self.num_pages} (a page leaked)")
        if sum(1 for r in self._refs if r > 1) != self._num_shared:
            raise RuntimeError("the shared-page count is stale")
        if len(self._by_key) != len(self._key_of) or any(self._key_of.get(p) != k for k, p in self._by_key.items()):
            raise RuntimeError("the prefix registry's two maps disagree")
        if any(self._refs[p] == 0 for p in self._key_of):
            raise RuntimeError("a free page is still registered")
