"""One way from a config dataclass to a job's command line, for every job in jobs/.

    parser = config_parser(LabelJobConfig, "Label reports.")
    cfg = config_from_args(LabelJobConfig, parser.parse_args(argv))

- Every field is a flag named after it (`reports_per_batch` -> `--reports-per-batch`), typed by
  its resolved type hint, with its `metadata["doc"]` and default as help: a bool is
  `--flag/--no-flag`, a list takes several values, a fixed tuple exactly its length. A nested
  dataclass field (`LabelJobConfig.engine: EngineConfig`) adds its own fields as flags of their
  own name (`--model`), prefixed with the outer field (`--engine-device`) only where an outer
  field has the name already. Fields of other types (a dict) are set in YAML or with --set.
- `--config FILE.yaml`: a mapping of field names; a nested dataclass is a mapping under its
  field's name (`engine: {model: ..., dtype: ...}`).
- `--set a.b=VALUE ...`: any field, nested ones by dotted path; VALUE is read as YAML (2, 1e-4,
  [a, b], null).
- Precedence: the dataclass defaults < the YAML < the flags < --set.
- An unknown key (YAML or --set) or a value of the wrong type is an InputError naming the key,
  where it came from and what is known (the job prints one line and exits 2); a required field
  that nothing set ends the job the same way, naming its flag.

A dataclass may list settings it no longer has in a `RETIRED_SETTINGS` class variable (name ->
why): old configs that still hold them load, with a warning, and the values are ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Iterator, TypeVar

import yaml

from ray_app.pipeline.cli import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")
_RESERVED = ("config", "set")  # the mechanism's own flags
_SCALARS = (bool, int, float, str)
_DEST = "config_field:"  # prefix of the Namespace attributes that hold field flags
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


@dataclass(frozen=True)
class Leaf:
    """A field that holds a value (not a nested dataclass), by its path from the top class."""

    path: tuple[str, ...]
    field: dataclasses.Field
    hint: Any  # the resolved type hint, Optional included

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def required(self) -> bool:
        return self.field.default is MISSING and self.field.default_factory is MISSING

    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        return self.field.default_factory()  # type: ignore[misc]


# ------------------------------------------------------------------------ fields and flags


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`; (hint, False) otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1 and len(typing.get_args(hint)) == 2:
            return rest[0], True
    return hint, False


def _nested_class(hint: Any) -> type | None:
    inner, _ = _unwrap_optional(hint)
    return inner if dataclasses.is_dataclass(inner) and isinstance(inner, type) else None


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every value-holding field of `cls` and of its nested dataclasses, outer ones first."""
    hints = typing.get_type_hints(cls)  # resolves `from __future__ import annotations` strings
    nested = []
    for f in dataclasses.fields(cls):
        sub = _nested_class(hints[f.name])
        if sub is not None:
            nested.append((f.name, sub))
        else:
            yield Leaf((*prefix, f.name), f, hints[f.name])
    for name, sub in nested:
        yield from leaves(sub, (*prefix, name))


def flag_names(cls: type) -> dict[str, str]:
    """Field key ('engine.model') -> its flag ('--model'): its own name, or prefixed by its outer
    fields where a field nearer the top has that name already."""
    taken: dict[str, str] = {}
    for leaf in sorted(leaves(cls), key=lambda leaf: len(leaf.path)):
        name = leaf.path[-1]
        if name in taken.values():
            name = "-".join(leaf.path)
        taken[leaf.key] = name
    return {key: "--" + name.replace("_", "-") for key, name in taken.items()}


def _argparse_kind(hint: Any) -> dict[str, Any] | None:
    """How argparse reads the field from the command line; None: only YAML and --set can."""
    inner, _ = _unwrap_optional(hint)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if inner in (int, float, str):
        return {"type": inner}
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is list and len(args) == 1 and args[0] in (int, float, str):
        return {"type": args[0], "nargs": "+"}
    if origin is tuple and args and args[-1] is Ellipsis and args[0] in (int, float, str):
        return {"type": args[0], "nargs": "+"}
    if origin is tuple and args and len(set(args)) == 1 and args[0] in (int, float, str):
        return {"type": args[0], "nargs": len(args)}
    return None


def _help(leaf: Leaf) -> str:
    doc = leaf.field.metadata.get("doc", "")
    shown = "required" if leaf.required else f"default: {leaf.default()!r}"
    return _escape(f"{doc} ({shown})".strip())


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help text


