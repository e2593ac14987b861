"""MSE activation ranges (passes/mse_range.py) and empirical bias correction
(passes/bias_correction.py) on a tiny seeded CNN."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.core.errors import BadInputError
from converter.core.runtime import tensor_values
from passes.mse_range import best_range, mse_ranges
from passes.quantize import StaticQuantize


def _cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """x → Conv(3→8) → Relu → depthwise Conv 3×3 (small weights: rounding shifts its mean)
    → Relu → Conv 1×1 (8→4) → y."""
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)
    w2[:, :, 0, 0] += 4.0  # one large tap per filter: the others round coarsely
    w3 = rng.normal(0, 0.4, (4, 8, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, 8).astype(np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.normal(0, 0.2, 8).astype(np.float32), "b2"),
        numpy_helper.from_array(w3, "w3"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["h2"], name="dw", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _heavy(rng: np.random.Generator, n: int) -> np.ndarray:
    """Normal inputs with rare outliers (0.02 % of the values 40x larger): the few values that
    set a min/max range."""
    x = rng.normal(0, 1, (n, 3, 10, 10))
    x *= np.where(rng.random(x.shape) < 0.0002, 40.0, 1.0)
    return x.astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def _fake_quant(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


@pytest.fixture
def data(tmp_path: Path):
    rng = np.random.default_rng(0)
    model = _cnn(rng)
    calib = _heavy(rng, 64)
    path = tmp_path / "calib.npz"
    np.savez(path, x=calib)
    return model, calib, path


def test_mse_range_is_narrower_than_minmax_on_heavy_tails_and_lowers_the_error(data):
    model, calib, _ = data
    feeds = lambda: ({"x": calib[i : i + 16]} for i in range(0, 64, 16))  # noqa: E731
    tensors, seen = mse_ranges(model, ["h1", "y"], feeds)
    assert seen == 64
    values_of = dict(zip(["h1", "y"], next(tensor_values(model, ["h1", "y"], [{"x": calib}]))[1]))
    for name, values in values_of.items():
        lo, hi = (float(v) for v in tensors[name].range_value)
        assert values.min() <= lo <= 0 <= hi <= values.max()
        width, full = hi - lo, values.max() - min(values.min(), 0)
        err_mse = np.mean((_fake_quant(values, lo, hi) - values) ** 2)
        minmax = _fake_quant(values, min(values.min(), 0), values.max())
        err_minmax = np.mean((minmax - values) ** 2)
        assert width < 0.96 * full, (name, width, full)
        assert err_mse < 0.96 * err_minmax, (name, err_mse, err_minmax)


def test_best_range_on_a_uniform_histogram_keeps_the_extremes():
    lo, hi, _ = best_range(np.full(2048, 10, np.int64), -1.0, 3.0)
    assert lo == pytest.approx(-1.0, abs=0.01) and hi == pytest.approx(3.0, abs=0.01)
    lo, hi, _ = best_range(np.zeros(2048, np.int64), 0.0, 1.0)
    assert (lo, hi) == (0.0, 1.0)  # no values: the extremes stay


def _mean_shift(model: onnx.ModelProto, quantized: onnx.ModelProto, x: np.ndarray) -> float:
    """Mean over output channels of |mean quantized output − mean float output|."""
    ref = _run(model, x)[0].mean(axis=(0, 2, 3))
    got = _run(quantized, x)[0].mean(axis=(0, 2, 3))
    return float(np.abs(got - ref).mean())


def test_bias_correction_lowers_the_mean_output_shift(tmp_path):
    rng = np.random.default_rng(0)
    model = _cnn(rng)
    calib = rng.normal(0, 1, (64, 3, 10, 10)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=calib)
    held_out = np.random.default_rng(1).normal(0, 1, (256, 3, 10, 10)).astype(np.float32)
    kw = {"calibration": path, "calib_method": "minmax", "target": "avx2", "progress": False}
    plain = StaticQuantize(bias_correction=False, **kw)(model)
    fixed = StaticQuantize(bias_correction=True, **kw)(model)
    stats = fixed.stats["bias_correction"]
    assert stats["layers"] == 3 and stats["samples"] == 64 and stats["skipped"] == 0
    assert plain.stats["bias_correction"] == {"layers": 0}
    for x in (calib, held_out):
        before, after = _mean_shift(model, plain.model, x), _mean_shift(model, fixed.model, x)
        assert before > 0.02 and after < 0.2 * before, (before, after)  # 0.023 → 0.0035
    # only the int32 bias integers changed: same graph, same weights
    assert [n.op_type for n in plain.model.graph.node] == [
        n.op_type for n in fixed.model.graph.node
    ]
    changed = [
        a.name
        for a, b in zip(plain.model.graph.initializer, fixed.model.graph.initializer)
        if a.SerializeToString() != b.SerializeToString()
    ]
    assert changed and all(name.startswith("b") and "quantized" in name for name in changed)


def test_default_scheme_uses_mse_and_bias_correction_and_is_deterministic(data):
    model, _, path = data
    first = StaticQuantize(calibration=path, target="avx2", progress=False)(model)
    second = StaticQuantize(calibration=path, target="avx2", progress=False)(model)
    assert first.stats["calibration"]["method"] == "mse"
    assert first.stats["bias_correction"]["layers"] == 3
    assert first.model.SerializeToString() == second.model.SerializeToString()


def test_bias_correction_with_saved_ranges_and_no_data_is_bad_input(data, tmp_path):
    model, _, path = data
    ranges = StaticQuantize(calibration=path, progress=False, equalize=False).calibrate(model)
    saved = ranges.save(tmp_path / "ranges.json")
    with pytest.raises(BadInputError) as e:
        StaticQuantize(ranges=saved, bias_correction=True, equalize=False)(model)
    assert e.value.exit_code == 2 and "\n" not in e.value.message
    assert "bias correction needs calibration data" in e.value.message
    assert "pass calibration=DATA" in e.value.message
    # with the data it works; unset, reused ranges alone quantize without it
    both = StaticQuantize(ranges=saved, calibration=path, bias_correction=True, equalize=False)
    assert both(model).stats["bias_correction"]["layers"] == 3
    alone = StaticQuantize(ranges=saved, equalize=False)(model)
    assert alone.stats["bias_correction"] == {"layers": 0}
    assert alone.stats["calibration"]["method"] == "mse"  # the file records the method


def test_bias_correction_on_few_samples_warns(data, tmp_path, caplog):
    model, calib, _ = data
    few = tmp_path / "few.npz"
    np.savez(few, x=calib[:4])
    with caplog.at_level(logging.WARNING):
        result = StaticQuantize(calibration=few, progress=False)(model)
    assert result.stats["bias_correction"]["samples"] == 4
    assert any("fewer than the 16" in w for w in result.stats["warnings"])


def test_best_range_on_laplace_values_clips_the_tails_and_predicts_its_error():
    x = np.random.default_rng(0).laplace(0, 1, 1_000_000)
    low, high = min(x.min(), 0.0), x.max()  # -13.5, 15.3
    counts = np.bincount(
        np.clip(((x - low) * 2048 / (high - low)).astype(np.int64), 0, 2047), minlength=2048
    )
    lo, hi, predicted = best_range(counts, low, high)
    assert -10.0 < lo < -9.5 and 9.5 < hi < 10.0  # measured ±9.75 of [-13.5, 15.3]
    actual = np.mean((_fake_quant(x, lo, hi) - x) ** 2)
    assert actual == pytest.approx(predicted, rel=0.01)  # 5.84e-4
    assert actual < 0.6 * np.mean((_fake_quant(x, low, high) - x) ** 2)  # minmax: 1.06e-3


def test_a_default_bias_correction_that_cannot_run_is_skipped_whole(data, monkeypatch):
    import passes.static
    from converter.core.errors import PassError

    model, _, path = data

    def fails(qdq, float_model, batches, float_targets=None):
        for t in qdq.graph.initializer:  # half-way through: one bias already moved
            if t.name.endswith("_quantized") and t.data_type == TensorProto.INT32:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 7, t.name))
                break
        raise RuntimeError("cannot run this segment")

    kw = {"calibration": path, "target": "avx2", "progress": False}
    plain = StaticQuantize(bias_correction=False, **kw)(model)
    monkeypatch.setattr(passes.static, "correct_biases", fails)
    skipped = StaticQuantize(**kw)(model)
    assert skipped.stats["bias_correction"] == {
        "layers": 0,
        "failed": "RuntimeError: cannot run this segment",
    }
    assert any("bias correction skipped" in w for w in skipped.stats["warnings"])
    assert skipped.model.SerializeToString() == plain.model.SerializeToString()
    with pytest.raises(PassError, match="bias correction failed"):
        StaticQuantize(bias_correction=True, **kw)(model)
