"""Int8 share of multiply-adds (passes/int8_share.py), counted on small models whose
MACs are computed by hand: what runs in int8 after onnxruntime's QDQ fusion, and what a
"quantized" model still runs in fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper
from test_kernel_truth import _folded_depthwise_model

from passes.dynamic import DynamicQuantize
from passes.int8_share import int8_share, requantized_nodes
from passes.quantize import StaticQuantize

# _folded_depthwise_model, per sample (outputs 16×16): conv1 8·256·(4·9) = 73728,
# conv2 (depthwise) 8·256·9 = 18432, conv3 4·256·8 = 8192.
CONV1, CONV2, CONV3 = 73728, 18432, 8192
TOTAL = CONV1 + CONV2 + CONV3


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("share") / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((16, 4, 16, 16)).astype(np.float32))
    return path


def _static(model: onnx.ModelProto, calib, **kw) -> onnx.ModelProto:
    kw.setdefault("equalize", False)
    return StaticQuantize(calibration=calib, target="avx2", progress=False, **kw)(model).model


def test_an_fp32_model_runs_nothing_in_int8():
    s = int8_share(_folded_depthwise_model())
    assert (s.int8_macs, s.total_macs, s.share, s.mac_nodes) == (0, TOTAL, 0.0, 3)


def test_full_int8_and_one_conv_kept_in_fp32(calib):
    model = _folded_depthwise_model()
    full = int8_share(_static(model, calib))
    assert (full.int8_macs, full.total_macs, full.int8_nodes, full.share) == (TOTAL, TOTAL, 3, 1.0)
    last = int8_share(_static(model, calib, nodes_to_exclude=("conv3",)))
    assert last.int8_macs == CONV1 + CONV2 and last.share == pytest.approx(92160 / 100352)
    first = int8_share(_static(model, calib, nodes_to_exclude=("conv1",)))
    assert first.int8_macs == CONV2 + CONV3 and first.int8_nodes == 2


def test_a_conv_kept_fp32_between_dq_and_q_runs_in_int8_all_the_same(calib):
    """conv2 kept fp32 reads a DequantizeLinear and feeds a QuantizeLinear: onnxruntime
    quantizes it at load, so it counts as int8, and is listed as re-quantized."""
    q = _static(_folded_depthwise_model(), calib, nodes_to_exclude=("conv2",))
    s = int8_share(q)
    assert s.int8_macs == TOTAL and s.requantized == ("conv2",) == tuple(requantized_nodes(q))
    assert "1 kept fp32 but re-quantized by onnxruntime" in s.line()


def _cnn_with_head() -> onnx.ModelProto:
    """x[n,2,16,16] → Conv (16 filters 3×3, pad 1) → Relu → GlobalAveragePool → Flatten →
    Gemm (16→10): conv 16·256·18 = 73728 MACs, the Gemm 160."""
    rng = np.random.default_rng(3)
    inits = {
        "w": rng.standard_normal((16, 2, 3, 3)),
        "b": rng.standard_normal(16),
        "g": rng.standard_normal((10, 16)),
        "gb": rng.standard_normal(10),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g", "gb"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_the_transformer_scheme_on_a_cnn_is_almost_no_int8(tmp_path):
    """auto's static_transformer on a CNN quantizes the head only: 160 of 73888 MACs (0.2 %),
    though the model is "int8"; the default scheme runs all of them in int8."""
    x = np.random.default_rng(4).standard_normal((16, 2, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    model = _cnn_with_head()
    head_only = int8_share(_static(model, tmp_path / "c.npz", scheme="transformer"))
    assert (head_only.int8_macs, head_only.total_macs) == (160, 73888)
    assert head_only.share == pytest.approx(0.00217, abs=1e-5)
    assert "int8 multiply-adds: 0.2% " in head_only.line()
    every = int8_share(_static(model, tmp_path / "c.npz", scheme="default"))
    assert every.int8_macs == every.total_macs == 73888


def test_dynamic_int8_counts_its_integer_matmuls():
    """x[n,32] → MatMul (32×64) → Relu → MatMul (64×8): 2048 + 512 MACs, both
    MatMulInteger after dynamic quantization."""
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((32, 64)), rng.standard_normal((64, 8))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in (("w1", w1), ("w2", w2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    assert int8_share(model).to_dict()["total_macs"] == 2560
    s = int8_share(DynamicQuantize()(model).model)
    assert (s.int8_macs, s.total_macs, s.int8_nodes) == (2560, 2560, 2)


def test_quantize_prints_the_share(tmp_path, capsys):
    """`quantize` says how much of the model runs in int8: 100 % for the default scheme on
    this CNN, 0.2 % when only its Gemm head is quantized."""
    x = np.random.default_rng(4).standard_normal((16, 2, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    onnx.save(_cnn_with_head(), tmp_path / "m.onnx")
    for scheme, text in (("default", "100.0% (0.0739 of 0.0739 M"), ("transformer", "0.2% (")):
        args = ["quantize", tmp_path / "m.onnx", "-o", tmp_path / f"{scheme}.onnx"]
        args += ["--mode", "static", "--calib", tmp_path / "c.npz", "--scheme", scheme]
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        assert f"  int8 multiply-adds: {text}" in out


def test_a_matmul_after_a_dynamic_reshape_counts_its_constant_weight():
    """Exported encoders lose shapes at a Reshape whose shape is computed at run time: a
    MatMul with a constant [K, N] weight after it still counts K·N per row (unknown dims read
    as 1); an activation × activation MatMul there stays unknown."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((8, 5), np.float32), "w")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["r"]),  # shape known only at run time
        helper.make_node("MatMul", ["r", "w"], ["y"], name="dense"),
        helper.make_node("Transpose", ["r"], ["rt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["r", "rt"], ["z"], name="attention"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y, z], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    s = int8_share(model)
    assert s.total_macs == 8 * 5 and s.mac_nodes == 1
    assert s.unknown == ("attention",)


def _symbolic_size(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its input's and output's height and width symbolic (a detector's)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in (out.graph.input[0], out.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "h", "w"
    return out


def test_symbolic_height_and_width_take_the_data_size(calib, tmp_path, capsys):
    """A model whose spatial dims are symbolic is counted at the size of the data it is given
    (read as 1 without data, and then the line says so): YOLOv8n at 1×1 counted 2.86 M
    multiply-adds per sample, at its 320×320 data 1.01 G."""
    model = _symbolic_size(_folded_depthwise_model())
    guessed = int8_share(model)
    assert guessed.total_macs == TOTAL // 256 and guessed.assumed == ("x",)
    assert "symbolic dims of input x read as 1" in guessed.line()
    sized = int8_share(model, {"x": (4, 16, 16)})
    assert (sized.total_macs, sized.assumed) == (TOTAL, ())
    assert int8_share(model, {"x": (4, 16)}).assumed == ("x",)  # not its rank: not used

    from converter.check.validate import validate

    q = tmp_path / "q.onnx"
    onnx.save(_static(model, calib), q)
    src = tmp_path / "fp32.onnx"
    onnx.save(model, src)
    report = validate(q, calib, reference=src, metrics=["cosine"], progress=False)
    assert (report.int8_macs.total_macs, report.int8_macs.int8_macs) == (TOTAL, TOTAL)
    assert report.int8_macs.assumed == ()
    code, out, err = cli(
        capsys, "quantize", src, "-o", tmp_path / "q2.onnx", "--mode", "static", "--calib", calib
    )
    assert code == 0, err
    assert "100.0% (0.1 of 0.1 M per sample" in out and "read as 1" not in out
