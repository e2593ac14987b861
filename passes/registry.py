"""Pass names as recipes and ``auto`` write them, mapped to the pass classes (an explicit
table: nothing registers itself on import)."""

from __future__ import annotations

import os
from typing import Any

from converter.core.errors import BadInputError
from passes.base import Pass, make_pass
from passes.dynamic import DynamicQuantize
from passes.float_region import FloatRegion
from passes.fp16 import Float16
from passes.options import calibration_option, has_calibration
from passes.pack import Pack, Unpack
from passes.prune import MagnitudePrune
from passes.smooth import SmoothQuant
from passes.static import StaticQuantize

__all__ = ["PASS_TYPES", "make_recipe_pass"]

PASS_TYPES: dict[str, type[Pass]] = {
    "prune": MagnitudePrune,
    "quantize-dynamic": DynamicQuantize,
    "quantize-static": StaticQuantize,
    "fp16": Float16,
    "smooth": SmoothQuant,
    "pack": Pack,
    "unpack": Unpack,
    "float-region": FloatRegion,
}
_MODES = {"dynamic": "quantize-dynamic", "static": "quantize-static"}


def make_recipe_pass(
    name: str, settings: dict[str, Any], calibration: str | os.PathLike | None = None
) -> Pass:
    """Build the pass a recipe names. ``quantize`` takes ``mode = "dynamic" | "static"``;
    a pass whose declaration takes calibration data (static quantization, smoothing) gets
    the recipe's unless its settings give some (or ``ranges``)."""
    settings = dict(settings)
    if name == "quantize":
        mode = settings.pop("mode", None)
        if mode not in _MODES:
            raise BadInputError(
                f'quantize needs mode = "dynamic" or "static", got {mode!r}',
                'write { pass = "quantize", mode = "static" }',
            )
        name = _MODES[mode]
    if name not in PASS_TYPES:
        raise BadInputError(
            f"unknown pass {name!r}", f"use one of {sorted([*PASS_TYPES, 'quantize'])}"
        )
    kind = PASS_TYPES[name]
    data = calibration_option(kind.Settings)
    if data is not None and not has_calibration(kind.Settings, settings):
        if calibration is None:
            raise BadInputError(
                f"pass {name} needs calibration data", "set [data] calibration in the recipe"
            )
        settings[data.name] = str(calibration)
    return make_pass(kind, settings)
