"""Every pass declares its settings once (passes/settings.py); its keyword arguments, recipe
keys, CLI flags and settings() are read from that declaration, so they agree."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.cli import build_parser, main
from converter.core.errors import BadInputError
from converter.core.machine import resolve_target
from passes.base import Pass, PassResult, make_pass
from passes.options import (
    REQUIRED,
    PassSettings,
    add_arguments,
    flag_help,
    from_args,
    needs_calibration,
    option,
    options_of,
)
from passes.registry import PASS_TYPES, make_recipe_pass

# The command line that makes each pass with its defaults (None: the pass has no verb).
VERBS = {
    "prune": ["prune", "M", "-o", "O", "--sparsity", "0.5"],
    "quantize-dynamic": ["quantize", "M", "-o", "O", "--mode", "dynamic"],
    "quantize-static": ["quantize", "M", "-o", "O", "--mode", "static", "--calib", "C"],
    "fp16": ["fp16", "M", "-o", "O"],
    "pack": ["pack", "M", "-o", "O"],
    "unpack": ["unpack", "M", "-o", "O"],
    "smooth": None,  # recipes and auto only
    "float-region": None,  # recipes and auto only
}
# The verbs' own arguments (not pass settings).
VERB_OWN = {"help", "model", "output", "mode", "undo", "debug", "quiet"}
# Settings a pass resolves when it is made: the target's canonical name, its weight bits.
RESOLVED = {
    "target": resolve_target("host").name,
    "reduce_range": resolve_target("host").reduce_range,
}
EXAMPLE = {"sparsity": 0.5}  # a value for each required option


def _minimal(kind: type[Pass]) -> dict:
    return {o.name: EXAMPLE[o.name] for o in options_of(kind.Settings) if o.required}


def _expected(kind: type[Pass]) -> dict:
    """The settings() of ``kind`` made with its defaults, read from the declaration."""
    out = {o.name: EXAMPLE[o.name] if o.required else o.default for o in options_of(kind.Settings)}
    return {**out, **{k: v for k, v in RESOLVED.items() if k in out}}


def _subparser(verb: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


@pytest.fixture(params=sorted(PASS_TYPES))
def pass_name(request) -> str:
    return request.param


def test_the_keyword_arguments_are_the_declaration(pass_name):
    kind = PASS_TYPES[pass_name]
    assert issubclass(kind.Settings, PassSettings) and dataclasses.is_dataclass(kind.Settings)
    params = inspect.signature(kind).parameters
    declared = {o.name: o.default for o in options_of(kind.Settings)}
    assert {k: p.default for k, p in params.items()} == {
        k: inspect.Parameter.empty if v is REQUIRED else v for k, v in declared.items()
    }


def test_settings_are_the_declared_options_with_their_defaults(pass_name):
    kind = PASS_TYPES[pass_name]
    made = kind(**_minimal(kind))
    assert list(made.settings()) == [o.name for o in options_of(kind.Settings)]
    assert made.settings() == _expected(kind)


def test_a_recipe_takes_exactly_the_declared_keys(pass_name):
    kind = PASS_TYPES[pass_name]
    names = sorted(o.name for o in options_of(kind.Settings))
    with pytest.raises(BadInputError) as e:
        make_recipe_pass(pass_name, {**_minimal(kind), "colour": "red"}, "c.npz")
    assert f"unknown setting(s) ['colour'] for pass {pass_name}" in e.value.what
    assert e.value.fix == f"use only {names}"
    every = {o.name: EXAMPLE.get(o.name, o.default) for o in options_of(kind.Settings)}
    made = make_recipe_pass(pass_name, every, "c.npz")  # every declared key, at its default
    assert made.settings() == {**_expected(kind), **_calibration(kind)}


def _calibration(kind: type[Pass]) -> dict:
    """What make_recipe_pass adds: the recipe's calibration data, where the pass needs it."""
    return {"calibration": "c.npz"} if needs_calibration(kind.Settings) else {}


def test_calibration_is_declared_once(pass_name, tmp_path):
    kind = PASS_TYPES[pass_name]
    assert kind(**_minimal(kind)).missing_calibration() == needs_calibration(kind.Settings)
    made = make_recipe_pass(pass_name, _minimal(kind), "c.npz")
    assert made.settings().get("calibration") == _calibration(kind).get("calibration")
    assert not made.missing_calibration()
    if needs_calibration(kind.Settings):
        with pytest.raises(BadInputError, match="needs calibration data"):
            make_recipe_pass(pass_name, _minimal(kind), None)
        with pytest.raises(BadInputError, match="needs calibration data"):
            kind(**_minimal(kind)).requires(_model(tmp_path / "m.onnx", save=False))


def test_the_verb_flags_are_the_declared_options(pass_name):
    if VERBS[pass_name] is None:
        assert pass_name in ("smooth", "float-region")  # the passes without a verb
        return
    verb = VERBS[pass_name][0]
    actions: dict[str, list[argparse.Action]] = {}
    for a in _subparser(verb)._actions:
        actions.setdefault(a.dest, []).append(a)
    made_by_verb = [PASS_TYPES[n] for n, argv in VERBS.items() if argv and argv[0] == verb]
    flagged = {o.name: o for kind in made_by_verb for o in options_of(kind.Settings) if o.cli}
    assert set(actions) - VERB_OWN == set(flagged)  # no flag the declarations do not have
    for o in options_of(PASS_TYPES[pass_name].Settings):
        if not o.cli:
            continue
        assert {s for a in actions[o.name] for s in a.option_strings} == {
            f for f in (o.flag, o.off_flag) if f
        }
        helps = {a.help for a in actions[o.name]}
        assert (flag_help(o) in helps if o.flag else True) and o.off_help in {"", *helps}
        for a in actions[o.name]:
            assert (tuple(a.choices) if a.choices else None) == o.choices
        if o.default not in (None, REQUIRED, (), True, False):
            assert str(o.default) in flag_help(o), f"the help of {o.flag} shows no default"


