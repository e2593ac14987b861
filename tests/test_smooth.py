"""SmoothQuant-style scaling: the same function in fp32, easier-to-quantize MatMul inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from converter.core.errors import BadInputError
from converter.core.metrics import per_sample_cosine
from converter.core.runtime import make_session
from passes import fingerprint
from passes.quantize import StaticQuantize
from passes.smooth import SmoothQuant

MODEL = """
<ir_version: 8, opset_import: ["" : 18]>
agraph (float[N, 16] x) => (float[N, 8] y) <float[16, 32] w1, float[32, 8] w2> {
    h = MatMul(x, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}
"""


def outlier_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(MODEL)
    for name, shape in (("w1", (16, 32)), ("w2", (32, 8))):
        w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    return model


def outlier_data(n: int, seed: int) -> np.ndarray:
    """Two input channels 60x larger than the rest, as in transformer activations."""
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    x[:, [3, 11]] *= 60.0
    return x


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model.SerializeToString()).run(None, {"x": x})[0]


@pytest.fixture()
def calib(tmp_path: Path) -> Path:
    np.savez(tmp_path / "calib.npz", x=outlier_data(128, 1))
    return tmp_path / "calib.npz"


def test_smoothing_keeps_the_function_and_shrinks_outliers(calib: Path) -> None:
    model = outlier_model()
    result = SmoothQuant(calibration=calib)(model)
    x = outlier_data(64, 2)
    assert np.abs(run(result.model, x) - run(model, x)).max() < 1e-4
    first = result.stats["inputs"]["x"]
    assert result.stats["smoothed"] == 2
    assert first["after"] < first["activation_max"] / 5  # the 60x channels are tamed


def test_smoothing_then_static_int8_is_closer_to_fp32(calib: Path) -> None:
    model = outlier_model()
    x = outlier_data(200, 3)
    want = run(model, x)
    plain = StaticQuantize(calibration=calib, per_channel=False, progress=False, target="avx2")(
        model
    ).model
    smoothed = SmoothQuant(calibration=calib)(model).model
    smooth_q = StaticQuantize(calibration=calib, per_channel=False, progress=False, target="avx2")(
        smoothed
    )
    err_plain = np.abs(run(plain, x) - want).mean()
    err_smooth = np.abs(run(smooth_q.model, x) - want).mean()
    assert err_smooth < 0.7 * err_plain
    cos_plain = per_sample_cosine(run(plain, x), want)
    cos_smooth = per_sample_cosine(run(smooth_q.model, x), want)
    assert 1 - cos_smooth.mean() < 0.5 * (1 - cos_plain.mean())  # the mean loss halves


def test_deterministic_and_input_untouched(calib: Path) -> None:
    model = outlier_model()
    before = fingerprint(model)
    a = SmoothQuant(calibration=calib, alpha=0.6)(model).model
    b = SmoothQuant(calibration=calib, alpha=0.6)(model).model
    assert fingerprint(a) == fingerprint(b) and fingerprint(model) == before


def test_trained_encoder_is_unchanged_in_fp32(tiny_encoder) -> None:
    model = onnx.load(str(tiny_encoder.onnx))
    result = SmoothQuant(calibration=tiny_encoder.calib, calib_samples=64)(model)
    test = dict(np.load(tiny_encoder.test))
    test.pop("labels")
    feed = {k: v[:50] for k, v in test.items()}
    want = make_session(tiny_encoder.onnx).run(None, feed)[0]
    got = make_session(result.model.SerializeToString()).run(None, feed)[0]
    assert result.stats["smoothed"] >= 4
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True])
def test_bad_alpha(alpha) -> None:
    with pytest.raises(BadInputError, match="alpha"):
        SmoothQuant(calibration="c.npz", alpha=alpha)


def test_needs_calibration() -> None:
    with pytest.raises(BadInputError, match="needs calibration data"):
        SmoothQuant()(outlier_model())
