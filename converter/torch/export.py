"""``onnxship export``: PyTorch → one ONNX file, verified numerically against torch.

Steps, each its own function: load the module, build the example input, export (dynamo,
falling back to TorchScript), check (onnx checker + shape inference), verify (onnxruntime vs
torch on the example and on a second input with other sizes on every dynamic axis), and only
then move the file into place.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort

from converter.core.data import Dataset, InputSpec
from converter.core.defaults import DEFAULT_OPSET, EXPORT_ATOL, EXPORT_RTOL, EXPORTERS
from converter.core.errors import BadInputError, ExportError, VerificationFailed, first_line
from converter.core.inputs import generate_inputs, parse_input_spec, resized_dims, symbols
from converter.core.onnxio import check_output_path, save_model
from converter.core.render import mb
from converter.torch.backends import export_any, exporter_reason, symbolic_axes, torch_feeds
from converter.torch.verify import Comparison, compare_outputs

__all__ = [
    "export",
    "export_module",
    "ExportSettings",
    "ExportReport",
    "ExportResult",
    "check_options",
    "example_inputs",
    "move_into_place",
]

logger = logging.getLogger(__name__)

EXAMPLE_SAMPLES = 16  # cap on samples traced from --example when the first axis is dynamic


@dataclass
class ExportReport:
    path: Path
    exporter: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    file_size: int
    parameters: int
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified: bool = True

    def summary(self) -> str:
        lines = [
            f"exported {self.path} with the {self.exporter} exporter, opset {self.opset}",
            f"  inputs:  {', '.join(self.inputs)}",
            f"  outputs: {', '.join(self.outputs)}",
            f"  size {mb(self.file_size)}, {self.parameters:,} parameters",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.verified:
            lines.append("  VERIFICATION SKIPPED (--no-verify): outputs were not compared")
        for comp in self.comparisons:
            rule = f"|onnx − torch| ≤ {comp.atol:g} + {comp.rtol:g}·|torch|"
            lines.append(f"  verified on {comp.label} ({rule} for every value):")
            lines += [
                f"    {o.name} {o.shape}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, "
                f"worst diff / allowed {o.worst_ratio:.3g}{'' if o.ok else '  FAIL'}"
                for o in comp.outputs
            ]
        return "\n".join(lines)


class ExportResult(NamedTuple):
    """``path, report = converter.export(...)``."""

    path: Path
    report: ExportReport


def export(
    spec: str,
    output: str | os.PathLike,
    inputs: Sequence[InputSpec | str],
    *,
    weights: str | os.PathLike | None = None,
    example: str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    output_names: Sequence[str] | None = None,
    exporter: str = "auto",
    opset: int = DEFAULT_OPSET,
    atol: float = EXPORT_ATOL,
    rtol: float = EXPORT_RTOL,
    verify: bool = True,
    seed: int = 0,
    accept_traced_branches: bool = False,
) -> ExportResult:
    """Export ``file.py:callable`` to ``output`` and verify it against torch.

    When the TorchScript tracer had to turn a tensor into a Python value (a data-dependent
    ``if``, a loop count, an index), the graph holds only the path the example took: that is
    refused (VerificationFailed, nothing written) naming the user's line, unless
    ``accept_traced_branches`` says the user accepts it."""
    try:
        from converter.torch import load as torchload
    except ImportError as e:
        raise BadInputError(
            f"export needs PyTorch ({e.name} is not installed)", "pip install 'onnxship[torch]'"
        ) from e

    specs = [parse_input_spec(s) if isinstance(s, str) else s for s in inputs]
    check_options(specs, exporter, opset, atol, rtol)
    out = check_output_path(output, *(p for p in (weights, example, spec.rpartition(":")[0])))
    model = torchload.load_module(spec)
    if weights is not None:
        torchload.load_weights(model, weights)
    feeds, dims = example_inputs(specs, dims or {}, example, seed)
    settings = ExportSettings(exporter, opset, atol, rtol, verify, seed, accept_traced_branches)
    return export_module(model, out, specs, feeds, dims, settings, output_names)


@dataclass(frozen=True)
class ExportSettings:
    """How a module is exported and verified (the options of ``export``)."""

    exporter: str = "auto"
    opset: int = DEFAULT_OPSET
    atol: float = EXPORT_ATOL
    rtol: float = EXPORT_RTOL
    verify: bool = True
    seed: int = 0
    accept_traced_branches: bool = False


def export_module(
    model: Any,
    out: Path,
    specs: Sequence[InputSpec],
    feeds: Mapping[str, np.ndarray],
    dims: Mapping[str, int],
    settings: ExportSettings,
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export an ``nn.Module`` already built (e.g. by ``shrink``) to ``out``: exporter, checker
    and shape inference, then verification on the inputs of :func:`_verification_inputs`;
    ``out`` is written only when everything passed."""
    s = settings
    names = _output_names(model, feeds, output_names)
    with tempfile.TemporaryDirectory(prefix=".onnxship-", dir=out.parent) as tmp:
        onnx_path, used, notes, risks = export_any(
            model, feeds, specs, names, s.opset, s.exporter, tmp
        )
        notes += _traced_branches(risks, s.accept_traced_branches)
        final = Path(tmp) / "final.onnx"
        _check_and_save(onnx_path, final, data_name=out.name + ".data")
        report = ExportReport(
            path=out,
            exporter=used,
            opset=s.opset,
            inputs=[_describe_io(v) for v in _graph_inputs(final)],
            outputs=[
                _describe_io(v)
                for v in onnx.load(str(final), load_external_data=False).graph.output
            ],
            file_size=final.stat().st_size,
            parameters=sum(p.numel() for p in model.parameters()),
            notes=notes,
            verified=s.verify,
        )
        if s.verify:
            _verify_or_raise(model, final, specs, feeds, dims, names, s, report)
        else:
            logger.warning("warning: --no-verify: the ONNX model was NOT compared with PyTorch")
        move_into_place(final, out)
    return ExportResult(out, report)


