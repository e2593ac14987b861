"""Input specs from the command line (``NAME:DIMS:DTYPE``, ``--dim NAME=SIZE``) and seeded
generated inputs for them. Used by export (tracing, verification) and bench."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from converter.core.data import InputSpec
from converter.core.errors import BadInputError

__all__ = [
    "DTYPES",
    "DEFAULT_DIM",
    "parse_input_spec",
    "parse_dims",
    "concrete_shape",
    "generate_inputs",
    "resized_dims",
]

DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int64": np.int64,
    "int32": np.int32,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}
# torch.export specialises sizes 0 and 1, so symbolic dims trace at 2 unless told otherwise.
DEFAULT_DIM = 2
_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SPEC_HELP = "use NAME:DIMS:DTYPE, e.g. x:batch,3,224,224:float32 or input_ids:batch,seq:int64"


def parse_input_spec(text: str) -> InputSpec:
    """``x:batch,3,224,224:float32`` → InputSpec; DTYPE defaults to float32."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise BadInputError(f"bad --input {text!r}", _SPEC_HELP)
    name, dims_text = parts[0], parts[1]
    dtype_name = parts[2] if len(parts) == 3 else "float32"
    if dtype_name not in DTYPES:
        raise BadInputError(
            f"unknown dtype {dtype_name!r} in --input {text!r}",
            f"use one of {', '.join(DTYPES)}",
        )
    dims: list[int | str] = []
    for dim in dims_text.split(","):
        dim = dim.strip()
        if dim.isdigit():
            dims.append(int(dim))
        elif _SYMBOL.match(dim):
            dims.append(dim)
        else:
            raise BadInputError(
                f"bad dimension {dim!r} in --input {text!r}",
                "each dimension is a whole number or a symbol name such as batch",
            )
    return InputSpec(name, np.dtype(DTYPES[dtype_name]), tuple(dims))


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``["batch=4", "seq=16"]`` → ``{"batch": 4, "seq": 16}``."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _SYMBOL.match(name) or not value.isdigit() or int(value) < 1:
            raise BadInputError(f"bad --dim {item!r}", "use NAME=SIZE with SIZE ≥ 1, e.g. seq=16")
        dims[name] = int(value)
    return dims


def concrete_shape(spec: InputSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of ``spec`` with symbols (and unnamed dynamic dims) given sizes."""
    return tuple(
        d if isinstance(d, int) else dims.get(d, DEFAULT_DIM) if d else DEFAULT_DIM
        for d in spec.shape
    )


def resized_dims(dims: Mapping[str, int]) -> dict[str, int]:
    """A different size for every symbol, to check that dynamic axes really are dynamic."""
    return {name: size - 1 if size > 2 else size + 1 for name, size in dims.items()}


def generate_inputs(
    specs: Sequence[InputSpec],
    dims: Mapping[str, int],
    seed: int = 0,
    int_range: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded inputs: floats standard normal, integers in [0, 2) (valid as token ids and as
    masks alike) unless ``int_range`` gives [low, high) for that input, bools random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = concrete_shape(spec, dims)
        kind = spec.dtype.kind
        if kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif kind in "iu":
            low, high = (int_range or {}).get(spec.name, (0, 2))
            feeds[spec.name] = rng.integers(low, high, size=shape).astype(spec.dtype)
        elif kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise BadInputError(
                f"cannot generate inputs of dtype {spec.dtype} for {spec.name}",
                "pass real inputs with --data / --example",
            )
    return feeds


def symbols(specs: Sequence[InputSpec]) -> list[str]:
    """The symbolic dim names of ``specs``, in first-seen order."""
    seen: dict[str, None] = {}
    for spec in specs:
        for d in spec.shape:
            if isinstance(d, str):
                seen.setdefault(d)
    return list(seen)
