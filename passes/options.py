"""Pass settings declared once, and everything read from the declaration.

A pass's settings are a frozen dataclass (``passes/settings.py``) whose fields are made by
:func:`option`: type (the annotation), default, help, and the allowed values (``choices``,
``low``/``high``). From that one declaration come the pass's keyword arguments and their
checks (:class:`passes.base.Pass` builds ``__init__`` from it), the keys a recipe accepts
(:func:`check_keys`), the flags of the pass's CLI verb (:func:`add_arguments`,
:func:`from_args`), the settings in manifests and ``auto``'s cache keys (``Pass.settings()``)
and whether the pass needs calibration data (:func:`needs_calibration`).

This module imports neither onnx nor numpy: the CLI builds its parsers from it at start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from converter.core.errors import BadInputError

__all__ = [
    "REQUIRED",
    "Option",
    "PassSettings",
    "NoSettings",
    "option",
    "options_of",
    "option_named",
    "check_keys",
    "add_arguments",
    "from_args",
    "flag_help",
    "needs_calibration",
    "calibration_option",
    "has_calibration",
]

REQUIRED: Any = dataclasses.MISSING  # an option without a default (a required argument)


@dataclass(frozen=True)
class Option:
    """One setting of a pass, as :func:`option` declared it (``name`` and ``type`` are read
    from the dataclass field)."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    flag: str | None = None  # the CLI flag (a bool's "on" flag)
    off_flag: str | None = None  # a bool's "off" flag (--per-tensor, --no-preprocess)
    off_help: str = ""
    metavar: str | None = None
    default_text: str | None = None  # what the help says the default is; "" says nothing
    cli: bool = True  # whether the pass's verb has a flag for it
    calibration: bool = False  # this option takes the pass's calibration data
    reuses_calibration: bool = False  # a value here stands in for calibration data

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def kind(self) -> str:
        """How the value is read: bool, tristate (bool or None), list, int, float or str."""
        arms = _arms(self.type)
        if bool in arms:
            return "tristate" if type(None) in arms else "bool"
        if any(typing.get_origin(a) is tuple for a in arms):
            return "list"
        return next((t.__name__ for t in (int, float) if t in arms), "str")

    def allowed(self) -> str:
        """The allowed values, as the errors say them."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        return self.bounds() or _describe(self.type)

    def bounds(self) -> str:
        """ "in [0, 1)", "≥ 1"...; empty when the option has no range."""
        low, high = self.low, self.high
        if low is not None and high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low:g}, {high:g}{right}"
        if low is not None:
            return f"{'>' if self.low_open else '≥'} {low:g}"
        if high is not None:
            return f"{'<' if self.high_open else '≤'} {high:g}"
        return ""

    def check(self, value: Any) -> Any:
        """``value`` checked against the declaration and normalized (lists become tuples,
        whole numbers given for a float become floats); BadInputError names the key, the
        value and what is allowed."""
        if not _conforms(value, self.type):
            kind = _describe(self.type)
            fix = f"use one of {', '.join(map(str, self.choices))}" if self.choices else ""
            raise BadInputError(
                f"{self.name} = {value!r} is not {kind}",
                fix or f"give {self.name} {kind} {self.bounds()}".rstrip(),
            )
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            raise BadInputError(
                f"{self.name} = {value!r} is not {self.allowed()}",
                f"use one of {', '.join(map(str, self.choices))}",
            )
        if not self._in_range(value):
            where = self.bounds()
            problem = f"is outside {where[3:]}" if where.startswith("in ") else f"must be {where}"
            raise BadInputError(f"{self.name} = {value!r} {problem}", f"give {self.name} {where}")
        if self.kind == "list":
            return tuple(value)
        return float(value) if self.kind == "float" else value

    def _in_range(self, value: Any) -> bool:
        if self.low is None and self.high is None:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high = self.high
        return low_ok and (high is None or (value < high if self.high_open else value <= high))


class PassSettings:
    """Base of the settings declarations: a frozen dataclass of :func:`option` fields, each
    value checked (and normalized) when an instance is made."""

    def __post_init__(self) -> None:
        for o in options_of(type(self)):
            object.__setattr__(self, o.name, o.check(getattr(self, o.name)))


@dataclass(frozen=True)
class NoSettings(PassSettings):
    """A pass without settings."""


def option(default: Any = REQUIRED, help: str = "", **details: Any) -> Any:
    """A dataclass field declaring one pass setting; ``details`` are the other fields of
    :class:`Option` (``choices``, ``low``, ``flag``, ``cli``...: a misspelt one is a
    TypeError at import). ``flag`` defaults to ``--name-with-dashes`` (for a bool that is on
    by default, ``off_flag`` to ``--no-…`` instead); ``cli=False``: no flag (Python API and
    recipes only)."""
    if details.get("choices") is not None:
        details["choices"] = tuple(details["choices"])
    spec = Option(name="", type=None, default=default, help=help, **details)
    return dataclasses.field(default=default, metadata={"option": spec})


@cache
def options_of(declaration: type) -> tuple[Option, ...]:
    """The options of a settings declaration, in field order (inherited ones first)."""
    hints = typing.get_type_hints(declaration)
    return tuple(
        _with_flags(dataclasses.replace(f.metadata["option"], name=f.name, type=hints[f.name]))
        for f in dataclasses.fields(declaration)
    )


def _with_flags(o: Option) -> Option:
    """``o`` with its flags named: ``--name-with-dashes`` unless declared, ``--no-…`` for a
    bool that is on by default, and for a tristate the ``--no-…`` argparse adds."""
    if not o.cli:
        return o
    flag, off_flag = o.flag, o.off_flag
    if not flag and not off_flag:
        dashed = o.name.replace("_", "-")
        if o.kind == "bool" and o.default is True:
            off_flag = f"--no-{dashed}"
        else:
            flag = f"--{dashed}"
    if o.kind == "tristate" and not off_flag:
        off_flag = f"--no-{flag.removeprefix('--')}"
    return dataclasses.replace(o, flag=flag, off_flag=off_flag)


def option_named(declaration: type, name: str) -> Option:
    return next(o for o in options_of(declaration) if o.name == name)


# ------------------------------------------------------------------ types


def _arms(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if len(_arms(hint)) > 1:
        return any(_conforms(value, arm) for arm in _arms(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(
            value, bool
        )
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    return isinstance(value, typing.get_origin(hint) or hint)


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _describe(hint: Any) -> str:
    arms = [a for a in _arms(hint) if a is not type(None)]
    words = []
    for arm in arms:
        if typing.get_origin(arm) is tuple:
            words.append(f"a list of {_describe(typing.get_args(arm)[0]).removeprefix('a ')}s")
        elif arm is os.PathLike:
            words.append("a path")
        else:
            words.append(_WORDS.get(arm, f"a {getattr(arm, '__name__', arm)}"))
    return " or ".join(dict.fromkeys(words)) + (" or none" if len(arms) < len(_arms(hint)) else "")


# ------------------------------------------------------------------ recipes and the API


def check_keys(declaration: type, settings: Mapping[str, Any], owner: str) -> None:
    """Refuse keys ``declaration`` does not have and required ones that are missing, naming
    the allowed keys (the values are checked when the declaration is instantiated)."""
    names = [o.name for o in options_of(declaration)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise BadInputError(
            f"unknown setting(s) {unknown} for {owner}", f"use only {sorted(names)}"
        )
    missing = [o.name for o in options_of(declaration) if o.required and o.name not in settings]
    if missing:
        raise BadInputError(f"{owner} needs {', '.join(missing)}", f"set {', '.join(missing)}")


def needs_calibration(declaration: type) -> bool:
    """Whether the pass needs calibration data (one of its options takes it)."""
    return calibration_option(declaration) is not None


def calibration_option(declaration: type) -> Option | None:
    """The option that takes the pass's calibration data; None when it needs none."""
    return next((o for o in options_of(declaration) if o.calibration), None)


