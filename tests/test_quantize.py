"""Int8 quantization: fidelity on the trained models, determinism, calibration reuse and
bounded memory, node reports, pre-processing fallback, and every bad input of the CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import one_line_error, run_batches
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.core.data import model_input_specs, open_data
from converter.core.errors import BadInputError, DataError
from converter.core.metrics import accuracy, agreement, per_sample_cosine
from converter.core.runtime import make_session
from passes.base import PassRunner, fingerprint, make_pass
from passes.quantize import (
    CalibrationRanges,
    DynamicQuantize,
    StaticQuantize,
    calibrate,
    is_quantized,
)

ROOT = Path(__file__).resolve().parent.parent


def evaluate(ref, model: onnx.ModelProto) -> dict[str, float]:
    """Quantized vs fp32 outputs on the held-out digits, through onnxruntime."""
    specs = model_input_specs(model)
    data = open_data(ref.test, specs)
    base = next(iter(run_batches(make_session(str(ref.onnx)), data.batches(specs, 128)).values()))
    feeds = data.batches(specs, 128)
    out = next(iter(run_batches(make_session(model.SerializeToString()), feeds).values()))
    labels = data.labels()
    cos = per_sample_cosine(out, base)
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "agreement": agreement(out, base),
        "accuracy": accuracy(out, labels),
        "accuracy_fp32": accuracy(base, labels),
    }


def bytes_of(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


# ----------------------------------------------------------------------- fidelity


def test_dynamic_int8_encoder_stays_close(tiny_encoder):
    model = onnx.load(str(tiny_encoder.onnx))
    result = DynamicQuantize()(model)
    m = evaluate(tiny_encoder, result.model)
    assert m["cos_mean"] >= 0.995 and m["cos_min"] >= 0.98
    assert m["agreement"] >= 0.97
    assert m["accuracy"] >= m["accuracy_fp32"] - 0.01
    assert result.stats["by_op"]["MatMul"]["quantized"] == 8  # the 8 weight MatMuls
    reasons = result.stats["nodes"]["fp32"]
    assert reasons["node_matmul"].startswith("no constant weight")  # attention scores
    assert result.stats["size_after"] < 0.4 * result.stats["size_before"]
    assert result.stats["warnings"] == []


def test_static_int8_cnn_stays_close(digits_cnn):
    model = onnx.load(str(digits_cnn.onnx))
    result = StaticQuantize(calibration=digits_cnn.calib, progress=False)(model)
    m = evaluate(digits_cnn, result.model)
    assert m["cos_mean"] >= 0.998 and m["cos_min"] >= 0.98
    assert m["agreement"] >= 0.99
    assert m["accuracy"] >= m["accuracy_fp32"] - 0.01
    assert result.stats["by_op"]["Conv"] == {"quantized": 3, "fp32": 0}
    assert result.stats["by_op"]["Gemm"] == {"quantized": 2, "fp32": 0}
    assert result.stats["calibration"]["samples"] == 256
    assert result.stats["preprocess"] == "symbolic shape inference + optimization"
    ops = {n.op_type for n in result.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.parametrize(
    "settings",
    [
        {"calib_method": "entropy"},
        {"calib_method": "percentile"},
        {"calib_method": "distribution"},
        {"format": "qoperator"},
        {"per_channel": False},
        {"reduce_range": False},
        {"activation_type": "int8"},
        {"weight_type": "uint8"},
    ],
)
def test_static_options_keep_the_cnn_accurate(settings, digits_cnn):
    model = onnx.load(str(digits_cnn.onnx))
    result = StaticQuantize(calibration=digits_cnn.calib, progress=False, **settings)(model)
    m = evaluate(digits_cnn, result.model)
    assert m["cos_mean"] >= 0.99 and m["accuracy"] >= m["accuracy_fp32"] - 0.01
    if settings.get("format") == "qoperator":
        assert "QLinearConv" in {n.op_type for n in result.model.graph.node}


def test_distribution_ranges_keep_relus(digits_cnn):
    """Symmetric ranges on ReLU outputs: ORT would drop the ReLUs and let negatives through
    (cosine 0.76 measured); the pass keeps them."""
    model = onnx.load(str(digits_cnn.onnx))
    result = StaticQuantize(calibration=digits_cnn.calib, calib_method="distribution")(model)
    assert result.stats["calibration"]["kept_relu"] is True
    assert "Relu" in {n.op_type for n in result.model.graph.node}
    minmax = StaticQuantize(calibration=digits_cnn.calib)(model)
    assert minmax.stats["calibration"]["kept_relu"] is False


def test_static_int8_on_the_encoder_and_mlp(tiny_encoder, digits_mlp):
    for ref in (tiny_encoder, digits_mlp):
        model = onnx.load(str(ref.onnx))
        m = evaluate(ref, StaticQuantize(calibration=ref.calib, progress=False)(model).model)
        assert m["cos_mean"] >= 0.99 and m["accuracy"] >= m["accuracy_fp32"] - 0.01
        m = evaluate(ref, DynamicQuantize()(model).model)
        assert m["cos_mean"] >= 0.99 and m["accuracy"] >= m["accuracy_fp32"] - 0.01


def test_conv_dominated_model_gets_a_warning_in_dynamic_mode(digits_cnn, caplog):
    model = onnx.load(str(digits_cnn.onnx))
    with caplog.at_level(logging.WARNING, logger="passes"):
        result = DynamicQuantize()(model)
    assert "conv-dominated" in result.stats["warnings"][0]
    assert "--mode static" in result.stats["warnings"][0]
    assert "ConvInteger" in {n.op_type for n in result.model.graph.node}
    assert any("conv-dominated" in r.getMessage() for r in caplog.records)
    assert DynamicQuantize(exclude_ops=["Conv"])(model).stats["warnings"] == []


# ----------------------------------------------------------------------- exclusions, stats


def test_excluded_nodes_stay_fp32_with_the_reason(digits_cnn):
    model = onnx.load(str(digits_cnn.onnx))
    result = StaticQuantize(
        calibration=digits_cnn.calib, exclude=["^node_linear_1$"], exclude_ops=["Conv"]
    )(model)
    fp32 = result.stats["nodes"]["fp32"]
    assert fp32["node_linear_1"] == "excluded by --exclude '^node_linear_1$'"
    assert fp32["node_conv2d"] == "op type Conv excluded (--exclude-op)"
    float_inits = {
        t.name for t in result.model.graph.initializer if t.data_type == TensorProto.FLOAT
    }
    for node in result.model.graph.node:
        if node.name in fp32 and node.op_type in ("Conv", "Gemm"):  # weight still float
            assert node.input[1] in float_inits, node.name
    assert "node_linear" in result.stats["nodes"]["quantized"]


def test_dynamic_exclusion_of_a_gemm_survives_ort_gemm_rewrite(digits_mlp):
    """ORT rewrites Gemm X to MatMul X_MatMul in dynamic mode; excluding X must exclude it."""
    model = onnx.load(str(digits_mlp.onnx))
    result = DynamicQuantize(nodes_to_exclude=["node_linear_2"])(model)
    assert result.stats["nodes"]["fp32"] == {
        "node_linear_2": "excluded by the caller (nodes_to_exclude)"
    }
    kept = {n.name: n.op_type for n in result.model.graph.node}
    assert kept.get("node_linear_2_MatMul") == "MatMul" or kept.get("node_linear_2") == "Gemm"
    assert result.stats["by_op"]["Gemm"] == {"quantized": 2, "fp32": 1}


def test_unmatched_exclusions_warn(digits_mlp, caplog):
    model = onnx.load(str(digits_mlp.onnx))
    with caplog.at_level(logging.WARNING, logger="passes"):
        DynamicQuantize(exclude=["nothing-like-this"], exclude_ops=["LSTM"])(model)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "matched no node" in text and "no LSTM node" in text


def test_stats_are_plain_json(digits_cnn):
    model = onnx.load(str(digits_cnn.onnx))
    for p in (DynamicQuantize(), StaticQuantize(calibration=digits_cnn.calib)):
        stats = p(model).stats
        assert json.loads(json.dumps(stats)) == stats


def test_is_quantized(digits_mlp):
    model = onnx.load(str(digits_mlp.onnx))
    assert not is_quantized(model)
    assert is_quantized(DynamicQuantize()(model).model)
    assert is_quantized(StaticQuantize(calibration=digits_mlp.calib)(model).model)


# ----------------------------------------------------------------------- determinism


def test_same_input_same_bytes(digits_cnn, tiny_encoder):
    cnn = onnx.load(str(digits_cnn.onnx))
    first = StaticQuantize(calibration=digits_cnn.calib)(cnn).model
    assert bytes_of(first) == bytes_of(StaticQuantize(calibration=digits_cnn.calib)(cnn).model)
    enc = onnx.load(str(tiny_encoder.onnx))
    assert bytes_of(DynamicQuantize()(enc).model) == bytes_of(DynamicQuantize()(enc).model)


def test_same_bytes_across_processes(tmp_path, digits_cnn):
    """Another interpreter, another hash seed: the CLI writes the same file."""
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"q{seed}.onnx"
        argv = ["quantize", str(digits_cnn.onnx), "-o", str(out), "--mode", "static"]
        argv += ["--calib", str(digits_cnn.calib), "-q"]
        env = {**os.environ, "PYTHONHASHSEED": seed}
        code = "import sys; from converter.cli import main; sys.exit(main(sys.argv[1:]))"
        run = subprocess.run(
            [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True
        )
        assert run.returncode == 0, run.stderr.decode()
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------- calibration reuse


def test_precomputed_ranges_give_the_same_model(digits_cnn, tmp_path):
    model = onnx.load(str(digits_cnn.onnx))
    # bias correction and stem rounding read the data, which reused ranges alone do not have
    minmax = {"calib_method": "minmax", "bias_correction": False, "stem_rounding": False}
    ranges = StaticQuantize(calibration=digits_cnn.calib, **minmax).calibrate(model)
    assert ranges.samples == 256 and ranges.model == fingerprint(model)
    for skip in ([], ["node_conv2d"], ["node_linear", "node_conv2d_2"]):
        direct = StaticQuantize(calibration=digits_cnn.calib, nodes_to_exclude=skip, **minmax)
        direct = direct(model)
        reused = StaticQuantize(ranges=ranges, nodes_to_exclude=skip)(model)
        assert bytes_of(direct.model) == bytes_of(reused.model)
        assert reused.stats["calibration"]["reused"] is True
    path = ranges.save(tmp_path / "ranges.json")
    loaded = CalibrationRanges.load(path)
    from_file = StaticQuantize(ranges=str(path), nodes_to_exclude=["node_conv2d"])(model)
    direct = StaticQuantize(
        calibration=digits_cnn.calib, nodes_to_exclude=["node_conv2d"], **minmax
    )
    assert bytes_of(from_file.model) == bytes_of(direct(model).model)
    assert loaded.method == "minmax" and loaded.prepared is None
    again = calibrate(model, digits_cnn.calib, calib_method="entropy")
    assert again.method == "entropy"


def test_ranges_of_another_model_are_refused(digits_cnn, digits_mlp, tmp_path):
    ranges = StaticQuantize(calibration=digits_mlp.calib).calibrate(onnx.load(str(digits_mlp.onnx)))
    with pytest.raises(BadInputError, match="another model"):
        StaticQuantize(ranges=ranges)(onnx.load(str(digits_cnn.onnx)))
    with pytest.raises(BadInputError, match="both calibration data and precomputed ranges"):
        StaticQuantize(calibration=digits_cnn.calib, ranges=ranges, bias_correction=False)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BadInputError, match="cannot read calibration ranges"):
        StaticQuantize(ranges=tmp_path / "bad.json")


def wide_model(width: int = 2048) -> onnx.ModelProto:
    """x[b,width] → MatMul → Relu → MatMul: big activations per sample."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    w2 = (rng.standard_normal((width, 8)) / np.sqrt(width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _calib_data(path: Path, samples: int, width: int, single_file: bool) -> Path:
    """``samples`` rows as one .npz file, or as a folder of 200-sample shards."""
    rng = np.random.default_rng(1)
    if single_file:
        np.savez(path, x=rng.standard_normal((samples, width)).astype("f4"))
        return path
    path.mkdir()
    for i in range(samples // 200):
        np.savez(path / f"{i:03d}.npz", x=rng.standard_normal((200, width)).astype("f4"))
    return path


def _peak_bytes(run) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "method, single_file", [("minmax", False), ("entropy", False), ("entropy", True)]
)
def test_calibration_memory_does_not_grow_with_the_samples(method, single_file, tmp_path):
    """2400 samples x 3 tensors x 4 KB = 29 MB of activations if they were kept (ORT's
    histogram calibrators keep every output of one reader) and 10 MB of input if a file
    were loaded whole; fed one streamed batch per call, the peak is the same for 200 and
    for 2400 samples, in shards or in one file."""
    width, samples = 1024, 2400
    small = _calib_data(tmp_path / "small.npz", 200, width, single_file)
    big = _calib_data(tmp_path / "big.npz", samples, width, single_file)
    model = wide_model(width)

    def calibrate_on(data):
        quantize = StaticQuantize(calibration=data, calib_method=method, progress=False)
        return lambda: quantize.calibrate(model)

    calibrate_on(small)()  # warm-up: imports and caches are not what we measure
    small_peak = _peak_bytes(calibrate_on(small))
    big_peak = _peak_bytes(calibrate_on(big))
    kept_all = samples * width * 4 * 3
    assert big_peak - small_peak < 0.03 * kept_all, (small_peak, big_peak)


