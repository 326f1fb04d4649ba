"""An interrupted ``offramp serve`` leaves no ``tritonserver`` (nor a Python-backend stub) behind:
SIGINT and SIGTERM are forwarded and the whole process group is stopped; when the wrapper is killed
outright (SIGKILL), the kernel signals tritonserver (``PR_SET_PDEATHSIG``, Linux)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from live_server import Proc, descendants, free_ports, kill_all, serve_command, start_wrapper, wait_gone

pytestmark = [pytest.mark.integration]


def _wait_for_stub(pid: int, timeout: float = 300.0) -> set[Proc]:
    """The wrapper's tree once tritonserver has started a Python-backend stub (a model is loading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = descendants(pid)
        if any(os.path.basename(p.argv[0]) == "triton_python_backend_stub" for p in tree if p.argv):
            return tree
        time.sleep(0.2)
    pytest.fail(f"no Python-backend stub appeared under offramp serve ({pid}) within {timeout:.0f} s")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG is Linux only")
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"]
)
def test_interrupted_serve_leaves_no_server_behind(tiny_models, tmp_path, signum):
    log = tmp_path / "serve.log"
    proc = start_wrapper(serve_command(tiny_models["llama"], *free_ports(3)), log)
    tree: set[Proc] = set()
    try:
        tree = _wait_for_stub(proc.pid)
        names = {os.path.basename(p.argv[0]) for p in tree if p.argv}
        assert "tritonserver" in names, names
        os.kill(proc.pid, signum)  # the wrapper only, as a supervisor or a closing terminal would
        proc.wait(120)
        left = wait_gone(tree, 120)
        assert not left, f"left behind after {signum.name}: {sorted((p.pid, p.argv[0]) for p in left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        kill_all(tree)