def test_the_verb_without_flags_makes_the_declared_defaults(pass_name):
    argv = VERBS[pass_name]
    if argv is None:
        return
    kind = PASS_TYPES[pass_name]
    args = _subparser(argv[0]).parse_args(argv[1:])
    expected = make_pass(kind, {**_minimal(kind), **_calibration_arg(argv)}).settings()
    assert kind(**from_args(kind.Settings, args)).settings() == expected


def _calibration_arg(argv: list[str]) -> dict:
    return {"calibration": argv[argv.index("--calib") + 1]} if "--calib" in argv else {}


# ----------------------------------------------------------------- out of range: exit 2


def _bad(o) -> float:
    """A value just outside ``o``'s range."""
    if o.high is not None:
        return o.high if o.high_open else o.high + 1
    return o.low if o.low_open else o.low - 1


RANGED = [
    (name, o)
    for name, kind in sorted(PASS_TYPES.items())
    for o in options_of(kind.Settings)
    if o.low is not None or o.high is not None
]


def _model(path: Path, save: bool = True) -> onnx.ModelProto | Path:
    w = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if not save:
        return model
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("pass_name", "o"), RANGED, ids=[f"{n}.{o.name}" for n, o in RANGED])
def test_out_of_range_is_exit_2_as_a_flag_and_as_a_recipe_key(pass_name, o, tmp_path, capsys):
    src = _model(tmp_path / "m.onnx")
    value = _bad(o)
    if VERBS[pass_name] is not None and o.cli:
        argv = VERBS[pass_name]
        argv = [str(src) if a == "M" else str(tmp_path / "o.onnx") if a == "O" else a for a in argv]
        argv = [a for a in argv if a not in ("--sparsity", "0.5") or o.name != "sparsity"]
        assert main([*argv, o.flag, str(value)]) == 2
        err = capsys.readouterr().err
        assert f"{o.name} = {value!r}" in err and " — " in err, err
    mode = {"quantize-static": "static", "quantize-dynamic": "dynamic"}.get(pass_name)
    entry = f'pass = "quantize", mode = "{mode}"' if mode else f'pass = "{pass_name}"'
    extra = ", sparsity = 0.5" if pass_name == "prune" and o.name != "sparsity" else ""
    entry += f', calibration = "c.npz"{extra}, {o.name} = {value!r}'
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[model]\nonnx = "{src}"\n[[variants]]\nname = "v"\npasses = [{{ {entry} }}]'
    )
    if not needs_calibration(PASS_TYPES[pass_name].Settings):
        recipe.write_text(recipe.read_text().replace(', calibration = "c.npz"', ""))
    assert main(["run", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{o.name} = {value!r}" in err and err.startswith("error: recipe variant 'v'"), err


# ----------------------------------------------------------------- a new option


@dataclass(frozen=True)
class _Small(PassSettings):
    size: int = option(4, "how many", low=1, metavar="N")
    colour: str = option("red", "which colour", choices=("red", "blue"))


@dataclass(frozen=True)
class _Bigger(_Small):
    shiny: bool = option(False, "polish it")


class _SmallPass(Pass):
    name = "small"
    Settings = _Small

    def call(self, model: onnx.ModelProto) -> PassResult:
        return PassResult(model, False)


class _BiggerPass(_SmallPass):
    Settings = _Bigger


def _flags(declaration: type) -> set[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser, declaration)
    return {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}


def test_adding_an_option_adds_its_flag_recipe_key_and_setting():
    assert _flags(_Small) == {"--size", "--colour"}
    assert _flags(_Bigger) - _flags(_Small) == {"--shiny"}
    assert set(_BiggerPass().settings()) - set(_SmallPass().settings()) == {"shiny"}
    assert make_pass(_BiggerPass, {"shiny": True}).shiny is True
    with pytest.raises(BadInputError, match=r"unknown setting\(s\) \['shiny'\] for pass small"):
        make_pass(_SmallPass, {"shiny": True})
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Bigger)
    args = parser.parse_args(["--shiny", "--size", "2"])
    assert _BiggerPass(**from_args(_Bigger, args)).settings() == {
        "size": 2,
        "colour": "red",
        "shiny": True,
    }
    assert "how many (default 4)" in parser.format_help()


def test_a_declared_range_choice_and_type_are_enforced():
    with pytest.raises(BadInputError, match=r"size = 0 must be ≥ 1"):
        make_pass(_SmallPass, {"size": 0})
    with pytest.raises(BadInputError, match="colour = 'green' is not one of red, blue"):
        _SmallPass(colour="green")
    with pytest.raises(BadInputError, match="size = '4' is not a whole number"):
        _SmallPass(size="4")
    with pytest.raises(BadInputError, match="shiny = 'yes' is not true or false"):
        _BiggerPass(shiny="yes")
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Small, unset=("size",))
    assert parser.parse_args([]).size is None  # the verb sees that the flag was not given
    assert from_args(_Small, parser.parse_args([])) == {"colour": "red"}
