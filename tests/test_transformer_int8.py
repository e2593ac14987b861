"""Static int8 for transformers: the MatMul-only QDQ scheme, mean-minmax ranges, mask-safe
entropy calibration, SmoothQuant folded into LayerNorm, and the unfused-DequantizeLinear
profile. Every number is measured through onnxruntime in the test itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from converter.check.profile import op_time_shares, unfused_dq_nodes, unfused_dq_share
from converter.check.sensitivity import sensitivity
from converter.core.runtime import make_session
from converter.search.auto import _configs, _passes_of
from passes.calibration import MASK_FILL, MaskSafeHistogramCollector, matmul_inputs
from passes.quantize import StaticQuantize
from passes.smooth import SmoothQuant
from tests.test_quantize import evaluate

FLOAT_OPS = ("Add", "Softmax", "LayerNormalization", "Erf", "Div", "Mul", "Where", "Gather")


def _readers_of_dequantized(model: onnx.ModelProto) -> set[str]:
    """Op types of the nodes that read an activation's DequantizeLinear output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    dq_of_activation = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits
    }
    return {
        n.op_type
        for n in model.graph.node
        if n.op_type != "QuantizeLinear"
        and any(i in dq_of_activation for i in n.input)
        and producer
    }


# ----------------------------------------------------------------- the transformer scheme


def test_transformer_scheme_quantizes_only_matmul_inputs(tiny_encoder):
    model = onnx.load(str(tiny_encoder.onnx))
    quantize = StaticQuantize(
        calibration=tiny_encoder.calib, scheme="transformer", progress=False, target="avx2"
    )
    result = quantize(model)
    q = result.model
    assert _readers_of_dequantized(q) <= {"MatMul", "Gemm"}
    # ...and every float op of the encoder reads float: no Q/DQ on their inputs.
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    for node in q.graph.node:
        if node.op_type in FLOAT_OPS:
            assert all(producer.get(i) != "DequantizeLinear" for i in node.input), node.name
    # One QuantizeLinear per MatMul/Gemm activation input, each with its calibrated range.
    activations = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    calibrated = result.stats["calibration"]
    assert calibrated["method"] == "mean_minmax" and calibrated["scheme"] == "transformer"
    assert len(activations) == calibrated["tensors"]
    assert result.stats["by_op"]["MatMul"]["quantized"] >= 8
    # The default scheme puts Q/DQ on the other ops too (what the new scheme avoids).
    default = StaticQuantize(
        calibration=tiny_encoder.calib, progress=False, target="avx2", scheme="default"
    )
    assert _readers_of_dequantized(default(model).model) - {"MatMul", "Gemm"}
    m = evaluate(tiny_encoder, q)
    assert m["cos_mean"] >= 0.99 and m["agreement"] >= 0.9  # generous floors


def test_scheme_auto_picks_transformer_for_encoders_only(tiny_encoder, digits_cnn):
    """The default scheme "auto": the encoder gets exactly the transformer scheme's bytes,
    the CNN exactly the default scheme's; the stats name the scheme used."""
    kw = {"progress": False, "target": "avx2"}
    for ref, expected in ((tiny_encoder, "transformer"), (digits_cnn, "default")):
        model = onnx.load(str(ref.onnx))
        auto = StaticQuantize(calibration=ref.calib, **kw)(model)
        explicit = StaticQuantize(calibration=ref.calib, scheme=expected, **kw)(model)
        assert auto.stats["calibration"]["scheme"] == expected
        assert auto.model.SerializeToString() == explicit.model.SerializeToString()
    assert not auto.stats["warnings"]  # no "looks like a transformer" hint on either