def _yaml_only(cls: type) -> str:
    """The help's closing lines: fields no flag can take (a dict), set in YAML or --set."""
    rows = [f"  {leaf.key}: {leaf.field.metadata.get('doc', '')}" for leaf in leaves(cls)
            if _argparse_kind(leaf.hint) is None]
    if not rows:
        return ""
    return _escape("set in the --config YAML or with --set KEY=VALUE only:\n" + "\n".join(rows))


def config_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """The job's parser: --config, --set and a flag per field (see the module docstring). A job
    may add arguments of its own; config_from_args reads only the fields'."""
    parser = argparse.ArgumentParser(description=description, epilog=_yaml_only(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML mapping of the fields below (nested settings as mappings: "
                             "`engine: {model: ...}`); flags override it")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override any field, nested ones by dotted path (engine.model=m); "
                             "values are read as YAML (2, 1e-4, [a, b], null); overrides flags")
    names = flag_names(cls)
    for leaf in leaves(cls):
        if leaf.path[-1] in _RESERVED:
            raise TypeError(f"{cls.__name__}.{leaf.key}: the field name '{leaf.path[-1]}' is "
                            "the config mechanism's own flag; rename the field")
        kind = _argparse_kind(leaf.hint)
        if kind is not None:
            if "action" not in kind:
                kind["metavar"] = leaf.path[-1].upper()
            parser.add_argument(names[leaf.key], dest=_DEST + leaf.key, default=argparse.SUPPRESS,
                                help=_help(leaf), **kind)
    for path, _why in _retired(cls):
        # still accepted, so that old commands run; config_from_args warns and drops the value
        flag = "--" + path[-1].replace("_", "-")
        if flag in names.values():
            flag = "--" + "-".join(path).replace("_", "-")
        parser.add_argument(flag, dest=_DEST + ".".join(path), default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    return parser


def _retired(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    for name, why in getattr(cls, "RETIRED_SETTINGS", {}).items():
        yield (*prefix, name), why
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _nested_class(hints[f.name])
        if sub is not None:
            yield from _retired(sub, (*prefix, f.name))


# ------------------------------------------------------------------- values, in precedence


def config_from_args(cls: type[T], args: argparse.Namespace, missing_hint: str = "",
                     what: str = "field") -> T:
    """The config from defaults < --config YAML < flags < --set. `missing_hint` ends the message
    that names required fields nothing set; `what` names a field in messages ('fine-tuning
    setting')."""
    config = getattr(args, "config", None)
    stages = [(config, _flatten(cls, read_yaml_mapping(config), config) if config else {}),
              ("the command line", {name[len(_DEST):]: value for name, value in vars(args).items()
                                    if name.startswith(_DEST)}),
              ("--set", parse_set(getattr(args, "set", None) or []))]
    typed: dict[str, Any] = {}
    for source, values in stages:  # later stages win
        typed.update(_typed(cls, _checked(cls, values, source, what), source))
    sources = " and ".join(filter(None, [config, "the command line"]))
    missing = _missing(cls, typed)
    if missing:
        names = flag_names(cls)
        # SystemExit("...") is an input error to run_job (one line, exit 2), like argparse's
        # own error for a missing argument
        raise SystemExit(f"missing {', '.join(names[key] for key in missing)}: give them as "
                         f"flags or as keys of a --config YAML{missing_hint}")
    return _construct_checked(cls, typed, sources)


def from_mapping(cls: type[T], data: dict[str, Any], source: str, what: str = "field") -> T:
    """`cls` from a mapping shaped like a --config YAML (a stored config, a config dict sent to
    workers), checked and typed the same way; `source` names it in errors."""
    typed = _typed(cls, _checked(cls, _flatten(cls, data, source), source, what), source)
    missing = _missing(cls, typed)
    if missing:
        raise InputError(f"{source}: missing {what}(s) {missing}")
    return _construct_checked(cls, typed, source)


def read_yaml_mapping(path: str) -> dict[str, Any]:
    with open(path) as f:  # FileNotFoundError names the path: an input error (cli.py)
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config {path}: expected a mapping of job fields, got "
                         f"{type(data).__name__}")
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """['a.b=2', 'c=[x, y]'] -> {'a.b': 2, 'c': ['x', 'y']} (values read as YAML)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE (e.g. engine.model=m)")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return out


def _flatten(cls: type, data: dict[str, Any], source: str,
             prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML mapping (nested mappings for nested dataclasses) as {dotted key: value}; unknown
    keys are kept, for _checked to name."""
    hints = typing.get_type_hints(cls)
    flat: dict[str, Any] = {}
    for name, value in data.items():
        path = (*prefix, str(name))
        sub = _nested_class(hints[name]) if name in hints else None
        if sub is None:
            flat[".".join(path)] = value
        elif value is None:
            continue  # `engine:` with nothing under it: the defaults
        elif not isinstance(value, dict):
            raise InputError(f"{source}: '{'.'.join(path)}' must be a mapping of "
                             f"{sub.__name__} settings, got {type(value).__name__}")
        else:
            flat.update(_flatten(sub, value, source, path))
    return flat


def _checked(cls: type, values: dict[str, Any], source: str, what: str) -> dict[str, Any]:
    """`values` less retired settings (with a warning each); an unknown key is refused."""
    known = {leaf.key for leaf in leaves(cls)}
    retired = {".".join(path): why for path, why in _retired(cls)}
    out = {}
    for key, value in values.items():
        if key in retired:
            log.warning("%s: '%s' is no longer a setting and is ignored: %s", source, key,
                        retired[key])
        elif key not in known:
            raise InputError(_unknown(key, source, known, what))
        else:
            out[key] = value
    return out


def _unknown(key: str, source: str, known: set[str], what: str) -> str:
    """The message for an unknown key, listing the names (fields and sections) beside it."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, -1, -1):  # the deepest known section the key is under
        section = parts[:depth]
        names = sorted({k.split(".")[depth] for k in known
                        if k.split(".")[:depth] == section and k.count(".") >= depth})
        if names:
            break
    where = f" under '{'.'.join(section)}'" if section else ""
    return f"{source}: unknown {what} '{key}'; known{where}: {names}"


def _typed(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """{dotted key: value} (keys checked already) with each value as its field's type."""
    known = {leaf.key: leaf for leaf in leaves(cls)}
    return {key: coerce(known[key], value, source) for key, value in values.items()}


def _missing(cls: type, typed: dict[str, Any]) -> list[str]:
    return [leaf.key for leaf in leaves(cls) if leaf.required and _unset(typed.get(leaf.key))]


def _construct_checked(cls: type[T], typed: dict[str, Any], source: str) -> T:
    try:
        return _construct(cls, typed, ())
    except InputError:
        raise
    except (TypeError, ValueError) as err:  # the dataclass's own checks (__post_init__)
        raise InputError(f"{source}: {err}") from err


def _unset(value: Any) -> bool:
    """None, or an empty text or list (`conditions: []`): nothing a required field can use."""
    return value is None or (isinstance(value, (str, list, tuple)) and not value)


def _construct(cls: type[T], typed: dict[str, Any], prefix: tuple[str, ...]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        sub = _nested_class(hints[f.name])
        if sub is not None:
            if any(key.startswith(".".join(path) + ".") for key in typed):
                kwargs[f.name] = _construct(sub, typed, path)
        elif ".".join(path) in typed:
            kwargs[f.name] = typed[".".join(path)]
    return cls(**kwargs)


def coerce(leaf: Leaf, value: Any, source: str) -> Any:
    """`value` as the field's type; an InputError naming the key and source when it is not."""
    try:
        return _as_type(leaf.hint, value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{source}: {leaf.key} {err}") from None


def _as_type(hint: Any, value: Any) -> Any:
    inner, optional = _unwrap_optional(hint)
    if value is None:
        if optional or inner is Any:
            return None
        raise ValueError(f"must be {_type_name(inner)}, got null")
    if inner is Any or isinstance(inner, TypeVar):
        return value
    if inner in _SCALARS:
        return _scalar(inner, value)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [value]  # `conditions: fracture`
        return [_as_type(args[0], v) for v in items] if args else list(items)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_as_type(args[0], v) for v in value)
        if args and len(args) != len(value):
            raise ValueError(f"must be {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_as_type(a, v) for a, v in zip(args, value)) if args else tuple(value)
    if origin is dict or inner is dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping, got {value!r}")
        return dict(value)
    return value  # a type this module does not check: the dataclass gets it as given


def _scalar(kind: type, value: Any) -> Any:
    if isinstance(value, bool) != (kind is bool):
        raise ValueError(f"must be {_KIND_NAMES[kind]}, got {value!r}")
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        except ValueError:
            raise ValueError(f"must be a number, got {value!r}") from None
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is str and isinstance(value, (int, float)):
        return str(value)  # `prompt_name: 2`
    if not isinstance(value, kind):
        raise ValueError(f"must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return _KIND_NAMES.get(hint) or getattr(hint, "__name__", str(hint))
