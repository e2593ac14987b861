"""Graph passes over ONNX models: pruning, int8 quantization, fp16.

Each pass family lives in its own module; this package exports the interface.
"""

from passes.base import Pass, PassResult, PassRunner, fingerprint, make_pass

__all__ = ["Pass", "PassResult", "PassRunner", "fingerprint", "make_pass"]
