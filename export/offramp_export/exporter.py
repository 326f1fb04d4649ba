"""Write a model as ONNX graphs: one per block of layers, plus the embedding and the heads.

Everything lands in one directory with a ``manifest.json`` (``offramp.blocks.manifest``). The manifest is
written last, so a directory with a manifest is complete. A re-run on the same checkpoint, block
layout, page size and exit head finds the manifest and returns at once; anything else re-exports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from offramp.blocks.manifest import BlockEntry, ExportManifest
from offramp.model.decoder import ModelWeights
from offramp.model.loader import load_weights, resolve_model, source_gguf
from offramp_export.graphs import BlockGraph, EmbedGraph, HeadGraph
from offramp_export.int4_graph import dense_weights, layer_int4, quantize_products

EXPORTER_VERSION = "1"  # bump whenever the graphs change: older exports are then redone
OPSET = 18
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass(slots=True)
class ExportResult:
    directory: Path
    manifest: ExportManifest
    reused: bool  # True when an up-to-date export was already there
    seconds: float


def checkpoint_checksum(checkpoint: Path) -> str:
    """sha256 over the checkpoint's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for path in [checkpoint / "config.json", *sorted(checkpoint.glob("*.safetensors"))]:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _file_checksum(path: Path | None) -> str | None:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _up_to_date(
    directory: Path,
    checksum: str,
    ranges: list[tuple[int, int]],
    page_size: int,
    head_sum: str | None,
    weights: str = "none",
    group_size: int | None = None,
) -> ExportManifest | None:
    try:
        manifest = ExportManifest.load(directory)
    except ValueError:
        return None
    same = (
        manifest.source_checksum == checksum
        and manifest.exporter_version == EXPORTER_VERSION
        and manifest.block_ranges == ranges
        and manifest.page_size == page_size
        and manifest.exit_head_checksum == head_sum
        and manifest.weights == weights
        and manifest.weight_group_size == group_size
    )
    files = [b.file for b in manifest.blocks] + [manifest.embed, manifest.final_head, *manifest.exit_heads.values()]
    return manifest if same and all((directory / f).is_file() for f in files) else None


def _block_dynamic_axes(num_layers_in_block: int) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {
        "hidden": {0: "num_rows"},
        "cos": {0: "num_rows"},
        "sin": {0: "num_rows"},
        "page_ids": {0: "num_seqs", 1: "num_pages"},
        "mask": {0: "num_seqs", 1: "rows_per_seq", 2: "context_plus_rows"},
        "hidden_out": {0: "num_rows"},
    }
    for i in range(num_layers_in_block):
        for kind in ("k", "v"):
            axes[f"{kind}_store.{i}"] = {1: "num_slots"}
            axes[f"{kind}_new.{i}"] = {0: "num_rows"}
    return axes


def _block_sample_inputs(weights: ModelWeights, num_layers: int, page_size: int) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: 2 sequences x 3 rows over 2 pages (no axis of size 1 to specialise on)."""
    s = weights.shape
    b, t, pages = 2, 3, 2
    n, ctx = b * t, pages * page_size
    stores = []
    for _ in range(num_layers):
        stores += [torch.randn(s.num_kv_heads, 4 * page_size, s.head_dim) for _ in range(2)]
    mask = torch.ones(b, t, ctx + t, dtype=torch.bool)
    return (
        torch.randn(n, s.hidden_size),
        torch.randn(n, s.head_dim),
        torch.randn(n, s.head_dim),
        torch.tensor([[0, 1], [2, 3]], dtype=torch.long),
        mask,
        *stores,
    )


def _export(module: torch.nn.Module, inputs: tuple, path: Path, names_in, names_out, axes) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module.eval(),
            inputs,
            str(path),
            input_names=list(names_in),
            output_names=list(names_out),
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


def _exit_head_pairs(weights: ModelWeights, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Shortcut pairs of a trained exit-head file: "shared" (one-jump) and/or "<depth>"."""
    from offramp.exits import LowRankHead

    head = LowRankHead(weights, path)
    return {("shared" if d is None else str(d)): pair for d, pair in head.shortcuts.items()}


