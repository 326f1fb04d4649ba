"""Stage 0's side of the pipeline processes: start them, join them, watch them, stop them.

``StageProcesses`` starts stages 1..N-1 (``python -m offramp.pipeline.worker``) with an ``env://``-
style rendezvous on a free localhost port, waits for each to come up (a stage that exits while
starting fails at once with its exit code), and runs a heartbeat thread: every ``period`` seconds it
checks each process and pings each idle link. The first failure found is kept (``failure``), later
calls raise it at once, and ``on_failure`` is told (servers turn not ready). ``close`` stops every
process (asked, then killed) and is also run when the object is collected or the interpreter exits,
so no stage outlives stage 0. ``RemoteStage`` is one stage behind a link, with ``LocalStage``'s
interface.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from offramp.model.attention import AttentionMetadata
from offramp.pipeline.placement import StageSpec
from offramp.pipeline.stages import BusyLog, meta_to
from offramp.pipeline.transport import Link, StageError, make_group, make_store

HOST = "127.0.0.1"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this ``offramp`` package


def _python() -> str:
    """The interpreter for stage processes: this one, unless embedded (a Triton stub) under another name."""
    exe = sys.executable or ""
    if os.path.basename(exe).startswith("python"):
        return exe
    return shutil.which("python3") or shutil.which("python") or exe


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class StageProcesses:
    def __init__(self, num_stages: int, timeout_s: float, on_failure: Callable[[str], None] | None = None) -> None:
        self.timeout_s, self.on_failure = timeout_s, on_failure
        self.failure: str | None = None
        self.store = make_store(HOST, 0, num_stages, True, timeout_s)
        env = dict(os.environ, MASTER_ADDR=HOST, MASTER_PORT=str(self.store.port), WORLD_SIZE=str(num_stages))
        env["OFFRAMP_STAGE_TIMEOUT_S"] = str(timeout_s)
        # the stages import the very package this process runs (an embedding such as a Triton stub may
        # not pass PYTHONPATH on, and another install of offramp may sit in site-packages)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.procs = [
            subprocess.Popen([_python(), "-m", "offramp.pipeline.worker"], env=dict(env, RANK=str(rank)))
            for rank in range(1, num_stages)
        ]
        self._finalizer = weakref.finalize(self, _kill, list(self.procs))
        try:
            self._wait_up()
            group = make_group(self.store, 0, num_stages, timeout_s)
        except BaseException:
            self._finalizer()
            raise
        self.links = [Link(group, rank, timeout_s, self._name(rank)) for rank in range(1, num_stages)]
        self._stop = threading.Event()
        self.period_s = min(2.0, timeout_s / 4)
        self._monitor = threading.Thread(target=self._heartbeat, name="offramp-stage-heartbeat", daemon=True)

    def _name(self, rank: int) -> str:
        return f"stage {rank} (pid {self.procs[rank - 1].pid})"

    def _wait_up(self) -> None:
        deadline = time.monotonic() + self.timeout_s + 60  # a cold start imports torch and loads the model
        for rank, proc in enumerate(self.procs, start=1):
            while not self.store.check([f"stage{rank}/up"]):
                if proc.poll() is not None:
                    raise StageError(f"{self._name(rank)} exited with code {proc.returncode} while starting")
                if time.monotonic() > deadline:
                    raise StageError(f"{self._name(rank)} did not join the pipeline within {self.timeout_s + 60:g} s")
                time.sleep(0.05)

    def start_heartbeat(self) -> None:
        self._monitor.start()

    def check(self) -> None:
        """Raise the failure found so far, if any."""
        if self.failure is not None:
            raise StageError(self.failure)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            if self.on_failure is not None:
                self.on_failure(reason)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.period_s):
            for rank, (proc, link) in enumerate(zip(self.procs, self.links), start=1):
                if proc.poll() is not None:
                    self.fail(f"{self._name(rank)} exited with code {proc.returncode}")
                elif link.lock.acquire(blocking=False):  # busy links answer the engine instead
                    try:
                        link.settle()
                        link.send(("ping",))
                        link.recv()
                    except StageError as exc:
                        self.fail(str(exc))
                    finally:
                        link.lock.release()
            if self.failure is not None:
                return

    def close(self) -> None:
        """Ask every stage to stop, then kill what is left; waits for all of them. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(timeout=self.timeout_s)
        for link in self.links:
            if link.broken is None and link.lock.acquire(timeout=5):
                try:
                    link.settle()
                    link.send(("stop",))
                    link.recv(timeout_s=5)
                except StageError:
                    pass
                finally:
                    link.lock.release()
        for proc, link in zip(self.procs, self.links):
            if link.broken is not None:  # dead or hung: nothing to wait for
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._finalizer()


class RemoteStage:
    """A stage in another process, reached through ``link``; hidden states travel on the CPU."""

    def __init__(self, spec: StageSpec, link: Link, processes: StageProcesses, home: torch.device) -> None:
        self.spec, self.link, self.processes, self.home = spec, link, processes, home
        self.busy = BusyLog()  # this stage's compute, as it reports it
        self.waits = BusyLog()  # stage 0 waiting for this stage (synchronous calls)
        link.on_answer = self.on_answer
        self._result: torch.Tensor | None = None  # a submitted run's output, once read
        self._sent_meta: AttentionMetadata | None = None  # held, so that ``is`` cannot match a new one

    def _call(self, message: tuple, wait: bool = True) -> tuple | None:
        self.processes.check()
        start = time.time()
        try:
            if not wait:
                self.link.post(message)
                return None
            answer = self.link.call(message)
        except StageError as exc:
            self.processes.fail(str(exc))
            raise
        self.waits.add(start, time.time())
        return answer

    def run(self, first: int, last: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        new_meta = None if meta is self._sent_meta else _cpu_meta(meta)
        _, out, interval = self._call(("run", first, last, new_meta, hidden.cpu()))
        self._sent_meta = meta
        self.busy.add(*interval)
        return out

    def submit(self, first: int, last: int, hidden: torch.Tensor, meta: AttentionMetadata) -> None:
        """``run`` without waiting; ``result`` returns its output (one submitted run at a time)."""
        new_meta = None if meta is self._sent_meta else _cpu_meta(meta)
        self._call(("run", first, last, new_meta, hidden.cpu()), wait=False)
        self._sent_meta = meta

    def result(self) -> torch.Tensor:
        """The output [rows, hidden] of the submitted run, once this stage has sent it."""
        start = time.time()
        try:
            with self.link.lock:
                self.link.settle()  # the answer lands in ``on_answer`` (maybe read by the heartbeat already)
        except StageError as exc:
            self.processes.fail(str(exc))
            raise
        self.waits.add(start, time.time())
        out, self._result = self._result, None
        return out

    def propagate(self, hidden, cos, sin, slots, from_layer: int) -> None:
        """Posted: stage 0 goes on while this stage fills the exited rows' K/V (EE-LLM: the token has
        already returned); the next exchange on the link reads the answer."""
        self._call(("propagate", hidden.cpu(), cos.cpu(), sin.cpu(), slots.cpu(), from_layer), wait=False)

    def on_answer(self, answer: tuple) -> None:
        """The answer of a posted message: a fill's ``("ok", interval)`` or a run's ``("ok", hidden, interval)``."""
        if len(answer) == 3:
            self._result = answer[1]
        self.busy.add(*answer[-1])

    def close(self) -> None:
        pass  # the processes are stopped together (``StageProcesses.close``)


def _cpu_meta(meta: AttentionMetadata) -> AttentionMetadata:
    return meta if meta.positions.device.type == "cpu" else meta_to(meta, torch.device("cpu"))
