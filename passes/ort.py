"""onnxruntime.quantization plumbing shared by the int8 passes: loading it without torch,
keeping its log lines and prints off the terminal, pre-processing (``quant_pre_process``
with its fallbacks), and turning its failures into PassError."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime

from converter.core.errors import PassError, first_line
from converter.core.onnxio import save_model, serialized_below_2gb

__all__ = ["Prepared", "preprocess", "optimize"]

logger = logging.getLogger(__name__)


def _load_ort_tools_without_torch() -> None:
    """onnxruntime.quantization imports onnxruntime.tools, whose __init__ imports torch
    whenever torch is installed (for a helper onnxship never uses): 1-5 s and ~400 MB per
    quantize call. Load that package once with torch hidden from its find_spec check;
    torch itself stays importable (and untouched when something already imported it)."""

    if "onnxruntime.tools" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # find_spec("torch") → None
    try:
        importlib.import_module("onnxruntime.tools")
    finally:
        del sys.modules["torch"]


@contextlib.contextmanager
def ort_quiet() -> Iterator[list[str]]:
    """Route onnxruntime.quantization's root-logger warnings and print() chatter to our
    debug log instead of the user's terminal; yields the captured warning messages."""
    captured: list[str] = []

    class _Capture(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "onnxruntime" not in record.pathname:
                return True
            message = record.getMessage()
            if record.levelno >= logging.WARNING and message not in captured:
                captured.append(message)
            logger.debug("onnxruntime: %s", message)
            return False

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            _Capture().filter(record)

    class _Stdout(io.TextIOBase):
        def write(self, text: str) -> int:
            if text.strip():
                logger.debug("onnxruntime: %s", text.strip())
            return len(text)

    root, ort_log = logging.getLogger(), logging.getLogger("onnxruntime")
    capture, handler, propagate = _Capture(), _Handler(), ort_log.propagate
    root.addFilter(capture)
    ort_log.addHandler(handler)
    ort_log.propagate = False
    try:
        with contextlib.redirect_stdout(_Stdout()):
            yield captured
    finally:
        root.removeFilter(capture)
        ort_log.removeHandler(handler)
        ort_log.propagate = propagate


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


@dataclass
class Prepared:
    """The model ORT quantizes: a file in the temp folder, its proto, and how it was made."""

    path: Path
    model: onnx.ModelProto
    note: str


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    """chdir for the duration: ORT's symbolic shape inference, when it fails, writes
    sym_shape_infer_temp.onnx (+ a .data file) into the current folder — the user's."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def preprocess(
    model: onnx.ModelProto, folder: Path, enabled: bool = True, symbolic: bool = True
) -> Prepared:
    """Run ``quant_pre_process`` on ``model`` in ``folder``, falling back step by step.
    ``symbolic=False`` (dynamic mode, which needs no activation shapes) runs ORT's basic
    optimization alone, from memory (:func:`optimize`): no symbolic shape inference (it
    imports sympy, 0.4 s) and no ONNX shape inference (``quantize_dynamic`` runs its own)."""
    if enabled and not symbolic:
        data = serialized_below_2gb(model)
        if data is not None:  # above 2 GB: quant_pre_process, which handles external data
            return optimize(model, folder, data)
    source = save_model(model, folder / "input.onnx")
    if not enabled:
        return Prepared(source, model, "off (--no-preprocess)")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = [  # auto_merge: dims that symbolic inference cannot prove equal (a dynamo
        # export's Min(512, seq) vs seq) are merged instead of failing the whole pre-process
        ("symbolic shape inference + optimization", {"auto_merge": True}),
        ("ONNX shape inference + optimization", {"skip_symbolic_shape": True}),
    ]
    failures = []
    for label, options in attempts:
        target = folder / "preprocessed.onnx"
        try:
            with ort_quiet(), _working_dir(folder):
                quant_pre_process(str(source), str(target), **options)
            note = label + (f" (after: {'; '.join(failures)})" if failures else "")
            if failures:
                logger.warning("pre-processing: %s", note)
            return Prepared(target, onnx.load(str(target)), note)
        except Exception as e:  # ORT raises Exception, ValueError, RuntimeError, Fail...
            failures.append(f"{label} failed: {first_line(e)}")
    note = "failed, quantizing the model as it is (" + "; ".join(failures) + ")"
    logger.warning(
        "pre-processing %s — quantization may skip tensors of unknown shape; "
        "--no-preprocess silences this",
        note,
    )
    return Prepared(source, model, note)


def optimize(model: onnx.ModelProto, folder: Path, data: bytes | None = None) -> Prepared:
    """ORT's basic graph optimization (constant folding, redundant nodes, MatMul + Add
    fusion: the optimization step of ``quant_pre_process``) of ``model`` (``data``: its
    serialized bytes, when the caller has them), from memory, written once by ORT itself,
    with ORT's value_info. A model ORT cannot load (a custom op) is quantized as it is,
    saying why."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    target = folder / "preprocessed.onnx"
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(target)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        with ort_quiet():
            onnxruntime.InferenceSession(
                data or model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
    except Exception as e:  # onnxruntime raises Fail, InvalidGraph, NotImplemented...
        note = f"failed, quantizing the model as it is (optimization failed: {first_line(e)})"
        logger.warning("pre-processing %s", note)
        return Prepared(save_model(model, folder / "input.onnx"), model, note)
    prepared = onnx.load(str(target))
    # The mark quantize_dynamic looks for (else it asks for pre-processing), added to the file
    # without writing it again: protobuf parses concatenated messages as one, merged, so a
    # ModelProto holding only the metadata entry, appended, adds that entry.
    mark = onnx.ModelProto()
    add_pre_process_metadata(mark)
    known = {p.key for p in prepared.metadata_props}
    if any(p.key not in known for p in mark.metadata_props):
        with open(target, "ab") as f:
            f.write(mark.SerializeToString())
        add_pre_process_metadata(prepared)
    return Prepared(target, prepared, "optimization")


def run_ort(what: str, function, *args, **kwargs) -> None:
    """Call an onnxruntime.quantization entry point; any failure becomes a PassError."""
    try:
        function(*args, **kwargs)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # ORT raises ValueError, KeyError, AssertionError, Fail...
        raise PassError(
            f"onnxruntime could not {what}: {first_line(e)}",
            "keep the failing node in fp32 with --exclude NAME or --exclude-op TYPE, or retry "
            "with/without --no-preprocess; --debug shows the details",
        ) from e


def method_enum(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
        "mean_minmax": CalibrationMethod.MinMax,  # ranges come from passes.calibration
        "mse": CalibrationMethod.MinMax,  # ranges come from passes.mse_range
    }[method]


_load_ort_tools_without_torch()
