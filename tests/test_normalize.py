"""Models from other exporters (passes/normalize.py): weights held in ``Constant`` nodes
(paddle2onnx writes them so) and old opsets. Every pass must see the weights, int8 must
upgrade the opset it needs and say so, and a model the converter cannot upgrade is a clear
exit 2 — with the input file never touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.core.errors import BadInputError
from passes.normalize import describe, opset_of, upgrade_opset, weights_as_initializers
from passes.quantize import DynamicQuantize, StaticQuantize
from tests.conftest import cli, one_line_error

SHAPE = [1, 3, 16, 16]


def constant_cnn(opset: int = 12, ir_version: int = 7, scaler: bool = False) -> onnx.ModelProto:
    """Conv(8) → Relu → Conv(4) → Mul(scale), every weight and bias in a ``Constant`` node
    (as paddle2onnx writes them), seeded. ``scaler`` puts an ImageScaler first: an op of
    opset ≤ 9 that onnx's version converter has no schema for, so it cannot upgrade."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 3,
        "b1": rng.standard_normal(8).astype(np.float32) / 10,
        "w2": rng.standard_normal((4, 8, 3, 3)).astype(np.float32) / 6,
        "b2": rng.standard_normal(4).astype(np.float32) / 10,
    }
    nodes = [
        helper.make_node("Constant", [], [n], name=f"const_{n}", value=numpy_helper.from_array(a))
        for n, a in arrays.items()
    ]
    source = "x"
    if scaler:
        nodes.append(helper.make_node("ImageScaler", ["x"], ["xs"], scale=1.0, name="scaler"))
        source = "xs"
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
    nodes += [
        helper.make_node("Constant", [], ["s"], name="const_s", value=scale),
        helper.make_node("Conv", [source, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c2", "s"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 16, 16])],
    )
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def _data(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE[1:])).astype(np.float32)


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])


def _worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def _int8_weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    int8 = (TensorProto.INT8, TensorProto.UINT8)
    return [t for t in model.graph.initializer if t.data_type in int8 and len(t.dims) == 4]


def _float_weights(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer if t.data_type == 1 and len(t.dims) == 4]


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


@pytest.fixture
def files(tmp_path):
    """The model file (opset 12, Constant weights), calibration and test data, and the
    model's bytes to check it is never modified."""
    src = tmp_path / "det.onnx"
    onnx.save(constant_cnn(), src)
    np.savez(tmp_path / "calib.npz", x=_data(1, 32))
    np.savez(tmp_path / "test.npz", x=_data(2, 16))
    return src, tmp_path / "calib.npz", tmp_path / "test.npz", src.read_bytes()


# ------------------------------------------------------------------ the normalization itself


def test_float_constants_move_to_initializers_and_the_outputs_stay_identical():
    model = constant_cnn()
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, -1])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["shape"], value=shape))
    model.graph.node.append(helper.make_node("Reshape", ["y", "shape"], ["flat"]))
    model.graph.node.append(helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0]))
    model.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [2]))
    before = model.SerializeToString(deterministic=True)

    moved, count = weights_as_initializers(model)

    assert count == 5  # w1 b1 w2 b2 s; not the int64 shape, not the graph output k
    assert sorted(t.name for t in moved.graph.initializer) == ["b1", "b2", "s", "w1", "w2"]
    assert [n.output[0] for n in moved.graph.node if n.op_type == "Constant"] == ["shape", "k"]
    assert model.SerializeToString(deterministic=True) == before  # the input is untouched
    x = _data(3, 2)
    np.testing.assert_array_equal(_run(moved, x), _run(model, x))
    assert weights_as_initializers(moved) == (moved, 0)  # nothing left: the same object


def test_scalar_constants_and_old_ir_versions():
    model = constant_cnn(opset=7, ir_version=3)
    node = next(n for n in model.graph.node if n.output[0] == "s")
    node.ClearField("attribute")
    node.attribute.append(helper.make_attribute("value_float", 0.5))
    moved, count = weights_as_initializers(model)
    assert count == 5 and moved.ir_version == 4  # IR 3 wants every initializer an input too
    assert numpy_helper.to_array(next(t for t in moved.graph.initializer if t.name == "s")) == 0.5
    onnx.checker.check_model(moved)
    assert model.ir_version == 3