def has_calibration(declaration: type, settings: Mapping[str, Any]) -> bool:
    """Whether ``settings`` give calibration data, or what stands in for it (``ranges``)."""
    sources = [o.name for o in options_of(declaration) if o.calibration or o.reuses_calibration]
    return any(settings.get(name) is not None for name in sources)


# ------------------------------------------------------------------ the command line


def flag_help(o: Option) -> str:
    """The help of ``o``'s flag: its help, then the default or "(repeatable)"."""
    if o.kind == "list":
        return f"{o.help} (repeatable)"
    if o.kind == "bool":
        return f"{o.help} (default)" if o.default is True else o.help
    shown = o.default_text
    if shown is None:
        shown = "" if o.required or o.default is None else str(o.default)
    return f"{o.help} (default {shown})" if shown else o.help


def add_arguments(
    container: argparse._ActionsContainer,
    declaration: type,
    *,
    only: Collection[str] | None = None,
    unset: Collection[str] = (),
) -> None:
    """Add the flags of ``declaration``'s CLI options (those in ``only``, all by default),
    each storing into ``args.<option name>``. The options in
    ``unset`` default to None, so that the verb sees whether the flag was given; the help
    shows the declaration's default either way."""
    for o in options_of(declaration):
        if o.cli and (only is None or o.name in only):
            _add(container, o, None if o.name in unset else _cli_default(o))


def _cli_default(o: Option) -> Any:
    return [] if o.kind == "list" else None if o.required else o.default


def _add(container: argparse._ActionsContainer, o: Option, default: Any) -> None:
    if o.kind == "bool":
        _add_bool(container, o, default)
    elif o.kind == "tristate":
        action = argparse.BooleanOptionalAction
        container.add_argument(o.flag, dest=o.name, action=action, default=None, help=o.help)
    elif o.kind == "list":
        container.add_argument(
            o.flag, dest=o.name, action="append", default=default, metavar=o.metavar,
            help=flag_help(o),
        )  # fmt: skip
    else:
        container.add_argument(
            o.flag, dest=o.name, type={"int": int, "float": float}.get(o.kind, str),
            choices=o.choices, default=default, required=o.required, metavar=o.metavar,
            help=flag_help(o),
        )  # fmt: skip


def _add_bool(container: argparse._ActionsContainer, o: Option, default: Any) -> None:
    if o.flag and o.off_flag:
        container = container.add_mutually_exclusive_group()
    if o.flag:
        container.add_argument(
            o.flag, dest=o.name, action="store_true", default=default, help=flag_help(o)
        )
    if o.off_flag:
        container.add_argument(
            o.off_flag, dest=o.name, action="store_false", default=default, help=o.off_help
        )


def from_args(
    declaration: type, args: argparse.Namespace, only: Collection[str] | None = None
) -> dict[str, Any]:
    """The settings of ``declaration`` given on the command line (flags left unset are
    absent: the declaration's defaults apply)."""
    return {
        o.name: getattr(args, o.name)
        for o in options_of(declaration)
        if (only is None or o.name in only) and getattr(args, o.name, None) is not None
    }