def test_calibration_feeds_one_batch_per_collect_call(digits_cnn, monkeypatch):
    import onnxruntime.quantization.calibrate as ort_calibrate

    calls = []
    original = ort_calibrate.MinMaxCalibrater.collect_data

    def spy(self, reader):
        feeds = []
        original_get = reader.get_next

        def get_next():
            feed = original_get()
            if feed:
                feeds.append(len(feed["x"]))
            return feed

        reader.get_next = get_next
        original(self, reader)
        calls.append(feeds)
        assert self.intermediate_outputs == []

    monkeypatch.setattr(ort_calibrate.MinMaxCalibrater, "collect_data", spy)
    model = onnx.load(str(digits_cnn.onnx))
    StaticQuantize(
        calibration=digits_cnn.calib, calib_samples=100, calib_batch_size=32,
        calib_method="minmax", bias_correction=False,
    )(model)  # fmt: skip
    assert calls == [[32], [32], [32], [4]]


# ----------------------------------------------------------------------- pre-processing


def symbolic_failure_model() -> onnx.ModelProto:
    """Min(32, seq) rows of a table added to a [seq, 8] input: symbolic shape inference
    cannot broadcast Min(32, seq) with seq (the pattern of BERT position embeddings)."""
    rng = np.random.default_rng(0)

    def const(name, value):
        return numpy_helper.from_array(np.array(value, dtype=np.int64), name)

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "zero"], ["seq"], name="seq", axis=0),
        helper.make_node("Min", ["seq", "cap"], ["n"], name="min"),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
        helper.make_node("Slice", ["table", "starts", "n1", "axes"], ["pos"], name="slice"),
        helper.make_node("Add", ["x", "pos"], ["h"], name="add"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        const("zero", 0),
        const("cap", 32),
        const("axes", [0]),
        const("starts", [0]),
    ]
    graph = helper.make_graph(
        nodes,
        "symfail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_preprocessing_merges_symbolic_dims(tmp_path, monkeypatch):
    """The BERT position-embedding pattern: with auto_merge, symbolic shape inference
    succeeds (quant_pre_process runs once, not twice). Static mode's pre-processing; dynamic
    mode skips symbolic inference (tests/test_quantize_cost.py)."""
    monkeypatch.chdir(tmp_path)
    result = symbolic_then_dynamic(symbolic_failure_model())
    assert result.stats["preprocess"] == "symbolic shape inference + optimization"
    assert list(tmp_path.iterdir()) == [] and result.stats["nodes"]["quantized"] == ["mm"]


def symbolic_then_dynamic(model: onnx.ModelProto):
    """``model`` pre-processed as static mode does (symbolic shape inference first), then
    quantized by DynamicQuantize; stats["preprocess"] says how it was pre-processed."""
    import tempfile

    from passes.ort import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        prepared = preprocess(model, Path(tmp), symbolic=True)
    result = DynamicQuantize(preprocess=False)(prepared.model)
    result.stats["preprocess"] = prepared.note
    return result


def test_preprocessing_falls_back_and_keeps_the_cwd_clean(tmp_path, monkeypatch, caplog):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    strict = SymbolicShapeInference.infer_shapes  # without auto_merge this model fails

    def no_merge(model, int_max=2**31 - 1, auto_merge=False, *args, **kwargs):
        return strict(model, int_max, False, *args, **kwargs)

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(no_merge))
    monkeypatch.chdir(tmp_path)  # ORT writes sym_shape_infer_temp.onnx into the cwd on failure
    model = symbolic_failure_model()
    with caplog.at_level(logging.WARNING, logger="passes"):
        result = symbolic_then_dynamic(model)
    assert result.stats["preprocess"].startswith("ONNX shape inference + optimization (after:")
    assert "Incomplete symbolic shape inference" in result.stats["preprocess"]
    assert any("pre-processing" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.iterdir()) == []
    assert result.stats["nodes"]["quantized"] == ["mm"]
    x = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
    base = make_session(model.SerializeToString()).run(None, {"x": x})[0]
    out = make_session(result.model.SerializeToString()).run(None, {"x": x})[0]
    assert per_sample_cosine(out, base).min() > 0.99