def test_upgrade_only_when_needed_and_the_failure_names_the_fix():
    model = constant_cnn(opset=12)
    assert upgrade_opset(model, 11, "int8") == (model, 12)  # recent enough: the same object
    upgraded, had = upgrade_opset(model, 13, "per-channel QDQ weights")
    assert (had, opset_of(upgraded), opset_of(model)) == (12, 13, 12)
    assert not [n for n in upgraded.graph.node if n.op_type == "Constant"]
    note = {"constants_moved": 5, "opset_from": 12, "opset_to": 13, "opset_reason": "x"}
    assert describe(note) == [
        "moved 5 Constant weights to initializers",
        "upgraded opset 12 → 13, needed by x",
    ]
    with pytest.raises(BadInputError) as e:
        upgrade_opset(constant_cnn(opset=7, ir_version=3, scaler=True), 13, "per-channel QDQ")
    assert "opset 7" in e.value.what and "needs opset ≥ 13" in e.value.what
    assert "v.convert_version(onnx.load('in.onnx'), 13)" in e.value.fix


# ------------------------------------------------------------------ quantize, end to end


def test_static_qdq_quantizes_constant_weights_and_upgrades_the_opset(files, tmp_path, capsys):
    src, calib, test, original = files
    out = tmp_path / "int8.onnx"

    code, stdout, _ = cli(capsys, "quantize", src, "-o", out, "--mode", "static", "--calib", calib)

    assert code == 0
    assert src.read_bytes() == original
    assert "input: moved 5 Constant weights to initializers" in stdout
    assert "input: upgraded opset 12 → 13, needed by per-channel QDQ weights" in stdout
    assert "int8: " in stdout and "Conv 2" in stdout
    q = onnx.load(out)
    assert opset_of(q) == 13
    weights = {w.name: w for w in _int8_weights(q)}
    assert len(weights) == 2 and _float_weights(q) == []  # (the Mul is fused into conv2)
    assert sorted(t.dims[0] for t in weights.values()) == [4, 8]
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert len(dq) == 2 and all(a.name == "axis" for n in dq for a in n.attribute)
    x = np.load(test)["x"]
    assert _worst_cosine(_run(out, x), _run(src, x)) > 0.99


@pytest.mark.parametrize(
    ("flags", "opset", "quantized_op"),
    [
        (("--mode", "static", "--format", "qoperator"), 12, "QLinearConv"),
        (("--mode", "static", "--per-tensor"), 12, "DequantizeLinear"),
        (("--mode", "dynamic"), 12, "ConvInteger"),
    ],
)
def test_other_modes_quantize_constant_weights_at_the_models_opset(
    flags, opset, quantized_op, files, tmp_path, capsys
):
    src, calib, test, original = files
    out = tmp_path / "int8.onnx"
    calibration = ("--calib", calib) if "static" in flags else ()

    code, stdout, _ = cli(capsys, "quantize", src, "-o", out, *flags, *calibration)

    assert code == 0, stdout
    assert src.read_bytes() == original
    assert "moved 5 Constant weights" in stdout and "upgraded opset" not in stdout
    q = onnx.load(out)
    assert opset_of(q) == opset
    assert len(_int8_weights(q)) == 2 and _float_weights(q) == []
    assert _ops(q).get(quantized_op, 0) >= 2
    x = np.load(test)["x"]
    assert _worst_cosine(_run(out, x), _run(src, x)) > 0.99


def _initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with its weights as initializers (as torch.onnx writes them)."""
    return weights_as_initializers(model)[0]


def _constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as built: weights in Constant nodes."""
    return model


