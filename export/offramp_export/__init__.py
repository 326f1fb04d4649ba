"""``offramp export``: each decoder block, the embedding and the heads as ONNX graphs (and
TensorRT engines built from them on NVIDIA GPUs)."""

from offramp_export.exporter import EXPORTER_VERSION, ExportResult, export_model

__all__ = ["EXPORTER_VERSION", "ExportResult", "export_model"]
