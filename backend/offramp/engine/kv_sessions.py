"""Stateful multi-turn sessions: the KV pages (and their token ids) a conversation keeps between
its requests, the LRU order they are evicted in, idle expiry and the ``max_sessions`` cap.

Life of a session (ids only, like the page manager):

- ``open`` when a request names the session (created on first use). One request per session may be
  in flight; a second one raises ``ValueError``.
- At admission the scheduler asks ``reusable_tokens``: the longest common prefix of the session's
  computed tokens and the request's FULL token ids (the caller renders the whole conversation), cut
  so that at least the last prompt token is computed and so that no new token lands in a page that is
  shared or registered (see ``page_manager``). ``attach`` then moves the pages covering that prefix
  to the request's sequence (the diverging tail is dropped); the session holds nothing meanwhile.
- ``detach`` when the request finishes (done, stopped, length or cancelled): the pages covering the
  tokens whose K/V is in the store come back to the session. Only the engine knows which tokens are
  exact (``kv_fill=recompute`` keeps tokens pending); it passes them in.
- ``evict`` drops an idle session's pages under memory pressure but keeps the session: its next
  request re-prefills (same output). ``end`` drops the session itself (``end_session``, idle
  timeout, or the least recently used idle session when ``max_sessions`` is reached).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from offramp.engine.page_manager import PageManager


def session_owner(session_id: str) -> tuple[str, str]:
    """The page-manager owner key of a session (sequence owners are ints, so never equal)."""
    return ("session", session_id)


@dataclass(slots=True)
class Session:
    session_id: str
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V the session's own pages hold
    last_used: float = 0.0
    request_id: str | None = None  # the request in flight (waiting or running), if any
    attached: bool = False  # its pages were moved to that request's sequence


@dataclass(slots=True)
class CacheStats:
    """Sessions and prefix sharing, for metrics (``LLMEngine.cache_stats``)."""

    num_sessions: int  # sessions known to the engine, idle or with a request in flight
    num_idle_sessions: int  # sessions with no request in flight
    num_session_pages: int  # pages held by sessions themselves (a running request's are its own)
    num_session_evictions: int  # cumulative: idle sessions whose pages were dropped for memory
    num_sessions_expired: int  # cumulative: sessions closed by idle timeout or the max_sessions cap
    num_session_reused_tokens: int  # cumulative: prompt tokens served from session pages
    num_shared_pages: int  # pages held by more than one owner right now
    num_registered_pages: int  # full prompt pages in the prefix registry right now
    num_prefix_reused_tokens: int  # cumulative: prompt tokens served from shared prefix pages


class KVSessionTable:
    def __init__(
        self,
        pages: PageManager,
        max_sessions: int,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pages = pages
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._sessions: dict[str, Session] = {}  # least recently used first
        self._next_expiry_check = 0.0
        self.num_evictions = 0
        self.num_expired = 0
        self.num_reused_tokens = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    @property
    def num_idle(self) -> int:
        return sum(1 for s in self._sessions.values() if s.request_id is None)

    @property
    def num_pages(self) -> int:
        return sum(len(self.pages.page_table(session_owner(sid))) for sid in self._sessions)

    def stats(self, num_prefix_reused_tokens: int) -> CacheStats:
        return CacheStats(
            num_sessions=len(self._sessions),
            num_idle_sessions=self.num_idle,
            num_session_pages=self.num_pages,
            num_session_evictions=self.num_evictions,
            num_sessions_expired=self.num_expired,
            num_session_reused_tokens=self.num_reused_tokens,
            num_shared_pages=self.pages.num_shared_pages,
            num_registered_pages=self.pages.num_registered_pages,
            num_prefix_reused_tokens=num_prefix_reused_tokens,
        )

    def _touch(self, session: Session) -> None:
        session.last_used = self.clock()
        self._sessions[session.session_id] = self._sessions.pop(session.session_id)  # to the MRU end

    # -- a request's turn -------------------------------------------------------------------------
    def open(self, session_id: str, request_id: str) -> Session:
        """Start ``request_id``'s turn (creating the session); ``ValueError`` if one is in flight."""
        session = self._sessions.get(session_id)
        if session is not None and session.request_id is not None:
            raise ValueError(
                f"session_id: {session_id!r} already has a request in flight ({session.request_id!r}); "
                "a session takes one request at a time: wait for it to finish or cancel it"
            )
        if session is None:
            if len(self._sessions) >= self.max_sessions and not self._close_lru_idle():
                raise ValueError(
                    f"max_sessions: all {self.max_sessions} sessions have a request in flight; retry later"
                )
            session = self._sessions[session_id] = Session(session_id)
        session.request_id = request_id
        self._touch(session)
        return session

    def reusable_tokens(self, session_id: str, prompt_ids: list[int]) -> int:
        """How many leading tokens of ``prompt_ids`` the session's pages can serve right now."""
        session = self._sessions.get(session_id)
        if session is None or session.attached or not session.token_ids:
            return 0
        held = session.token_ids
        limit = min(len(held), len(prompt_ids))
        if prompt_ids[:limit] == held[:limit]:
            n = limit
        else:
            n = next(i for i in range(limit) if held[i] != prompt_ids[i])
        n = min(n, len(prompt_ids) - 1)  # the last prompt token always runs: its logits give the next token
        size = self.pages.page_size
        if n % size and not self.pages.is_writable(self.pages.page_table(session_owner(session_id))[n // size]):
            n -= n % size  # new tokens would land in a shared or registered page: start a fresh one
        return n

    def attach(self, session_id: str, seq_owner: int, num_tokens: int) -> None:
        """Move the pages covering the first ``num_tokens`` tokens to the request's sequence and drop
        the rest; the session holds nothing until ``detach``."""
        session = self._sessions[session_id]
        self.pages.move(session_owner(session_id), seq_owner, self.pages.pages_for(num_tokens))
        session.token_ids = []
        session.attached = True
        self.num_reused_tokens += num_tokens

    def detach(self, session_id: str, seq_owner: int, token_ids: list[int]) -> None:
        """End the request's turn: keep the sequence's pages covering ``token_ids`` (its tokens with
        exact K/V in the store) for the next turn. The caller frees whatever the sequence still holds."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        if session.attached:
            held = len(self.pages.page_table(seq_owner)) * self.pages.page_size
            token_ids = list(token_ids[:held])
            self.pages.move(seq_owner, session_owner(session_id), self.pages.pages_for(len(token_ids)))
            session.token_ids = token_ids
        session.request_id = None
        session.attached = False
        self._touch(session)

    # -- eviction and expiry ----------------------------------------------------------------------
    def evict(self, session_id: str) -> int:
        """Drop a session's pages but keep the session (its next request re-prefills); returns the
        pages that went back to the free list."""
        session = self._sessions.get(session_id)
        owner = session_owner(session_id)
        if session is None or not self.pages.page_table(owner):
            return 0
        session.token_ids = []
        self.num_evictions += 1
        return self.pages.free(owner)

    def end(self, session_id: str) -> int:
        """Forget a session and free its pages (its request, if any, must be finished first)."""
        if self._sessions.pop(session_id, None) is None:
            return 0
        return self.pages.free(session_owner(session_id))

    def reclaim(self, num_free_wanted: int, include_waiting: bool = False, protect: str | None = None) -> int:
        """Evict sessions, least recently used first, until ``num_free_wanted`` pages are free: idle
        ones, then (``include_waiting``) those whose request is still queued, never ``protect``.
        Returns how many sessions were evicted."""
        evicted = 0
        for waiting in (False, True) if include_waiting else (False,):
            for session in list(self._sessions.values()):
                if self.pages.num_free_pages >= num_free_wanted:
                    return evicted
                if session.session_id == protect or session.attached or (session.request_id is not None) != waiting:
                    continue
                if self.pages.page_table(session_owner(session.session_id)):
                    self.evict(session.session_id)
                    evicted += 1
        return evicted

    def expire(self) -> list[str]:
        """Close sessions idle for longer than ``idle_timeout_s``; cheap when none is due."""
        now = self.clock()
        if now < self._next_expiry_check:
            return []
        self._next_expiry_check = now + min(1.0, self.idle_timeout_s / 4)
        due = []
        for session in self._sessions.values():  # least recently used first: stop at the first fresh one
            if session.last_used > now - self.idle_timeout_s:
                break
            if session.request_id is None:
                due.append(session.session_id)
        for session_id in due:
            self.end(session_id)
        self.num_expired += len(due)
        return due

    def _close_lru_idle(self) -> bool:
        oldest = next((s.session_id for s in self._sessions.values() if s.request_id is None), None)
        if oldest is None:
            return False
        self.end(oldest)
        self.num_expired += 1
        return True
