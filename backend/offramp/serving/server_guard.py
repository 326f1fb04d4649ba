"""The guard between ``offramp serve`` and ``tritonserver``: it leads their process group, and
whatever ends (the server, a signal, or ``offramp serve`` dying, even by SIGKILL) it stops the whole
group, the Python-backend stubs included, before it exits.

Run by path (``python server_guard.py PARENT_PID GRACE_S -- tritonserver ...``), standard library
only, so it starts at once. The parent starts it with ``child_preexec``: its own process group and
SIGTERM when the parent dies (Linux); tritonserver gets SIGTERM if the guard dies. SIGINT, SIGTERM and SIGHUP are forwarded to tritonserver
once as SIGINT (it drains and exits within its ``--exit-timeout-secs``); ``GRACE_S`` seconds later,
or as soon as tritonserver has exited, everything left in the group gets SIGKILL. A stub can
outlive tritonserver on its own when the server dies while a model is loading: that is why this
exists. Exit status: tritonserver's (128 + signal when a signal ended it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl():
    """libc's ``prctl`` on Linux (None elsewhere), looked up before any fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def child_preexec(parent_pid: int, new_group: bool = True, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for a child that must not outlive ``parent_pid`` (the forking process): on
    Linux the kernel sends it ``sig`` when the parent dies, however it dies (``PR_SET_PDEATHSIG``,
    kept across exec); with ``new_group`` it leads its own process group, so that its whole tree can
    be stopped as one and a terminal's Ctrl-C reaches it only through the parent."""
    prctl = _prctl()

    def setup() -> None:
        if new_group:
            os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os.kill(os.getpid(), sig)

    return setup


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` but this one (from /proc: Linux)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members.append(int(entry))
    return members


def kill_group_but_me() -> None:
    for pid in group_members(os.getpgrp()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: server_guard.py PARENT_PID GRACE_S -- COMMAND...", file=sys.stderr)
        return 2
    parent, grace = int(argv[0]), float(argv[1])
    state: dict = {"server": None, "asked": False, "stopped": False}

    def stop_once() -> None:
        if state["server"] is not None and not state["stopped"]:
            state["stopped"] = True
            state["server"].send_signal(signal.SIGINT)
            timer = threading.Timer(grace, kill_group_but_me)
            timer.daemon = True
            timer.start()

    def on_signal(signum, _frame) -> None:
        state["asked"] = True
        stop_once()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if os.getppid() != parent or state["asked"]:
        return 1  # the parent died (or asked us to stop) before the server started
    state["server"] = subprocess.Popen(argv[3:], preexec_fn=child_preexec(os.getpid(), new_group=False))
    if state["asked"]:
        stop_once()  # a signal came while the server was starting
    code = state["server"].wait()
    kill_group_but_me()  # stubs left behind by a server that died while loading
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