def test_no_preprocess(digits_mlp):
    result = DynamicQuantize(preprocess=False)(onnx.load(str(digits_mlp.onnx)))
    assert result.stats["preprocess"] == "off (--no-preprocess)"
    assert result.stats["by_op"]["Gemm"] == {"quantized": 3, "fp32": 0}


def test_ort_chatter_does_not_reach_stdout(digits_cnn, capsys):
    model = onnx.load(str(digits_cnn.onnx))
    StaticQuantize(calibration=digits_cnn.calib, calib_method="entropy", preprocess=False)(model)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Please consider" not in captured.err


# ----------------------------------------------------------------------- settings


def test_bad_settings_are_rejected(digits_cnn):
    cases = [
        ({"calib_method": "kl"}, "calib_method = 'kl'"),
        ({"format": "qlinear"}, "format"),
        ({"activation_type": "int4"}, "activation_type"),
        ({"weight_type": "float8"}, "weight_type"),
        ({"calib_samples": 0}, "calib_samples"),
        ({"calib_batch_size": -1}, "calib_batch_size"),
        ({"exclude": ["["]}, "regular expression"),
        ({"activation_type": "int8", "weight_type": "uint8"}, "not supported"),
    ]
    for settings, words in cases:
        with pytest.raises(BadInputError, match=words):
            StaticQuantize(calibration=digits_cnn.calib, **settings)
    with pytest.raises(BadInputError, match="unknown setting"):
        make_pass(DynamicQuantize, {"symmetric": True})


