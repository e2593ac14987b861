"""The application: the Python API (here, names imported on first use), the command line
(``cli.py``, ``__main__.py``) and the old flat module paths (``_moved.py``).

onnxship: PyTorch → deployable ONNX, with the evidence that it is fit to ship.

The Python API mirrors the CLI. Names are imported on first use, so ``import converter``
stays fast and never imports torch (only ``export`` needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

from converter import _moved
from converter.core import __version__

# public name -> module that defines it (modules are named apart from the functions, so
# importing a module never shadows the function of the same name)
_API = {
    "export": "converter.torch.export",
    "ExportResult": "converter.torch.export",
    "ExportReport": "converter.torch.export",
    "validate": "converter.check.validate",
    "ValidationReport": "converter.check.validate",
    "bench": "converter.check.bench",
    "BenchReport": "converter.check.bench_report",
    "BenchGates": "converter.check.bench_gates",
    "shrink": "converter.torch.shrink",
    "ShrinkOptions": "converter.torch.shrink",
    "ShrinkReport": "converter.torch.shrink",
    "run_recipe": "converter.recipes.pipeline",
    "load_recipe": "converter.recipes.schema",
    "OnnxshipError": "converter.core.errors",
    "BadInputError": "converter.core.errors",
    "DataError": "converter.core.errors",
    "GateFailed": "converter.core.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'converter' has no attribute {name!r}")


_moved.install()  # the old flat module paths (converter.validation, ...) as aliases
