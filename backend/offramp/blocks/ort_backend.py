"""The ONNX Runtime block backend: each block is one exported ONNX graph (``offramp export``).

Tensors are bound to the sessions without copies (I/O binding on the tensors' memory): the
paged K/V stores go in as they are, the block's output and new K/V land in tensors allocated
here. Session threads do not spin (see ``session_options``). The CUDA or TensorRT execution provider is used when the installed
``onnxruntime`` has one and the store lives on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from offramp.blocks.exported import ExportedBackend
from offramp.blocks.manifest import ExportManifest
from offramp.model.decoder import ModelWeights
from offramp.model.kv_store import KVStore

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
    # int4 exports: ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, by default with int8
    # activations (level 4: ~0.7 % off per product, compounding); level 0 keeps float32 activations
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OrtBackend(ExportedBackend):
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
            raise ValueError("backend onnxruntime: the KV store must be head-major (KVStore(head_major=True))")
        if kv.dtype != torch.float32:
            raise ValueError("backend onnxruntime: dtype must be float32 (the exported graphs are float32)")
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
