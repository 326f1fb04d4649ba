"""``offramp serve``: run a real ``tritonserver`` on the Offramp model repository.

Finds ``tritonserver`` (the one the ``nvidia-pytriton`` wheel ships, or one on ``PATH`` as in the
NGC image), prepares a backend directory with the Python backend and the stub for this Python,
resolves the model once (a GGUF is de-quantized before the server starts), starts the server
with locked-down defaults, waits until it is ready, and stops it cleanly on Ctrl-C.

The server loads every model in the repository: ``offramp`` (stateless) and ``offramp_chat``
(multi-turn sessions). Each is its own Python-backend process with its own engine: its own copy of
the weights and its own KV store. The command-line overrides (``OFFRAMP_ENGINE_OVERRIDES``) apply
to every model alike, which is what both need (the same checkpoint, engine and export); budgets
such as ``--kv-budget-mb`` and ``--max-queued-requests`` therefore hold per model, so the
server's total KV memory is the budget times the number of models. Models load one after the
other, so that a second model reuses the export (``--engine onnxruntime``) the first one wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from offramp.model.loader import ModelLoadError, cache_root, resolve_model
from offramp.serving import server_guard
from offramp.serving.openai_gateway import served_model, start_gateway, stop_gateway
from offramp.serving.server_guard import child_preexec

GRACE_S = 40.0  # tritonserver drains within --exit-timeout-secs=30; then its group is killed
# The default model's fastest format that keeps >= 0.97 agreement with float32 (docs/weights.md);
# served unless the command line names a format or a setting int4 does not combine with. Where the CPU
# extension's int4 product does not run (no compiler, a CPU with neither AVX2 nor AVX-512), torch's int4
# kernel can be slower than bfloat16 weights (14x slower than the extension's on an AVX2 CPU): bfloat16.
FAST_FORMAT = {"dtype": "bfloat16", "weights": "int4"}
FALLBACK_FORMAT = {"dtype": "bfloat16", "weights": "bf16"}
FORMAT_KEYS = ("dtype", "weights", "backend", "device", "devices", "pipeline_stages", "sparsity_predictor")


@dataclass(slots=True)
class ServerPaths:
    tritonserver: Path
    backend_dir: Path
    lib_dirs: list[Path]


def find_tritonserver(workdir: Path) -> ServerPaths:
    """The PyPI tritonserver (with a backend dir holding this Python's stub), else one on PATH."""
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        root = Path(spec.submodule_search_locations[0]) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if (root / "bin" / "tritonserver").is_file() and stub.is_file():
            backends = workdir / "backends"
            python_dir = backends / "python"
            if not (python_dir / "triton_python_backend_stub").is_file():
                shutil.rmtree(backends, ignore_errors=True)
                shutil.copytree(root / "backends" / "python", python_dir)
                shutil.copy2(stub, python_dir / "triton_python_backend_stub")
            libs = root.parent.parent / "nvidia_pytriton.libs"
            return ServerPaths(
                root / "bin" / "tritonserver", backends, [libs, Path(sysconfig.get_config_var("LIBDIR"))]
            )
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerPaths(Path(on_path), Path("/opt/tritonserver/backends"), [])
    raise ModelLoadError("no tritonserver found: install nvidia-pytriton (make install) or run in the NGC image")


def server_command(
    paths: ServerPaths, repo: Path, http: int, grpc: int, metrics: int, host: str = "127.0.0.1"
) -> list[str]:
    """Locked-down defaults: listen on ``host`` only (loopback unless asked), no model load/unload
    API; repository, shared-memory, logging and trace APIs need a key that is printed nowhere."""
    key = secrets.token_hex(16)
    restricted = f"model-repository,shared-memory,logging,trace:offramp-admin-key={key}"
    return [
        str(paths.tritonserver),
        f"--model-repository={repo}",
        f"--backend-directory={paths.backend_dir}",
        "--model-control-mode=none",
        f"--http-address={host}",
        f"--http-port={http}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics}",
        "--allow-metrics=true",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--exit-timeout-secs=30",
        "--model-load-thread-count=1",  # one at a time: the models share one export directory
        "--log-verbose=0",
    ]


def _engine_json(repo: Path) -> dict:
    """The served model's own settings (``offramp/1/engine.json``), before command-line overrides."""
    return json.loads((repo / "offramp" / "1" / "engine.json").read_text(encoding="utf-8"))


def fast_format(repo: Path, overrides: dict) -> dict:
    """``FAST_FORMAT`` when the served model is the default one and nothing on the command line
    chose a format (or a backend, device or placement int4 does not run on); else nothing."""
    model = overrides.get("model")
    if model is None:
        model = _engine_json(repo).get("model")
    if model != "default" or any(key in overrides for key in FORMAT_KEYS):
        return {}
    from offramp.model import fused

    if not fused.int4_product_available():
        print(
            "offramp: serving the default model with bfloat16 weights: the fused int4 product does not run here"
            f" ({fused.unavailable_reason() or 'neither AVX2 nor AVX-512 in this build'}); --weights int4 still"
            " selects int4 (torch's kernel)",
            file=sys.stderr,
        )
        return dict(FALLBACK_FORMAT)
    print(
        "offramp: serving the default model with int4 weights and bfloat16 activations (its fastest format"
        " at >= 0.97 agreement); --dtype float32 --weights none serves the exact float32 reference",
        file=sys.stderr,
    )
    return dict(FAST_FORMAT)


def prebuild_kernels(repo: Path, overrides: dict) -> None:
    """Build the fused CPU decode kernels here, once, before the model instances start (they load the
    cached build): a bfloat16 model would otherwise compile them inside Triton's model loading."""
    if overrides.get("dtype", _engine_json(repo).get("dtype")) == "bfloat16" and overrides.get("fused_decode", True):
        from offramp.model import fused

        fused.kernels()


def server_env(paths: ServerPaths, overrides: dict) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(p) for p in paths.lib_dirs] + [env.get("LD_LIBRARY_PATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OFFRAMP_ENGINE_OVERRIDES"] = json.dumps(overrides)
    return env


def wait_ready(proc: subprocess.Popen, http: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with code {proc.returncode} before it was ready")
        if _is_ready(http):
            return
        time.sleep(0.5)
    raise RuntimeError(f"tritonserver was not ready after {timeout:.0f} s")


def watch_ready(proc: subprocess.Popen, http: int, period_s: float = 1.0, limit: int = 5) -> int:
    """Serve until tritonserver exits (its code), or return 1 when a model's Python-backend stub has
    exited (a pipeline stage failed and the stub left: Triton neither restarts it nor turns not
    ready) or the server reports not ready ``limit`` checks in a row."""
    stubs, misses = stub_pids(proc.pid), 0
    while True:
        try:
            return proc.wait(timeout=period_s)
        except subprocess.TimeoutExpired:
            pass
        now = stub_pids(proc.pid)
        if stubs - now:
            print("offramp: a model's Python-backend stub exited (see the log above); stopping", flush=True)
            return 1
        stubs |= now
        misses = 0 if _is_ready(http) else misses + 1
        if misses >= limit:
            print("offramp: the server is not ready any more (see the log above); stopping", flush=True)
            return 1


def stub_pids(root: int) -> set[int]:
    """Python-backend stubs among ``root``'s descendants (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry))
        names[int(entry)] = os.path.basename(argv0)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if names.get(child) == "triton_python_backend_stub":
                found.add(child)
    return found


def _is_ready(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def run_server(
    repo: Path,
    overrides: dict,
    http: int = 8000,
    grpc: int = 8001,
    metrics: int = 8002,
    timeout: float = 300.0,
    host: str = "127.0.0.1",
    openai_port: int | None = None,
    openai_host: str = "127.0.0.1",
) -> int:
    """Start, wait until ready, print how to use it, and serve until Ctrl-C / SIGTERM / SIGHUP. With
    ``openai_port`` the OpenAI-compatible gateway runs beside the server and stops with it. However
    this returns (a signal, an error, the server's own exit), tritonserver and everything it started
    are stopped first; if this process is killed outright, the kernel signals the guard, which stops
    them (Linux; see ``server_guard``)."""
    if not (repo / "offramp" / "config.pbtxt").is_file():
        raise ModelLoadError(f"{repo} is not an Offramp model repository (no offramp/config.pbtxt)")
    overrides = overrides | fast_format(repo, overrides)
    prebuild_kernels(repo, overrides)
    if "model" in overrides:
        overrides["model"] = str(resolve_model(overrides["model"]))  # de-quantize a GGUF before serving
    paths = find_tritonserver(cache_root() / "triton")
    proc = subprocess.Popen(  # the guard leads tritonserver's process group (see server_guard)
        [sys.executable, server_guard.__file__, str(os.getpid()), str(GRACE_S), "--"]
        + server_command(paths, repo.resolve(), http, grpc, metrics, host),
        env=server_env(paths, overrides),
        preexec_fn=child_preexec(os.getpid()),
    )
    stop = {"signal": False}

    def forward(signum, _frame):
        if not stop["signal"] and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # once: the guard has tritonserver drain and exit
        stop["signal"] = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    gateway = None
    try:
        try:
            wait_ready(proc, http, timeout)
        except RuntimeError as exc:
            if stop["signal"]:
                return 0  # stopped while starting
            raise ModelLoadError(str(exc)) from None
        if openai_port is not None:
            gateway = start_gateway(openai_host, openai_port, host, grpc, served_model(repo, overrides))
        _print_usage(host, http, grpc, metrics, openai_host if gateway else None, openai_port)
        code = watch_ready(proc, http)
    finally:
        stop_gateway(gateway)  # the gateway stops with the server
        stop_server(proc, already_signalled=stop["signal"])
    return 0 if stop["signal"] else code


def _print_usage(host: str, http: int, grpc: int, metrics: int, openai_host: str | None, openai_port: int | None):
    body = json.dumps({"text_input": "What is the capital of France?", "sampling_parameters": '{"max_tokens": 32}'})
    print(
        f"offramp: serving on http://{host}:{http} (gRPC {grpc}, metrics {metrics}); Ctrl-C stops.\n"
        f"  curl -s -X POST localhost:{http}/v2/models/offramp/generate -d '{body}'\n"
        f'  offramp-client --url localhost:{grpc} --protocol grpc stream "Tell me a story"\n'
        f"  offramp-client --url localhost:{grpc} chat          (model offramp_chat: a conversation)",
        flush=True,
    )
    if openai_host is not None:
        print(f"  OpenAI API: http://{openai_host}:{openai_port}/v1 (model offramp)", flush=True)


def stop_server(proc: subprocess.Popen, grace: float = GRACE_S + 10, already_signalled: bool = False) -> None:
    """Stop the guard and its whole process group (tritonserver, the stubs): SIGINT (the guard has
    tritonserver drain, then kills what is left), then after ``grace`` seconds SIGKILL for whatever
    of the group is still there; returns once the guard has been reaped."""
    if proc.poll() is None and not already_signalled:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of the group may outlive us
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
