"""Per-tensor quantization error: SQNR (dB) and cosine of every tensor an int8 model
quantizes, against the fp32 model it was made from — the numbers onnxruntime's
``quantization.qdq_loss_debug`` computes, for static (QDQ) and dynamic models, in bounded
memory. ``sensitivity`` and ``auto`` report them.

Each record (:class:`TensorError`) is one tensor, worst (lowest SQNR) first:

- ``activation``: a float tensor quantized at run time (QuantizeLinear → DequantizeLinear in
  a QDQ model, DynamicQuantizeLinear in a dynamic one). ``sqnr_db``/``cosine``: the fp32
  model's value against its own int8 round trip with the int8 model's scale and zero point
  (static: calibrated; dynamic: computed per run, here per sample) — the error this tensor
  alone adds. ``propagated_*``: the fp32 value against the int8 model's dequantized value,
  which also carries every error upstream (qdq_loss_debug's ``xmodel_err``).
- ``weight``: an initializer stored as int8 (int32 for QDQ biases), fp32 against dequantized
  (qdq_loss_debug's ``compute_weight_error``). No propagated numbers.
- ``output`` (dynamic models): the output of a node dynamic quantization replaced (MatMul →
  DynamicQuantizeLinear + MatMulInteger + scale Muls...) that both models have by name:
  ``sqnr_db``/``cosine`` with only that node quantized (fp32 inputs), ``propagated_*`` in
  the int8 model.

SQNR = 20·log10(‖x‖ / ‖x − x̂‖) over every element of every sample, with onnxruntime's ε
floor (a tensor kept exact: 313 dB and more); it equals
``compute_signal_to_quantization_noice_ratio`` of the concatenated samples, but is summed one
sample at a time (one exception: an all-zero tensor kept exact, 0 dB there, is
:data:`EXACT_DB` here). Cosine is over the same elements (two zero tensors count as 1).

How: names are matched the way qdq_loss_debug matches them
(``create_activation_matching``: ``X`` ↔ ``X_DequantizeLinear_Output``, and a quantized
graph output ``X`` ↔ ``X_QuantizeLinear_Input``). The fp32 model gets copies of the int8
model's quantization nodes reading its own tensors (for a dynamic model: of every node that
replaced an fp32 one), so one fp32 run gives each tensor and its "alone" round trip; one int8
run gives the propagated values. Only the measured tensors are made outputs, and the
samples are run and summed one at a time: memory holds one sample's measured tensors. Both
run with graph optimizations off (as qdq_loss_debug's ``collect_activations`` does), so every
tensor keeps its name and the int8 model computes its reference semantics (float math on
dequantized values); the fused int8 kernels of an optimized session round slightly
differently — the output difference ``validate`` measures.

Why not qdq_loss_debug's ``qdq_err`` (the int8 model's value before QuantizeLinear vs after
DequantizeLinear): where onnxruntime folded a Relu into the node before it, letting the uint8
range clip the negatives, that "before" value is the one before the Relu, so the number
measures the Relu. And its ``create_weight_matching`` subtracts uint8 zero points in uint8
(wrapping: −17 dB on a digits MLP whose int8 weights give 39 dB), so weights are dequantized
here with widened integers.

``fp32`` must be the model the quantization pass quantized: the pass pre-processes
(``quant_pre_process`` folds BatchNorm into Conv weights under new names), so give it
``prepare_reference(model)`` — ``sensitivity`` has that model already. A tensor the fp32
model lacks by name (or has with another shape) is left out.

The parts: :mod:`~converter.check.tensor_error` (the record, its sums and its table rows),
:mod:`~converter.check.node_error_graphs` (the probes and the two augmented models); this
module runs and measures them, and reads the int8 weights.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from converter.check.node_error_graphs import Graphs, Probe, readers_of
from converter.check.tensor_error import ERROR_HEADER, EXACT_DB, Sums, TensorError, error_rows
from converter.core.data import model_input_specs, open_data
from converter.core.defaults import NODE_ERROR_SAMPLES as DEFAULT_SAMPLES
from converter.core.runtime import make_session, run_session
from passes.ort import preprocess

__all__ = [
    "node_errors",
    "TensorError",
    "prepare_reference",
    "sample_feeds",
    "error_rows",
    "ERROR_HEADER",
    "EXACT_DB",
    "DEFAULT_SAMPLES",
]

logger = logging.getLogger(__name__)

KINDS = ("activation", "output", "weight", "bias")  # tie order in the ranking
# int32 biases rank after every other tensor: bias correction moves them on purpose (their
# "error" against the fp32 bias is the correction), and rounding alone leaves them exact
LAST = ("bias",)


def node_errors(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    threads: int = 1,
) -> list[TensorError]:
    """The error of every tensor ``quantized`` quantizes, against ``fp32`` (the model the
    pass quantized: see :func:`prepare_reference`), on ``feeds`` (one run each; a few
    samples of batch 1 are plenty), worst SQNR first. Deterministic for the same models,
    feeds and onnxruntime version."""
    graphs = Graphs(fp32, quantized)
    probes = graphs.probes()
    sums = _measure(graphs, probes, feeds, threads) if probes else {}
    records = [p.record(sums[p.tensor]) for p in probes if p.tensor in sums]
    records += _weight_errors(graphs)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(
        records,
        key=lambda r: (r.kind in LAST, _worst_first(r.sqnr_db), order[r.kind], r.tensor),
    )


def _worst_first(sqnr: float) -> float:
    return -math.inf if math.isnan(sqnr) else sqnr


def prepare_reference(model: onnx.ModelProto, enabled: bool = True) -> onnx.ModelProto:
    """``model`` pre-processed as the int8 passes pre-process it (``quant_pre_process``),
    so that its tensor and weight names are those of the int8 model."""

    with tempfile.TemporaryDirectory(prefix="onnxship-node-error-") as tmp:
        return preprocess(model, Path(tmp), enabled).model


def sample_feeds(
    data: str | os.PathLike, model: onnx.ModelProto, samples: int = DEFAULT_SAMPLES
) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` samples of ``data``, one per feed (batch 1 unless the model
    fixes its batch size), without labels."""

    specs = model_input_specs(model)
    dataset = open_data(data, specs)
    size = dataset.batch_size_for(specs, 1)
    return list(dataset.batches(specs, size, limit=samples, check_finite=True))


