"""The TensorRT block backend: one serialized engine per block (``offramp export --tensorrt``).

The KV stores live on the GPU (head-major, like the ONNX Runtime engine's); each block call binds
them, the step's small index tensors and the hidden states by address and runs on torch's current
CUDA stream. Hidden states come from and go back to the caller's device, so the rest of the engine
(embedding, heads, sampling) runs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from offramp.blocks.exported import ExportedBackend
from offramp.blocks.manifest import ExportManifest
from offramp.model.decoder import ModelWeights
from offramp.model.kv_store import KVStore


class TrtBackend(ExportedBackend):
    def __init__(
        self,
        weights: ModelWeights,
        kv: KVStore,
        block_ranges: list[tuple[int, int]],
        export_dir: Path,
        precision: str = "fp16",
    ) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise ValueError(
                "backend tensorrt: the 'tensorrt' package is not installed (pip install tensorrt)"
            ) from None
        super().__init__(weights, kv, block_ranges)
        if not kv.head_major or kv.k[0].device.type != "cuda":
            raise ValueError("backend tensorrt: the KV store must be head-major and on a CUDA device")
        self.manifest = ExportManifest.load(export_dir)
        self.manifest.check(block_ranges, kv.page_size, weights.shape.num_layers)
        record = Path(export_dir) / "tensorrt.json"
        if not record.is_file() or precision not in json.loads(record.read_text()):
            raise ValueError(f"backend tensorrt: no {precision} engines in {export_dir} (offramp export --tensorrt)")
        self.device = kv.k[0].device
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = [], []
        for block in self.manifest.blocks:
            plan = Path(export_dir) / Path(block.file).with_suffix(f".{precision}.plan").name
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise ValueError(f"backend tensorrt: cannot load {plan} (built by another TensorRT version or GPU?)")
            self.engines.append(engine)
            self.contexts.append(engine.create_execution_context())

    def _execute(self, block_idx: int, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        context = self.contexts[block_idx]
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT block {block_idx} failed to run")
