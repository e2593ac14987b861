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
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from converter.core import defaults
from converter.core.data import model_input_specs, open_data
from converter.core.gates import json_number as _num
from converter.core.render import cell
from converter.core.runtime import make_session, run_session
from passes.ort import preprocess
from passes.quant_report import is_quant_op  # (loads onnxruntime.quantization without torch)

__all__ = [
    "node_errors",
    "TensorError",
    "prepare_reference",
    "sample_feeds",
    "error_rows",
    "ERROR_HEADER",
    "DEFAULT_SAMPLES",
]

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = defaults.NODE_ERROR_SAMPLES
KINDS = ("activation", "output", "weight")  # tie order in the ranking
_LOCAL = "/onnxship_alone"  # suffix of the copies in the fp32 model
_DQ = "/onnxship_dequantized"  # a dynamic activation's int8 value, dequantized
_EPS = float(np.finfo(float).eps)  # onnxruntime's floor in its SQNR
EXACT_DB = 20 * math.log10(1 / _EPS)  # 313.1 dB: a unit-norm tensor kept exact


@dataclass(frozen=True)
class TensorError:
    """One quantized tensor: its error alone (``sqnr_db``, ``cosine``) and, for activations
    and node outputs, propagated through the int8 model (see the module docstring)."""

    tensor: str
    kind: str  # activation | output | weight
    nodes: tuple[str, ...]  # the nodes reading it as int8 (activation, weight) or making it
    sqnr_db: float
    cosine: float
    propagated_sqnr_db: float | None = None
    propagated_cosine: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorError:
        """The inverse of :meth:`to_dict` (a number JSON made null comes back as NaN)."""
        nan = float("nan")
        return cls(
            d["tensor"],
            d["kind"],
            tuple(d["nodes"]),
            nan if d["sqnr_db"] is None else d["sqnr_db"],
            nan if d["cosine"] is None else d["cosine"],
            d["propagated_sqnr_db"],
            d["propagated_cosine"],
        )

    def to_dict(self) -> dict:
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "nodes": list(self.nodes),
            "sqnr_db": _num(self.sqnr_db),
            "cosine": _num(self.cosine),
            "propagated_sqnr_db": _num(self.propagated_sqnr_db),
            "propagated_cosine": _num(self.propagated_cosine),
        }


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
    graphs = _Graphs(fp32, quantized)
    probes = graphs.probes()
    sums = _measure(graphs, probes, feeds, threads) if probes else {}
    records = [p.record(sums[p.tensor]) for p in probes if p.tensor in sums]
    records += _weight_errors(graphs)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(records, key=lambda r: (_worst_first(r.sqnr_db), order[r.kind], r.tensor))


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


# ---------------------------------------------------------------- the two graphs


@dataclass(frozen=True)
class _Probe:
    """A tensor to measure: its fp32 name, its "alone" copy in the augmented fp32 model and
    its int8 value in the augmented int8 model."""

    tensor: str
    kind: str
    nodes: tuple[str, ...]
    alone: str
    propagated: str

    def record(self, sums: tuple[_Sums, _Sums]) -> TensorError:
        alone, propagated = sums
        return TensorError(
            self.tensor,
            self.kind,
            self.nodes,
            alone.sqnr_db(),
            alone.cosine(),
            propagated.sqnr_db(),
            propagated.cosine(),
        )


