"""The layout explains the design: layers import only downwards, folders stay small, and every
engine option is a flag of the commands that build an engine."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from offramp.cli.args import flag_name
from offramp.cli.main import build_parser, main
from offramp.config import EngineConfig
from offramp.serving.serving_config import ServingConfig, load_serving_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"offramp": ROOT / "backend/offramp", "offramp_export": ROOT / "export/offramp_export"}
PACKAGES["offramp_client"] = ROOT / "client/offramp_client"
PACKAGES["offramp_gateway"] = ROOT / "gateway/offramp_gateway"

# Which layer may import which (a layer may always import itself). ``offramp/__init__.py`` is the
# public facade and may re-export from any layer, so it is not a node here.
ALLOWED = {
    "offramp.config": set(),
    "offramp.model": {"offramp.config"},
    "offramp.blocks": {"offramp.config", "offramp.model"},
    "offramp.exits": {"offramp.config", "offramp.model"},
    "offramp.sparsity": {"offramp.config", "offramp.model"},
    "offramp_export": {"offramp.config", "offramp.model", "offramp.blocks", "offramp.exits"},
    "offramp.pipeline": {"offramp.config", "offramp.model", "offramp.blocks"},
    "offramp.engine": {
        "offramp.config",
        "offramp.model",
        "offramp.blocks",
        "offramp.exits",
        "offramp.pipeline",
        "offramp.sparsity",
        "offramp_export",
    },
    "offramp.serving": {"offramp.config", "offramp.model", "offramp.engine"},
    "offramp.tools": {
        "offramp.config",
        "offramp.model",
        "offramp.exits",
        "offramp.sparsity",
        "offramp.engine",
        "offramp.serving",
    },
    "offramp.cli": {
        "offramp.config",
        "offramp.model",
        "offramp.engine",
        "offramp.serving",
        "offramp.tools",
        "offramp.sparsity",
        "offramp_export",
    },
    "offramp_client": set(),
    "offramp_gateway": {"offramp.config", "offramp.model"},  # the tokenizer, for multi-message chats
}


def _node(module: str) -> str | None:
    """The layer a dotted module belongs to (``offramp.engine.runner`` -> ``offramp.engine``)."""
    parts = module.split(".")
    if parts[0] in ("offramp_export", "offramp_client", "offramp_gateway"):
        return parts[0]
    if parts[0] != "offramp" or len(parts) < 2:
        return None
    return "offramp.config" if parts[1] in ("config", "config_checks", "config_layout") else f"offramp.{parts[1]}"


def _modules():
    for top, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            name = ".".join([top, *rel.parts]).removesuffix(".__init__")
            if name != "offramp":
                yield name, path


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {node: set() for node in ALLOWED}
    for name, path in _modules():
        src = _node(name)
        edges[src] |= {dst for dst in map(_node, _imports(path)) if dst is not None and dst != src}
    return edges


def test_layers_import_only_downwards():
    wrong = {src: sorted(dsts - ALLOWED[src]) for src, dsts in _edges().items() if dsts - ALLOWED[src]}
    assert wrong == {}, f"imports against the layering: {wrong}"


def test_no_import_cycle_between_packages():
    edges, state = _edges(), {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_engine_layers_never_import_triton():
    triton = {name for name, path in _modules() if "triton_python_backend_utils" in _imports(path)}
    assert triton == set()  # model.py passes Triton's utilities in; the package never imports them


@pytest.mark.parametrize(
    "subpackage", ["model", "blocks", "exits", "pipeline", "sparsity", "engine", "serving", "tools", "cli"]
)
def test_each_subpackage_imports_in_isolation(subpackage):
    code = f"import offramp.{subpackage}"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_no_folder_holds_more_than_twelve_modules():
    for folder in [p for top in PACKAGES.values() for p in [top, *top.rglob("*")] if p.is_dir()]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{folder} holds {len(modules)} modules"


def _subparser(parser, name):
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def _flags(parser) -> dict[str, object]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


@pytest.mark.parametrize("command", ["generate", "bench", "serve"])
def test_every_engine_field_is_a_flag_with_the_dataclass_default(command):
    parser = _subparser(build_parser(), command)
    flags = _flags(parser)
    for f in dataclasses.fields(EngineConfig):
        action = flags.get(flag_name(f))
        assert action is not None, f"{command} has no {flag_name(f)} for EngineConfig.{f.name}"
        scale = f.metadata.get("scale", 1)
        # --dtype left unset follows --weights (engine_config resolves it; tests/test_cli.py)
        expected = None if command == "serve" or f.default is None or f.name == "dtype" else f.default
        expected = expected // scale if isinstance(expected, int) and not isinstance(expected, bool) else expected
        assert action.default == expected, f"{command} {flag_name(f)}"
        assert action.help, f"{command} {flag_name(f)} has no help"
    if command == "serve":
        for f in dataclasses.fields(ServingConfig)[1:]:
            assert flag_name(f) in flags, f"serve has no {flag_name(f)} for ServingConfig.{f.name}"


def test_flags_reach_the_config():
    """A value given on the command line lands in the EngineConfig the command builds."""
    from offramp.cli import args as cli_args

    parser = _subparser(build_parser(), "generate")
    argv = ["--prompt", "x", "--layers-per-block", "3", "--kv-budget-mb", "7", "--exit-points", "3,6"]
    argv += ["--no-enable-prefix-sharing", "--raw", "--max-model-len", "99", "--exit-gate", "similarity"]
    config = cli_args.engine_config(parser.parse_args(argv))
    assert (config.layers_per_block, config.kv_budget_bytes, config.exit_points) == (3, 7 << 20, (3, 6))
    assert config.enable_prefix_sharing is False and config.use_chat_template is False
    assert config.max_model_len == 99 and config.exit_gate == "similarity"


def test_serve_overrides_are_derived(monkeypatch, tmp_path):
    seen = {}

    def fake_run_server(repo, overrides, *rest):
        seen.update(overrides)
        return 0

    monkeypatch.setattr("offramp.serving.serve.run_server", fake_run_server)
    argv = ["serve", "--max-num-seqs", "7", "--kv-budget-mb", "3", "--exit-head", "h.safetensors"]
    assert main(argv + ["--max-queued-requests", "9"]) == 0
    assert seen == {
        "max_num_seqs": 7,
        "kv_budget_bytes": 3 << 20,
        "exit_head": str(Path("h.safetensors").resolve()),
        "max_queued_requests": 9,
    }


def test_old_names_are_accepted_with_a_deprecation_message(tmp_path, caplog, capsys):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"model": "default", "block_size": 3, "engine": "torch"}))
    with caplog.at_level(logging.WARNING, logger="offramp"):
        cfg = load_serving_config(path)
    assert cfg.engine.layers_per_block == 3 and cfg.engine.backend == "torch"
    assert "'block_size' is deprecated" in caplog.text and "'engine' is deprecated" in caplog.text
    path.write_text(json.dumps({"block_size": 3, "layers_per_block": 2}))
    with pytest.raises(ValueError, match="both 'block_size'"):
        load_serving_config(path)
    parser = _subparser(build_parser(), "bench")
    args = parser.parse_args(["--block-size", "4", "--engine", "onnxruntime"])
    assert (args.layers_per_block, args.backend) == (4, "onnxruntime")
    assert "--block-size is deprecated; use --layers-per-block" in capsys.readouterr().err
