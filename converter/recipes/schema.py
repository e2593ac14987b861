"""Recipes: a TOML file naming the model, the data, the variants (each a chain of passes),
the gates and the bench settings. Unknown keys are errors naming the allowed ones; relative
paths are relative to the recipe file.

    name = "digits_cnn"
    target = "host"               # CPU kind for int8 (host, avx2, avx512-vnni, arm64)
    [model]                       # from PyTorch (as `export` takes it) ...
    spec = "model.py:trained"
    inputs = ["x:batch,1,8,8:float32"]
    # onnx = "model.onnx"         # ... or an existing ONNX file instead of spec/inputs
    [data]
    calibration = "calib.npz"     # for static quantization
    validation = "test.npz"       # scored against the fp32 reference (labels optional)
    [[variants]]
    name = "int8_static"
    passes = [{ pass = "quantize", mode = "static" }]
    [gates]
    max_drop = 0.01               # accuracy drop vs fp32, absolute
    [bench]
    threads = [1]
    # executor = "ray"            # validate on Ray (pip install 'onnxship[ray]'); optional
    # ray_address = "10.0.0.5:6379"   # an existing cluster; default: a local Ray
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from converter.core import defaults
from converter.core.errors import BadInputError
from converter.core.executor import EXECUTORS, import_ray
from converter.core.gates import ScoreLimits, check_fraction
from converter.core.machine import Target, resolve_target
from converter.recipes.checks import (
    check_bench,
    check_gates,
    check_model,
    default_name,
    safe_name,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "to_plain",
    "Recipe",
    "ModelSection",
    "DataSection",
    "Variant",
    "Gates",
    "BenchSection",
    "load_recipe",
]


@dataclass
class ModelSection:
    spec: str | None = None
    inputs: list[str] = field(default_factory=list)
    onnx: Path | None = None
    weights: Path | None = None
    example: Path | None = None
    dims: dict[str, int] = field(default_factory=dict)
    output_names: list[str] | None = None
    exporter: str = "auto"
    opset: int | None = None
    atol: float | None = None
    rtol: float | None = None
    accept_traced_branches: bool = False


@dataclass
class DataSection:
    calibration: Path | None = None
    validation: Path | None = None


@dataclass
class Variant:
    name: str
    passes: list[dict[str, Any]] = field(default_factory=list)
    # Structured pruning + distillation of the PyTorch model first (`onnxship shrink`):
    # { keep = 0.5, data = "train.npz", epochs = 3, ... }; then the passes run on its export.
    shrink: dict[str, Any] | None = None


@dataclass(frozen=True)
class Gates(ScoreLimits):
    """[gates]: the score limits of every variant (``min_score``, ``max_drop``,
    ``min_worst``: ScoreLimits, their ranges included) and the ``metrics`` validate reports.
    A value out of its range fails when the recipe is loaded, naming its key."""

    metrics: list[str] | None = None

    def __post_init__(self) -> None:
        for name, (_, low, high) in self.RANGES.items():
            check_fraction(getattr(self, name), f"recipe [gates] {name}", low, high)


@dataclass
class BenchSection:
    threads: list[int] = field(default_factory=lambda: [1])
    warmup: int = defaults.DEFAULT_WARMUP
    runs: int | None = None  # DEFAULT_RUNS unless `seconds` is given (filled at load)
    seconds: float | None = None
    dims: dict[str, int] = field(default_factory=dict)


@dataclass
class Recipe:
    path: Path
    name: str
    model: ModelSection
    data: DataSection
    variants: list[Variant]
    gates: Gates
    bench: BenchSection
    # hardware target of every quantize pass that names none, resolved once at load
    target: Target = field(default_factory=lambda: resolve_target("host"))
    target_as_written: str = "host"  # what the recipe says (the manifest shows both)
    executor: str = "in-process"  # where validation's shards are scored: or "ray"
    ray_address: str | None = None

    def resolved(self) -> dict[str, Any]:
        """The recipe with defaults filled and paths absolute: what the manifest records."""

        return to_plain(self)


def to_plain(value: Any) -> Any:
    """JSON-ready values: dataclasses and dicts as dicts, lists and tuples as lists, scalars as
    they are, anything else (paths, calibration ranges) as its string."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Target):
        return value.name
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return str(value)


_PATH_FIELDS = {"onnx", "weights", "example", "calibration", "validation"}
_TOP = {"name", "target", "model", "data", "variants", "gates", "bench", "executor", "ray_address"}


