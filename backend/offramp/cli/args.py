"""Command-line flags derived from the config dataclasses, and their translation back.

Every ``EngineConfig`` field (and every ``ServingConfig`` field for ``offramp serve``) becomes a
``--flag`` named after it, with its type, default and help taken from the field: a new option
appears everywhere by adding one field.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import Field, fields
from pathlib import Path

from offramp.config import RENAMED, EngineConfig


def flag_name(f: Field) -> str:
    """``--layers-per-block`` for ``layers_per_block`` (or the field's own ``flag``)."""
    return "--" + f.metadata.get("flag", f.name.replace("_", "-"))


def _dest(f: Field) -> str:
    return flag_name(f)[2:].replace("-", "_")


def _base_type(hint) -> type:
    """``int`` for ``int | None``; ``tuple`` for ``tuple[int, ...]``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def int_list(text: str) -> tuple[int, ...]:
    """``"10,20"`` -> ``(10, 20)``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> tuple[str, ...]:
    """``"cpu,cuda:0"`` -> ``("cpu", "cuda:0")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _list_parser(hint):
    """The parser of a ``tuple[int, ...]`` or ``tuple[str, ...]`` field."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return str_list if typing.get_args(hint)[:1] == (str,) else int_list


class _Renamed(argparse.Action):
    """An old flag name: stores into the new one and says so once."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"offramp: {option_string} is deprecated; use {self.metavar}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: tuple[str, ...] | None = None,
    overrides: bool = False,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of ``cls``. With ``overrides`` every default is None (unset flags leave the
    ``engine.json`` value alone), as ``offramp serve`` needs."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if "help" not in f.metadata or (only is not None and f.name not in only) or f.name in skip:
            continue
        kind, scale = _base_type(hints[f.name]), f.metadata.get("scale", 1)
        default = None if overrides or f.default is None else f.default // scale if scale != 1 else f.default
        parse = _list_parser(hints[f.name]) if kind is tuple else kind
        kwargs = {"dest": _dest(f), "default": default, "help": f.metadata["help"]}
        if kind is bool:
            group.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(flag_name(f), type=parse, **kwargs)
        if f.name in RENAMED.values():  # its old name too
            old = next(o for o, n in RENAMED.items() if n == f.name)
            metavar = flag_name(f)
            group.add_argument(
                "--" + old.replace("_", "-"),
                dest=f.name,
                type=parse,
                action=_Renamed,
                metavar=metavar,
                help=argparse.SUPPRESS,
            )
    wanted = {f.name for f in fields(cls) if only is None or f.name in only}
    if "use_chat_template" in wanted:
        group.add_argument("--raw", dest="use_chat_template", action="store_false", help="= --no-use-chat-template")


def config_values(args: argparse.Namespace, cls: type, *, skip_unset: bool = False) -> dict:
    """The fields of ``cls`` that ``args`` holds, in the field's own units (``--kv-budget-mb`` ->
    bytes). With ``skip_unset``, flags left at None are left out (overrides)."""
    values = {}
    for f in fields(cls):
        if "help" not in f.metadata or not hasattr(args, _dest(f)):
            continue
        value = getattr(args, _dest(f))
        if value is None and skip_unset:
            continue
        values[f.name] = value * f.metadata["scale"] if value is not None and "scale" in f.metadata else value
    return values


def engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    add_config_flags(parser, EngineConfig, skip=skip)
    parser.set_defaults(dtype=None)  # unset: follows --weights (engine_config)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    values = config_values(args, EngineConfig)
    if values.get("dtype") is None:  # bf16/int8/int4 weights compute in bfloat16 (the only activations they take)
        values["dtype"] = "float32" if values.get("weights", "none") == "none" else "bfloat16"
    return EngineConfig(**values)


def absolute_paths(values: dict, keys=("export_dir", "exit_head", "exit_classifier", "sparsity_predictor")) -> dict:
    """Paths for a server that runs in another directory: made absolute."""
    for key in keys:
        if values.get(key):
            values[key] = str(Path(values[key]).resolve())
    return values
