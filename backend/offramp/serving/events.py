"""What crosses between the engine thread (``async_engine.AsyncEngine``) and the servers: a request's
handle, the events it streams, and the statistics after each iteration."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from offramp.engine.sequence import Sequence
from offramp.serving.requests import GenerateRequest, RequestError


@dataclass(slots=True)
class StreamEvent:
    """What the engine thread reports for one request: new text (and tokens), or the end."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from session or shared prefix pages (no prefill)
    error: RequestError | None = None


@dataclass(slots=True)
class RequestHandle:
    request_id: str
    request: GenerateRequest
    emit: Callable[[StreamEvent], None]
    is_cancelled: Callable[[], bool] = lambda: False
    prompt_token_ids: list[int] = field(default_factory=list)
    seq: Sequence | None = None
    emitted_tokens: int = 0
    counted_tokens: int = 0  # output tokens already reported to metrics (a speculative step adds several)
    session_id: str | None = None  # a turn of this stateful session (see LLMEngine.add_request)
    submitted_at: float = field(default_factory=time.perf_counter)  # TTFT and latency count from here


@dataclass(slots=True)
class EngineStats:
    """A snapshot after each iteration, for metrics."""

    num_running: int
    num_waiting: int
    pages_used: int
    pages_free: int
    num_preemptions: int
    batch_size: int = 0
    new_tokens: int = 0
    exit_layers: list[int] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    num_sessions: int = 0  # sessions held (idle or with a request in flight)
    session_pages: int = 0  # KV pages held by sessions between turns (a running turn holds its own)
    session_evictions: int = 0  # cumulative: idle sessions whose pages were dropped for memory
    prefix_shared_pages: int = 0  # KV pages held by more than one sequence or session right now
    sparsity_density: float | None = None  # mean share of FFN groups sparse decode rows computed (cumulative)
