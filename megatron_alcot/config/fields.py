"""Config fields that carry their own command-line flag: names, help, choices, all on the field.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Example:
    ...     lr: float = flag("--lr", default=3e-4, help="peak learning rate")
    ...     mmap: bool = flag(off="--no-mmap", default=True, help="memory-map the data files")
    ...     cache: dict = internal(default_factory=dict, why="filled by the loader")
    >>> [(s.name, s.flags, s.off, s.kind) for s in flag_specs(Example)]
    [('lr', ('--lr',), None, 'value'), ('mmap', (), '--no-mmap', 'switch')]

``arguments.py`` builds the parser from :func:`flag_specs` alone, so a flag's name, meaning and
default live in one place: the field.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Optional, Tuple


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the flag and the fix."""


def flag(*names: str, default: Any = MISSING, default_factory: Any = MISSING, help: str,
         choices: Optional[tuple] = None, metavar: Optional[str] = None, off: Optional[str] = None) -> Any:
    """A dataclass field set by the flag(s) ``names``.

    Booleans are switches: each of ``names`` sets True, ``off`` (a ``--no-...`` flag) sets False.
    Other types take one value (a list type takes any number). ``help`` says what the value
    means; the parser adds the choices and the default.
    """
    if not names and off is None:
        raise TypeError("flag() needs at least one flag name or off=")
    meta = {"flags": names, "off": off, "help": help, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"flag": meta})


def internal(default: Any = MISSING, *, default_factory: Any = MISSING, why: str) -> Any:
    """A dataclass field no flag sets; ``why`` says where its value comes from."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"internal": why})


@dataclass(frozen=True)
class FlagSpec:
    """One field's flags, read from its metadata (see :func:`flag`)."""

    name: str                     # the field
    flags: Tuple[str, ...]        # flags that set it (True for a switch)
    off: Optional[str]            # the flag that sets a switch to False
    help: str
    kind: str                     # "switch", "value" or "list"
    type: Any                     # int, float or str for "value"
    choices: Optional[tuple]
    metavar: Optional[str]
    default: Any                  # the field's default (None when it has a factory)


def _value_type(annotation) -> Any:
    """``Optional[int]`` -> int; ``bool``, ``list``, ``int``, ``float``, ``str`` as they are."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0]
    return annotation


def flag_specs(cls) -> list:
    """The :class:`FlagSpec` of every flagged field of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("flag")
        if meta is None:
            continue
        kind_type = _value_type(hints[f.name])
        kind = {bool: "switch", list: "list"}.get(kind_type, "value")
        if meta["off"] is not None and kind != "switch":
            raise TypeError(f"{cls.__name__}.{f.name}: off= is for bool fields only")
        specs.append(FlagSpec(f.name, meta["flags"], meta["off"], meta["help"], kind,
                              str if kind == "list" else kind_type, meta["choices"], meta["metavar"],
                              None if f.default is MISSING else f.default))
    return specs


def is_internal(f: dataclasses.Field) -> bool:
    return "internal" in f.metadata


def flag_name(name: str) -> str:
    """``latent_max_steps`` -> ``--latent-max-steps``: the flag spelling of a name that has no field."""
    return "--" + name.replace("_", "-")


def flag_of(config, name: str) -> str:
    """The flag declared on field ``name`` of ``config`` (an instance or class), for error messages; a
    field without a flag (``internal``) is spelt as :func:`flag_name` does."""
    meta = next(f.metadata for f in dataclasses.fields(config) if f.name == name).get("flag")
    if meta is None:
        return flag_name(name)
    return (meta["flags"] or (meta["off"],))[0]


def check_choice(config, name: str) -> None:
    """Raise ConfigError when field ``name`` of ``config`` is not one of the choices declared on it."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    choices, value = field.metadata["flag"]["choices"], getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{flag_of(config, name)} {value!r} is unknown; choose one of {', '.join(choices)}")
