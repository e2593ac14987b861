"""GPTQ rounding of the stem (passes/gptq.py ``round_stem``, ``StaticQuantize(stem_rounding=
True)``): the im2col patches are the Conv's, only the stem's integers change, and the
output error on held-out images goes down. Numbers measured through onnxruntime in-test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.core.runtime import make_session
from passes.gptq import conv_patches, stem_jobs
from passes.quantize import StaticQuantize


def _cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """x [b, 3, 16, 16] → Conv 3→8 (3×3, stride 2, pad 1) → Relu → Conv 8→4 (1×1): a stem."""
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv", ["x", "w", "b"], ["h"], name="stem", strides=[2, 2], pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
        ),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="head"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 16, 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth images (blurred noise): neighbouring pixels correlate, as in photos — the case
    where each weight rounded on its own is furthest from the best."""
    x = rng.normal(size=(n, 3, 20, 20))
    for axis in (2, 3):
        x = (x + np.roll(x, 1, axis) + np.roll(x, 2, axis)) / 3
    return x[:, :, 2:18, 2:18].astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return make_session(model.SerializeToString()).run(None, {"x": x})


@pytest.fixture()
def data(tmp_path: Path):
    rng = np.random.default_rng(3)
    x = _images(rng, 160)
    np.savez(tmp_path / "calib.npz", x=x[:64])
    return rng, tmp_path / "calib.npz", x[64:]


def test_patches_are_the_convs():
    rng = np.random.default_rng(0)
    model = _cnn(rng)
    x = _images(rng, 2)
    job = stem_jobs(_fake_qdq(model), model)[0]
    w = numpy_helper.to_array(model.graph.initializer[0]).reshape(8, -1)
    b = numpy_helper.to_array(model.graph.initializer[1])
    ours = (conv_patches(x, job) @ w.T + b).reshape(2, 8, 8, 8).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, _run(model, x)[1], atol=1e-4)


def _dequantized(qdq: onnx.ModelProto) -> np.ndarray:
    """The stem's int8 weights times their per-channel scales, [out, C·kh·kw]."""
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    q = inits["w_quantized"].reshape(8, -1).astype(np.float64)
    return q * inits["w_scale"].reshape(-1, 1)


def _fake_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A stand-in QDQ model that dequantizes the stem weight from ``w_quantized``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.append(
        numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.int8), "w_quantized")
    )
    out.graph.node.insert(
        0, helper.make_node("DequantizeLinear", ["w_quantized", "s", "z"], ["w_dq"], axis=0)
    )
    return out


def test_stem_rounding_lowers_the_held_out_stem_error_and_changes_only_its_integers(data):
    rng, calib, held_out = data
    model = _cnn(rng)
    ref = _run(model, held_out)[0]
    built = {
        on: StaticQuantize(
            calibration=calib, stem_rounding=on, bias_correction=False, progress=False
        )(model)
        for on in (False, True)
    }
    errors = {
        on: float(np.mean((_run(r.model, held_out)[0] - ref) ** 2)) for on, r in built.items()
    }
    assert errors[True] < errors[False], errors  # the model's output, int8 activations too
    job = stem_jobs(built[True].model, model)[0]
    patches = conv_patches(held_out, job)
    w = numpy_helper.to_array(model.graph.initializer[0]).reshape(8, -1)
    weight_error = {  # the stem's output error from its weights alone, held-out images
        on: float(np.mean((patches @ (_dequantized(r.model) - w).T) ** 2))
        for on, r in built.items()
    }
    assert weight_error[True] < 0.7 * weight_error[False], weight_error  # 7.1e-5 → 4.1e-5
    ints = {
        on: {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
        for on, r in built.items()
    }
    changed = [k for k in ints[False] if not np.array_equal(ints[False][k], ints[True][k])]
    assert changed == ["w_quantized"]
    ops = {on: [n.op_type for n in r.model.graph.node] for on, r in built.items()}
    assert ops[True] == ops[False]  # same graph, same kernels
    assert built[True].stats["stem_rounding"]["convs"] == 1
    assert 0 < built[True].stats["stem_rounding"]["proxy_error_ratio"] < 1
    assert built[False].stats["stem_rounding"] == {"convs": 0}


def test_no_stem_no_change(data):
    """A model whose first op is not a Conv on the input: nothing to re-round."""
    _, calib, _ = data
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["y"], name="conv"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    result = StaticQuantize(calibration=calib, stem_rounding=True, progress=False)(model)
    assert result.stats["stem_rounding"]["convs"] == 0


def test_asked_for_without_the_data_is_refused(data):
    from converter.core.errors import BadInputError

    rng, calib, _ = data
    model = _cnn(rng)
    ranges = StaticQuantize(calibration=calib, progress=False).calibrate(model)
    with pytest.raises(BadInputError, match="stem rounding needs calibration data"):
        StaticQuantize(ranges=ranges, stem_rounding=True, bias_correction=False)(model)
    alone = StaticQuantize(ranges=ranges)(model)  # unset: reused ranges alone skip it
    assert alone.stats["stem_rounding"] == {"convs": 0}