# ---------------------------------------------------------------- measuring


def _measure(
    graphs: Graphs,
    probes: Sequence[Probe],
    feeds: Iterable[Mapping[str, np.ndarray]],
    threads: int,
) -> dict[str, tuple[Sums, Sums]]:
    """Each probe's (alone, propagated) sums over ``feeds``, one run of each augmented model
    per feed; probes whose fp32 and int8 shapes differ are dropped."""
    fp32, int8 = (
        make_session(m.SerializeToString(), threads, optimize=False, built=True)
        for m in (graphs.fp32_model(probes), graphs.int8_model(probes))
    )
    sums = {p.tensor: (Sums(), Sums()) for p in probes}
    dropped: set[str] = set()
    for feed in feeds:
        f = dict(feed) | _named(fp32, run_session(fp32, feed, "the fp32 model (augmented)"))
        q = _named(int8, run_session(int8, feed, "the int8 model (augmented)"))
        for p in probes:
            x, alone, propagated = f[p.tensor], f[p.alone], q[p.propagated]
            if p.tensor in dropped or not np.shape(x) == np.shape(alone) == np.shape(propagated):
                dropped.add(p.tensor)
                continue
            sums[p.tensor][0].add(x, alone)
            sums[p.tensor][1].add(x, propagated)
    for name in sorted(dropped):
        logger.debug("node errors: %s has different shapes in the two models; left out", name)
    return {k: v for k, v in sums.items() if k not in dropped}


def _named(session, values: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    return {o.name: v for o, v in zip(session.get_outputs(), values)}


# ---------------------------------------------------------------- weights


def _weight_errors(graphs: Graphs) -> list[TensorError]:
    """fp32 vs dequantized, per int8 initializer whose fp32 tensor the fp32 model has."""
    readers = readers_of(graphs.fp32)
    out = []
    for name, weight, dequantized, bits in _dequantized_weights(graphs):
        if weight.shape != dequantized.shape:
            continue
        sums = Sums()
        sums.add(weight, dequantized)
        nodes = tuple(n.name for n in readers.get(name, ()))
        kind = "bias" if bits == onnx.TensorProto.INT32 else "weight"
        out.append(TensorError(name, kind, nodes, sums.sqnr_db(), sums.cosine()))
    return out


def _dequantized_weights(graphs: Graphs) -> Iterable[tuple[str, np.ndarray, np.ndarray, int]]:
    """(fp32 name, fp32 value, dequantized value, integer type) of every int initializer named
    ``<name>_quantized`` (onnxruntime's naming), in name order. Its scale and zero point
    come from the DequantizeLinear reading it (QDQ) or from ``<name>_scale`` and
    ``<name>_zero_point`` (dynamic; a MatMul weight ``<name>_Transposed`` is the fp32
    Gemm weight transposed)."""
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

    readers = readers_of(graphs.q)
    for qname, tensor in sorted(graphs.q_inits.items()):
        if not qname.endswith(TENSOR_NAME_QUANT_SUFFIX):
            continue
        base = qname[: -len(TENSOR_NAME_QUANT_SUFFIX)]
        params = _quant_params(graphs.q_inits, readers.get(qname, ()), qname, base)
        found = _fp32_weight(graphs.fp32_inits, base)
        if params is None or found is None:
            continue
        name, weight = found
        yield name, weight, _dequant(numpy_helper.to_array(tensor), *params), tensor.data_type


def _quant_params(
    inits: Mapping[str, onnx.TensorProto], readers: Sequence[onnx.NodeProto], qname: str, base: str
) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    """(scale, zero point, axis; None: pick by size) of the int8 initializer ``qname``."""
    dq = next((n for n in readers if n.op_type == "DequantizeLinear" and n.input[0] == qname), None)
    if dq is not None:
        names = list(dq.input[1:3])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    else:
        names = [base + "_scale", base + "_zero_point"]
        last = any(n.op_type == "MatMulInteger" for n in readers)
        axis = -1 if last else None
    if names[0] not in inits:
        return None
    scale = numpy_helper.to_array(inits[names[0]])
    zp_name = names[1] if len(names) > 1 else ""
    zero = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else np.zeros_like(scale)
    return scale, zero, axis


def _fp32_weight(inits: Mapping[str, onnx.TensorProto], base: str) -> tuple[str, np.ndarray] | None:
    if base in inits:
        return base, numpy_helper.to_array(inits[base])
    original = base.removesuffix("_Transposed")
    if original != base and original in inits:
        weight = numpy_helper.to_array(inits[original])
        return (original, weight.T) if weight.ndim == 2 else None
    return None


def _dequant(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None) -> np.ndarray:
    """DequantizeLinear in numpy, integers widened (no uint8 wrap-around), float32 result;
    per-axis parameters broadcast along ``axis`` (None: the first axis of their size)."""
    shape: list[int] = []
    if scale.size > 1:
        if axis is None:
            axis = next((a for a, n in enumerate(q.shape) if n == scale.size), 0)
        shape = [1] * q.ndim
        shape[axis] = scale.size
    centered = q.astype(np.int64) - zero.astype(np.int64).reshape(shape)
    return centered.astype(np.float32) * scale.astype(np.float32).reshape(shape)
