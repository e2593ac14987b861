"""Graph passes over ONNX models: pruning, int8 quantization, SmoothQuant scaling, fp16.

Each pass family lives in its own module; this package exports the interface and the passes,
imported on first use (the CLI reads ``passes.settings`` at start-up without loading onnx).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_API = {
    "Pass": "passes.base",
    "PassResult": "passes.base",
    "PassRunner": "passes.base",
    "fingerprint": "passes.base",
    "make_pass": "passes.base",
    "MagnitudePrune": "passes.prune",
    "DynamicQuantize": "passes.quantize",
    "StaticQuantize": "passes.quantize",
    "CalibrationRanges": "passes.quantize",
    "calibrate": "passes.quantize",
    "is_quantized": "passes.quantize",
    "Float16": "passes.fp16",
    "SmoothQuant": "passes.smooth",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'passes' has no attribute {name!r}")