def test_transformer_scheme_fuses_every_dequantize(tiny_encoder):
    """onnxruntime fuses each Q/DQ pair of the new scheme into an integer kernel; the default
    scheme leaves DequantizeLinear nodes running in float (counted in the optimized graph)."""
    model = onnx.load(str(tiny_encoder.onnx))
    kw = {"calibration": tiny_encoder.calib, "progress": False, "target": "avx2"}
    new = StaticQuantize(scheme="transformer", **kw)(model).model
    old = StaticQuantize(scheme="default", **kw)(model).model
    assert unfused_dq_nodes(new.SerializeToString()) == 0
    assert unfused_dq_nodes(old.SerializeToString()) > 0


def test_same_bytes_and_ranges_reused(tiny_encoder):
    model = onnx.load(str(tiny_encoder.onnx))
    kw = {"scheme": "transformer", "progress": False, "target": "avx2"}
    once = StaticQuantize(calibration=tiny_encoder.calib, **kw)(model).model
    again = StaticQuantize(calibration=tiny_encoder.calib, **kw)(model).model
    ranges = StaticQuantize(calibration=tiny_encoder.calib, **kw).calibrate(model)
    reused = StaticQuantize(ranges=ranges, **kw)(model).model
    raw = [m.SerializeToString(deterministic=True) for m in (once, again, reused)]
    assert raw[0] == raw[1] == raw[2]


# ----------------------------------------------------------------- mean-minmax ranges

LINEAR = """
<ir_version: 8, opset_import: ["" : 18]>
agraph (float[N, 4] x) => (float[N, 3] y) <float[4, 3] w> {
    h = Relu(x)
    y = MatMul(h, w)
}
"""


