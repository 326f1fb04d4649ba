"""Messages between pipeline stages over torch.distributed (gloo), with a timeout on every call.

Each stage joins one process group of its own (a ``TCPStore`` rendezvous at ``MASTER_ADDR`` /
``MASTER_PORT`` with ``RANK`` and ``WORLD_SIZE``, as ``env://`` does, but not the process-wide
default group, so one process may hold several pipelines, e.g. tests). A message is any picklable
object (tensors included, on the CPU), sent as a fixed 64 KiB first part (its length, then the
bytes) and the rest, if any: a gloo send waits for the peer's receive, so a decode step's message is
one handshake instead of two. A timed-out or broken exchange
closes the link for good (gloo closes the pair): the caller treats it as the stage's failure.
A message may also be posted without waiting (K/V fills of exited rows): its answer is read before
the next exchange on the link, so stage 0 goes on (samples, schedules) while the stage fills.
"""

from __future__ import annotations

import datetime
import pickle
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

FIRST_BYTES = 64 * 1024  # a message's first part: decode steps (tens of rows) fit in one send


class StageError(ConnectionError):
    """A pipeline stage failed: it died, hung past the timeout, or reported an error. One line. (An
    ``OSError``: the command line reports it as one error line, as it does a missing file.)"""


def _span(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def make_store(host: str, port: int, world_size: int, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """The rendezvous: stage 0 listens (``port`` 0 picks a free one: ``store.port``), the others join."""
    return dist.TCPStore(host, port, world_size, is_master, timeout=_span(timeout_s), wait_for_workers=False)


def make_group(store: dist.TCPStore, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroupGloo:
    return dist.ProcessGroupGloo(store, rank, world_size, _span(timeout_s))


class Link:
    """One peer of a process group: ``send`` / ``recv`` whole messages, each bounded by ``timeout_s``.
    ``lock`` serialises exchanges (a request and its answer) between threads."""

    def __init__(self, group: dist.ProcessGroupGloo, peer: int, timeout_s: float, name: str) -> None:
        self.group, self.peer, self.timeout_s, self.name = group, peer, timeout_s, name
        self.lock = threading.Lock()
        self.broken: str | None = None
        self.num_unanswered = 0  # posted messages whose answers are not read yet
        self.on_answer: Callable[[object], None] | None = None  # what a posted message's answer is for

    def send(self, message: object) -> None:
        """One gloo send for a message up to ``FIRST_BYTES`` (its length, then the pickle), two above."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        first = bytearray(FIRST_BYTES)
        head = min(len(data), FIRST_BYTES - 8)
        first[:8], first[8 : 8 + head] = len(data).to_bytes(8, "little"), data[:head]
        self._run(lambda: self.group.send([torch.frombuffer(first, dtype=torch.uint8)], self.peer, 0), "sending to it")
        if len(data) > head:
            rest = torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8)
            self._run(lambda: self.group.send([rest], self.peer, 1), "sending to it")

    def recv(self, timeout_s: float | None = None) -> object:
        first = torch.empty(FIRST_BYTES, dtype=torch.uint8)
        self._run(lambda: self.group.recv([first], self.peer, 0), "waiting for its answer", timeout_s)
        raw = first.numpy().tobytes()
        size = int.from_bytes(raw[:8], "little")
        data = raw[8 : 8 + size]
        if size > FIRST_BYTES - 8:
            rest = torch.empty(size - (FIRST_BYTES - 8), dtype=torch.uint8)
            self._run(lambda: self.group.recv([rest], self.peer, 1), "waiting for its answer", timeout_s)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def call(self, message: object) -> object:
        """Send ``message`` and return the answer; an ``("error", text)`` answer raises ``StageError``."""
        with self.lock:
            self.settle()
            self.send(message)
            return self._checked(self.recv())

    def post(self, message: object) -> None:
        """Send ``message`` without waiting: its answer is read (checked, then handed to ``on_answer``)
        before the next exchange. (A gloo send completes only once the peer receives, so one posted
        message at most is in flight: a second would block both sides.)"""
        with self.lock:
            self.settle()
            self.send(message)
            self.num_unanswered += 1

    def settle(self) -> None:
        """Read the answers of posted messages; call with ``lock`` held."""
        while self.num_unanswered:
            self.num_unanswered -= 1
            answer = self._checked(self.recv())
            if self.on_answer is not None:
                self.on_answer(answer)

    def _checked(self, answer: object) -> object:
        if isinstance(answer, tuple) and answer and answer[0] == "error":
            raise StageError(f"{self.name}: {answer[1]}")
        return answer

    def _run(self, start: Callable[[], object], what: str, timeout_s: float | None = None) -> None:
        """Post one send or receive and wait for it; any failure closes the link for good."""
        if self.broken is not None:
            raise StageError(self.broken)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            start().wait(_span(timeout_s))
        except RuntimeError as exc:
            if "imed out" in str(exc):
                self.broken = f"{self.name}: {what} timed out after {timeout_s:g} s"
            else:
                cause = str(exc).splitlines()[0].split("] ", 1)[-1].split(". ")[0]  # gloo's first sentence
                self.broken = f"{self.name}: connection lost while {what} ({cause[:80]})"
            raise StageError(self.broken) from None
