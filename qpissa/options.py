"""Settings dataclasses as user-facing options: argparse flags and YAML files from one definition.

Each setting is a dataclass field with `metadata={"help": ...}`; flags, help texts and YAML validation
are derived from it, so a knob is defined once. Enums are closed choices; nested dataclasses are
reached with dotted keys (`data.max_seq_len=512`). Unknown keys and wrong types are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from qpissa import UserError

T = TypeVar("T")


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, reading `1e-5` (an exponent, no dot) as the number it is, as YAML 1.2 does:
    PyYAML's YAML 1.1 reads it as text, in a Trainer option's mapping (`lr_scheduler_kwargs`) too."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def add_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of the flat dataclass `cls` (but `exclude`), with help text and choices."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        kind = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        default = field.default if field.default is not dataclasses.MISSING else None
        if default is not None:  # Python >= 3.11's BooleanOptionalAction no longer adds its own
            help_text += " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(kind, type) and issubclass(kind, Enum):
            parser.add_argument(
                flag, choices=[m.value for m in kind], default=_plain(default), help=help_text
            )
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)


def path_argument(text: str) -> Path:
    """argparse's type for a path (`cli` registers it for `type=Path`): `""` is refused, where
    `Path("")` would quietly mean `.`."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is an empty path; give a path")
    return Path(text)


def from_namespace(cls: type[T], namespace: argparse.Namespace, exclude: tuple[str, ...] = ()) -> T:
    """Build `cls` from the parsed flags that `add_arguments` added; `exclude`d fields keep their defaults.

    Raises:
        UserError: naming every flag whose value is out of range (or not a finite number) at once.
    """
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.name not in exclude}
    return from_dict(cls, values, as_flags=True)


def from_dict(cls: type[T], values: dict[str, Any], where: str = "", *, as_flags: bool = False) -> T:
    """Build a (possibly nested) dataclass from plain data, checking every key and type.

    Args:
        cls: the dataclass type.
        values: plain data (from YAML or flags); nested dataclasses take nested dicts.
        where: dotted prefix used in error messages.
        as_flags: name the fields as the command-line flags they came from (`--shard-size-mb`).

    Raises:
        UserError: naming every unknown key and every value of the wrong type at once.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [
        f"unknown setting `{where}{key}` (known: {', '.join(sorted(fields))})"
        for key in values
        if key not in fields
    ]
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            continue
        name = "--" + key.replace("_", "-") if as_flags else f"{where}{key}"
        try:
            kwargs[key] = _coerce(hints[key], value, name)
        except UserError as error:
            problems.append(str(error))
    if problems:
        raise UserError("; ".join(problems))
    return cls(**kwargs)


def coerce_fields(settings: Any) -> None:
    """Check and convert the fields of a settings dataclass built in Python (`ConvertSettings(rank=8,
    method="loftq")`) as `from_dict` does those from YAML and flags: a text choice becomes its enum, text a
    Path, an int a float; without this a wrong type passed every check and failed far away, or not at all.

    Raises:
        UserError: naming every field of the wrong type at once, by its keyword.
    """
    hints = typing.get_type_hints(type(settings))
    problems = []
    for field in dataclasses.fields(settings):
        try:
            value = _coerce(hints[field.name], getattr(settings, field.name), field.name)
        except UserError as error:
            problems.append(str(error))
            continue
        object.__setattr__(settings, field.name, value)
    if problems:
        raise UserError("; ".join(problems))


def to_dict(settings: Any) -> dict[str, Any]:
    """Plain, JSON-ready data of a settings dataclass (enums as their values, paths as strings)."""
    return {key: _plain(value) for key, value in dataclasses.asdict(settings).items()}


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply command-line overrides (dotted keys for nested settings) to plain data.

    Both `key=value` and `--key value` (or `--key=value`; a lone `--flag` is true) are accepted, as
    LLaMA-Factory's and transformers' own parsers do. Values are parsed as YAML scalars, so
    `lr=2e-5`, `packing=true` and `name=foo` all work.
    """
    merged = dict(values)
    for item in _as_key_value(overrides):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override `{item}` is not key=value; write e.g. learning_rate=2e-5")
        node: dict | list = merged
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"override `{item}`: its key has an empty part; write e.g. data.max_seq_len=256")
        *parents, leaf = parts
        for depth, parent in enumerate(parents):
            if isinstance(node, list):
                node = node[_list_index(node, parent, key, parents[:depth])]
            elif parent not in node and parts[depth + 1].isdigit():  # an index into a list not there
                name = ".".join(parents[: depth + 1])
                raise UserError(
                    f"override `{key}`: the recipe has no list `{name}`; add its entries in the recipe"
                )
            else:
                node = node.setdefault(parent, {})
            if not isinstance(node, dict | list):
                raise UserError(f"override `{key}`: `{parent}` is not a group of settings")
        try:
            value = yaml.load(raw, Loader=RecipeLoader)
        except yaml.YAMLError as error:
            raise UserError(
                f"override `{item}`: the value is not a YAML scalar ({yaml_problem(error)}); quote it"
            ) from None
        if isinstance(node, list):
            node[_list_index(node, leaf, key, parents)] = value
        else:
            node[leaf] = value
    return merged


