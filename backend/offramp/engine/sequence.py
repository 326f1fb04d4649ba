"""One request's token sequence as the scheduler sees it: ids and counters, no tensors."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from offramp.engine.detokenizer import IncrementalDetokenizer
from offramp.engine.sampling import SamplingParams
from offramp.engine.spec import SpecState

_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller


@dataclass(slots=True)
class Sequence:
    """Prompt plus generated tokens; ``num_computed_tokens`` of them have KV in the page store."""

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # depth each output token left at
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    session_id: str | None = None  # the session whose pages this request continues (and keeps)
    num_cached_tokens: int = 0  # tokens reused at the last admission (session pages or shared prefix)
    num_run_tokens: int = 0  # tokens this request pushed through the model (prefill + decode)
    prefix_keys: list[bytes] | None = None  # prefix-registry keys of the prompt's full pages (lazy)
    num_registered_pages: int = 0  # pages below this index are registered or were reused
    num_prefix_waits: int = 0  # steps spent waiting for another sequence to compute a shared prefix
    detokenizer: IncrementalDetokenizer | None = None  # text so far, for stop strings and streaming
    lossless: bool = False  # every token is the full model's (early exits may only draft)
    spec: SpecState | None = None  # lossless mode with drafts: the source and the adaptive draft length

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