class _Graphs:
    """The fp32 and int8 models, indexed once; builds the probes and augmented models."""

    def __init__(self, fp32: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
        self.fp32, self.q = fp32, quantized
        self.inputs = {i.name for i in fp32.graph.input}
        self.values = self.inputs | {o for n in fp32.graph.node for o in n.output if o}
        self.fp32_inits = {t.name: t for t in fp32.graph.initializer}
        self.q_inits = {t.name: t for t in quantized.graph.initializer}
        self.q_producer = {o: n for n in quantized.graph.node for o in n.output if o}
        self.kept = {(n.name, n.op_type) for n in quantized.graph.node}
        self.fp32_nodes = {(n.name, n.op_type) for n in fp32.graph.node}
        self.qdq = any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
        self.alias: dict[str, str] = {}  # int8-model name → fp32 name (quantized graph outputs)
        self.extra: list[onnx.NodeProto] = []  # DequantizeLinear of dynamic activations
        self.copies: list[onnx.NodeProto] = []
        self.renamed: dict[str, str] = {}  # int8-model tensor → its copy's in the fp32 model
        self.tainted: set[str] = set()  # copies' outputs computed from int8 data

    def probes(self) -> list[_Probe]:
        if self.qdq:
            matches = self._qdq_matches()
            self._copy(self._is_qdq_activation_node)
            return self._qdq_probes(matches)
        self._copy(self._replaces_fp32)
        return self._dynamic_probes()

    # ------------------------------------------------------------ QDQ (static)

    def _qdq_matches(self) -> dict[str, tuple[str, str]]:
        """fp32 activation name → (the int8 model's name for its value before
        QuantizeLinear, the DequantizeLinear output that replaces it), by qdq_loss_debug's own
        name matching (given names for tensors, it pairs names)."""
        from onnxruntime.quantization.qdq_loss_debug import create_activation_matching

        names = {i.name for i in self.q.graph.input} | set(self.q_producer)
        matched = create_activation_matching({n: n for n in names})
        out = {}
        for act, pair in sorted(matched.items()):
            pre, post = pair["pre_qdq"], pair["post_qdq"]
            dq = self.q_producer.get(post)
            q = self.q_producer.get(dq.input[0]) if dq is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or q is None:
                continue
            if q.op_type != "QuantizeLinear" or act not in self.values:
                continue
            if pre != act:
                self.alias[pre] = act
            out[act] = (pre, post)
        return out

    def _is_qdq_activation_node(self, node: onnx.NodeProto) -> bool:
        if node.op_type == "QuantizeLinear":
            return node.input[0] not in self.q_inits
        source = self.q_producer.get(node.input[0]) if node.input else None
        return (
            node.op_type == "DequantizeLinear"
            and source is not None
            and (source.op_type == "QuantizeLinear")
        )

    def _qdq_probes(self, matches: Mapping[str, tuple[str, str]]) -> list[_Probe]:
        """One per activation; its nodes are those reading it as int8 (a graph output: the
        node making it)."""
        readers = _readers(self.q)
        probes = []
        for act, (pre, post) in matches.items():
            if post not in self.renamed:
                continue
            made_by = [self.q_producer[pre]] if pre in self.q_producer else []
            nodes = tuple(n.name for n in readers.get(post, made_by))
            probes.append(_Probe(act, "activation", nodes, self.renamed[post], post))
        return probes

    # ------------------------------------------------------------ dynamic

    def _replaces_fp32(self, node: onnx.NodeProto) -> bool:
        """A node of the int8 model that the fp32 one does not have, or that reads a tensor
        only the int8 model has (a Gather of a quantized embedding table)."""
        if (node.name, node.op_type) not in self.fp32_nodes:
            return True
        return any(i and i not in self.values and i not in self.fp32_inits for i in node.input)

    def _dynamic_probes(self) -> list[_Probe]:
        fp32_readers = _readers(self.fp32)
        replaced = [n for n in self.fp32.graph.node if (n.name, n.op_type) not in self.kept]
        replaced_names = {n.name for n in replaced}
        probes = []
        for node in self.q.graph.node:  # activations: DynamicQuantizeLinear inputs
            x = node.input[0] if node.op_type == "DynamicQuantizeLinear" else ""
            if x not in self.values or node.output[0] not in self.renamed:
                continue
            self.extra.append(_dequantize(node.output, x + _DQ))
            readers = tuple(n.name for n in fp32_readers.get(x, ()) if n.name in replaced_names)
            probes.append(_Probe(x, "activation", readers, x + _DQ + _LOCAL, x + _DQ))
        seen = {p.tensor for p in probes}
        for node in replaced:  # outputs of the nodes dynamic quantization replaced
            for o in node.output:
                if o in self.renamed and self.renamed[o] in self.tainted and o not in seen:
                    probes.append(_Probe(o, "output", (node.name,), self.renamed[o], o))
                    seen.add(o)
        return probes

    # ------------------------------------------------------------ copies and models

    def _copy(self, picked: Callable[[onnx.NodeProto], bool]) -> None:
        """Copies of the int8 model's ``picked`` nodes, reading the fp32 model's tensors
        where the int8 model reads a tensor both have; a node whose inputs cannot all be
        found is left out (and so is what reads it)."""
        for node in self.q.graph.node:
            if not picked(node):
                continue
            inputs = [self._resolve(i) for i in node.input]
            if any(i is None for i in inputs):
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = node.name + _LOCAL
            del copy.input[:]
            copy.input.extend(inputs)
            from_int8 = is_quant_op(node.op_type) or any(i in self.tainted for i in inputs)
            for k, o in enumerate(node.output):
                if o:
                    self.renamed[o] = copy.output[k] = o + _LOCAL
                    if from_int8:
                        self.tainted.add(copy.output[k])
            self.copies.append(copy)

    def _resolve(self, name: str) -> str | None:
        """What a copy reads for the int8 model's tensor ``name``: the fp32 tensor when both
        models have it (so each copy sees fp32 inputs: "alone"), else an earlier copy's
        output, else the int8 model's initializer; None when there is none."""
        name = self.alias.get(name, name)
        if not name or name in self.values or name in self.fp32_inits:
            return name
        if name in self.renamed:
            return self.renamed[name]
        return name if name in self.q_inits else None

    def fp32_model(self, probes: Sequence[_Probe]) -> onnx.ModelProto:
        """The fp32 model with the copies, and every probe's tensor and copy as outputs."""
        out = onnx.ModelProto()
        out.CopyFrom(self.fp32)
        added = self.copies + [_with_suffix(n, _LOCAL, self.renamed) for n in self.extra]
        out.graph.node.extend(added)
        used = {i for n in added for i in n.input} - set(self.fp32_inits)
        out.graph.initializer.extend(t for name, t in sorted(self.q_inits.items()) if name in used)
        del out.opset_import[:]
        out.opset_import.extend(self.q.opset_import)
        wanted = [p.tensor for p in probes if p.tensor not in self.inputs]
        _add_outputs(out, wanted + [p.alone for p in probes])
        return out

    def int8_model(self, probes: Sequence[_Probe]) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(self.q)
        out.graph.node.extend(self.extra)
        _add_outputs(out, [p.propagated for p in probes])
        return out


def _readers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in dict.fromkeys(node.input):
            out.setdefault(i, []).append(node)
    return out


def _dequantize(quantized: Sequence[str], output: str) -> onnx.NodeProto:
    """DequantizeLinear of a DynamicQuantizeLinear's (y, scale, zero point)."""
    return onnx.helper.make_node("DequantizeLinear", list(quantized[:3]), [output], name=output)


def _with_suffix(node: onnx.NodeProto, suffix: str, renamed: Mapping[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = node.name + suffix
    del copy.input[:]
    copy.input.extend(renamed.get(i, i) for i in node.input)
    copy.output[0] = node.output[0] + suffix
    return copy


def _add_outputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Make ``names`` graph outputs (onnxruntime takes them without type information)."""
    have = {o.name for o in model.graph.output}
    for name in dict.fromkeys(names):
        if name not in have:
            model.graph.output.add().name = name


# ---------------------------------------------------------------- measuring


class _Sums:
    """Running sums of one comparison (reference x, candidate y) in float64."""

    def __init__(self) -> None:
        self.xx = self.yy = self.xy = self.dd = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        d = x - y
        self.xx += float(x @ x)
        self.yy += float(y @ y)
        self.xy += float(x @ y)
        self.dd += float(d @ d)

    def sqnr_db(self) -> float:
        """onnxruntime's compute_signal_to_quantization_noice_ratio, from the sums; an all-zero
        tensor kept exact gets :data:`EXACT_DB` (onnxruntime: 0 dB, which would rank it worst)."""
        if self.xx == 0 and self.dd == 0:
            return EXACT_DB
        signal = max(math.sqrt(self.xx), _EPS)
        noise = max(math.sqrt(self.dd), _EPS)
        return 20 * math.log10(signal / noise)

    def cosine(self) -> float:
        if self.xx == 0 and self.yy == 0:
            return 1.0
        if self.xx == 0 or self.yy == 0:
            return 0.0
        return max(-1.0, min(1.0, self.xy / math.sqrt(self.xx * self.yy)))


def _measure(
    graphs: _Graphs,
    probes: Sequence[_Probe],
    feeds: Iterable[Mapping[str, np.ndarray]],
    threads: int,
) -> dict[str, tuple[_Sums, _Sums]]:
    """Each probe's (alone, propagated) sums over ``feeds``, one run of each augmented model
    per feed; probes whose fp32 and int8 shapes differ are dropped."""
    fp32 = make_session(graphs.fp32_model(probes).SerializeToString(), threads, optimize=False)
    int8 = make_session(graphs.int8_model(probes).SerializeToString(), threads, optimize=False)
    sums = {p.tensor: (_Sums(), _Sums()) for p in probes}
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


def _weight_errors(graphs: _Graphs) -> list[TensorError]:
    """fp32 vs dequantized, per int8 initializer whose fp32 tensor the fp32 model has."""
    readers = _readers(graphs.fp32)
    out = []
    for name, weight, dequantized in _dequantized_weights(graphs):
        if weight.shape != dequantized.shape:
            continue
        sums = _Sums()
        sums.add(weight, dequantized)
        nodes = tuple(n.name for n in readers.get(name, ()))
        out.append(TensorError(name, "weight", nodes, sums.sqnr_db(), sums.cosine()))
    return out


def _dequantized_weights(graphs: _Graphs) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
    """(fp32 name, fp32 value, dequantized value) of every int initializer named
    ``<name>_quantized`` (onnxruntime's naming), in name order. Its scale and zero point
    come from the DequantizeLinear reading it (QDQ) or from ``<name>_scale`` and
    ``<name>_zero_point`` (dynamic; a MatMul weight ``<name>_Transposed`` is the fp32
    Gemm weight transposed)."""
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

    readers = _readers(graphs.q)
    for qname, tensor in sorted(graphs.q_inits.items()):
        if not qname.endswith(TENSOR_NAME_QUANT_SUFFIX):
            continue
        base = qname[: -len(TENSOR_NAME_QUANT_SUFFIX)]
        params = _quant_params(graphs.q_inits, readers.get(qname, ()), qname, base)
        found = _fp32_weight(graphs.fp32_inits, base)
        if params is None or found is None:
            continue
        name, weight = found
        yield name, weight, _dequant(numpy_helper.to_array(tensor), *params)


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


# ---------------------------------------------------------------- rendering

ERROR_HEADER = ["tensor", "kind", "node", "SQNR (dB)", "cosine", "propagated SQNR (dB)"]


def error_rows(records: Sequence[TensorError], top: int | None = None) -> list[list[str]]:
    """Table rows (``ERROR_HEADER``) of the first ``top`` records, for the CLI and reports."""

    rows = []
    for r in records[:top] if top else records:
        nodes = ", ".join(r.nodes[:1]) + (f" +{len(r.nodes) - 1}" if len(r.nodes) > 1 else "")
        rows.append(
            [
                r.tensor,
                r.kind,
                nodes,
                cell(r.sqnr_db, ".1f"),
                cell(r.cosine, ".5f"),
                cell(r.propagated_sqnr_db, ".1f"),
            ]
        )
    return rows