def export_model(
    model: str,
    block_ranges: list[tuple[int, int]],
    page_size: int,
    output: Path,
    exit_head: Path | None = None,
    force: bool = False,
    progress: bool = True,
    weights_format: str = "none",
    group_size: int = 32,
) -> ExportResult:
    """Export ``model`` cut into ``block_ranges`` into ``output`` (reusing an up-to-date export). With
    ``weights_format="int4"`` the blocks' products are weight-only int4 (``int4_graph``): the engine's own
    int4 weights (a GGUF's 4-bit blocks as stored), so the graphs compute what the torch int4 engine does,
    in float32 activations; the embedding and heads stay float32."""
    if weights_format not in ("none", "int4"):
        raise ValueError(f"weights: {weights_format!r}: export writes none (float32) or int4")
    t0 = time.perf_counter()
    output = Path(output)
    checkpoint = resolve_model(model)
    checksum = checkpoint_checksum(checkpoint)
    head_sum = _file_checksum(exit_head)
    group = group_size if weights_format == "int4" else None
    if not force:
        manifest = _up_to_date(output, checksum, block_ranges, page_size, head_sum, weights_format, group)
        if manifest is not None:
            return ExportResult(output, manifest, True, time.perf_counter() - t0)

    quantized = None
    if weights_format == "int4":
        quantized, _ = load_weights(checkpoint, torch.bfloat16, "int4", group_size, source_gguf(model))
        weights = dense_weights(quantized)
    else:
        weights, _ = load_weights(checkpoint, torch.float32)
    shape = weights.shape
    if block_ranges[-1][1] != shape.num_layers:
        raise ValueError(f"block layout {block_ranges} does not cover the model's {shape.num_layers} layers")
    heads = _exit_head_pairs(weights, exit_head) if exit_head is not None else {}
    output.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output, prefix=".export-"))
    try:
        steps = len(block_ranges) + 2 + len(heads)
        bar = tqdm(total=steps, desc="offramp export", unit="graph", disable=not progress)
        blocks, axes = [], {}
        for i, (start, end) in enumerate(block_ranges):
            graph = BlockGraph(weights, start, end, page_size)
            name = f"block_{i:02d}.onnx"
            axes = _block_dynamic_axes(end - start)
            _export(
                graph,
                _block_sample_inputs(weights, end - start, page_size),
                tmp / name,
                graph.input_names(),
                graph.output_names(),
                axes,
            )
            if quantized is not None:
                graph_proto = onnx.load(str(tmp / name))
                quantize_products(graph_proto, layer_int4(quantized.layers[start:end]))
                onnx.save(graph_proto, str(tmp / name))
                onnx.checker.check_model(str(tmp / name))
            blocks.append(BlockEntry(name, start, end))
            bar.update()
        row_axes = {"token_ids": {0: "num_rows"}, "hidden": {0: "num_rows"}, "logits": {0: "num_rows"}}
        ids = torch.tensor([1, 2, 3], dtype=torch.long)
        _export(EmbedGraph(weights), (ids,), tmp / "embed.onnx", ["token_ids"], ["hidden"], row_axes)
        bar.update()
        sample = torch.randn(3, shape.hidden_size)
        _export(HeadGraph(weights), (sample,), tmp / "final_head.onnx", ["hidden"], ["logits"], row_axes)
        bar.update()
        exit_files = {}
        for key, (down, up) in heads.items():
            name = f"exit_head_{key}.onnx"
            _export(HeadGraph(weights, down, up), (sample,), tmp / name, ["hidden"], ["logits"], row_axes)
            exit_files[key] = name
            bar.update()
        bar.close()
        tokenizer_dir = tmp / "tokenizer"
        tokenizer_dir.mkdir()
        copied = []
        for name in TOKENIZER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tokenizer_dir / name)
                copied.append(f"tokenizer/{name}")
        manifest = ExportManifest(
            source_checksum=checksum,
            exporter_version=EXPORTER_VERSION,
            opset=OPSET,
            dtype="float32",
            page_size=page_size,
            kv_layout="head_major",
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            blocks=blocks,
            embed="embed.onnx",
            final_head="final_head.onnx",
            exit_heads=exit_files,
            exit_head_checksum=head_sum,
            dynamic_axes={name: {str(k): v for k, v in ax.items()} for name, ax in {**axes, **row_axes}.items()},
            tokenizer_files=copied,
            weights=weights_format,
            weight_group_size=group,
        )
        old = output / "manifest.json"
        if old.exists():
            old.unlink()  # the directory is incomplete from here until the new manifest lands
        for item in tmp.iterdir():
            target = output / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        stale = [
            p
            for p in output.glob("*.onnx")
            if p.name not in {*(b.file for b in blocks), "embed.onnx", "final_head.onnx", *exit_files.values()}
        ]
        for path in stale:  # graphs of an earlier layout
            path.unlink()
        manifest.save(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(output, manifest, False, time.perf_counter() - t0)