def test_runner_names_the_failed_pass(digits_cnn):
    model = onnx.load(str(digits_cnn.onnx))
    with pytest.raises(BadInputError) as e:
        PassRunner([DynamicQuantize(), StaticQuantize(calibration=digits_cnn.calib)]).run(model)
    assert e.value.message.startswith(
        "pass quantize-static failed (already ran: quantize-dynamic): the model is already "
        "quantized"
    )


# ----------------------------------------------------------------------- CLI


@pytest.fixture
def cnn_copy(tmp_path, digits_cnn):
    src = tmp_path / "cnn.onnx"
    src.write_bytes(digits_cnn.onnx.read_bytes())
    return src


def _bad_data(tmp_path: Path, name: str, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_cli_bad_calibration_data_is_exit_2(tmp_path, capsys, cnn_copy):
    good = np.zeros((8, 1, 8, 8), np.float32)
    nan = good.copy()
    nan[5, 0, 3, 3] = np.nan
    cases = {
        "missing input": (_bad_data(tmp_path, "names.npz", image=good), "missing inputs ['x']"),
        "shape": (
            _bad_data(tmp_path, "shape.npz", x=np.zeros((8, 1, 7, 7), np.float32)),
            "axis 2 is 7, model wants 8",
        ),
        "dtype": (
            _bad_data(tmp_path, "dtype.npz", x=np.zeros((8, 1, 8, 8), np.int64)),
            "is int64, model wants float32",
        ),
        "nan": (_bad_data(tmp_path, "nan.npz", x=nan), "NaN or Inf (first at sample 5)"),
        "empty": (_bad_data(tmp_path, "empty.npz", x=good[:0]), "holds no samples"),
        "absent": (tmp_path / "absent.npz", "does not exist"),
    }
    before = cnn_copy.read_bytes()
    out = tmp_path / "out.onnx"
    for what, (data, words) in cases.items():
        argv = ["quantize", str(cnn_copy), "-o", str(out), "--mode", "static", "--calib", str(data)]
        assert main(argv) == 2, what
        assert words in one_line_error(capsys), what
        assert not out.exists() and cnn_copy.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".onnx" and p != cnn_copy]