@pytest.mark.parametrize(
    ("mode", "opset", "weights"),
    [
        ("static", 13, _constants),
        ("dynamic", 11, _constants),
        ("static", 13, _initializers),  # was: "produced an invalid model ... report this as a bug"
    ],
)
def test_an_opset_7_model_is_upgraded_to_what_int8_needs(
    mode, opset, weights, files, tmp_path, capsys
):
    _, calib, test, _ = files
    src = tmp_path / "old.onnx"
    onnx.save(weights(constant_cnn(opset=7, ir_version=3)), src)
    original = src.read_bytes()
    out = tmp_path / "int8.onnx"
    calibration = ("--calib", calib) if mode == "static" else ()

    code, stdout, _ = cli(capsys, "quantize", src, "-o", out, "--mode", mode, *calibration)

    assert code == 0
    assert f"upgraded opset 7 → {opset}" in stdout
    assert src.read_bytes() == original
    q = onnx.load(out)
    assert opset_of(q) == opset and len(_int8_weights(q)) == 2
    x = np.load(test)["x"]
    assert _worst_cosine(_run(out, x), _run(src, x)) > 0.99


def test_the_opset_12_model_with_initializer_weights_is_upgraded(files, tmp_path, capsys):
    """paddle2onnx's opset 12 with its weights moved by hand: the QDQ per-channel
    DequantizeLinear's axis needs 13 (was: "produced an invalid model ... report this as
    a bug")."""
    _, calib, test, _ = files
    src = tmp_path / "det.onnx"
    onnx.save(_initializers(constant_cnn(opset=12)), src)
    out = tmp_path / "int8.onnx"
    code, stdout, _ = cli(capsys, "quantize", src, "-o", out, "--mode", "static", "--calib", calib)
    assert code == 0
    assert "upgraded opset 12 → 13" in stdout and "Constant" not in stdout
    x = np.load(test)["x"]
    assert opset_of(onnx.load(out)) == 13
    assert _worst_cosine(_run(out, x), _run(src, x)) > 0.99


@pytest.mark.parametrize(
    ("mode", "opset", "weights"),
    [("static", 13, _constants), ("dynamic", 11, _constants), ("static", 13, _initializers)],
)
def test_an_opset_the_converter_cannot_upgrade_is_exit_2_naming_the_fix(
    mode, opset, weights, files, tmp_path, capsys
):
    _, calib, _, _ = files
    src = tmp_path / "old.onnx"
    onnx.save(weights(constant_cnn(opset=7, ir_version=3, scaler=True)), src)
    out = tmp_path / "int8.onnx"
    calibration = ("--calib", calib) if mode == "static" else ()

    from converter.cli import main

    assert main([str(a) for a in ("quantize", src, "-o", out, "--mode", mode, *calibration)]) == 2
    line = one_line_error(capsys)
    assert "the model is opset 7 and " in line and f"needs opset ≥ {opset}" in line
    assert f"convert_version(onnx.load('in.onnx'), {opset})" in line
    assert "report this as a bug" not in line
    assert not out.exists()


def test_per_tensor_is_offered_when_the_model_has_opset_11(files):
    model = constant_cnn(opset=11)
    model.graph.node.insert(0, helper.make_node("ImageScaler", ["x"], ["unused"], scale=1.0))
    with pytest.raises(BadInputError) as e:  # ImageScaler: no schema after opset 9
        StaticQuantize(calibration=files[1])(model)
    assert "keep the model's opset with --per-tensor or --format qoperator" in e.value.fix
    with pytest.raises(BadInputError) as e:
        StaticQuantize(calibration=files[1])(constant_cnn(opset=7, scaler=True))
    assert "--per-tensor" not in e.value.fix  # below 11 it needs an upgrade too


def test_ranges_reused_on_constant_weights_give_the_same_model(files):
    src, calib, _, _ = files
    model = onnx.load(src)
    ranges = StaticQuantize(calibration=calib).calibrate(model)
    direct = StaticQuantize(calibration=calib, bias_correction=False)(model)
    reused = StaticQuantize(ranges=ranges)(model)
    assert direct.stats["normalized"] == reused.stats["normalized"]
    assert direct.model.SerializeToString(deterministic=True) == reused.model.SerializeToString(
        deterministic=True
    )
    assert DynamicQuantize()(model).stats["normalized"]["constants_moved"] == 5


def test_an_already_quantized_model_is_refused_before_any_upgrade(files, tmp_path):
    src, calib, _, _ = files
    per_tensor = StaticQuantize(calibration=calib, per_channel=False)(onnx.load(src)).model
    assert opset_of(per_tensor) == 12
    with pytest.raises(BadInputError, match="already quantized"):
        StaticQuantize(calibration=calib)(per_tensor)


