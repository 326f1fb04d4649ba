"""The manifest of an exported model: what ``offramp export`` wrote and what the exported
engines (ONNX Runtime, TensorRT) check before they run it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(slots=True)
class BlockEntry:
    file: str  # ONNX file, relative to the export directory
    start: int  # first layer
    end: int  # one past the last layer


@dataclass(slots=True)
class ExportManifest:
    source_checksum: str  # sha256 over the checkpoint's config and weights
    exporter_version: str
    opset: int
    dtype: str
    page_size: int
    kv_layout: str  # "head_major": K/V stores are [kv_heads, num_slots, head_dim]
    num_layers: int
    hidden_size: int
    blocks: list[BlockEntry]
    embed: str
    final_head: str
    exit_heads: dict[str, str] = field(default_factory=dict)  # "<depth>" or "shared" -> file
    exit_head_checksum: str | None = None  # sha256 of the shortcut file the exit heads came from
    dynamic_axes: dict[str, dict[str, str]] = field(default_factory=dict)  # input/output -> {axis: name}
    tokenizer_files: list[str] = field(default_factory=list)
    weights: str = "none"  # "int4": the blocks' products are weight-only int4 (DequantizeLinear + MatMul)
    weight_group_size: int | None = None
    format_version: int = FORMAT_VERSION

    @property
    def block_ranges(self) -> list[tuple[int, int]]:
        return [(b.start, b.end) for b in self.blocks]

    def save(self, directory: Path) -> None:
        (directory / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ExportManifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(f"export_dir: {directory} holds no {MANIFEST_NAME} (run `offramp export`)")
        try:
            data = json.loads(path.read_text())
            data["blocks"] = [BlockEntry(**b) for b in data["blocks"]]
            manifest = cls(**data)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"export_dir: {path} is not an Offramp export manifest ({exc})") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise ValueError(f"export_dir: {path} has format {manifest.format_version}; re-run `offramp export`")
        return manifest

    def check(self, block_ranges: list[tuple[int, int]], page_size: int, num_layers: int) -> None:
        """Raise ``ValueError`` when this export does not fit the engine's configuration."""
        if self.num_layers != num_layers:
            raise ValueError(f"export: made for a {self.num_layers}-layer model, this one has {num_layers}")
        if self.block_ranges != block_ranges:
            raise ValueError(f"export: block layout {self.block_ranges} differs from the config's {block_ranges}")
        if self.page_size != page_size:
            raise ValueError(f"export: made for page_size {self.page_size}, the config has {page_size}")