def test_cli_bad_arguments_are_exit_2(tmp_path, capsys, cnn_copy, digits_cnn):
    out = tmp_path / "out.onnx"
    base = ["quantize", str(cnn_copy), "-o", str(out)]
    calib = ["--calib", str(digits_cnn.calib)]
    cases = [
        ([*base, "--mode", "static"], "needs calibration data"),
        ([*base, "--mode", "dynamic", *calib], "only applies to --mode static"),
        ([*base, "--mode", "dynamic", "--format", "qdq"], "only applies to --mode static"),
        ([*base, "--mode", "static", *calib, "--calib-samples", "0"], "calib_samples"),
        ([*base, "--mode", "static", *calib, "--exclude", "("], "regular expression"),
        ([*base, "--mode", "fast"], "invalid choice"),
        (["quantize", str(cnn_copy), "-o", str(cnn_copy), "--mode", "dynamic"], "also an input"),
    ]
    before = cnn_copy.read_bytes()
    for argv, words in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors
            code = e.code
        assert code == 2, argv
        assert words in one_line_error(capsys), argv
        assert not out.exists() and cnn_copy.read_bytes() == before


def test_cli_refuses_quantized_and_fp16_models(tmp_path, capsys, digits_mlp):
    from passes.fp16 import Float16

    model = onnx.load(str(digits_mlp.onnx))
    out = tmp_path / "out.onnx"
    for name, converted, words in (
        ("int8.onnx", DynamicQuantize()(model).model, "already quantized"),
        ("fp16.onnx", Float16(keep_io_types=False)(model).model, "no float32 weights"),
    ):
        src = tmp_path / name
        src.write_bytes(converted.SerializeToString())
        capsys.readouterr()  # the conversion passes' own log lines
        for mode in (["--mode", "dynamic"], ["--mode", "static", "--calib", str(digits_mlp.calib)]):
            assert main(["quantize", str(src), "-o", str(out), *mode]) == 2
            assert words in one_line_error(capsys)
            assert not out.exists()


