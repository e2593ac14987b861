"""What `quantize --mode dynamic` costs beyond the bare ``quantize_dynamic``: no torch or sympy
imported (a fresh interpreter, sys.modules checked), pre-processing done once (ORT's
optimization from memory, no symbolic shape inference), and the same int8 weights as the full
``quant_pre_process``. No timings asserted: they depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import passes.ort as ort_module
from passes.quantize import DynamicQuantize

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sympy", "onnxruntime.tools.symbolic_shape_infer", "transformers")


def matmul_model() -> onnx.ModelProto:
    """x [b, 32] → MatMul → Add → Relu → MatMul → [b, 8], seeded weights."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], "mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], "add"),
        helper.make_node("Relu", ["hb"], ["r"], "relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], "mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CHILD = """
import json, sys
from converter.cli import main
code = main(["-q", "quantize", {src!r}, "-o", {out!r}, "--mode", "dynamic"])
print(json.dumps([code, sorted(m for m in {heavy!r} if m in sys.modules)]))
"""


def test_dynamic_quantize_process_imports_neither_torch_nor_sympy(tmp_path):
    src, out = tmp_path / "mlp.onnx", tmp_path / "int8.onnx"
    onnx.save(matmul_model(), src)
    code = CHILD.format(src=str(src), out=str(out), heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    exit_code, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert exit_code == 0 and out.exists()
    assert imported == []


def test_dynamic_preprocessing_runs_once_without_quant_pre_process(monkeypatch):
    calls = []
    optimize = ort_module.optimize

    def counted(model, folder, data=None):
        calls.append(folder)
        return optimize(model, folder, data)

    def refused(*args, **kwargs):
        raise AssertionError("quant_pre_process must not run in dynamic mode")

    import onnxruntime.quantization.shape_inference as shape_inference

    monkeypatch.setattr(ort_module, "optimize", counted)
    monkeypatch.setattr(shape_inference, "quant_pre_process", refused)
    result = DynamicQuantize()(matmul_model())
    assert len(calls) == 1 and result.stats["preprocess"] == "optimization"
    # (ORT's basic optimization fused mm1 + add into a Gemm, as quant_pre_process does)
    assert result.stats["nodes"]["quantized"] == ["mm1/MatMulAddFusion", "mm2"]
    # the pre-processed mark is there: onnxruntime did not ask for pre-processing
    assert not any("pre-processing" in w for w in result.stats["onnxruntime_warnings"])


def test_dynamic_weights_equal_those_after_full_pre_processing(tmp_path):
    """Skipping symbolic (and ONNX) shape inference changes no int8 weight or scale."""
    model = matmul_model()
    light = DynamicQuantize()(model).model
    full = ort_module.preprocess(model, tmp_path, symbolic=True)
    assert full.note == "symbolic shape inference + optimization"
    heavy = DynamicQuantize(preprocess=False)(full.model).model

    def weights(m: onnx.ModelProto) -> dict[str, bytes]:
        return {t.name: t.SerializeToString() for t in m.graph.initializer}

    assert weights(light) == weights(heavy)
    assert [n.op_type for n in light.graph.node] == [n.op_type for n in heavy.graph.node]


def test_a_model_onnxruntime_cannot_load_is_quantized_as_it_is(caplog):
    """A custom-domain op (dynamic mode allows them): ORT's optimizer cannot load the model,
    so it is quantized unoptimized, and the report says why."""
    model = matmul_model()
    model.graph.node[2].op_type, model.graph.node[2].domain = "MyRelu", "custom.ops"
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    result = DynamicQuantize()(model)
    assert result.stats["preprocess"].startswith("failed, quantizing the model as it is")
    assert result.stats["nodes"]["quantized"] == ["mm1", "mm2"]
