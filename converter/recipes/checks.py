"""The values of a recipe, checked when it is loaded, before anything runs: each error is
exit 2 and names the key (``recipe [bench] runs 'many' is not a whole number ≥ 1 — e.g.
runs = 100``). Types and ranges here; what needs the model's inputs or the data files
(:func:`check_against_model`) runs as soon as the model's inputs are known: at load for an
``onnx`` model, right after the export for a ``spec`` (whose code may write the data)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converter.core.data import Dataset, InputSpec
from converter.core.defaults import DEFAULT_RUNS, EXPORTERS, METRICS, SCORES
from converter.core.errors import BadInputError
from converter.core.inputs import parse_input_spec, symbols

__all__ = [
    "safe_name",
    "default_name",
    "check_model",
    "check_gates",
    "check_bench",
    "check_against_model",
]

# One path component of letters, digits, _ . - that does not start with . or -: no folder,
# no `..`, no hidden file, nothing a shell or another OS reads differently.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return _is_int(value) and value >= 1


def whole(value: Any, key: str, low: int = 1, example: int = 1) -> None:
    if not _is_int(value) or value < low:
        raise BadInputError(
            f"recipe {key} {value!r} is not a whole number ≥ {low}",
            f"e.g. {key.rpartition(' ')[2]} = {example}",
        )


def strings(value: Any, key: str, example: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadInputError(f"recipe {key} must be a list of strings, got {value!r}", example)


def sizes(value: Any, key: str) -> None:
    """A table of symbolic dims: ``{ batch = 4, seq = 16 }``, each a whole number ≥ 1."""
    if not isinstance(value, dict):
        raise BadInputError(
            f"recipe {key} must be a table of dim sizes, got {value!r}", "e.g. { seq = 16 }"
        )
    for name, size in value.items():
        if not _SYMBOL.match(name) or not _is_int(size) or size < 1:
            raise BadInputError(
                f"recipe {key} {name} = {size!r} is not a dim size",
                "give each symbolic dim a whole number ≥ 1, e.g. { seq = 16 }",
            )


def safe_name(value: Any, key: str, reserved: Sequence[str] = ()) -> str:
    """``value`` when it is one safe path component (it names a folder or a file)."""
    if not isinstance(value, str) or not _NAME.match(value) or value in reserved:
        but = f" (and not {', '.join(map(repr, reserved))})" if reserved else ""
        raise BadInputError(
            f"recipe {key} {value!r} is not a plain name: it names a file or folder",
            f"use letters, digits, _ . - and start with a letter, digit or _{but}",
        )
    return value


def default_name(stem: str) -> str:
    """The recipe's name when it gives none: its file name, made one safe component."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".-")
    return name or "recipe"