def test_cli_calibration_error_mid_stream_leaves_nothing(tmp_path, capsys, cnn_copy):
    """NaN in the last shard: found while calibrating, after pre-processing; no output."""
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        x = rng.random((20, 1, 8, 8)).astype(np.float32)
        if i == 2:
            x[7] = np.inf
        np.savez(folder / f"{i}.npz", x=x)
    out = tmp_path / "out.onnx"
    argv = ["quantize", str(cnn_copy), "-o", str(out), "--mode", "static", "--calib", str(folder)]
    assert main(argv) == 2
    assert "NaN or Inf (first at sample 47)" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "shards"]


def test_cli_quantizes_and_reports(tmp_path, capsys, digits_cnn, tiny_encoder):
    out = tmp_path / "cnn-int8.onnx"
    argv = ["quantize", str(digits_cnn.onnx), "-o", str(out), "--mode", "static"]
    argv += ["--calib", str(digits_cnn.calib), "--exclude-op", "Gemm"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "static int8, QDQ: uint8 activations, int8 per-channel weights" in report
    assert "calibration: mse on 256 samples" in report
    assert "bias correction: 3 Conv/Gemm biases on 64 samples" in report
    # the shipped kernels checked against the model's QDQ semantics on 8 calibration samples
    assert "kernel truth (8 samples, 1 thread; optimizations on vs off): kernels agree" in report
    assert re.search(r"vs fp32: semantics (0\.99|1\.0)\d+, kernels (0\.99|1\.0)\d+", report)
    assert "op type Gemm excluded (--exclude-op): node_linear, node_linear_1" in report
    assert is_quantized(onnx.load(str(out)))
    enc = tmp_path / "enc-int8.onnx"
    assert main(["quantize", str(tiny_encoder.onnx), "-o", str(enc), "--mode", "dynamic"]) == 0
    report = capsys.readouterr().out
    assert "dynamic int8" in report and "no constant weight" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn-int8.onnx", "enc-int8.onnx"]


def test_calibration_error_is_a_data_error(tmp_path):
    """Values the model rejects at run time surface as a DataError naming the samples."""
    model = symbolic_failure_model()  # 32 table rows: a batch of 40 rows cannot be added
    np.savez(tmp_path / "long.npz", x=np.zeros((40, 8), np.float32))
    quantize = StaticQuantize(
        calibration=tmp_path / "long.npz", calib_batch_size=40, calib_method="minmax"
    )
    with pytest.raises(DataError, match="calibration samples 0..39 through the model failed"):
        quantize(model)
