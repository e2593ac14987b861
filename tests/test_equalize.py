"""Activation equalization into depthwise convolutions (passes/equalize.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes.equalize import equalizable_pairs, equalize
from passes.quantize import StaticQuantize


def _model(rng: np.random.Generator, activation: str = "Clip", dense_second: bool = False):
    """x → Conv(3→8) → Relu/Clip(0, 6) → Conv depthwise 3×3 (or dense 1×1) → y. Channel 0 of
    the middle tensor has a tiny range and a high-gain, cancelling depthwise filter: the
    case per-tensor activation int8 serves worst."""
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w1[0] *= 0.02
    b1 = rng.normal(0.5, 0.2, 8).astype(np.float32)
    b1[0] = 0.02
    if dense_second:
        w2 = rng.normal(0, 0.5, (8, 8, 1, 1)).astype(np.float32)
        second = helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2")
    else:
        w2 = rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)
        w2[0] = np.array([[1.5, -6, 1.6], [10.6, -15, 8.2], [-1.4, 1.6, -0.9]], np.float32)
        second = helper.make_node(
            "Conv", ["a", "w2", "b2"], ["y"], name="conv2", group=8, pads=[1, 1, 1, 1]
        )
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    act = (
        helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act")
        if activation == "Clip"
        else helper.make_node("Relu", ["h"], ["a"], name="act")
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        act,
        second,
    ]
    graph = helper.make_graph(
        nodes,
        "eq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def _data(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(0, 1, (n, 3, 12, 12)).astype(np.float32)


def test_equalization_keeps_the_float_model_and_stretches_the_small_channel():
    rng = np.random.default_rng(0)
    for activation in ("Clip", "Relu"):
        model = _model(rng, activation)
        calib = _data(rng, 32)
        equalized, stats = equalize(model, [{"x": calib[i : i + 8]} for i in range(0, 32, 8)])
        assert stats["pairs"] == 1 and stats["samples"] == 32 and stats["largest_stretch"] > 5
        for x in (calib, _data(np.random.default_rng(1), 16)):  # calibration and unseen
            np.testing.assert_allclose(_run(equalized, x), _run(model, x), rtol=1e-5, atol=1e-5)
        w1 = numpy_helper.to_array(equalized.graph.initializer[0])
        assert (
            np.abs(w1[0]).max()
            > 5 * np.abs(numpy_helper.to_array(model.graph.initializer[0])[0]).max()
        )


def test_a_dense_second_conv_is_skipped_and_counted():
    model = _model(np.random.default_rng(0), dense_second=True)
    pairs, skipped = equalizable_pairs(model)
    assert pairs == [] and skipped == 1
    equalized, stats = equalize(model, [])
    assert stats == {"pairs": 0, "skipped": 1}
    assert equalized.SerializeToString() == model.SerializeToString()


def test_equalization_lowers_the_int8_error(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(rng)
    calib, test = _data(rng, 64), _data(np.random.default_rng(2), 64)
    np.savez(tmp_path / "calib.npz", x=calib)
    ref = _run(model, test)

    def error(**settings) -> float:
        q = StaticQuantize(calibration=tmp_path / "calib.npz", progress=False, **settings)
        result = q(model)
        return float(np.abs(_run(result.model, test) - ref)[:, 0].mean())

    plain, equalized = error(equalize=False), error()
    assert equalized < 0.5 * plain, (plain, equalized)