def _list_index(items: list, part: str, key: str, path: list[str]) -> int:
    """`part` of an override's key as an index into the recipe's list at `path` (`data.sources.1.samples`)."""
    name = ".".join(path)
    if not items:
        raise UserError(f"override `{key}`: `{name}` is an empty list; add its entries in the recipe")
    if not part.isdigit() or int(part) >= len(items):
        raise UserError(
            f"override `{key}`: `{name}` is a list of {len(items)}; "
            f"name an entry by its index, 0 to {len(items) - 1} (e.g. {name}.0.{key.split('.')[-1]}=...)"
        )
    return int(part)


def _as_key_value(overrides: list[str]) -> list[str]:
    """`--key value`, `--key=value` and a lone `--flag` as `key=value` (dashes in keys as underscores)."""
    items, index = [], 0
    while index < len(overrides):
        item = overrides[index]
        index += 1
        if not item.startswith("--"):
            items.append(item)
            continue
        key, sep, raw = item[2:].partition("=")
        key = key.replace("-", "_")
        if not sep:
            has_value = index < len(overrides) and not overrides[index].startswith("--")
            raw = overrides[index] if has_value else "true"
            index += has_value
        items.append(f"{key}={raw}")
    return items


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parse error on one line: what is wrong and where (PyYAML spreads it over several)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _coerce(hint: Any, value: Any, name: str) -> Any:
    kind = _base_type(hint)
    label = name if name.startswith("--") else f"`{name}`"  # a flag, or a key of the YAML recipe
    if value is None:
        if _is_optional(hint):
            return None
        raise UserError(f"{label} may not be empty")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):  # built in Python: its own __post_init__ checked it
            return value
        if not isinstance(value, dict):
            raise UserError(f"{label} must be a group of settings, got {value!r}")
        return from_dict(kind, value, where=f"{name}.")
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(m.value for m in kind)
            raise UserError(f"{label} must be one of {choices}, got {value!r}") from None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{label} must be true or false, got {value!r}")
    if _is_count_or_ratio(hint) and isinstance(value, (int, float)) and not isinstance(value, bool):
        # the Trainer's `save_steps: 0.1` is a ratio of the run, `50` a count: each kept as what it is
        return int(value) if float(value).is_integer() else float(value)
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        # YAML 1.1 reads `2e-5` (no dot) as text; `.nan`, `.inf` and the flag `nan` pass a `<= 0` check
        number = float(value) if not isinstance(value, str) or is_number(value) else None
        if number is not None and not math.isfinite(number):
            raise UserError(f"{label} must be a finite number, got {value!r}")
        if number is not None:
            return number
    if kind in (Path, str) and _is_text_scalar(value):
        # YAML reads `output_dir: 2024` as a number and `2024-01-01` as a date: what was typed is meant
        text = value if isinstance(value, (str, Path)) else typed_text(value)
        if kind is str:
            return str(text)
        if isinstance(text, str) and not text.strip():  # Path("") would quietly mean "."
            raise UserError(f"{label} is empty; give a path")
        return Path(text).expanduser()  # as the Trainer expands output_dir: one `~` means one place
    if kind is list and isinstance(value, list):
        item = _list_item(hint)
        if dataclasses.is_dataclass(item):  # a list of groups: `data.sources: [{path: ...}, ...]`
            return [_coerce(item, entry, f"{name}.{index}") for index, entry in enumerate(value)]
        return value
    if isinstance(kind, type) and isinstance(value, kind) and not isinstance(value, bool):
        return value
    wanted = "a path" if kind is Path else getattr(kind, "__name__", kind)
    raise UserError(f"{label} must be {wanted}, {got(value)}")


