"""Bad input refused up front, in one line naming the input and the fix (exit 2), nothing
written: object arrays in data, fewer calibration samples than --calib-samples, a custom-domain
op in static quantization, a bench batch that cannot fit in memory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import one_line_error, two_matmul_mlp
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.core.runtime import unknown_ops


@pytest.fixture
def mlp(tmp_path):
    """(model path, data path): the two-MatMul MLP and 20 samples of it."""
    onnx.save(two_matmul_mlp(np.random.default_rng(0)), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    return tmp_path / "m.onnx", tmp_path / "d.npz"


def _run(*args) -> int:
    return main([str(a) for a in args])


def test_object_labels_are_refused_by_every_verb(mlp, tmp_path, capsys) -> None:
    model, data = mlp
    x = np.load(data)["x"]
    ragged = np.empty(20, dtype=object)
    ragged[:] = [[1]] * 10 + [[2, 3]] * 10
    np.savez(tmp_path / "obj.npz", x=x, labels=ragged)
    obj = tmp_path / "obj.npz"
    out = tmp_path / "q.onnx"
    for args in (
        ["validate", model, "--data", obj],
        ["quantize", model, "-o", out, "--mode", "static", "--calib", obj],
        ["bench", model, "--data", obj, "--runs", "2"],
        ["sensitivity", model, "--data", obj],
    ):
        assert _run(*args) == 2, args
        line = one_line_error(capsys)
        assert f"data {obj}: labels is an object array" in line, line
        assert "labels=numpy.asarray(values, dtype=numpy.int64)" in line
    assert not out.exists()


def test_calib_samples_beyond_the_data_is_bad_input(mlp, tmp_path, capsys) -> None:
    model, data = mlp
    out = tmp_path / "q.onnx"
    args = ["quantize", model, "-o", out, "--mode", "static", "--calib", data]
    assert _run(*args, "--calib-samples", "100") == 2
    line = one_line_error(capsys)
    assert f"--calib-samples 100, but the calibration data {data} holds 20 samples" in line
    assert "pass --calib-samples 20 or fewer" in line and not out.exists()
    assert _run("-q", *args, "--calib-samples", "20") == 0 and out.exists()


def _with_custom_op(path) -> None:
    w = numpy_helper.from_array(np.eye(32, dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Swish", ["h"], ["y"], name="swish", domain="my.ops"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [w],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)


def test_a_custom_domain_op_in_static_quantization(mlp, tmp_path, capsys) -> None:
    _, data = mlp
    _with_custom_op(tmp_path / "c.onnx")
    out = tmp_path / "q.onnx"
    args = ["quantize", tmp_path / "c.onnx", "-o", out, "--mode", "static", "--calib", data]
    assert _run(*args) == 2
    line = one_line_error(capsys)
    assert "node swish (my.ops:Swish) is a custom-domain op onnxruntime does not know" in line
    assert "use --mode dynamic" in line and not out.exists()
    # onnxruntime's own domains and the model's functions are known
    assert unknown_ops(onnx.load(tmp_path / "c.onnx")) == ["swish (my.ops:Swish)"]
    model = onnx.load(tmp_path / "c.onnx")
    model.graph.node[1].domain = "com.microsoft"
    model.graph.node[1].op_type = "BiasGelu"
    assert unknown_ops(model) == []


def test_bench_refuses_a_batch_that_cannot_fit_in_memory(mlp, capsys) -> None:
    model, _ = mlp
    # 10**11 samples: more than any machine has (the 10**8 is refused here too, by
    # a machine with less than 38 GB free)
    assert _run("bench", model, "--batch", "100000000000", "--runs", "2") == 2
    line = one_line_error(capsys)
    assert f"--batch 100000000000: making the inputs of {model} needs 3.84e+04 GB" in line
    assert "(0.384 kB per sample, before the model's own memory)" in line
    assert "GB free — use a smaller --batch" in line
