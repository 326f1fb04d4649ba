"""A pipeline stage process (``python -m offramp.pipeline.worker``), started by stage 0.

It joins stage 0's rendezvous (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``; its
timeout in ``OFFRAMP_STAGE_TIMEOUT_S``), is told its blocks and settings, loads the weights of its
layers only, reports how many KV pages its budget holds, allocates the pages stage 0 decides on, and
then answers requests until told to stop:

- ``("run", first, last, meta | None, hidden)`` -> ``("ok", hidden, (start, end))``: blocks
  ``[first, last)`` on ``hidden`` [rows, hidden]; ``meta`` only when it changed since the last call;
- ``("propagate", hidden, cos, sin, slots, from_layer)`` -> ``("ok", (start, end))``;
- ``("ping",)`` -> ``("pong",)`` (stage 0's heartbeat); ``("stop",)`` -> ``("bye",)``, then exit.

A failing request is answered ``("error", one line)``. The process ends when stage 0 goes away:
the kernel signals it when its parent dies, a watchdog checks the parent, and a link that breaks or
stays silent longer than the idle limit (stage 0 pings every few seconds) ends the loop.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import threading
import time

import torch

from offramp.config import config_from_dict
from offramp.model import fused
from offramp.model.device import resolve_device, to_device
from offramp.model.kv_store import KVStore, page_bytes
from offramp.model.loader import load_weights, resolve_model, source_gguf
from offramp.pipeline.stages import LocalStage
from offramp.pipeline.transport import Link, StageError, make_group, make_store

IDLE_FACTOR = 4  # silent for this many stage timeouts (stage 0 pings far more often): stage 0 is gone


def _die_with_parent() -> None:
    """SIGKILL when the parent dies (Linux), and a watchdog thread for everything else."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="offramp-stage-watchdog", daemon=True).start()


def _load(setup: tuple) -> tuple[LocalStage, dict]:
    """Weights of this stage's layers on its device; the KV capacity its budget allows."""
    _, settings, spec, block_ranges = setup
    config = config_from_dict(settings, f"stage {spec.index}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(spec.device)
    dtype = getattr(torch, config.dtype)
    checkpoint = resolve_model(config.model)
    weights, _ = load_weights(checkpoint, dtype, config.weights, config.weight_group_size, source_gguf(config.model))
    owned = range(*spec.layers)
    layers = [to_device(w, device) if i in owned else None for i, w in enumerate(weights.layers)]
    weights = dataclasses.replace(weights, layers=layers, embed=torch.empty(0), lm_head=torch.empty(0))
    fused.prepare_products(weights, config, device)  # as the engine does
    budget = config.kv_budget_bytes
    if config.kv_budget_fraction is not None and device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * config.kv_budget_fraction)
    per_page = page_bytes(weights.shape, dtype, config.page_size, spec.num_layers)
    pages = config.num_pages or (budget // per_page)
    capacity = {"pages": pages, "budget_bytes": budget, "page_bytes": per_page, "device": str(device)}
    return (weights, dtype, config, spec, block_ranges, device), capacity


def _serve(link: Link, stage: LocalStage, idle_s: float) -> None:
    meta = None
    while True:
        message = link.recv(timeout_s=idle_s)
        op = message[0]
        try:
            if op == "run":
                _, first, last, new_meta, hidden = message
                meta = new_meta if new_meta is not None else meta
                start = time.time()
                out = stage.run(first, last, hidden, meta).cpu()
                link.send(("ok", out, (start, time.time())))
            elif op == "propagate":
                start = time.time()
                stage.propagate(*message[1:])
                link.send(("ok", (start, time.time())))
            elif op == "ping":
                link.send(("pong",))
            elif op == "stop":
                link.send(("bye",))
                return
            else:
                link.send(("error", f"unknown request {op!r}"))
        except StageError:
            raise
        except Exception as exc:  # answered, not fatal: stage 0 decides
            link.send(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def main() -> int:
    _die_with_parent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout_s = float(os.environ.get("OFFRAMP_STAGE_TIMEOUT_S", "30"))
    store = make_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout_s)
    store.set(f"stage{rank}/up", str(os.getpid()))
    link = Link(make_group(store, rank, world, timeout_s), 0, timeout_s, "stage 0")
    try:
        setup = link.recv(timeout_s=timeout_s)
        try:
            loaded, capacity = _load(setup)
        except Exception as exc:
            link.send(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            return 1
        link.send(("capacity", capacity))
        answer = link.recv(timeout_s=timeout_s)
        if answer[0] != "alloc":  # stage 0 gave up (another stage failed)
            link.send(("bye",))
            return 0
        weights, dtype, config, spec, block_ranges, device = loaded
        devices = [device] * weights.shape.num_layers
        kv = KVStore(weights.shape, answer[1], config.page_size, dtype, devices, layers=range(*spec.layers))
        link.send(("ready", kv.total_bytes))
        _serve(link, LocalStage(spec, weights, kv, block_ranges), max(IDLE_FACTOR * timeout_s, 10.0))
        return 0
    except StageError as exc:
        print(f"offramp stage {rank}: {exc}; exiting", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
