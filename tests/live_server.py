"""What the tests against a live ``tritonserver`` share: starting ``offramp serve`` on free ports and
stopping its whole process tree (also when the start fails or pytest is interrupted), requests,
readiness, Prometheus metrics read with a real parser, and the processes the suite started.

Every process the suite starts inherits ``SUITE_ENV`` in its environment, so a leak check can tell
the suite's ``tritonserver`` from any other on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from offramp.serving.server_guard import child_preexec

REPO = Path(__file__).resolve().parents[1]
SUITE_ENV = "OFFRAMP_TEST_SUITE_TOKEN"
SERVER_PROGRAMS = ("tritonserver", "triton_python_backend_stub")  # argv[0] basenames
SERVER_MODULES = ("offramp.cli.main", "offramp_gateway", "bin/offramp")  # a Python argv naming these
STAGE_MODULE = "offramp.pipeline.worker"  # a pipeline stage: python -m offramp.pipeline.worker
GUARD = "server_guard.py"  # offramp serve's guard of tritonserver's process group


# -- Prometheus ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (histograms give ``_bucket``/``_count``/``_sum``)."""
    from prometheus_client.parser import text_string_to_metric_families  # the dev extra

    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def metric_value(samples: list[Sample], name: str, **labels: str | float) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels`` (``le`` compared as a
    number). Raises ``KeyError`` when no sample matches: a misspelled name or label cannot read 0."""
    found = [s.value for s in samples if s.name == name and _labels_match(s.labels, labels)]
    if not found:
        names = sorted({s.name for s in samples if s.name.startswith(name.split("_")[0])})
        raise KeyError(f"no sample {name}{labels or ''}; samples with that prefix: {names}")
    return sum(found)


def _labels_match(have: dict, want: dict) -> bool:
    for key, value in want.items():
        if key not in have:
            return False
        if key == "le" and float(have[key]) != float(value):
            return False
        if key != "le" and have[key] != str(value):
            return False
    return True


# -- the server ---------------------------------------------------------------------------------
@dataclass
class Server:
    http: int
    grpc: int
    metrics_port: int
    log: Path
    openai_port: int | None = None
    initial_metrics: list[Sample] = field(default_factory=list)  # scraped once ready, before any request

    def post(self, endpoint: str, body: dict, model: str = "offramp") -> tuple[int, dict]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}/v2/models/{model}/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def ready(self) -> bool:
        urls = [f"http://127.0.0.1:{self.http}/v2/health/ready"]
        if self.openai_port is not None:
            urls.append(f"http://127.0.0.1:{self.openai_port}/health")
        try:
            return all(urllib.request.urlopen(u, timeout=2).status == 200 for u in urls)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def samples(self) -> list[Sample]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def metric(self, name: str, model: str = "offramp", **labels: str | float) -> float:
        """One model's value of ``name`` (summed over any other labels); ``model=""``: all models."""
        if model:
            labels["model"] = model
        return metric_value(self.samples(), name, **labels)

    def wait_for_metric(self, name: str, value: float, timeout: float = 60.0, model: str = "offramp") -> float:
        """Poll until ``name`` equals ``value`` (bounded); returns the last value read."""
        deadline = time.monotonic() + timeout
        while (current := self.metric(name, model)) != value and time.monotonic() < deadline:
            time.sleep(0.2)
        return current


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def serve_command(model: Path, http: int, grpc: int, metrics: int, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "offramp.cli.main", "serve", "--model", str(model)]
    cmd += ["--model-repository", str(REPO / "model_repository"), "--http-port", str(http)]
    return cmd + ["--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra]


def start_wrapper(cmd: list[str], log: Path) -> subprocess.Popen:
    """``offramp serve`` in a session of its own, killed by the kernel if pytest dies (Linux)."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=child_preexec(os.getpid(), False),
        )


def serve(log: Path, model: Path, *extra: str, openai: bool = False) -> Iterator[Server]:
    """Start ``offramp serve`` (tritonserver) on free ports, wait until ready, yield, and stop the
    whole process tree whatever happens (a failed start, a failing test, an interrupted run)."""
    http, grpc, metrics, openai_port = free_ports(4)
    if openai:
        extra = (*extra, "--openai-port", str(openai_port))
    proc = start_wrapper(serve_command(model, http, grpc, metrics, *extra), log)
    srv = Server(http, grpc, metrics, log, openai_port if openai else None)
    try:
        deadline = time.monotonic() + 300
        while not srv.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"offramp serve did not become ready:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        srv.initial_metrics = srv.samples()
        yield srv
    finally:
        stop_tree(proc)


# -- processes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot: (pid, start) names one process even if the pid is reused
    ppid: int
    argv: tuple[str, ...]


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None  # a zombie has exited; only its parent's wait is missing
    return Proc(pid, int(fields[19]), int(fields[1]), tuple(a.decode(errors="replace") for a in argv if a))


def all_processes() -> list[Proc]:
    return [p for p in (_read_proc(int(d)) for d in os.listdir("/proc") if d.isdigit()) if p is not None]


def descendants(pid: int) -> set[Proc]:
    """``pid``'s live descendants now (children, their children, ...)."""
    procs = all_processes()
    found, frontier = set(), {pid}
    while frontier:
        children = {p for p in procs if p.ppid in frontier and p not in found}
        found |= children
        frontier = {p.pid for p in children}
    return found


def alive(proc: Proc) -> bool:
    now = _read_proc(proc.pid)
    return now is not None and now.start == proc.start


def is_server_process(proc: Proc) -> bool:
    """tritonserver, a Python-backend stub, ``offramp serve``, its guard, the OpenAI gateway or a
    pipeline stage process."""
    if not proc.argv:
        return False
    if Path(proc.argv[0]).name in SERVER_PROGRAMS or (len(proc.argv) > 1 and proc.argv[1].endswith(GUARD)):
        return True
    if STAGE_MODULE in proc.argv[1:3]:  # a pipeline stage process (offramp.pipeline.worker)
        return True
    return any(m in a for a in proc.argv[:3] for m in SERVER_MODULES) and (
        "serve" in proc.argv or any("offramp_gateway" in a for a in proc.argv[:3])
    )


def suite_token(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    prefix = f"{SUITE_ENV}=".encode()
    return next((e[len(prefix) :].decode() for e in env if e.startswith(prefix)), None)


def wait_gone(procs: set[Proc], timeout: float) -> set[Proc]:
    """Wait (bounded) until none of ``procs`` is alive; returns those still alive."""
    deadline = time.monotonic() + timeout
    left = {p for p in procs if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = {p for p in left if alive(p)}
    return left


def kill_all(procs: set[Proc]) -> None:
    for p in procs:
        if alive(p):
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_tree(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT to ``offramp serve`` (it stops tritonserver and waits for it), then SIGKILL for
    anything of its tree still alive after ``grace`` seconds; waits until all of it is gone."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    left = wait_gone(tree, 10)
    kill_all(left)
    wait_gone(left, 10)
