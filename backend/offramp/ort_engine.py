"""The ONNX Runtime block engine: each block is one exported ONNX graph (``offramp export``).

Tensors are bound to the sessions without copies (I/O binding on the tensors' memory): the
paged K/V stores go in as they are, the block's output and new K/V land in tensors allocated
here. Session threads do not spin (see ``session_options``). The CUDA or TensorRT execution provider is used when the installed
``onnxruntime`` has one and the store lives on a GPU.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch

from offramp.attention import AttentionMetadata
from offramp.block_engine import BlockEngine
from offramp.kv_store import KVStore
from offramp.manifest import ExportManifest
from offramp.modeling import ModelWeights

_NUMPY = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_, torch.float16: np.float16}


def session_options(num_threads: int | None = None):
    """Options for Offramp's ONNX Runtime sessions: ``num_threads`` intra-op threads that sleep as
    soon as a run ends. Spinning threads (ONNX Runtime's default) keep the cores busy after each
    block and slow the PyTorch work between blocks (heads, sampling) by 3x on a 2-core machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def group_mask(
    positions: torch.Tensor,  # [B, T] long: each row's position in its sequence
    context: int,  # C: slots gathered per sequence (whole pages)
) -> torch.Tensor:  # [B, T, C + T] bool
    """What each row attends to: stored slots at or before its position that no row of this step
    rewrites, then the step's own rows at or before its position."""
    slots = torch.arange(context)
    rewritten = (slots[None, None, :] == positions[:, :, None]).any(1, keepdim=True)  # [B, 1, C]
    past = (slots[None, None, :] <= positions[:, :, None]) & ~rewritten
    new = positions[:, None, :] <= positions[:, :, None]  # [B, T, T]
    return torch.cat((past, new), dim=-1).contiguous()


def group_inputs(meta: AttentionMetadata, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Per attention group of a step, the exported block graph's inputs besides the hidden states
    and the stores (shared by every block, so built once per step), plus the rows' ``slots``."""
    prepared = []
    for g in meta.groups:
        rows = slice(g.row_start, g.row_end)
        positions = meta.positions[rows].view(g.num_seqs, g.max_new)  # [B, T]
        host = {
            "cos": meta.cos[rows, 0].float(),  # [n, head_dim]
            "sin": meta.sin[rows, 0].float(),
            "page_ids": g.kv_pages,  # [B, P]
            "mask": group_mask(positions, g.kv_pages.shape[1] * meta.page_size),  # [B, T, C + T]
            "slots": meta.slot_mapping[rows],  # [n]
        }
        prepared.append({k: v.contiguous().to(device, non_blocking=True) for k, v in host.items()})
    return prepared


class ExportedBlockEngine(BlockEngine):
    """What the engines over exported block graphs share: the step's group inputs (built once per
    step), the graph's inputs and outputs per group, and storing the new K/V. Subclasses run one
    block graph (``_execute``) on tensors of ``self.device``."""

    device: torch.device
    _prepared: tuple[AttentionMetadata, list[dict[str, torch.Tensor]]] | None = None

    def _group_inputs(self, meta: AttentionMetadata) -> list[dict[str, torch.Tensor]]:
        if self._prepared is None or self._prepared[0] is not meta:
            self._prepared = (meta, group_inputs(meta, self.device))
        return self._prepared[1]

    @abstractmethod
    def _execute(self, block_idx: int, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run block ``block_idx``'s graph from ``feeds`` into the preallocated ``outputs``."""

    def run_block(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        start, end = self.block_ranges[block_idx]
        s = self.weights.shape
        outs = []
        for g, inputs in zip(meta.groups, self._group_inputs(meta)):
            rows = hidden[g.row_start : g.row_end].to(self.device, torch.float32).contiguous()  # [n, hidden]
            n = rows.shape[0]
            feeds = {"hidden": rows, **{k: v for k, v in inputs.items() if k != "slots"}}
            outputs = {"hidden_out": torch.empty(n, s.hidden_size, device=self.device)}  # [n, hidden]
            for i, layer in enumerate(range(start, end)):
                feeds[f"k_store.{i}"], feeds[f"v_store.{i}"] = self.kv.k[layer], self.kv.v[layer]
                for kind in ("k", "v"):  # [n, kv_heads, head_dim]
                    outputs[f"{kind}_new.{i}"] = torch.empty(n, s.num_kv_heads, s.head_dim, device=self.device)
            self._execute(block_idx, feeds, outputs)
            for i, layer in enumerate(range(start, end)):
                self.kv.write(layer, inputs["slots"], outputs[f"k_new.{i}"], outputs[f"v_new.{i}"])
            outs.append(outputs["hidden_out"])
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.to(hidden.device, hidden.dtype)


class OrtBlockEngine(ExportedBlockEngine):
    name = "onnxruntime"

    def __init__(
        self,
        weights: ModelWeights,
        kv: KVStore,
        block_ranges: list[tuple[int, int]],
        export_dir: Path,
        num_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(weights, kv, block_ranges)
        if not kv.head_major:
            raise ValueError("onnxruntime engine: the KV store must be head-major (KVStore(head_major=True))")
        if kv.dtype != torch.float32:
            raise ValueError("engine onnxruntime: dtype must be float32 (the exported graphs are float32)")
        self.manifest = ExportManifest.load(export_dir)
        self.manifest.check(block_ranges, kv.page_size, weights.shape.num_layers)
        options = session_options(num_threads)
        self.device = kv.k[0].device
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider",) if p in available] + providers
        self.sessions = [
            ort.InferenceSession(str(Path(export_dir) / b.file), options, providers=providers)
            for b in self.manifest.blocks
        ]

    def _execute(self, block_idx: int, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        binding = self.sessions[block_idx].io_binding()
        for name, tensor in feeds.items():
            self._bind(binding.bind_input, name, tensor)
        for name, tensor in outputs.items():
            self._bind(binding.bind_output, name, tensor)
        self.sessions[block_idx].run_with_iobinding(binding)

    @staticmethod
    def _bind(bind, name: str, tensor: torch.Tensor) -> None:
        device = tensor.device
        bind(
            name,
            device.type,
            device.index or 0,
            _NUMPY[tensor.dtype],
            list(tensor.shape),
            tensor.data_ptr(),
        )