def linear_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(LINEAR)
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    return model


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_mean_minmax_is_the_mean_of_per_sample_extremes(tmp_path: Path, batch: int):
    x = np.array([[-1.0, 2.0, 0.5, 3.0], [0.1, 0.2, 0.3, 9.0], [-4.0, -1.0, 1.0, 1.5]], np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    model = linear_model()
    ranges = StaticQuantize(
        calibration=tmp_path / "calib.npz", scheme="transformer", calib_batch_size=batch
    ).calibrate(model)
    h = np.maximum(x, 0)  # the MatMul reads Relu(x)
    (name,) = matmul_inputs(onnx.load_from_string(ranges.prepared))
    low, high = ranges.tensors[name].range_value
    assert float(low) == pytest.approx(h.min(axis=1).mean(), rel=1e-6)
    assert float(high) == pytest.approx(h.max(axis=1).mean(), rel=1e-6)  # (3 + 9 + 1.5) / 3
    assert float(high) < h.max()  # the global max (ORT's minmax) would be 9
    q = StaticQuantize(ranges=ranges, scheme="transformer")(model).model
    scale = next(
        numpy_helper.to_array(t)
        for t in q.graph.initializer
        if t.name == next(n.input[1] for n in q.graph.node if n.op_type == "QuantizeLinear")
    )
    assert float(scale) == pytest.approx(h.max(axis=1).mean() / 255, rel=1e-5)


# ----------------------------------------------------------------- masks filled with finfo.min

MASKED = """
<ir_version: 8, opset_import: ["" : 18]>
agraph (float[N, 8] x, float[N, 8] m) => (float[N, 4] y) <float[8, 8] w1, float[8, 4] w2,
        float one, float fill> {
    s = MatMul(x, w1)
    keep = Sub(one, m)
    bias = Mul(keep, fill)
    scores = Add(s, bias)
    p = Softmax<axis = -1>(scores)
    y = MatMul(p, w2)
}
"""


def masked_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    model = onnx.parser.parse_model(MASKED)
    for name, value in (
        ("w1", rng.standard_normal((8, 8))),
        ("w2", rng.standard_normal((8, 4))),
        ("one", np.array(1.0)),
        ("fill", np.array(np.finfo(np.float32).min)),
    ):
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return model


def masked_data(path: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = np.ones((n, 8), np.float32)
    m[:, 5:] = 0  # padding: the last 3 positions masked with finfo.min
    feeds = {"x": rng.standard_normal((n, 8)).astype(np.float32), "m": m}
    np.savez(path, **feeds)
    return feeds


def test_ort_histograms_fail_on_mask_fills_ours_do_not():
    from onnxruntime.quantization.calibrate import HistogramCollector

    values = {"t": [np.array([np.finfo(np.float32).min, 0.5, -1.0, 2.0], np.float32)]}
    settings = dict(
        method="entropy",
        symmetric=False,
        num_bins=128,
        num_quantized_bins=128,
        percentile=99.999,
        scenario="same",
    )
    with pytest.raises(ValueError, match="bins"), np.errstate(over="ignore", invalid="ignore"):
        HistogramCollector(**settings).collect(values)
    ours = MaskSafeHistogramCollector(**settings)
    ours.collect(values)
    _, edges, low, high, _ = ours.histogram_dict["t"]
    assert (float(low), float(high)) == (-1.0, 2.0)  # the fill is ignored
    assert np.all(np.abs(edges) <= 2.0)


@pytest.mark.parametrize("scheme", ["default", "transformer"])
def test_entropy_calibration_on_a_finfo_min_mask(tmp_path: Path, scheme: str):
    model = masked_model()
    masked_data(tmp_path / "calib.npz", 64, 1)
    test = masked_data(tmp_path / "test.npz", 32, 2)
    ranges = StaticQuantize(
        calibration=tmp_path / "calib.npz", calib_method="entropy", scheme=scheme
    ).calibrate(model)
    for name, data in ranges.tensors.data.items():
        assert np.all(np.abs(np.asarray(data.range_value, np.float64)) < MASK_FILL), name
    q = StaticQuantize(ranges=ranges, scheme=scheme)(model).model
    want = make_session(model.SerializeToString()).run(None, test)[0]
    got = make_session(q.SerializeToString()).run(None, test)[0]
    assert np.all(np.isfinite(got))
    if scheme == "transformer":  # the mask stays float: the masked positions stay masked
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.98


# ----------------------------------------------------------------- SmoothQuant into LayerNorm

LN_GRAPH = """
<ir_version: 8, opset_import: ["" : 18]>
agraph (float[N, 16] x) => ({outputs}) <float[16] g, float[16] b, float[16, 8] w1,
        float[16, 8] w2, float[8, 16] w3> {{
    h = LayerNormalization<axis = -1>(x, g, b)
    q = MatMul(h, w1)
    k = MatMul(h, w2)
    y = Add(q, k)
{residual}
}}
"""


def ln_model(residual: bool) -> onnx.ModelProto:
    text = LN_GRAPH.format(
        outputs="float[N, 8] y" + (", float[N, 16] z" if residual else ""),
        residual="    o = MatMul(y, w3)\n    z = Add(h, o)" if residual else "",
    )
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    g = rng.uniform(0.5, 1.5, 16)
    g[[2, 9]] = 40.0  # two outlier channels, as LayerNorm γ gives transformers
    for name, value in (
        ("g", g),
        ("b", rng.standard_normal(16) * 0.1),
        ("w1", rng.standard_normal((16, 8)) / 4),
        ("w2", rng.standard_normal((16, 8)) / 4),
        ("w3", rng.standard_normal((8, 16)) / 4),
    ):
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    return model


@pytest.mark.parametrize(("residual", "fold"), [(False, "in place"), (True, "copy")])
def test_smoothing_folds_into_layernorm_exactly(tmp_path: Path, residual: bool, fold: str):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    x = {"x": rng.standard_normal((32, 16)).astype(np.float32)}
    model = ln_model(residual)
    folded = SmoothQuant(calibration=tmp_path / "calib.npz", alpha=0.95)(model)
    with_mul = SmoothQuant(calibration=tmp_path / "calib.npz", alpha=0.95, fold_layernorm=False)(
        model
    )
    ops = [n.op_type for n in folded.model.graph.node]
    lns = {n.output[0] for n in folded.model.graph.node if n.op_type == "LayerNormalization"}
    muls = [n for n in folded.model.graph.node if n.op_type == "Mul"]
    assert not [n for n in muls if set(n.input) & (lns | {"h"})]  # no Mul after the LayerNorm
    assert folded.stats["mul_nodes"] == len(muls) == (1 if residual else 0)  # 1: y's (no LN)
    assert folded.stats["folded_into_layernorm"] == {"h": fold}
    assert ops.count("LayerNormalization") == (2 if residual else 1)
    assert "Mul" in [n.op_type for n in with_mul.model.graph.node]
    want = make_session(model.SerializeToString()).run(None, x)
    for out in (folded.model, with_mul.model):
        got = make_session(out.SerializeToString()).run(None, x)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    smoothed = folded.stats["inputs"]["h"]
    assert smoothed["after"] < smoothed["activation_max"] / 3  # the 40x channels are tamed


# ----------------------------------------------------------------- profiler, auto, sensitivity

DQ_ADD = """
<ir_version: 8, opset_import: ["" : 18]>
agraph (float[N, 256] x) => (float[N, 256] y) <float s, uint8 z> {
    q = QuantizeLinear(x, s, z)
    d = DequantizeLinear(q, s, z)
    y = Add(d, x)
}
"""


def test_unfused_dequantize_share():
    model = onnx.parser.parse_model(DQ_ADD)
    for name, value in (("s", np.array(0.1, np.float32)), ("z", np.array(128, np.uint8))):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    feed = {"x": np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)}
    raw = model.SerializeToString()
    shares = op_time_shares(raw, feed, runs=5)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["DequantizeLinear"] > 0 and 0 < unfused_dq_share(raw, feed, runs=5) < 1
    assert unfused_dq_nodes(raw) == 1
    fp32 = linear_model().SerializeToString()
    assert unfused_dq_share(fp32, {"x": feed["x"][:, :4]}, runs=5) == 0.0


def test_auto_tries_the_transformer_scheme(tiny_encoder):
    configs = dict(_configs(onnx.load(str(tiny_encoder.onnx)), "avx2"))
    names = list(configs)
    assert names.index("static_transformer") < names.index("static_u8_pc_minmax")
    assert configs["static_transformer"]["scheme"] == "transformer"
    smooth = next(name for name in names if name.startswith("smooth"))
    assert names.index(smooth) < names.index("static_u8_pc_minmax")
    passes = _passes_of(configs[smooth], ["node_x"])
    assert [p["pass"] for p in passes] == ["smooth", "quantize-static"]
    assert passes[1]["nodes_to_exclude"] == ["node_x"] and "smooth" not in passes[1]


def test_sensitivity_reports_unfused_dequantize(tiny_encoder):
    settings = {"scheme": "transformer", "target": "avx2"}
    report = sensitivity(
        tiny_encoder.onnx,
        tiny_encoder.test,
        calib=tiny_encoder.calib,
        samples=16,
        quant_settings=settings,
        progress=False,
    )
    assert report.unfused_dq_nodes == 0 and report.to_dict()["unfused_dq_nodes"] == 0
    assert 0 <= report.unfused_dq_share < 0.05
    assert "unfused DequantizeLinear: 0 nodes" in report.summary()
    assert report.nodes and all(n.op_type in ("MatMul", "Gemm") for n in report.nodes)


def test_cli_scheme(tiny_encoder, tmp_path: Path, capsys):
    from converter.cli import main

    out = tmp_path / "enc-int8.onnx"
    args = ["quantize", str(tiny_encoder.onnx), "-o", str(out), "--mode", "static"]
    calib = ["--calib", str(tiny_encoder.calib), "--target", "avx2", "-q"]
    assert main([*args, *calib, "--scheme", "transformer"]) == 0
    assert _readers_of_dequantized(onnx.load(str(out))) <= {"MatMul", "Gemm"}
    capsys.readouterr()
    dynamic = ["quantize", str(tiny_encoder.onnx), "-o", str(tmp_path / "d.onnx")]
    assert main([*dynamic, "--mode", "dynamic", "--scheme", "transformer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scheme" in err[0] and not (tmp_path / "d.onnx").exists()


def test_cli_sensitivity_scheme(tiny_encoder, capsys):
    from converter.cli import main

    args = ["sensitivity", str(tiny_encoder.onnx), "--data", str(tiny_encoder.test)]
    args += ["--calib", str(tiny_encoder.calib), "--scheme", "transformer", "--samples", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "MatMul/Gemm inputs only" in out and "unfused DequantizeLinear: 0 nodes" in out


def test_auto_tries_gptq_after_smoothing(tiny_encoder, tmp_path: Path, monkeypatch):
    from converter.search import auto as auto_module
    from tests.test_gptq import _int_weights

    every = auto_module._configs
    monkeypatch.setattr(
        auto_module, "_configs", lambda m, t: [c for c in every(m, t) if c[0].startswith("smooth")]
    )
    result = auto_module.auto(
        tiny_encoder.onnx, tiny_encoder.test, tmp_path / "a", metric="cosine", min_score=0.5,
        bench_runs=3, target="avx2",
    )  # fmt: skip
    built = {c.name: c for c in result.candidates}
    assert list(built) == ["smooth0.8_static_transformer", "smooth0.8_static_transformer_gptq"]
    assert built["smooth0.8_static_transformer_gptq"].passes[-1]["weight_rounding"] == "gptq"
    near, gptq = (onnx.load(str(c.path)) for c in built.values())
    assert [n.op_type for n in near.graph.node] == [n.op_type for n in gptq.graph.node]
    ints = _int_weights(near), _int_weights(gptq)
    assert ints[0].keys() == ints[1].keys() and ints[0]
    assert any(not np.array_equal(ints[0][k], ints[1][k]) for k in ints[0])
    assert all(c.score is not None and 0.5 < c.score <= 1.0 for c in built.values())


def _conv_backbone_with_attention() -> onnx.ModelProto:
    """x[n,3,16,16] → two Convs → tokens [n,256,32] → LayerNorm → MatMul → Softmax: looks like
    a transformer, but the Convs hold 1290240 of the 1552384 multiply-adds (83 %), as in
    PP-OCRv4's recognizer (95 %)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = {
        "w1": rng.standard_normal((16, 3, 3, 3)) / 5,
        "w2": rng.standard_normal((32, 16, 3, 3)) / 12,
        "shape": np.array([0, 32, -1]),
        "gamma": np.ones(32),
        "beta": np.zeros(32),
        "wq": rng.standard_normal((32, 32)) / 6,
    }
    inits = [
        numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
        for k, v in w.items()
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Reshape", ["c2", "shape"], ["t"], name="tokens"),
        helper.make_node("Transpose", ["t"], ["tt"], name="nlc", perm=[0, 2, 1]),
        helper.make_node("LayerNormalization", ["tt", "gamma", "beta"], ["n"], name="norm"),
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="proj"),
        helper.make_node("Softmax", ["q"], ["y"], name="softmax", axis=-1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 256, 32])
    graph = helper.make_graph(nodes, "hybrid", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_the_transformer_scheme_on_a_conv_heavy_model_says_so(tmp_path):
    """Scheme auto picks the transformer scheme (MatMul, Softmax, LayerNorm) and keeps the
    Convs — 83 % of the multiply-adds — in fp32: the warning says so and names the fix."""
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32))
    result = StaticQuantize(calibration=calib, progress=False, target="avx2")(
        _conv_backbone_with_attention()
    )
    assert result.stats["calibration"]["scheme"] == "transformer"
    (warning,) = result.stats["warnings"]
    assert "83 % of this model's multiply-adds are in Conv" in warning
    assert "--scheme default" in warning
