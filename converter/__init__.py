"""onnxship: PyTorch → deployable ONNX, with the evidence that it is fit to ship.

The Python API mirrors the CLI. Names are imported on first use, so ``import converter``
stays fast and never imports torch (only ``export`` needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (modules are named apart from the functions, so
# importing a module never shadows the function of the same name)
_API = {
    "export": "converter.exporter",
    "ExportResult": "converter.exporter",
    "ExportReport": "converter.exporter",
    "validate": "converter.validation",
    "ValidationReport": "converter.validation",
    "bench": "converter.benchmark",
    "BenchReport": "converter.benchmark",
    "BenchGates": "converter.benchmark",
    "shrink": "converter.shrinker",
    "ShrinkOptions": "converter.shrinker",
    "ShrinkReport": "converter.shrinker",
    "run_recipe": "converter.pipeline",
    "load_recipe": "converter.recipe",
    "OnnxshipError": "converter.errors",
    "BadInputError": "converter.errors",
    "DataError": "converter.errors",
    "GateFailed": "converter.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'converter' has no attribute {name!r}")
