"""Foundation: errors, defaults, data, inputs, onnx I/O, runtime sessions, metrics, gates,
the executor, rendering and the machine. Imports nothing above it."""

__version__ = "0.1.0"
