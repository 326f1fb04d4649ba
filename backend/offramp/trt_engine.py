"""The TensorRT block engine: one serialized engine per block (``offramp export --tensorrt``).

The KV stores live on the GPU (head-major, like the ONNX Runtime engine's); each block call binds
them, the step's small index tensors and the hidden states by address and runs on torch's current
CUDA stream. Hidden states come from and go back to the caller's device, so the rest of the engine
(embedding, heads, sampling) runs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from offramp.attention import AttentionMetadata
from offramp.block_engine import BlockEngine
from offramp.kv_store import KVStore
from offramp.manifest import ExportManifest
from offramp.modeling import ModelWeights
from offramp.ort_engine import group_inputs


class TrtBlockEngine(BlockEngine):
    name = "tensorrt"

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
                "engine tensorrt: the 'tensorrt' package is not installed (pip install tensorrt)"
            ) from None
        super().__init__(weights, kv, block_ranges)
        if not kv.head_major or kv.k[0].device.type != "cuda":
            raise ValueError("engine tensorrt: the KV store must be head-major and on a CUDA device")
        self.manifest = ExportManifest.load(export_dir)
        self.manifest.check(block_ranges, kv.page_size, weights.shape.num_layers)
        record = Path(export_dir) / "tensorrt.json"
        if not record.is_file() or precision not in json.loads(record.read_text()):
            raise ValueError(f"engine tensorrt: no {precision} engines in {export_dir} (offramp export --tensorrt)")
        self.device = kv.k[0].device
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = [], []
        for block in self.manifest.blocks:
            plan = Path(export_dir) / Path(block.file).with_suffix(f".{precision}.plan").name
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise ValueError(f"engine tensorrt: cannot load {plan} (built by another TensorRT version or GPU?)")
            self.engines.append(engine)
            self.contexts.append(engine.create_execution_context())
        self._prepared: tuple[AttentionMetadata, list[dict[str, torch.Tensor]]] | None = None

    def _group_inputs(self, meta: AttentionMetadata) -> list[dict[str, torch.Tensor]]:
        if self._prepared is None or self._prepared[0] is not meta:
            self._prepared = (meta, group_inputs(meta, self.device))
        return self._prepared[1]

    def run_block(self, block_idx: int, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        start, end = self.block_ranges[block_idx]
        outs = []
        for g, inputs in zip(meta.groups, self._group_inputs(meta)):
            rows = hidden[g.row_start : g.row_end].to(self.device, torch.float32).contiguous()  # [n, hidden]
            outs.append(self._run_group(block_idx, start, end, rows, inputs))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.to(hidden.device, hidden.dtype)

    def _run_group(self, block_idx: int, start: int, end: int, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        context = self.contexts[block_idx]
        s = self.weights.shape
        n = hidden.shape[0]
        feeds = {"hidden": hidden, **{k: v for k, v in inputs.items() if k != "slots"}}
        for i, layer in enumerate(range(start, end)):
            feeds[f"k_store.{i}"], feeds[f"v_store.{i}"] = self.kv.k[layer], self.kv.v[layer]
        out = torch.empty(n, s.hidden_size, device=self.device)  # [n, hidden]
        new_kv = [torch.empty(n, s.num_kv_heads, s.head_dim, device=self.device) for _ in range(2 * (end - start))]
        outputs = {"hidden_out": out}
        for i in range(end - start):
            outputs[f"k_new.{i}"], outputs[f"v_new.{i}"] = new_kv[2 * i], new_kv[2 * i + 1]
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT block {block_idx} failed to run")
        for i, layer in enumerate(range(start, end)):
            self.kv.write(layer, inputs["slots"], new_kv[2 * i], new_kv[2 * i + 1])
        return out
