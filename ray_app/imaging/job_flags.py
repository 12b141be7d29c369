"""Command-line flags from a config dataclass (each field's metadata 'doc' is its help), so the
imaging jobs' CLIs stay one line per job."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import TypeVar

T = TypeVar("T")

_SCALARS = {"int": int, "float": float, "str": str}


def parser_for(cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "")
        required = f.default is MISSING and f.default_factory is MISSING
        help_text = f.metadata.get("doc", "") + ("" if required else f" (default: {_default(f)})")
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        elif kind.startswith("tuple["):
            item = _SCALARS[kind[len("tuple["):].split(",")[0].strip()]
            parser.add_argument(flag, dest=f.name, type=item, nargs=kind.count(",") + 1,
                                required=required, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_SCALARS.get(kind, str),
                                required=required, help=help_text)
    return parser


def _default(f) -> object:
    return f.default if f.default is not MISSING else f.default_factory()


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config with every flag given on the command line; defaults for the rest."""
    values = {}
    for f in fields(cls):
        value = getattr(args, f.name)
        if value is None or (str(f.type) == "bool" and value is False):
            continue
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
