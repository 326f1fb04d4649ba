"""The engine on a background thread, for servers: submit, cancel, stream events, drain, stop.

One thread owns the ``LLMEngine`` and runs an iteration whenever there is work. Callers hand in
``RequestHandle`` objects (with an ``emit`` callback and an ``is_cancelled`` probe) from any
thread. Every request gets exactly one final event: on success, on error and on cancellation.
An error in the loop itself fails the requests in flight, is logged with its traceback (a repeat
of the same error once more only as a count) and makes the loop back off, so it cannot spin.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable

from offramp.engine.llm_engine import LLMEngine
from offramp.serving.events import EngineStats, RequestHandle, StreamEvent
from offramp.serving.requests import RequestError

log = logging.getLogger("offramp.engine_loop")
BACKOFF_S = (0.05, 1.0)  # the loop's wait after a failed pass: doubles per repeat, within these bounds


class AsyncEngine:
    """Owns an ``LLMEngine`` built by ``engine_factory`` on the engine thread itself.

    Building it there matters: OpenMP gives each thread that runs parallel torch work its own
    team, and a team left behind by model loading on another thread slowed every later step by
    ~35% (measured: 21 vs 33 tokens/s on 2 cores).
    """

    def __init__(
        self,
        engine_factory: Callable[[], LLMEngine],
        max_queued: int = 256,
        on_stats: Callable[[EngineStats], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._factory = engine_factory
        self.on_fatal = on_fatal  # told once when the engine cannot run any more (a pipeline stage failed)
        self.failure: str | None = None
        self.engine: LLMEngine | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.max_queued = max_queued
        self.on_stats = on_stats
        self._inbox: queue.Queue[RequestHandle] = queue.Queue()
        self._ended_sessions: queue.Queue[str] = queue.Queue()
        self._live: dict[str, RequestHandle] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._num_pending = 0
        self._drain_s = 30.0
        self._deadline: float | None = None
        self._clock = time.monotonic  # of the drain deadline (tests drive it)
        self._last_error: str | None = None  # the loop's last error, while it repeats
        self._num_repeats = 0
        self._backoff_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="offramp-engine", daemon=True)

    @property
    def tokenizer(self):
        """The engine's tokenizer (once ``start`` has built the engine)."""
        return self.engine.tokenizer

    def start(self) -> None:
        """Start the engine thread; returns once the engine is built (re-raising a load error)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, handle: RequestHandle) -> None:
        """Queue a request; raises ``RequestError(code="unavailable")`` when the server is full."""
        with self._lock:
            if self.failure is not None:
                raise RequestError(f"the model failed ({self.failure}); retry on another instance", code="unavailable")
            if self._stop.is_set() or not self._thread.is_alive():
                raise RequestError("the model is shutting down; retry on another instance", code="unavailable")
            if self._num_pending >= self.max_queued:
                raise RequestError(
                    f"server busy: {self.max_queued} requests in flight; retry later", code="unavailable"
                )
            self._num_pending += 1
            self._inbox.put(handle)  # under the lock: shutdown cannot slip in between check and put
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let in-flight ones finish (up to ``timeout``), abort the rest, join."""
        self._drain_s = timeout
        with self._lock:
            self._stop.set()
        self._wake.set()
        self._thread.join(timeout + 5.0)

    def end_session(self, session_id: str) -> None:
        """Close a session from any thread: on the engine thread its request in flight (if any) gets
        its final event (finish reason ``abort``) and the session's pages are freed."""
        self._ended_sessions.put(session_id)
        self._wake.set()

    @property
    def num_in_flight(self) -> int:
        return self._num_pending

    # -- engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as exc:  # surfaces in start(), on the caller's thread
            self._load_error = exc
            return
        finally:
            self._ready.set()
        try:
            while True:
                try:
                    if self._iterate():
                        return
                except Exception as exc:  # a fault must not strand requests: each gets its final event
                    if self._loop_failed(exc):
                        return
                else:
                    self._recovered()
        finally:
            self._close_engine()

    def _close_engine(self) -> None:
        try:
            self.engine.close()  # pipeline stages stop with the engine thread
        except Exception as exc:
            log.error("offramp: closing the engine failed: %r", exc)

    def _fatal(self, failure: str) -> None:
        """The engine cannot run any more: every request in flight or queued gets an error, callers
        are told (servers turn not ready), and the loop ends."""
        with self._lock:
            self.failure = failure
        log.error("offramp: the engine failed and stops: %s", failure)
        error = RequestError(f"the model failed ({failure}); retry on another instance", code="unavailable")
        self._fail_all(error)
        for handle in self._queued():
            self._finish(handle, StreamEvent(handle.request_id, finished=True, error=error))
        self._close_engine()  # the other stages stop before anyone is told
        if self.on_fatal is not None:
            self.on_fatal(failure)

    def _loop_failed(self, exc: Exception) -> bool:
        """After a failed pass: fail the live requests, log the error (with its traceback the first
        time it occurs in a row), and wait before the next pass (doubling, bounded). True when the
        thread should end (shutting down: queued requests are refused)."""
        if self.engine.failure is not None:  # not a passing fault: a pipeline stage is gone
            self._fatal(self.engine.failure)
            return True
        self._fail_all(RequestError(f"internal error in the engine: {exc!r}", code="internal"))
        key = f"{type(exc).__name__}: {exc}"
        if key != self._last_error:
            self._log_repeats()
            log.error("offramp: error in the engine loop (backing off): %s", key, exc_info=exc)
            self._last_error = key
        else:
            self._num_repeats += 1
        low, high = BACKOFF_S
        self._backoff_s = min(high, max(low, self._backoff_s * 2))  # until a pass goes through
        if self._stop.wait(self._backoff_s):
            self._refuse_queued()
            return True
        return False

    def _log_repeats(self) -> None:
        if self._num_repeats:
            log.error("offramp: the engine loop error above repeated %d more time(s)", self._num_repeats)
        self._num_repeats = 0

    def _recovered(self) -> None:
        """A pass went through: close the account of the last error and reset the back-off."""
        if self._last_error is not None:
            self._log_repeats()
            self._last_error, self._backoff_s = None, 0.0

    def _iterate(self) -> bool:
        """One pass of the loop; True when the thread should end."""
        if self.engine.failure is not None:  # found by the stages' heartbeat, maybe while idle
            self._fatal(self.engine.failure)
            return True
        self._admit()
        self._cancel()
        self._end_sessions()
        if self._stop.is_set():
            self._deadline = self._deadline or self._clock() + self._drain_s
            if not self._live or self._clock() > self._deadline:
                for handle in list(self._live.values()):
                    self._abort(handle)
                self._refuse_queued()
                return True
        if self.engine.has_work:
            self._step()
        else:
            if self.engine.expire_sessions():
                self._report(self._stats())  # their pages were freed outside a step
            self._wake.wait(0.05)
            self._wake.clear()
        return False

    def _end_sessions(self) -> None:
        while True:
            try:
                session_id = self._ended_sessions.get_nowait()
            except queue.Empty:
                return
            for handle in [h for h in self._live.values() if h.session_id == session_id]:
                self._abort(handle)
            self.engine.end_session(session_id)
            self._report(self._stats())

    def _queued(self):
        """Take every request waiting in the inbox, without blocking."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _refuse_queued(self) -> None:
        """Requests that raced with shutdown still get their one final (error) event."""
        error = RequestError("the model is shutting down; retry on another instance", code="unavailable")
        for handle in self._queued():
            self._finish(handle, StreamEvent(handle.request_id, finished=True, error=error))

    def _fail_all(self, error: RequestError) -> None:
        """Every live request gets its final (error) event, even if aborting it fails too."""
        for handle in list(self._live.values()):
            try:
                self.engine.abort(handle.request_id)
            except Exception as exc:
                log.error("offramp: could not abort %s after an engine error: %r", handle.request_id, exc)
            self._finish(handle, StreamEvent(handle.request_id, finished=True, error=error))

    def _admit(self) -> None:
        for handle in self._queued():
            try:
                req = handle.request
                handle.prompt_token_ids = self.engine.encode_for_serving(req.prompt)
                handle.seq = self.engine.add_request(
                    handle.request_id, handle.prompt_token_ids, req.params, handle.session_id, detokenize=True
                )
                handle.seq.arrival_time = handle.submitted_at  # waiting in the inbox counts toward TTFT
                self._live[handle.request_id] = handle
            except Exception as exc:  # bad input -> invalid; anything else -> internal, this request only
                if isinstance(exc, RequestError):
                    error = exc
                elif isinstance(exc, ValueError):
                    error = RequestError(str(exc))
                else:
                    error = RequestError(f"internal error while admitting the request: {exc!r}", code="internal")
                if handle.seq is not None:
                    self.engine.abort(handle.request_id)
                self._finish(handle, StreamEvent(handle.request_id, finished=True, error=error))

    def _cancel(self) -> None:
        for handle in list(self._live.values()):
            try:
                cancelled = handle.is_cancelled()
            except Exception:  # the probe itself failed (the client is gone): treat as cancelled
                cancelled = True
            if cancelled:
                self._abort(handle)

    def _abort(self, handle: RequestHandle) -> None:
        self.engine.abort(handle.request_id)
        self._final(handle)
        self._report(self._stats())  # pages were freed outside a step

    def _step(self) -> None:
        grown, finished = self.engine.step()
        stats = self._stats()
        stats.batch_size = len(grown)
        done = {s.request_id for s in finished}
        for seq in grown:
            handle = self._live.get(seq.request_id)
            if handle is None:
                continue
            start, handle.counted_tokens = handle.counted_tokens, len(seq.output_token_ids)
            stats.exit_layers.extend(seq.exit_layers[start:])  # one per token, accepted drafts included
            stats.new_tokens += handle.counted_tokens - start
            if len(seq.output_token_ids) == 1 and seq.first_token_time is not None:
                stats.ttft_s.append(seq.first_token_time - seq.arrival_time)
            if seq.request_id in done:
                if len(seq.output_token_ids) > 1 and seq.first_token_time is not None:
                    n = len(seq.output_token_ids) - 1
                    stats.tpot_s.append((seq.finish_time - seq.first_token_time) / n)
                self._final(handle)
            elif handle.request.stream:
                self._stream(handle)
        self._report(stats)

    def _report(self, stats: EngineStats) -> None:
        if self.on_stats is not None:
            try:
                self.on_stats(stats)
            except Exception as exc:  # metrics must never fail a request
                print(f"offramp: metrics update failed: {exc!r}", file=sys.stderr, flush=True)

    def snapshot(self) -> EngineStats:
        """The engine's state now, for metrics at load (call it while no request is in flight)."""
        return self._stats()

    def _stats(self) -> EngineStats:
        sched = self.engine.scheduler
        cache = self.engine.cache_stats
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            pages_used=self.engine.pages.num_used_pages,
            pages_free=self.engine.pages.num_free_pages,
            num_preemptions=sched.num_preemptions,
            num_sessions=cache.num_sessions,
            session_pages=cache.num_session_pages,
            session_evictions=cache.num_session_evictions,
            prefix_shared_pages=cache.num_shared_pages,
            sparsity_density=None
            if self.engine.runner.sparse is None
            else self.engine.runner.sparse.stats.mean_density,
        )

    def _new_tokens(self, handle: RequestHandle) -> tuple[list[int], list[int]]:
        seq = handle.seq
        start, handle.emitted_tokens = handle.emitted_tokens, len(seq.output_token_ids)
        return seq.output_token_ids[start:], seq.exit_layers[start:]

    def _stream(self, handle: RequestHandle) -> None:
        tokens, exits = self._new_tokens(handle)
        text = handle.seq.detokenizer.take()  # the engine decoded the new tokens in its step
        if text or tokens:
            handle.emit(self._event(handle, text, tokens, exits))

    def _final(self, handle: RequestHandle) -> None:
        tokens, exits = self._new_tokens(handle)
        detok = handle.seq.detokenizer
        text = detok.take() + detok.flush()
        if not handle.request.stream:  # one response: the whole text and every token
            tokens, exits = list(handle.seq.output_token_ids), list(handle.seq.exit_layers)
            text = detok.final_text
            if not handle.request.exclude_input_in_output:
                text = handle.request.prompt + text
        event = self._event(handle, text, tokens, exits)
        event.finished = True
        event.finish_reason = handle.seq.finish_reason.value if handle.seq.finish_reason else "abort"
        self._finish(handle, event)

    def _event(self, handle: RequestHandle, text: str, tokens: list[int], exits: list[int]) -> StreamEvent:
        return StreamEvent(
            request_id=handle.request_id,
            text=text,
            token_ids=tokens,
            exit_layers=exits,
            num_input_tokens=len(handle.prompt_token_ids),
            num_output_tokens=len(handle.seq.output_token_ids),
            num_cached_tokens=handle.seq.num_cached_tokens,
        )

    def _finish(self, handle: RequestHandle, event: StreamEvent) -> None:
        self._live.pop(handle.request_id, None)
        with self._lock:
            self._num_pending -= 1
        handle.emit(event)
