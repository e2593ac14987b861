"""The two torch.onnx exporters behind ``onnxship export`` (dynamo, and TorchScript as its
fallback), run quietly: their prints go to the debug log, the TorchScript tracer's warnings
(a data-dependent Python value frozen into the graph) are recorded with the user's line."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converter.core.data import InputSpec
from converter.core.errors import ExportError
from converter.core.inputs import symbols

__all__ = ["export_any", "exporter_reason", "symbolic_axes", "torch_feeds"]

logger = logging.getLogger(__name__)


def torch_feeds(feeds: Mapping[str, np.ndarray]) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in feeds.values())


def export_any(
    model: Any,
    feeds: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    names: list[str],
    opset: int,
    exporter: str,
    tmp: str,
) -> tuple[Path, str, list[str], list[str]]:
    """Run the chosen exporter; ``auto`` falls back from dynamo to TorchScript, saying so.
    Returns the file, the exporter used, notes and the tracer's risks."""
    tried = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    errors: dict[str, str] = {}
    notes = []
    for name in tried:
        path = Path(tmp) / f"{name}.onnx"
        try:
            risks = _EXPORTERS[name](model, feeds, specs, names, opset, path)
        except Exception as e:  # exporters raise many types; each is reported below
            errors[name] = exporter_reason(e)
            logger.debug("%s exporter failed", name, exc_info=True)
            continue
        if errors:
            notes.append(f"dynamo exporter failed ({errors['dynamo']}); used torchscript")
            logger.warning("warning: " + notes[-1])
        return path, name, notes, risks
    detail = "; ".join(f"{k}: {v}" for k, v in errors.items())
    raise ExportError(
        f"the model could not be exported ({detail})",
        "replace the named op/construct with one ONNX supports, or try the other --exporter; "
        "--debug shows the full trace",
    )


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([^']+)'"),  # dynamo: no ONNX function for an aten op
    re.compile(r"operator '([^']+)'"),  # torchscript: UnsupportedOperatorError
    re.compile(r"function '\w*\(<function (\w+)"),  # dynamo: a torchlib function raised
)


def exporter_reason(e: BaseException) -> str:
    """The telling part of an exporter's error: the failing op when one is named, else the
    innermost exception's first line."""
    chain = []
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(err) for err in chain)
    for pattern in _OP_PATTERNS:
        match = pattern.search(text)
        if match:
            innermost = str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__]
            return f"op {match.group(1)} failed: {innermost[0][:200]}"
    lines = [ln.strip() for err in reversed(chain) for ln in str(err).splitlines() if ln.strip()]
    return f"{type(chain[-1]).__name__}: {lines[0][:300]}" if lines else type(chain[-1]).__name__


def _user_frame() -> str:
    """``file:line: code`` of the innermost frame outside torch, the stdlib and onnxship: the
    line of the user's model that made the tracer warn."""

    skip = (str(Path(os.__file__).parent), str(Path(__file__).parent))  # stdlib, onnxship
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" in name or name.startswith(skip) or name.startswith("<"):
            continue
        return f"{name}:{frame.lineno}: {(frame.line or '').strip()}"
    return "an unknown line"


@contextlib.contextmanager
def _recording_tracer_warnings(risks: list[str] | None):
    """Ignore the exporters' warnings, except torch.jit.TracerWarning: each one (a tensor
    turned into a Python bool/number, so the trace froze one branch or value) is appended
    to ``risks`` with the user's line that caused it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if risks is None:
            yield
            return
        import torch

        warnings.filterwarnings("always", category=torch.jit.TracerWarning)

        def record(message, category, filename, lineno, file=None, line=None):
            text = str(message).strip().split(". ")[0]
            entry = f"{_user_frame()} ({text[:120]})"
            if entry not in risks:
                risks.append(entry)

        warnings.showwarning = record
        yield


@contextlib.contextmanager
def _quiet_exporter(risks: list[str] | None = None):
    """Keep the exporters' prints (Python and C++, stdout and stderr) and warnings off the
    user's terminal; what they printed goes to the debug log. Tracer warnings go to
    ``risks`` (see _recording_tracer_warnings)."""
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink, _recording_tracer_warnings(risks):
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                yield
        finally:
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            torch_log.setLevel(level)
            sink.seek(0)
            logger.debug("exporter output:\n%s", sink.read().decode(errors="replace"))


def symbolic_axes(spec: InputSpec) -> dict[int, str]:
    """Axis → symbol name for the dynamic axes of one input."""
    return {axis: d for axis, d in enumerate(spec.shape) if isinstance(d, str)}


def _export_dynamo(model, feeds, specs, names, opset, path: Path) -> list[str]:
    """Export with torch.export (which refuses data-dependent branches rather than freezing
    them: no trace risks to report)."""
    import torch

    dim_objs = {s: torch.export.Dim(s) for s in symbols(specs)}
    dynamic = tuple(
        {axis: dim_objs[d] for axis, d in symbolic_axes(spec).items()} or None for spec in specs
    )
    options = {"dynamic_shapes": dynamic, "external_data": True, "verbose": False}
    _torch_export(model, feeds, specs, names, opset, path, dynamo=True, **options)
    return []


def _export_torchscript(model, feeds, specs, names, opset, path: Path) -> list[str]:
    """Export by tracing; returns the tracer's warnings (each with the user's line)."""
    axes = {spec.name: symbolic_axes(spec) for spec in specs}
    options = {"dynamic_axes": {k: v for k, v in axes.items() if v}, "do_constant_folding": True}
    risks: list[str] = []
    _torch_export(model, feeds, specs, names, opset, path, risks, dynamo=False, **options)
    return risks


def _torch_export(model, feeds, specs, names, opset, path, risks=None, **options) -> None:
    """torch.onnx.export with what both exporters share, quietly (see _quiet_exporter)."""
    import torch

    with _quiet_exporter(risks):
        torch.onnx.export(
            model,
            torch_feeds(feeds),
            str(path),
            input_names=[s.name for s in specs],
            output_names=names,
            opset_version=opset,
            **options,
        )


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}