def _is_text_scalar(value: Any) -> bool:
    """A value a text or path setting takes as typed: text, a path, or a YAML number or date (not a bool,
    which is most often a flag left without its value)."""
    return isinstance(value, (str, Path, int, float, datetime.date)) and not isinstance(value, bool)


def typed_text(value: int | float | datetime.date) -> str:
    """A YAML number or date as the text it was typed as (`2024-01-01`, not `datetime.date(2024, 1, 1)`)."""
    return value.isoformat() if isinstance(value, datetime.date) else str(value)


def got(value: Any) -> str:
    """`got VALUE` for a type error; `true` where no boolean fits is most often a flag left without its
    value (`--max_steps` alone reads as `max_steps=true`), so the fix is said."""
    if value is True:
        return "got true (a flag without its value? write --key VALUE or key=VALUE)"
    return f"got {value!r}"


def check_api_argument(value: Any, cls: type[T], argument: str, fix: str) -> T:
    """A Python API function's settings argument, checked again: a path or a dict there would fail deep
    inside with an AttributeError, and a field set after creation (`settings.rank = 0`) skipped the checks.

    Returns:
        a copy of `value` built again (nested settings too), so its `__post_init__` checks run on it.

    Raises:
        UserError: naming the argument, what it got and `fix`; or what the checks find.
    """
    if not isinstance(value, cls):
        raise UserError(f"{argument}: expected {cls.__name__}, got {type(value).__name__}; {fix}")
    return _rebuilt(value)


def api_path(value: Any, argument: str) -> Path:
    """A Python API function's path argument, text or a Path; None or a number failed inside pathlib."""
    if not isinstance(value, (str, os.PathLike)):
        raise UserError(f"{argument}: expected a path (text or a Path), got {type(value).__name__}")
    return Path(value)


def _rebuilt(value: Any) -> Any:
    """`value` built again from its fields (settings have no `init=False` field, which this would drop)."""
    if isinstance(value, list):
        return [_rebuilt(item) for item in value]
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    fields = (field for field in dataclasses.fields(value) if field.init)
    return type(value)(**{field.name: _rebuilt(getattr(value, field.name)) for field in fields})


def _base_type(hint: Any) -> Any:
    """`int | None` → int; `list[str]` → list; anything else unchanged."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is not None:
        return origin
    return hint


def _is_count_or_ratio(hint: Any) -> bool:
    """`int | float` (or with None): a count of steps, or a fraction of the run's steps below 1."""
    return {a for a in typing.get_args(hint) if a is not type(None)} == {int, float}


def _list_item(hint: Any) -> Any:
    """`list[X] | None` -> X (None for a bare list)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_optional(hint) else [hint]
    items = typing.get_args(args[0])
    return items[0] if items else None


def is_number(text: str) -> bool:
    """`text` parses as a float (`nan` and `inf` included: the range checks name those)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
