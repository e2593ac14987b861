"""Kernel truth (converter/check/kernel_truth.py): a QDQ model run with onnxruntime's
optimizations off (its semantics) and on (the fused integer kernels that ship).

It stays quiet on a faithful model and fires on two built to diverge on any CPU:
- a depthwise Conv kept in fp32 (``nodes_to_exclude``) between a DequantizeLinear and a
  QuantizeLinear, which onnxruntime's WeightBiasQuantization transformer quantizes to
  per-tensor int8 at session load: its BN-folded weights span 100x across channels, so the
  small channels lose their precision (docs/ort-kernel-divergence.md; depthwise kernels
  multiply exactly, so no CPU-specific saturation is involved);
- a MatMul whose int32 accumulator overflows (200 000 products of ~240 × ~52), which float
  semantics computes and the integer kernel wraps."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.check.kernel_truth import (
    Agreement,
    kernel_truth,
    reference_outputs,
)
from converter.core.errors import BadInputError
from converter.core.machine import METADATA_KEY, TARGETS, host_target
from converter.core.runtime import make_session
from passes.quantize import StaticQuantize


def _folded_depthwise_model() -> onnx.ModelProto:
    """x[n,4,16,16] → conv1 → relu1 → conv2 (depthwise) → relu2 → conv3 (1×1) → y. Channel 0
    is near dead (its input ~0.01 of the others'), its depthwise weights are 100x the
    others' (as BN folding leaves them) and conv3 barely reads it."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)) / 6
    w2 = rng.standard_normal((8, 1, 3, 3)) / 3
    w1[0] *= 0.01
    b1 = rng.standard_normal(8) * 0.1
    b1[0] *= 0.01
    w2[0] *= 100.0
    b2 = rng.standard_normal(8) * 0.1
    w3 = rng.standard_normal((4, 8, 1, 1)) / 3
    w3[:, 0] *= 0.01
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4, group=8),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes,
        "folded_depthwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 16, 16])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The fp32 model, its faithful int8 build and the one keeping conv2 in fp32 (7-bit
    weights: the avx2 target, faithful on every CPU), 8 samples and their fp32 outputs."""
    folder = tmp_path_factory.mktemp("kernel_truth")
    calib = np.random.default_rng(1).standard_normal((32, 4, 16, 16)).astype(np.float32)
    np.savez(folder / "calib.npz", x=calib)
    model = _folded_depthwise_model()
    samples = np.random.default_rng(2).standard_normal((8, 4, 16, 16)).astype(np.float32)
    feeds = [{"x": s[None]} for s in samples]

    def build(exclude: tuple[str, ...]) -> onnx.ModelProto:
        q = StaticQuantize(
            equalize=False,  # the depthwise conv2 as built: this tests kernels, not ranges
            calibration=folder / "calib.npz",
            target="avx2",
            nodes_to_exclude=exclude,
            progress=False,
        )
        return q(model).model

    return {
        "folder": folder,
        "model": model,
        "faithful": build(()),
        "excluded": build(("conv2",)),
        "feeds": feeds,
        "reference": reference_outputs(model, feeds),
    }


def test_quiet_on_a_faithful_qdq_model(built):
    r = kernel_truth(built["faithful"], built["feeds"], built["reference"])
    assert not r.diverged and r.parts == () and r.located is None
    (y,) = r.outputs
    assert y.output == "y" and y.kernels_vs_semantics.top1 is None  # 4-D: no argmax
    assert y.kernels_vs_semantics.worst_cosine > 0.99999
    assert y.semantics_vs_reference.mean_cosine == pytest.approx(0.9995, abs=3e-4)
    assert y.kernels_vs_reference.mean_cosine == pytest.approx(
        y.semantics_vs_reference.mean_cosine, abs=1e-5
    )
    assert (r.samples, r.threads, r.threshold) == (8, 1, 0.01)
    assert "kernels agree" in r.lines()[0]


def test_fires_where_onnxruntime_requantizes_a_conv_kept_in_fp32(built):
    """The model says conv2 is float (semantics: 0.9996 to fp32); the kernels run it with
    per-tensor int8 weights (0.945): diverged, and the parting named is conv2 (+ its Relu)."""
    excluded = built["excluded"]
    assert {n.name for n in excluded.graph.node if n.op_type == "Conv"} >= {"conv2"}
    r = kernel_truth(excluded, built["feeds"], built["reference"])
    (y,) = r.outputs
    assert r.diverged and r.located is True
    assert y.semantics_vs_reference.mean_cosine == pytest.approx(0.9996, abs=3e-4)
    assert y.kernels_vs_reference.mean_cosine == pytest.approx(0.9453, abs=0.005)
    assert y.kernels_vs_semantics.mean_cosine == pytest.approx(0.9460, abs=0.005)
    first = r.parts[0]
    assert first.nodes == ("conv2", "relu2") and first.op_types == ("Conv", "Relu")
    assert first.tensor.startswith("r2") and first.upstream_error == 0.0
    assert first.relative_error == pytest.approx(0.271, abs=0.01)
    assert len(r.parts) == 1  # conv3 only carries it on (0.73 from 0.27: < 8x)
    assert any("parts at conv2, relu2" in line for line in r.lines())


def test_the_kernels_compute_conv2_with_per_tensor_int8_weights(built):
    """What the kernels run equals the semantics of the same model with conv2's weights
    round-tripped through onnxruntime's per-tensor int8 (GetQuantizationParameter: range
    including 0 over 255 steps, zero point rounded), to rounding (two output steps at
    most), and not the semantics of the model as it is."""
    excluded = built["excluded"]
    copy = onnx.ModelProto()
    copy.CopyFrom(excluded)
    for t in copy.graph.initializer:
        if t.name == "w2":
            w = numpy_helper.to_array(t)
            lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
            scale = np.float32((hi - lo) / 255)
            zero = np.clip(np.rint(np.float32(-128) - np.float32(lo) / scale), -128, 127)
            rounded = (np.clip(np.rint(w / scale) + zero, -128, 127) - zero) * scale
            t.CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), "w2"))
    kernels = make_session(excluded.SerializeToString(), optimize=True)
    requantized = make_session(copy.SerializeToString(), optimize=False)
    semantics = make_session(excluded.SerializeToString(), optimize=False)
    step = numpy_helper.to_array(
        next(t for t in excluded.graph.initializer if t.name == "y_scale")
    ).item()
    for feed in built["feeds"]:
        k, s = kernels.run(None, feed)[0].ravel(), requantized.run(None, feed)[0].ravel()
        model_says = semantics.run(None, feed)[0].ravel()
        assert np.abs(k - s).max() <= 2 * step * 1.001
        assert k @ s / np.linalg.norm(k) / np.linalg.norm(s) > 0.9995
        assert k @ model_says / np.linalg.norm(k) / np.linalg.norm(model_says) < 0.96


def test_threshold_decides_and_results_are_deterministic(built):
    args = (built["excluded"], built["feeds"], built["reference"])
    assert kernel_truth(*args) == kernel_truth(*args)
    loose = kernel_truth(*args, threshold=0.1)  # the gap is 0.054
    assert not loose.diverged and loose.parts == () and loose.threshold == 0.1
    assert kernel_truth(*args, parts=0).parts == ()
    text = json.dumps(kernel_truth(*args).to_dict())
    back = json.loads(text)
    assert back["diverged"] is True and back["parts"][0]["nodes"] == ["conv2", "relu2"]
    assert back["outputs"][0]["kernels_vs_semantics"]["top1"] is None


def test_a_path_works_and_bad_input_is_refused(built, tmp_path):
    path = tmp_path / "q.onnx"
    onnx.save(built["faithful"], str(path))
    assert not kernel_truth(path, built["feeds"][:2]).diverged
    with pytest.raises(BadInputError, match="QDQ model"):
        kernel_truth(built["model"], built["feeds"])
    with pytest.raises(BadInputError, match="2 reference outputs for 8 samples"):
        kernel_truth(built["faithful"], built["feeds"], built["reference"][:2])
    with pytest.raises(BadInputError, match="no samples"):
        kernel_truth(built["faithful"], [])
    with pytest.raises(BadInputError, match="does not exist"):
        kernel_truth(tmp_path / "missing.onnx", built["feeds"])


def test_the_kernel_figure_says_whose_host_it_is(built):
    host = host_target().name
    other = "arm64" if host != "arm64" else "avx2"
    model = onnx.ModelProto()
    model.CopyFrom(built["faithful"])
    entry = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    assert entry.value == "avx2"  # written by StaticQuantize
    entry.value = other
    r = kernel_truth(model, built["feeds"][:1])
    assert (r.model_target, r.host_target) == (other, host) and host in TARGETS
    assert r.note == (
        f"kernel figure is this host's ({host}), not the target's ({other}): "
        "onnxruntime picks other int8 kernels there"
    )
    assert r.lines()[-1] == f"  {r.note}" and r.to_dict()["note"] == r.note
    entry.value = host
    assert kernel_truth(model, built["feeds"][:1]).note is None
    assert "logical cores" in r.host


# ---------------------------------------------------------------- int32 accumulator overflow


def _overflow_model(k: int = 200_000) -> onnx.ModelProto:
    """x[1,k] (uint8, scale 1/255) · W[k,8] (int8 40..64: 7-bit, no pair saturation on any
    CPU) → big (uint8, scale 50) · W2[8,4] → y: the true sum of products (~3e9) is past
    int32, so the fused kernel wraps it negative (→ 0) where float semantics gives ~198."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = {
        "sx": np.array(1 / 255, f32),
        "zx": np.array(0, np.uint8),
        "w": rng.integers(40, 65, (k, 8)).astype(np.int8),
        "sw": np.array(1e-3, f32),
        "zw": np.array(0, np.int8),
        "sb": np.array(50.0, f32),
        "zb": np.array(0, np.uint8),
        "w2": rng.integers(-60, 61, (8, 4)).astype(np.int8),
        "sw2": np.array(1e-2, f32),
        "sy": np.array(10.0, f32),
        "zy": np.array(128, np.uint8),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], name="dq_w"),
        helper.make_node("MatMul", ["xd", "wd"], ["big"], name="mm_big"),
        helper.make_node("QuantizeLinear", ["big", "sb", "zb"], ["bq"], name="q_big"),
        helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"], name="dq_big"),
        helper.make_node("DequantizeLinear", ["w2", "sw2", "zw"], ["w2d"], name="dq_w2"),
        helper.make_node("MatMul", ["bd", "w2d"], ["out"], name="mm_out"),
        helper.make_node("QuantizeLinear", ["out", "sy", "zy"], ["yq"], name="q_y"),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dq_y"),
    ]
    graph = helper.make_graph(
        nodes,
        "overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v, n) for n, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_fires_on_an_int32_accumulator_overflow_without_a_reference():
    model = _overflow_model()
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.uniform(0.9, 1.0, (1, 200_000)).astype(np.float32)} for _ in range(2)]
    off = make_session(model.SerializeToString(), optimize=False)
    on = make_session(model.SerializeToString(), optimize=True)
    assert not np.array_equal(off.run(None, feeds[0])[0], on.run(None, feeds[0])[0])
    r = kernel_truth(model, feeds)
    assert r.diverged and r.outputs[0].semantics_vs_reference is None
    assert r.outputs[0].kernels_vs_semantics.top1 is not None  # [1, 4]: logits-like
    first = r.parts[0]
    assert first.tensor == "bq" and first.nodes == ("mm_big",) and first.op_types == ("MatMul",)
    assert first.relative_error == pytest.approx(1.0)  # every value became 0
    assert first.upstream_error == 0.0 and first.cosine == 0.0


def test_agreement_numbers():
    ref = [np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]]), np.array([[0.0, 0.0, 3.0]])]
    cand = [np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]]), np.array([[0.0, 0.0, -3.0]])]
    a = Agreement.of(cand, ref)
    assert a.worst_cosine == pytest.approx(-1.0)
    assert a.mean_cosine == pytest.approx((1 + 0.8 - 1) / 3)
    assert a.top1 == pytest.approx(1 / 3)  # only the first row keeps its argmax