def check_model(model: Any) -> None:
    """[model]: one of spec and onnx; the export settings (a spec's) typed and in range."""
    if (model.spec is None) == (model.onnx is None):
        raise BadInputError(
            "recipe [model] needs exactly one of `spec` and `onnx`",
            'spec = "model.py:build" with inputs = [...], or onnx = "m.onnx"',
        )
    if model.onnx is not None:
        _onnx_only(model)
        return
    if not isinstance(model.spec, str) or not all(model.spec.rpartition(":")[::2]):
        raise BadInputError(
            f"recipe [model] spec {model.spec!r} is not FILE.py:CALLABLE",
            'spec = "model.py:build"',
        )
    if not model.inputs:
        raise BadInputError(
            "recipe [model] has `spec` but no `inputs`", 'inputs = ["x:batch,3,224,224:float32"]'
        )
    strings(model.inputs, "[model] inputs", 'inputs = ["x:batch,3,224,224:float32"]')
    specs = [_input(text) for text in model.inputs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BadInputError(f"recipe [model] inputs repeat a name: {names}", "name each once")
    sizes(model.dims, "[model] dims")
    unknown = sorted(set(model.dims) - set(symbols(specs)))
    if unknown:
        raise BadInputError(
            f"recipe [model] dims {unknown} name no dim of the inputs",
            f"the symbolic dims are {', '.join(symbols(specs)) or '(none)'}",
        )
    _export_settings(model)


def _input(text: str) -> InputSpec:
    try:
        return parse_input_spec(text)
    except BadInputError as e:
        e.what = e.what.replace("--input", "recipe [model] inputs entry")
        raise


def _export_settings(model: Any) -> None:
    if model.output_names is not None:
        strings(model.output_names, "[model] output_names", 'output_names = ["logits"]')
    if model.exporter not in EXPORTERS:
        raise BadInputError(
            f"recipe [model] exporter {model.exporter!r} is unknown", f"use one of {EXPORTERS}"
        )
    if model.opset is not None and (not _is_int(model.opset) or not 7 <= model.opset <= 23):
        raise BadInputError(
            f"recipe [model] opset {model.opset!r} is out of range", "use an opset from 7 to 23"
        )
    for key in ("atol", "rtol"):
        value = getattr(model, key)
        if value is not None and (not _is_number(value) or value < 0):
            raise BadInputError(
                f"recipe [model] {key} {value!r} is not a number ≥ 0", f"e.g. {key} = 0.001"
            )
    if not isinstance(model.accept_traced_branches, bool):
        raise BadInputError(
            "recipe [model] accept_traced_branches must be true or false",
            "accept_traced_branches = true",
        )
    for key in ("weights", "example"):
        path = getattr(model, key)
        if path is not None and not Path(path).exists():
            raise BadInputError(f"recipe [model] {key} {path} does not exist", "check the path")


_EXPORT_KEYS = {
    "inputs": [],
    "weights": None,
    "example": None,
    "dims": {},
    "output_names": None,
    "exporter": "auto",
    "opset": None,
    "atol": None,
    "rtol": None,
    "accept_traced_branches": False,
}


def _onnx_only(model: Any) -> None:
    given = [k for k, default in _EXPORT_KEYS.items() if getattr(model, k) != default]
    if given:
        raise BadInputError(
            f"recipe [model] gives onnx, and {given} are settings of the export from `spec`",
            "drop them (the ONNX file is used as it is)",
        )
    if not isinstance(model.onnx, Path) or not model.onnx.is_file():
        raise BadInputError(f"recipe [model] onnx {model.onnx} does not exist", "check the path")


def check_gates(gates: Any, has_validation: bool) -> None:
    """[gates]: ``metrics`` known names; a gate needs validation data to read."""
    if gates.metrics is not None:
        strings(gates.metrics, "[gates] metrics", 'metrics = ["accuracy", "cosine"]')
        unknown = [m for m in gates.metrics if m not in METRICS]
        if unknown:
            raise BadInputError(
                f"recipe [gates] metrics: {unknown[0]!r} is unknown",
                f"use some of {', '.join(METRICS)}",
            )
        if not gates.metrics or len(set(gates.metrics)) != len(gates.metrics):
            raise BadInputError(
                f"recipe [gates] metrics {gates.metrics} must name each metric once",
                'e.g. metrics = ["accuracy", "cosine"]',
            )
        if gates.min_score is not None and gates.metrics[0] not in SCORES:
            raise BadInputError(
                f"recipe [gates] min_score reads the first metric, and {gates.metrics[0]} is "
                "an error (lower is better), not a score",
                "put a score first in metrics: accuracy, agreement or cosine",
            )
    if (gates.given or gates.metrics) and not has_validation:
        raise BadInputError(
            "recipe has [gates] but no [data] validation to score them on",
            'add validation = "test.npz" to [data], or drop [gates]',
        )


def check_bench(bench: Any, has_validation: bool) -> None:
    """[bench]: threads, warmup, runs or seconds, dims; fills ``runs`` when neither is
    given (DEFAULT_RUNS)."""
    threads = bench.threads
    if not isinstance(threads, list) or not threads or not all(_count(t) for t in threads):
        raise BadInputError(
            f"recipe [bench] threads {bench.threads!r} must be a list of whole numbers ≥ 1",
            "e.g. threads = [1, 2]",
        )
    if len(set(bench.threads)) != len(bench.threads):
        raise BadInputError(f"recipe [bench] threads {bench.threads} repeat", "list each once")
    whole(bench.warmup, "[bench] warmup", low=0, example=10)
    if bench.runs is not None and bench.seconds is not None:
        raise BadInputError(
            "recipe [bench] gives both runs and seconds",
            "give one: runs = N timed runs, or seconds = T of measuring",
        )
    if bench.runs is not None:
        whole(bench.runs, "[bench] runs", example=DEFAULT_RUNS)
    if bench.seconds is not None and not (_is_number(bench.seconds) and 0 < bench.seconds < 1e6):
        raise BadInputError(
            f"recipe [bench] seconds {bench.seconds!r} is not a positive number",
            "e.g. seconds = 10",
        )
    if bench.runs is None and bench.seconds is None:
        bench.runs = DEFAULT_RUNS
    sizes(bench.dims, "[bench] dims")
    if bench.dims and has_validation:
        raise BadInputError(
            "recipe [bench] dims sizes generated inputs, and the bench reads [data] validation",
            "drop [bench] dims (the bench runs the validation data's first sample)",
        )


def check_against_model(recipe: Any, specs: Sequence[InputSpec]) -> None:
    """What needs the reference model's inputs ``specs``: each data file exists and fits
    them, the gates' metrics find labels, [bench] dims size every generated input."""
    data = recipe.data
    for key, path in (("calibration", data.calibration), ("validation", data.validation)):
        if path is not None:
            try:
                Dataset(path).check(specs)
            except BadInputError as e:
                e.what = f"recipe [data] {key}: {e.what}"
                raise
    for v in recipe.variants:
        if v.shrink is not None:
            try:
                Dataset(v.shrink["data"]).check(specs)
            except BadInputError as e:
                e.what = f"recipe variant {v.name!r} shrink data: {e.what}"
                raise
    metrics = recipe.gates.metrics or []
    if data.validation is not None and "accuracy" in metrics:
        if not Dataset(data.validation).has_labels:
            raise BadInputError(
                f"[gates] metrics has accuracy but {data.validation} has no `labels`",
                "add labels to the validation data, or gate on agreement/cosine",
            )
    if data.validation is None:
        _check_bench_dims(recipe.bench.dims, specs)


def _check_bench_dims(dims: dict[str, int], specs: Sequence[InputSpec]) -> None:
    known = symbols(specs)
    unknown = sorted(set(dims) - set(known))
    if unknown:
        raise BadInputError(
            f"recipe [bench] dims {unknown} name no dim of the model's inputs",
            f"the symbolic dims are {', '.join(known) or '(none)'}",
        )
    named = {d for s in specs for d in s.shape[1:] if isinstance(d, str) and d}
    unsized = sorted(named - set(dims))
    if unsized:
        raise BadInputError(
            f"the bench generates the model's inputs, and dims {unsized} have no size",
            f"give them in [bench] dims, e.g. dims = {{ {unsized[0]} = 16 }}, or add "
            "[data] validation",
        )
