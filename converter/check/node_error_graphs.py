"""The two graphs per-tensor error compares: which tensors of the int8 model to measure
(:class:`Probe`: matched by name the way onnxruntime's ``qdq_loss_debug`` matches them), and
the fp32 and int8 models augmented to expose them — the fp32 one with copies of the int8
model's quantization nodes reading its own tensors (each tensor's "alone" round trip), the
int8 one with its propagated values as outputs. See :mod:`converter.check.node_error`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from converter.check.tensor_error import Sums, TensorError
from passes.quant_report import is_quant_op  # (loads onnxruntime.quantization without torch)

__all__ = ["Probe", "Graphs", "readers_of"]

_LOCAL = "/onnxship_alone"  # suffix of the copies in the fp32 model
_DQ = "/onnxship_dequantized"  # a dynamic activation's int8 value, dequantized


@dataclass(frozen=True)
class Probe:
    """A tensor to measure: its fp32 name, its "alone" copy in the augmented fp32 model and
    its int8 value in the augmented int8 model."""

    tensor: str
    kind: str
    nodes: tuple[str, ...]
    alone: str
    propagated: str

    def record(self, sums: tuple[Sums, Sums]) -> TensorError:
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


class Graphs:
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
        self.names = {n.name for n in fp32.graph.node}  # node names taken in the fp32 model

    def probes(self) -> list[Probe]:
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

    def _qdq_probes(self, matches: Mapping[str, tuple[str, str]]) -> list[Probe]:
        """One per activation; its nodes are those reading it as int8 (a graph output: the
        node making it)."""
        readers = readers_of(self.q)
        probes = []
        for act, (pre, post) in matches.items():
            if post not in self.renamed:
                continue
            made_by = [self.q_producer[pre]] if pre in self.q_producer else []
            nodes = tuple(n.name for n in readers.get(post, made_by))
            probes.append(Probe(act, "activation", nodes, self.renamed[post], post))
        return probes

    # ------------------------------------------------------------ dynamic

    def _replaces_fp32(self, node: onnx.NodeProto) -> bool:
        """A node of the int8 model that the fp32 one does not have, or that reads a tensor
        only the int8 model has (a Gather of a quantized embedding table)."""
        if (node.name, node.op_type) not in self.fp32_nodes:
            return True
        return any(i and i not in self.values and i not in self.fp32_inits for i in node.input)

    def _dynamic_probes(self) -> list[Probe]:
        fp32_readers = readers_of(self.fp32)
        replaced = [n for n in self.fp32.graph.node if (n.name, n.op_type) not in self.kept]
        replaced_names = {n.name for n in replaced}
        probes = []
        for node in self.q.graph.node:  # activations: DynamicQuantizeLinear inputs
            x = node.input[0] if node.op_type == "DynamicQuantizeLinear" else ""
            if x not in self.values or node.output[0] not in self.renamed:
                continue
            self.extra.append(_dequantize(node.output, x + _DQ))
            readers = tuple(n.name for n in fp32_readers.get(x, ()) if n.name in replaced_names)
            probes.append(Probe(x, "activation", readers, x + _DQ + _LOCAL, x + _DQ))
        seen = {p.tensor for p in probes}
        for node in replaced:  # outputs of the nodes dynamic quantization replaced
            for o in node.output:
                if o in self.renamed and self.renamed[o] in self.tainted and o not in seen:
                    probes.append(Probe(o, "output", (node.name,), self.renamed[o], o))
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
            copy.name = self._copy_name(node)
            del copy.input[:]
            copy.input.extend(inputs)
            from_int8 = is_quant_op(node.op_type) or any(i in self.tainted for i in inputs)
            for k, o in enumerate(node.output):
                if o:
                    self.renamed[o] = copy.output[k] = o + _LOCAL
                    if from_int8:
                        self.tainted.add(copy.output[k])
            self.copies.append(copy)

    def _copy_name(self, node: onnx.NodeProto) -> str:
        """A name for the copy of ``node`` that no other node of the fp32 model has: its own
        with the suffix, or for an unnamed node (onnxruntime's dynamic quantization leaves its
        bias Reshapes unnamed) its type and first output; onnxruntime refuses a model in which
        two nodes share a name."""
        base = (node.name or f"{node.op_type}({node.output[0]})") + _LOCAL
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}{k}"
        self.names.add(name)
        return name

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

    def fp32_model(self, probes: Sequence[Probe]) -> onnx.ModelProto:
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

    def int8_model(self, probes: Sequence[Probe]) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(self.q)
        out.graph.node.extend(self.extra)
        _add_outputs(out, [p.propagated for p in probes])
        return out


def readers_of(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
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
