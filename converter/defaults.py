"""User-visible defaults shared by the Python API and the CLI (no heavy imports here)."""

# Opset 18: the dynamo exporter's own default in torch 2.13, written natively by both
# exporters and run by every onnxruntime since 1.14.
DEFAULT_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
EXPORT_ATOL = 1e-4
EXPORT_RTOL = 1e-3
