"""Checks on ONNX models: validate, bench and its gates, per-node errors, sensitivity, profile."""
