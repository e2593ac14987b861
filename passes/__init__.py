"""Graph passes over ONNX models: pruning, int8 quantization, SmoothQuant scaling, fp16.

Each pass family lives in its own module; this package exports the interface and the passes.
"""

from passes.base import Pass, PassResult, PassRunner, fingerprint, make_pass
from passes.fp16 import Float16
from passes.prune import MagnitudePrune
from passes.quantize import (
    CalibrationRanges,
    DynamicQuantize,
    StaticQuantize,
    calibrate,
    is_quantized,
)
from passes.smooth import SmoothQuant

__all__ = [
    "Pass",
    "PassResult",
    "PassRunner",
    "fingerprint",
    "make_pass",
    "MagnitudePrune",
    "DynamicQuantize",
    "StaticQuantize",
    "CalibrationRanges",
    "calibrate",
    "is_quantized",
    "Float16",
    "SmoothQuant",
]
