"""GPTQ weight rounding (passes/gptq.py, ``StaticQuantize(weight_rounding="gptq")``): the
integers change, nothing else does, and the output error on held-out data goes down. Every
number is measured through onnxruntime (or against numpy) in the test itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from converter.core.runtime import make_session
from passes.gptq import gptq_round, proxy_error
from passes.quantize import StaticQuantize

K, N = 64, 32


def _matmul_model(rng: np.random.Generator, gemm: bool = False) -> onnx.ModelProto:
    """x [b, K] → MatMul(x, W) + Relu → MatMul(·, W2): two weights GPTQ can re-round; with
    ``gemm`` the first is a Gemm with transB=1 (weight stored [N, K])."""
    w = rng.normal(size=(K, N)).astype(np.float32)
    w2 = rng.normal(size=(N, 8)).astype(np.float32)
    if gemm:
        first = helper.make_node("Gemm", ["x", "w"], ["h"], name="mm1", transB=1)
        w = np.ascontiguousarray(w.T)
    else:
        first = helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1")
    nodes = [
        first,
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _correlated(rng: np.random.Generator, n: int) -> np.ndarray:
    """Inputs on a low-rank subspace plus a little noise: XᵀX far from diagonal, the case
    where rounding each weight alone is furthest from the best."""
    basis = rng.normal(size=(6, K))
    return (rng.normal(size=(n, 6)) @ basis + 0.05 * rng.normal(size=(n, K))).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model.SerializeToString()).run(None, {"x": x})[0]


def _int_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The integer weights (onnxruntime names them ``<weight>_quantized``)."""
    return {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name.endswith("_quantized")
    }


@pytest.fixture()
def data(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = _correlated(rng, 768)
    np.savez(tmp_path / "calib.npz", x=x[:256])
    return rng, tmp_path / "calib.npz", x[256:]


@pytest.mark.parametrize("gemm", [False, True])
def test_gptq_lowers_the_held_out_output_error_and_changes_only_integers(data, gemm):
    rng, calib, held_out = data
    model = _matmul_model(rng, gemm)
    ref = _run(model, held_out)
    built = {
        r: StaticQuantize(calibration=calib, target="avx2", weight_rounding=r, progress=False)(
            model
        )
        for r in ("nearest", "gptq")
    }
    err = {r: float(np.mean((_run(b.model, held_out) - ref) ** 2)) for r, b in built.items()}
    assert err["gptq"] < 0.8 * err["nearest"], err
    stats = built["gptq"].stats["weight_rounding"]
    assert stats["weights"] == 2 and 0 < stats["proxy_error_ratio"] < 1
    assert built["nearest"].stats["weight_rounding"] == {"method": "nearest"}
    near, gptq = built["nearest"].model, built["gptq"].model
    assert [(n.op_type, list(n.input)) for n in near.graph.node] == [
        (n.op_type, list(n.input)) for n in gptq.graph.node
    ]
    ints_near, ints_gptq = _int_weights(near), _int_weights(gptq)
    assert ints_near.keys() == ints_gptq.keys()
    changed = [k for k in ints_near if not np.array_equal(ints_near[k], ints_gptq[k])]
    assert changed, "GPTQ changed no integer"
    for name in ints_near:  # 7-bit target: the quantizer's range, same dtype and shape
        assert ints_gptq[name].dtype == ints_near[name].dtype
        assert ints_gptq[name].shape == ints_near[name].shape
        assert np.abs(ints_gptq[name].astype(int)).max() <= 64
    floats_near = {t.name: t for t in near.graph.initializer if t.name not in ints_near}
    for t in gptq.graph.initializer:  # scales, zero points: byte for byte
        if t.name in floats_near:
            assert t.SerializeToString() == floats_near[t.name].SerializeToString()


def test_gptq_round_beats_nearest_on_its_objective_and_matches_it_without_correlation():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(K, N))
    scale = np.abs(w).max(axis=0) / 127
    x = _correlated(rng, 512).astype(np.float64)
    h = x.T @ x / len(x)
    nearest = np.clip(np.round(w / scale), -127, 127)
    rounded = gptq_round(w, h, scale, np.zeros(N), (-127, 127))
    assert rounded.min() >= -127 and rounded.max() <= 127
    assert np.array_equal(rounded, np.round(rounded))
    zero = np.zeros(N)
    assert proxy_error(w, rounded, scale, zero, h) < 0.5 * proxy_error(w, nearest, scale, zero, h)
    # identity XᵀX: each weight's error is its own business, GPTQ is nearest rounding
    # (up to the 1 % damping, which does not move any weight across a rounding boundary here)
    assert np.array_equal(gptq_round(w, np.eye(K), scale, zero, (-127, 127)), nearest)


def test_gptq_is_deterministic(data):
    rng, calib, _ = data
    model = _matmul_model(rng)
    runs = [
        StaticQuantize(calibration=calib, target="avx2", weight_rounding="gptq", progress=False)(
            model
        ).model.SerializeToString()
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_gptq_with_reused_ranges_needs_the_data(data):
    from converter.core.errors import BadInputError

    rng, calib, held_out = data
    model = _matmul_model(rng)
    ranges = StaticQuantize(calibration=calib, target="avx2").calibrate(model)
    with pytest.raises(BadInputError, match="GPTQ weight rounding needs calibration data"):
        StaticQuantize(ranges=ranges, weight_rounding="gptq", target="avx2")(model)
    both = StaticQuantize(
        ranges=ranges, calibration=calib, weight_rounding="gptq", target="avx2", progress=False
    )(model)
    fresh = StaticQuantize(
        calibration=calib, weight_rounding="gptq", target="avx2", progress=False
    )(model)
    assert np.array_equal(_run(both.model, held_out), _run(fresh.model, held_out))


def test_cli_weight_rounding(data, capsys, tmp_path):
    rng, calib, held_out = data
    src = tmp_path / "m.onnx"
    onnx.save(_matmul_model(rng), src)
    out = tmp_path / "q.onnx"
    args = ["quantize", str(src), "-o", str(out), "--mode", "static", "--calib", str(calib)]
    code, stdout, _ = cli(capsys, *args, "--weight-rounding", "gptq", "--target", "avx2")
    assert code == 0, stdout
    assert "weight rounding: GPTQ on 2 weights" in stdout
    ratio = float(stdout.split("calibration data ")[1].split("x")[0])
    assert 0 < ratio < 1
    code, _, err = cli(capsys, "quantize", str(src), "-o", str(out), "--mode", "dynamic",
                       "--weight-rounding", "gptq")  # fmt: skip
    assert code == 2 and "--weight-rounding only applies to --mode static" in err
    assert np.isfinite(_run(onnx.load(str(out)), held_out)).all()


def test_recipe_setting(data):
    from converter.core.errors import BadInputError
    from passes.registry import make_recipe_pass

    _, calib, _ = data
    made = make_recipe_pass("quantize", {"mode": "static", "weight_rounding": "gptq"}, calib)
    assert isinstance(made, StaticQuantize) and made.weight_rounding == "gptq"
    with pytest.raises(BadInputError, match="weight_rounding"):
        make_recipe_pass("quantize", {"mode": "dynamic", "weight_rounding": "gptq"}, None)
    with pytest.raises(BadInputError, match="weight_rounding = 'adaround'"):
        StaticQuantize(calibration=calib, weight_rounding="adaround")