# ------------------------------------------------------------------ the other verbs


def test_prune_sees_constant_weights(files, tmp_path, capsys):
    src, _, _, original = files
    out = tmp_path / "pruned.onnx"
    code, stdout, _ = cli(capsys, "prune", src, "-o", out, "--sparsity", "0.5", "--min-params", "1")
    assert code == 0
    assert src.read_bytes() == original
    assert "input: moved 5 Constant weights to initializers" in stdout
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    zeros = sum(int((weights[n] == 0).sum()) for n in ("w1", "w2"))
    assert zeros == round(0.5 * (8 * 3 * 9 + 4 * 8 * 9))


def test_fp16_validate_and_bench_on_constant_weights(files, tmp_path, capsys):
    src, _, test, original = files
    half = tmp_path / "half.onnx"
    code, stdout, _ = cli(capsys, "fp16", src, "-o", half)
    assert code == 0 and "moved 5 Constant weights" in stdout
    x = np.load(test)["x"]
    np.testing.assert_allclose(_run(half, x), _run(src, x), atol=2e-2, rtol=0)
    code, stdout, _ = cli(
        capsys, "validate", half, "--data", test, "--reference", src, "--metric", "cosine",
        "--min-worst", "0.999",
    )  # fmt: skip
    assert code == 0, stdout
    code, stdout, _ = cli(capsys, "bench", src, half, "--data", test, "--runs", "5")
    assert code == 0 and "half.onnx" in stdout
    assert src.read_bytes() == original


def test_unnamed_and_duplicate_nodes_are_named_and_bias_correction_pairs_them(tmp_path):
    """Bias correction pairs each quantized Conv with its float twin by node name: with
    every name empty (a hand-built ResNet-18) it paired the Gemm with a Conv and failed
    ("shapes (1000,) (64,)"). Nodes are named <OpType>_<position> first; a duplicate name
    keeps its first holder."""
    from passes.normalize import named_nodes
    from tests.test_kernel_truth import _folded_depthwise_model

    model = _folded_depthwise_model()
    for node in model.graph.node:
        node.name = ""
    model.graph.node[3].name = "Conv_0"  # relu2 holds it first: conv1 becomes Conv_0_2
    model.graph.node[4].name = "Conv_0"  # a duplicate: conv3 is renamed
    named, count = named_nodes(model)
    assert count == 4
    assert [n.name for n in named.graph.node] == [
        "Conv_0_2", "Relu_1", "Conv_2", "Conv_0", "Conv_4"
    ]  # fmt: skip
    assert named_nodes(named) == (named, 0) and model.graph.node[0].name == ""  # input untouched
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((32, 4, 16, 16)).astype(np.float32))
    result = StaticQuantize(calibration=calib, progress=False, target="avx2")(model)
    corrected = result.stats["bias_correction"]
    assert (corrected["layers"], corrected["skipped"]) == (2, 1)  # conv3 has no bias
    assert not result.stats["warnings"]
    assert result.stats["normalized"]["nodes_named"] == 4
    assert "named 4 nodes that had no name or another's" in describe(result.stats["normalized"])[0]


def test_accept_is_idempotent_when_the_upgrade_adds_unnamed_nodes(tmp_path):
    """onnx's version converter adds nodes (Squeeze's axes become a Constant input at opset
    13) without names: naming before the upgrade left them for a second accept to name, so
    ranges measured on the accepted model did not fit it again (PP-OCRv4 rec in auto's
    sensitivity ranking)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes = [
        helper.make_node("Squeeze", ["x"], ["s"], axes=[0]),
        helper.make_node("MatMul", ["s", "w"], ["m"]),
        helper.make_node("Squeeze", ["m"], ["t"], axes=[0]),
        helper.make_node("Unsqueeze", ["t"], ["u"], axes=[0]),
        helper.make_node("MatMul", ["u", "w"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 12)]
    )
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 1, 4)).astype(np.float32))
    q = StaticQuantize(calibration=calib, scheme="default")
    first, _ = q.accept(model)
    again, normalized = q.accept(first)
    assert opset_of(first) == 13 and all(n.name for n in first.graph.node)
    assert again.SerializeToString() == first.SerializeToString() and normalized is None