def _verify_or_raise(model, final, specs, feeds, dims, names, s: ExportSettings, report) -> None:
    report.comparisons = _verify(model, final, specs, feeds, dims, names, s.atol, s.rtol, s.seed)
    failures = [f for c in report.comparisons for f in c.failures()]
    if failures:
        error = VerificationFailed(
            "ONNX outputs differ from PyTorch: " + "; ".join(failures),
            "look for ops that behave differently in ONNX (try --exporter torchscript), "
            "or loosen --atol/--rtol if the differences are acceptable",
        )
        error.report = report
        raise error


def check_options(
    specs: Sequence[InputSpec], exporter: str, opset: int, atol: float, rtol: float
) -> None:
    if not specs:
        raise BadInputError("no --input given", "describe every forward() argument with --input")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BadInputError(f"input names repeat: {names}", "give every --input its own name")
    if exporter not in EXPORTERS:
        raise BadInputError(f"unknown exporter {exporter!r}", f"use one of {', '.join(EXPORTERS)}")
    if not 7 <= opset <= 23:
        raise BadInputError(f"opset {opset} is out of range", "use an opset from 7 to 23")
    if not (atol >= 0 and rtol >= 0):  # (NaN compares False: refused too)
        raise BadInputError(
            f"tolerances must be numbers ≥ 0 (got atol {atol}, rtol {rtol})",
            "pass --atol/--rtol ≥ 0",
        )


def example_inputs(
    specs: Sequence[InputSpec], dims: Mapping[str, int], example: Any, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Feeds for tracing and the size each symbol has in them."""
    if example is None:
        sizes = {s: dims.get(s, 2) for s in symbols(specs)}
        return generate_inputs(specs, sizes, seed), sizes
    data = Dataset(example)
    data.check(specs)
    feeds = next(data.batches(specs, batch_size=EXAMPLE_SAMPLES))
    sizes: dict[str, int] = {}
    for spec in specs:
        for axis, dim in symbolic_axes(spec).items():
            size = feeds[spec.name].shape[axis]
            if sizes.setdefault(dim, size) != size:
                raise BadInputError(
                    f"dynamic axis {dim!r} has sizes {sizes[dim]} and {size} in {example}",
                    "give arrays that agree on every shared axis",
                )
    small = [f"{d}={n}" for d, n in sizes.items() if n < 2]
    if small:
        raise BadInputError(
            f"dynamic axes {small} have size < 2 in {example}; torch.export specialises "
            "sizes 0 and 1",
            "give at least 2 samples (and length ≥ 2) on every dynamic axis",
        )
    return feeds, sizes


def _flatten(obj: Any) -> list:
    """Tensors of a (nested) tuple/list/dict output, in the order the exporters emit them."""
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _flatten(item)]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _flatten(value)]
    if obj is None:
        return []
    return [obj]


def _run_torch(model: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(*torch_feeds(feeds))
    return [t.detach().cpu().numpy() for t in _flatten(out)]


def _names_of(obj: Any, prefix: str) -> list[str]:
    """Output names from the structure the module returns, in _flatten's order: a dict's
    keys, a namedtuple's fields, ``prefix_i`` for plain tuples and lists."""
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in _names_of(v, _join(prefix, str(k)))]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return [n for k, v in zip(obj._fields, obj) for n in _names_of(v, _join(prefix, k))]
    if isinstance(obj, (tuple, list)):
        base = prefix or "output"
        return [n for i, v in enumerate(obj) for n in _names_of(v, f"{base}_{i}")]
    return [] if obj is None else [prefix or "output"]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _output_names(
    model: Any, feeds: Mapping[str, np.ndarray], given: Sequence[str] | None
) -> list[str]:
    """``given`` (checked against the number of outputs), else names from the structure."""
    import torch

    with torch.no_grad():
        out = model(*torch_feeds(feeds))
    found = _names_of(out, "")
    if not given:
        return (
            found if len(set(found)) == len(found) else [f"output_{i}" for i in range(len(found))]
        )
    if len(given) != len(found) or len(set(given)) != len(given):
        raise BadInputError(
            f"{len(given)} --output-name given ({', '.join(given)}) for a model with "
            f"{len(found)} outputs ({', '.join(found)})",
            f"give {len(found)} distinct names, in the order the model returns them",
        )
    return list(given)


