"""Builds a model split over stages: placement, each stage's weights and K/V, the placed backend.

With ``--devices`` every stage is a device of this process; with ``--pipeline-stages N`` stages
1..N-1 are processes (``remote``). Page ids are global (one page manager, in stage 0), the storage
is per stage, and every stage's pages come out of that stage's own budget (``--kv-budget-mb`` per
stage, or ``--kv-budget-fraction`` of its GPU's free memory): the engine gets the smallest count.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

import torch

from offramp.config import EngineConfig
from offramp.model.decoder import ModelWeights
from offramp.model.device import resolve_device, to_device
from offramp.model.kv_store import KVStore, page_bytes
from offramp.pipeline.costs import block_costs
from offramp.pipeline.placed_backend import PlacedBackend
from offramp.pipeline.placement import Placement, StageSpec, place
from offramp.pipeline.remote import RemoteStage, StageProcesses
from offramp.pipeline.stages import LocalStage
from offramp.pipeline.transport import StageError

MIB = 1024 * 1024


@dataclass(slots=True)
class Pipeline:
    """What the engine gets: its weights (layers of other processes dropped), its K/V, the backend."""

    placement: Placement
    weights: ModelWeights
    kv: KVStore
    backend: PlacedBackend
    num_pages: int


def stage_devices(config: EngineConfig, home: torch.device) -> list[str]:
    if config.devices is not None:
        return list(config.devices)
    return [str(home)] * config.pipeline_stages


def _resolve_devices(devices: list[str]) -> list[str]:
    """Each stage's device, resolved (``cuda`` -> ``cuda:0``); one that is not here is named with its stage."""
    resolved = []
    for index, name in enumerate(devices):
        try:
            resolved.append(str(resolve_device(name)))
        except ValueError as exc:
            raise ValueError(f"devices: stage {index}: {str(exc).removeprefix('device: ')}") from None
    return resolved


def _budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_budget_fraction is not None and device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * config.kv_budget_fraction)
    return config.kv_budget_bytes


def _capacity(config: EngineConfig, weights: ModelWeights, spec: StageSpec) -> dict:
    """Pages stage ``spec``'s budget holds for its layers (what a stage process reports for itself)."""
    device = torch.device(spec.device)
    per_page = page_bytes(weights.shape, weights.embed.dtype, config.page_size, spec.num_layers)
    budget = _budget(config, device)
    return {"pages": config.num_pages or budget // per_page, "budget_bytes": budget, "page_bytes": per_page}


def _num_pages(config: EngineConfig, placement: Placement, capacities: list[dict]) -> int:
    """The smallest stage's page count; a stage that holds no page is named with its numbers."""
    for spec, cap in zip(placement.stages, capacities):
        if cap["pages"] < 1:
            raise ValueError(
                f"kv_budget: stage {spec.index} ({spec.device}, layers {spec.layers[0]}-{spec.layers[1] - 1}) "
                f"cannot hold one sequence: its budget of {_size(cap['budget_bytes'])} holds 0 pages; "
                f"one page of {config.page_size} tokens over its {spec.num_layers} layers needs "
                f"{_size(cap['page_bytes'])}"
            )
    num_pages = min(cap["pages"] for cap in capacities)
    held = ", ".join(f"stage {i} {_size(num_pages * c['page_bytes'])}" for i, c in enumerate(capacities))
    print(f"offramp:   KV: {num_pages} pages of {config.page_size} tokens ({held})", file=sys.stderr, flush=True)
    return num_pages


def _size(num_bytes: int) -> str:
    return f"{num_bytes / MIB:.2f} MiB" if num_bytes >= MIB else f"{num_bytes / 1024:.1f} KiB"


def build_pipeline(
    config: EngineConfig, weights: ModelWeights, block_ranges: list[tuple[int, int]], home: torch.device
) -> Pipeline:
    """``weights`` are all on ``home`` (stage 0's device); they are split here."""
    devices = _resolve_devices(stage_devices(config, home))
    costs, head_cost, how = block_costs(weights, block_ranges, config.page_size)
    placement = place(block_ranges, devices, costs, config.pipeline_stages > 1, head_cost, how)
    print(placement.describe(), file=sys.stderr, flush=True)
    print(f"offramp:   in engine.json terms: {json.dumps(placement.as_dict())}", file=sys.stderr, flush=True)
    if placement.is_remote:
        return _remote(config, weights, block_ranges, placement, home)
    return _local(config, weights, block_ranges, placement, home)


def _layer_devices(placement: Placement, num_layers: int) -> list[torch.device]:
    devices = [torch.device(placement.stages[0].device)] * num_layers
    for spec in placement.stages:
        for layer in range(*spec.layers):
            devices[layer] = torch.device(spec.device)
    return devices


def _local(config, weights, block_ranges, placement, home) -> Pipeline:
    """Every stage a device of this process: each layer's weights and K/V on its stage's device."""
    num_pages = _num_pages(config, placement, [_capacity(config, weights, s) for s in placement.stages])
    devices = _layer_devices(placement, weights.shape.num_layers)
    layers = [to_device(w, d) for w, d in zip(weights.layers, devices)]
    weights = dataclasses.replace(weights, layers=layers)
    kv = KVStore(weights.shape, num_pages, config.page_size, weights.embed.dtype, devices)
    stages = [LocalStage(spec, weights, kv, block_ranges) for spec in placement.stages]
    return Pipeline(
        placement, weights, kv, PlacedBackend(weights, kv, block_ranges, placement, stages, home), num_pages
    )


def _remote(config, weights, block_ranges, placement, home) -> Pipeline:
    """Stage 0 here, the others as processes: each loads and keeps only its own layers."""
    first = placement.stages[0]
    owned = range(*first.layers)
    weights = dataclasses.replace(weights, layers=[w if i in owned else None for i, w in enumerate(weights.layers)])
    processes = StageProcesses(len(placement.stages), config.stage_timeout_s)
    try:
        settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        for link, spec in zip(processes.links, placement.stages[1:]):
            link.send(("setup", settings, spec, block_ranges))
        capacities = [_capacity(config, weights, first)]
        for link in processes.links:
            answer = link.recv(timeout_s=config.stage_timeout_s + 120)  # loading the model
            if answer[0] == "error":
                raise StageError(f"{link.name}: {answer[1]}")
            capacities.append(answer[1])
        num_pages = _num_pages(config, placement, capacities)
        for link in processes.links:
            link.send(("alloc", num_pages))
        for link, cap in zip(processes.links, capacities[1:]):
            _, kv_bytes = link.recv()
            if kv_bytes != num_pages * cap["page_bytes"]:  # the stage holds exactly its layers' pages
                raise StageError(f"{link.name}: holds {kv_bytes} bytes of K/V, not {num_pages * cap['page_bytes']}")
    except BaseException:
        processes.close()
        raise
    devices = [home] * weights.shape.num_layers
    kv = KVStore(weights.shape, num_pages, config.page_size, weights.embed.dtype, devices, layers=owned)
    stages = [LocalStage(first, weights, kv, block_ranges)]
    stages += [RemoteStage(spec, link, processes, home) for spec, link in zip(placement.stages[1:], processes.links)]
    micro = config.micro_batches or len(placement.stages)
    backend = PlacedBackend(weights, kv, block_ranges, placement, stages, home, processes, micro)
    processes.start_heartbeat()
    return Pipeline(placement, weights, kv, backend, num_pages)
