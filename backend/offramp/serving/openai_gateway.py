"""Start and stop the OpenAI-compatible gateway (``offramp_gateway``) beside ``tritonserver``.

``offramp serve --openai-port 9000`` runs ``python -m offramp_gateway`` as a child process that
forwards to the server's gRPC port. It is only started here, never imported: the engine side
stays free of web frameworks. The gateway is told this process's id (``--exit-with-pid``), so it
also ends if ``offramp serve`` is killed without stopping it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from offramp.model.loader import ModelLoadError

WILDCARDS = ("0.0.0.0", "::", "")


def local_address(host: str) -> str:
    """Where a process on this machine reaches a server listening on ``host``."""
    return "127.0.0.1" if host in WILDCARDS else host


def served_model(repo: Path, overrides: dict) -> str | None:
    """The checkpoint the ``offramp`` model serves (its chat template renders chat histories)."""
    if overrides.get("model"):
        return str(overrides["model"])
    try:
        return json.loads((repo / "offramp" / "1" / "engine.json").read_text(encoding="utf-8")).get("model", "default")
    except (OSError, ValueError, AttributeError):
        return None


def gateway_command(host: str, port: int, triton_host: str, grpc_port: int, model: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "offramp_gateway", "--host", host, "--port", str(port)]
    cmd += ["--triton-url", f"{local_address(triton_host)}:{grpc_port}", "--exit-with-pid", str(os.getpid())]
    return cmd + (["--model", model] if model else [])


def start_gateway(
    host: str, port: int, triton_host: str, grpc_port: int, model: str | None, timeout: float = 60.0
) -> subprocess.Popen:
    """Start the gateway and wait until it answers ``/v1/models``; it shares our process group."""
    if importlib.util.find_spec("offramp_gateway") is None:
        raise ModelLoadError("--openai-port needs the offramp_gateway package: reinstall Offramp (make install)")
    proc = subprocess.Popen(gateway_command(host, port, triton_host, grpc_port, model))
    url = f"http://{local_address(host)}:{port}/v1/models"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ModelLoadError(f"the OpenAI gateway exited with code {proc.returncode} (is port {port} free?)")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    stop_gateway(proc)
    raise ModelLoadError(f"the OpenAI gateway did not answer on port {port} within {timeout:.0f} s")


def stop_gateway(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM (uvicorn stops gracefully), SIGKILL if it does not within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