def _traced_branches(risks: list[str], accepted: bool) -> list[str]:
    """Refuse a trace that froze data-dependent Python values, unless accepted (a note)."""
    if not risks:
        return []
    shown = "; ".join(risks[:3]) + (f"; and {len(risks) - 3} more" if len(risks) > 3 else "")
    if not accepted:
        raise VerificationFailed(
            "the exported graph may be wrong for inputs that take another path: the "
            f"TorchScript tracer froze a data-dependent Python value at {shown}",
            "make that code tensor-only (e.g. torch.where instead of `if`), or pass "
            "--accept-traced-branches if every input takes the same path",
        )
    note = f"accepted traced branches (--accept-traced-branches): {shown}"
    logger.warning("warning: %s", note)
    return [note]


def _check_and_save(src: Path, final: Path, data_name: str) -> None:
    """onnx checker and shape inference on the export, then one self-contained file."""
    try:
        onnx.checker.check_model(str(src), full_check=True)
        model = onnx.load(str(src))
        model = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(
            f"the exported model fails the onnx checker: {first_line(e)}",
            "try the other --exporter or another --opset; --debug shows the details",
        ) from e
    save_model(model, final, data_name)


def _graph_inputs(path: Path) -> list:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _describe_io(value: onnx.ValueInfoProto) -> str:
    t = value.type.tensor_type
    dims = ",".join(d.dim_param or str(d.dim_value) for d in t.shape.dim)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return f"{value.name}[{dims}] {dtype}"


def _verify(model, path, specs, feeds, dims, names, atol, rtol, seed) -> list[Comparison]:
    """Compare onnxruntime with torch on the example and on resized generated inputs."""

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_names = [o.name for o in session.get_outputs()]
    comparisons = []
    for label, case in _verification_inputs(specs, feeds, dims, seed):
        want = _run_torch(model, case)
        try:
            got = session.run(None, case)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
            comp = Comparison(label, atol, rtol)
            comp.problems.append(f"onnxruntime failed: {exporter_reason(e)}")
            comparisons.append(comp)
            continue
        comparisons.append(compare_outputs(label, onnx_names, got, names, want, atol, rtol))
    return comparisons


def _verification_inputs(specs, feeds, dims, seed) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The example; the example negated (float inputs) and new random values at its sizes,
    so that a graph frozen on the example's values shows; a resized input per dynamic axis."""
    ranges = {n: (int(a.min()), int(a.max()) + 1) for n, a in feeds.items() if a.dtype.kind in "iu"}
    same = {d: feeds[s.name].shape[axis] for s in specs for axis, d in symbolic_axes(s).items()}
    cases = [("the example input", dict(feeds))]
    if any(a.dtype.kind == "f" for a in feeds.values()):
        negated = {n: -a if a.dtype.kind == "f" else a for n, a in feeds.items()}
        cases.append(("the example negated", negated))
    cases.append(("new random values", generate_inputs(specs, same, seed + 2, ranges)))
    if dims:
        other = resized_dims(dims)
        text = ", ".join(f"{k}={v}" for k, v in other.items())
        cases.append((f"a resized input ({text})", generate_inputs(specs, other, seed + 1, ranges)))
    return cases


def move_into_place(final: Path, out: Path) -> None:
    data_name = out.name + ".data"
    if (final.parent / data_name).exists():  # a model over 2 GB: its external data first
        os.replace(final.parent / data_name, out.parent / data_name)
    os.replace(final, out)