def _section(cls: type, raw: Any, where: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise BadInputError(f"recipe [{where}] must be a table", f"write it as [{where}]")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise BadInputError(
            f"unknown key(s) {unknown} in recipe [{where}]", f"allowed keys: {allowed}"
        )
    values = {k: (_path(v, k, base) if k in _PATH_FIELDS else v) for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise BadInputError(f"recipe [{where}] is incomplete: {e}", f"give {allowed}") from e


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str):
        raise BadInputError(f"recipe key {key!r} must be a path string", f'{key} = "file"')
    path = Path(value)
    return path if path.is_absolute() else (base / path).resolve()


def _variants(raw: Any, base: Path) -> list[Variant]:
    if not isinstance(raw, list):
        raise BadInputError("recipe `variants` must be an array of tables", "use [[variants]]")
    variants = [_section(Variant, item, f"variants.{i}", base) for i, item in enumerate(raw)]
    for v in variants:
        if isinstance(v.shrink, dict) and isinstance(v.shrink.get("data"), str):
            v.shrink["data"] = _path(v.shrink["data"], "data", base)
    names = [v.name for v in variants]
    for v in variants:  # each names its file OUTDIR/<name>.onnx
        safe_name(v.name, "variant name", reserved=("fp32",))
        if not isinstance(v.passes, list) or not all(
            isinstance(p, dict) and "pass" in p for p in v.passes
        ):
            raise BadInputError(
                f"variant {v.name!r}: passes must be tables with a `pass` key",
                'passes = [{ pass = "prune", sparsity = 0.5 }]',
            )
    if len(set(names)) != len(names):
        raise BadInputError(f"variant names repeat: {names}", "give each variant its own name")
    return variants


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe {path} does not exist", "check the path")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"recipe {path} is not valid TOML: {e}", "fix the syntax") from e
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise BadInputError(
            f"unknown key(s) {unknown} in recipe {path.name}",
            f"allowed top-level keys: {sorted(_TOP)}",
        )
    base = path.resolve().parent
    if "model" not in raw:
        raise BadInputError(f"recipe {path.name} has no [model]", "add [model] with spec or onnx")
    recipe = Recipe(
        path=path.resolve(),
        name=_name(raw, path),
        model=_section(ModelSection, raw["model"], "model", base),
        data=_section(DataSection, raw.get("data", {}), "data", base),
        variants=_variants(raw.get("variants", []), base),
        gates=_section(Gates, raw.get("gates", {}), "gates", base),
        bench=_section(BenchSection, raw.get("bench", {}), "bench", base),
        target=_target(raw.get("target", "host")),
        target_as_written=str(raw.get("target", "host")),
        executor=_string(raw, "executor", "in-process"),
        ray_address=_string(raw, "ray_address", None),
    )
    _check_model(recipe.model, base)
    has_validation = recipe.data.validation is not None
    check_gates(recipe.gates, has_validation)
    check_bench(recipe.bench, has_validation)
    _check_executor(recipe)
    _check_shrink(recipe)
    return recipe


def _name(raw: dict, path: Path) -> str:
    """The recipe's name, the default output folder build/<name>: one path component."""
    if "name" not in raw:
        return default_name(path.stem)
    return safe_name(raw["name"], "name")


def _string(raw: dict, key: str, default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is not None and not isinstance(value, str):
        raise BadInputError(f"recipe `{key}` must be a string, got {value!r}", f'{key} = "..."')
    return value


def _target(value: Any) -> Target:
    """The recipe's target, resolved now (an unknown one fails before anything runs)."""
    if not isinstance(value, str):
        raise BadInputError(f"recipe `target` must be a string, got {value!r}", 'target = "host"')
    return resolve_target(value)


def _check_executor(recipe: Recipe) -> None:
    """A bad ``executor`` (or a missing Ray) fails here, before anything runs."""

    if recipe.executor not in EXECUTORS:
        raise BadInputError(
            f"recipe executor {recipe.executor!r} is unknown", f"use one of {list(EXECUTORS)}"
        )
    if recipe.ray_address is not None and recipe.executor != "ray":
        raise BadInputError("recipe has ray_address but no executor", 'add executor = "ray"')
    if recipe.executor == "ray":
        import_ray()


def _check_shrink(recipe: Recipe) -> None:
    """A `shrink` variant needs the PyTorch model (spec) and training data."""
    for v in recipe.variants:
        if v.shrink is None:
            continue
        if not isinstance(v.shrink, dict) or "data" not in v.shrink:
            raise BadInputError(
                f"variant {v.name!r}: shrink must be a table with `data`",
                'shrink = { keep = 0.5, data = "train.npz" }',
            )
        if recipe.model.spec is None:
            raise BadInputError(
                f"variant {v.name!r} shrinks the PyTorch model, but [model] gives only `onnx`",
                'give [model] spec = "model.py:build" and inputs',
            )


def _check_model(model: ModelSection, base: Path) -> None:
    check_model(model)
    if model.spec is not None:
        file, _, name = model.spec.rpartition(":")
        path = _path(file, "spec", base)
        if not path.is_file():
            raise BadInputError(f"recipe [model] spec file {path} does not exist", "check the path")
        model.spec = f"{path}:{name}"
