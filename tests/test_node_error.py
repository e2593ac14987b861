"""Per-tensor quantization error (converter/check/node_error.py): every number checked against a
direct computation — numpy round trips of the int8 model's own scales, onnxruntime's
qdq_loss_debug pipeline, plain onnxruntime runs — on tiny seeded models built here; and the
same records in `sensitivity --json` and in `auto`'s report and manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from converter.check.node_error import EXACT_DB, node_errors, prepare_reference, sample_feeds
from converter.core.runtime import make_session
from passes.quantize import DynamicQuantize, StaticQuantize

OUTLIER = 1000.0  # one calibration sample of input b: its range, and so its int8 step, explodes


def _two_input_model() -> onnx.ModelProto:
    """a[batch,16], b[batch,16] → concat(a·Wa, b·Wb) → Relu → ·W2 → y[batch,4] (no
    pattern quant_pre_process fuses: node names stay)."""
    rng = np.random.default_rng(0)
    weights = {
        "wa": rng.standard_normal((16, 8)) / 4,
        "wb": rng.standard_normal((16, 8)) / 4,
        "w2": rng.standard_normal((16, 4)) / 3,
    }
    nodes = [
        helper.make_node("MatMul", ["a", "wa"], ["ha"], name="mm_a"),
        helper.make_node("MatMul", ["b", "wb"], ["hb"], name="mm_b"),
        helper.make_node("Concat", ["ha", "hb"], ["s"], name="concat", axis=1),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 16]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """a uniform in [-1, 1] (a narrow range), b standard normal."""
    return {
        "a": rng.uniform(-1, 1, (n, 16)).astype(np.float32),
        "b": rng.standard_normal((n, 16)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("node_error")
    calib = _inputs(np.random.default_rng(1), 64)
    calib["b"][5, 3] = OUTLIER  # calibrated range of b: [-3.x, 1000] → a step of ~4
    np.savez(folder / "calib.npz", **calib)
    data = _inputs(np.random.default_rng(2), 32)  # scored samples: no outlier
    np.savez(folder / "data.npz", **data)
    model = _two_input_model()
    onnx.save(model, str(folder / "model.onnx"))
    static = StaticQuantize(calibration=folder / "calib.npz", progress=False)(model).model
    reference = prepare_reference(model)
    feeds = sample_feeds(folder / "data.npz", model, 8)
    return {
        "folder": folder,
        "model": model,
        "reference": reference,
        "static": static,
        "feeds": feeds,
        "errors": node_errors(reference, static, feeds),
    }


def _by_name(errors) -> dict:
    return {e.tensor: e for e in errors}


def _sqnr(x: np.ndarray, y: np.ndarray) -> float:
    """onnxruntime's formula, written out (float64)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    eps = np.finfo(float).eps
    return 20 * math.log10(max(np.linalg.norm(x), eps) / max(np.linalg.norm(x - y), eps))


def _qdq_round_trip(x: np.ndarray, model: onnx.ModelProto, tensor: str) -> np.ndarray:
    """x through the QuantizeLinear → DequantizeLinear pair ``model`` puts on ``tensor``,
    in numpy (uint8, round half to even, saturate)."""
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale, zero = inits[q.input[1]].astype(np.float32), inits[q.input[2]].astype(np.int64)
    quantized = np.clip(np.rint(x / scale) + zero, 0, 255)
    return ((quantized - zero) * scale).astype(np.float32)


# ---------------------------------------------------------------- static (QDQ)


def test_static_records_cover_every_quantized_activation_and_weight(two_inputs):
    errors = _by_name(two_inputs["errors"])
    kinds = {name: e.kind for name, e in errors.items()}
    assert {kinds[w] for w in ("wa", "wb", "w2")} == {"weight"}
    assert {kinds[t] for t in ("a", "b", "y")} == {"activation"}
    assert errors["a"].nodes == ("mm_a",) and errors["wb"].nodes == ("mm_b",)
    for e in errors.values():
        assert math.isfinite(e.sqnr_db) and -1 <= e.cosine <= 1
        assert (e.propagated_sqnr_db is None) == (e.kind == "weight")
    sqnrs = [e.sqnr_db for e in two_inputs["errors"]]
    assert sqnrs == sorted(sqnrs)  # worst first
    again = node_errors(two_inputs["reference"], two_inputs["static"], two_inputs["feeds"])
    assert again == two_inputs["errors"]  # deterministic


def test_narrow_input_beats_the_one_whose_range_an_outlier_stretched(two_inputs):
    """Both SQNRs equal a numpy round trip with the int8 model's own scale and zero point;
    a (step 2/255 over a range it fills) is far better than b (step ~4 for values ~1)."""
    errors, static = _by_name(two_inputs["errors"]), two_inputs["static"]
    feeds = two_inputs["feeds"]
    for name in ("a", "b"):
        x = np.concatenate([f[name] for f in feeds])
        want = _sqnr(x, _qdq_round_trip(x, static, name))
        assert errors[name].sqnr_db == pytest.approx(want, rel=1e-6, abs=1e-9)
        # a graph input reaches the int8 model unchanged: nothing propagates into it
        assert errors[name].propagated_sqnr_db == pytest.approx(errors[name].sqnr_db)
    assert errors["a"].sqnr_db > 40 > 10 > errors["b"].sqnr_db
    assert errors["a"].cosine > 0.9999 > 0.9 > errors["b"].cosine
    assert two_inputs["errors"][0].tensor == "b"  # the worst of all


def test_numbers_equal_onnxruntimes_qdq_loss_debug(two_inputs):
    """The propagated activation SQNRs are qdq_loss_debug's xmodel_err, the (int8) weight
    SQNRs its compute_weight_error, run through its own pipeline on the same samples."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        compute_weight_error,
        create_activation_matching,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    folder = two_inputs["folder"]
    paths = {}
    for name in ("reference", "static"):
        paths[name] = folder / f"{name}.onnx"
        onnx.save(two_inputs[name], str(paths[name]))
        modify_model_output_intermediate_tensors(str(paths[name]), str(folder / f"{name}_aug.onnx"))
    feeds = two_inputs["feeds"]
    qdq = collect_activations(str(folder / "static_aug.onnx"), iter(feeds))
    fp32 = collect_activations(str(folder / "reference_aug.onnx"), iter(feeds))
    ort_errors = compute_activation_error(create_activation_matching(qdq, fp32))
    ort_weights = compute_weight_error(create_weight_matching(paths["reference"], paths["static"]))
    ours = _by_name(two_inputs["errors"])
    activations = {n for n, e in ours.items() if e.kind == "activation"}
    assert activations == set(ort_errors) and len(activations) >= 4
    for name in activations:
        want = ort_errors[name]["xmodel_err"]
        assert ours[name].propagated_sqnr_db == pytest.approx(want, rel=1e-4), name
    assert {n for n, e in ours.items() if e.kind == "weight"} == set(ort_weights)
    for name, want in ort_weights.items():
        assert ours[name].sqnr_db == pytest.approx(want, rel=1e-4), name


def test_uint8_weights_are_dequantized_without_wrapping(two_inputs):
    """uint8 weights (zero point 128-ish): fp32 vs (q − zp)·scale in widened integers.
    (qdq_loss_debug's create_weight_matching subtracts in uint8, which wraps.)"""
    model = two_inputs["model"]
    calib = two_inputs["folder"] / "calib.npz"
    int8 = StaticQuantize(calibration=calib, progress=False, weight_type="uint8")(model).model
    errors = _by_name(node_errors(two_inputs["reference"], int8, two_inputs["feeds"]))
    inits = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    for name in ("wa", "wb", "w2"):
        assert inits[f"{name}_quantized"].dtype == np.uint8
        zero = inits[f"{name}_zero_point"].astype(np.int64)
        scale = inits[f"{name}_scale"]
        axis_shape = (1, -1) if scale.size > 1 else ()  # per output channel of a MatMul
        dequantized = (inits[f"{name}_quantized"] - zero.reshape(axis_shape)) * scale.reshape(
            axis_shape
        )
        fp32 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        assert errors[name].sqnr_db == pytest.approx(_sqnr(fp32, dequantized), rel=1e-6)
        assert errors[name].sqnr_db > 30


def test_a_relu_folded_into_the_node_before_is_measured_after_the_relu(tmp_path):
    """x → MatMul → Relu: onnxruntime drops the Relu and lets the uint8 range clip; the
    activation is still the fp32 (post-Relu) value vs its round trip."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="mm2"),
        ],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    int8 = StaticQuantize(calibration=tmp_path / "calib.npz", progress=False)(model).model
    assert "Relu" not in {n.op_type for n in int8.graph.node}
    feeds = [{"x": x[i : i + 1]} for i in range(8)]
    r = _by_name(node_errors(prepare_reference(model), int8, feeds))["r"]
    fp32_r = np.maximum(x[:8] @ numpy_helper.to_array(w), 0)
    assert r.sqnr_db == pytest.approx(_sqnr(fp32_r, _qdq_round_trip(fp32_r, int8, "r")), rel=1e-5)
    assert r.sqnr_db > 30


def test_an_all_zero_tensor_kept_exact_is_not_ranked_worst(tmp_path):
    """onnxruntime's formula gives 0 dB for 0 vs 0; here it is EXACT_DB."""
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(4, np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "bias"], ["y"], name="gemm")],
        "zero_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8)).astype(np.float32))
    quantize = StaticQuantize(
        calibration=tmp_path / "calib.npz", progress=False, bias_correction=False
    )  # bias correction would move the zero bias
    int8 = quantize(model).model
    feeds = sample_feeds(tmp_path / "calib.npz", model, 4)
    errors = node_errors(prepare_reference(model), int8, feeds)
    assert _by_name(errors)["bias"].sqnr_db == EXACT_DB
    assert errors[-1].tensor == "bias" and errors[0].sqnr_db < 60


# ---------------------------------------------------------------- dynamic


def _dynamic_round_trip(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear (ONNX spec: uint8, the range always holds 0) then dequantize."""
    low, high = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = np.float32((high - low) / 255)
    zero = np.clip(np.rint(-low / scale), 0, 255)
    quantized = np.clip(np.rint(x / scale) + zero, 0, 255)
    return ((quantized - zero) * scale).astype(np.float32)


def test_dynamic_records_of_replaced_nodes_and_their_inputs(two_inputs):
    model, reference, feeds = two_inputs["model"], two_inputs["reference"], two_inputs["feeds"]
    int8 = DynamicQuantize()(model).model
    errors = _by_name(node_errors(reference, int8, feeds))
    assert {errors[t].kind for t in ("ha", "hb", "y")} == {"output"}
    assert errors["y"].nodes == ("mm_out",) and errors["ha"].nodes == ("mm_a",)
    assert {errors[t].kind for t in ("a", "b", "r")} == {"activation"}
    assert {errors[t].kind for t in ("wa", "wb", "w2")} == {"weight"}
    # the graph output, propagated: a plain run of both models
    fp32_session, int8_session = (
        make_session(model.SerializeToString()),
        make_session(int8.SerializeToString()),
    )
    want = np.concatenate([fp32_session.run(None, f)[0] for f in feeds])
    got = np.concatenate([int8_session.run(None, f)[0] for f in feeds])
    assert errors["y"].propagated_sqnr_db == pytest.approx(_sqnr(want, got), rel=1e-6)
    # mm_a reads a graph input: alone and propagated are the same computation
    assert errors["ha"].sqnr_db == pytest.approx(errors["ha"].propagated_sqnr_db, rel=1e-12)
    # an input quantized per run (per sample here), as the ONNX spec says
    a = [f["a"] for f in feeds]
    want = _sqnr(np.concatenate(a), np.concatenate([_dynamic_round_trip(x) for x in a]))
    assert errors["a"].sqnr_db == pytest.approx(want, rel=1e-5)
    # r is computed from int8 matmuls in the int8 model: more error than its own round trip
    assert errors["r"].propagated_sqnr_db < errors["r"].sqnr_db


def test_dynamic_alone_is_the_model_with_only_that_node_quantized(tmp_path):
    """x → mm1 → mm2 → y: mm2's "alone" error is that of DynamicQuantize with mm1 excluded
    (mm2 reads mm1's fp32 output), its propagated error that of the fully quantized model."""
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((12, 12)).astype(np.float32) / 3 for _ in range(2)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
        ],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights, 1)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((1, 12)).astype(np.float32)} for _ in range(6)]
    errors = _by_name(node_errors(prepare_reference(model), DynamicQuantize()(model).model, feeds))

    def y_sqnr(candidate: onnx.ModelProto) -> float:
        runs = [make_session(m.SerializeToString()) for m in (model, candidate)]
        want, got = ([s.run(None, f)[0] for f in feeds] for s in runs)
        return _sqnr(np.concatenate(want), np.concatenate(got))

    alone = DynamicQuantize(nodes_to_exclude=["mm1"])(model).model
    assert errors["y"].sqnr_db == pytest.approx(y_sqnr(alone), rel=1e-9)
    assert errors["y"].propagated_sqnr_db == pytest.approx(
        y_sqnr(DynamicQuantize()(model).model), rel=1e-9
    )
    assert errors["y"].propagated_sqnr_db < errors["y"].sqnr_db


# ---------------------------------------------------------------- sensitivity and auto


def test_sensitivity_json_and_table_hold_the_records(two_inputs, tmp_path, capsys):
    folder = two_inputs["folder"]
    args = ["sensitivity", folder / "model.onnx", "--data", folder / "data.npz"]
    args += ["--calib", folder / "calib.npz", "--json", tmp_path / "s.json", "--tensor-errors", 3]
    code, out, _ = cli(capsys, *args)
    assert code == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    # the fully quantized model is the one StaticQuantize makes with the same settings
    want = [e.to_dict() for e in two_inputs["errors"]]
    assert doc["tensor_errors"] == json.loads(json.dumps(want))
    assert doc["tensor_error_samples"] == 8
    table = out.split("per-tensor error of the fully quantized model", 1)[1].splitlines()
    worst = two_inputs["errors"][0]
    assert table[3].split()[:2] == [worst.tensor, worst.kind]
    assert f"{worst.sqnr_db:.1f}" in table[3]
    assert f"... {len(want) - 3} more" in out
    code, out, _ = cli(capsys, *args[:-2], "--tensor-errors", 0)
    assert code == 0 and "per-tensor error" not in out
    assert json.loads((tmp_path / "s.json").read_text())["tensor_errors"] is None


def _auto(two_inputs, out: Path, min_score: float, **extra) -> dict:
    from converter.search.auto import auto

    folder = two_inputs["folder"]
    auto(
        folder / "model.onnx",
        folder / "data.npz",
        out,
        metric="cosine",
        min_score=min_score,
        calib=folder / "calib.npz",
        bench_runs=3,
        **extra,
    )
    return json.loads((out / "manifest.json").read_text())


def test_auto_report_has_the_chosen_candidates_table(two_inputs, tmp_path):
    manifest = _auto(two_inputs, tmp_path / "out", min_score=0.5)
    chosen = next(c for c in manifest["candidates"] if c["name"] == manifest["chosen"])
    others = [c for c in manifest["candidates"] if c is not chosen]
    assert all(c["node_errors"] is None for c in others)
    # the numbers: node_errors of the written model against the pre-processed fp32 model
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))
    feeds = sample_feeds(two_inputs["folder"] / "data.npz", two_inputs["model"])
    want = node_errors(two_inputs["reference"], written, feeds)
    assert chosen["node_errors"]["samples"] == 8
    assert chosen["node_errors"]["tensors"] == json.loads(json.dumps([e.to_dict() for e in want]))
    report = (tmp_path / "out" / "report.md").read_text()
    section = report.split(f"## Per-tensor error: {chosen['name']}", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == min(10, len(want))
    assert rows[0].startswith(f"| {want[0].tensor} | {want[0].kind} |")
    assert f"| {want[0].sqnr_db:.1f} |" in rows[0]
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"Per-tensor error: {chosen['name']}" in html and f"<td>{want[0].tensor}</td>" in html


def test_auto_measures_the_closest_candidate_on_a_miss(two_inputs, tmp_path):
    manifest = _auto(two_inputs, tmp_path / "miss", min_score=1.0, min_worst=1.0, max_excluded=1)
    assert manifest["chosen"] is None
    measured = [c for c in manifest["candidates"] if c["node_errors"] is not None]
    scored = [c for c in manifest["candidates"] if c["score"] is not None]
    assert [c["name"] for c in measured] == [max(scored, key=lambda c: c["score"])["name"]]
    assert measured[0]["node_errors"]["tensors"]
    report = (tmp_path / "miss" / "report.md").read_text()
    assert f"## Per-tensor error: {measured[0]['name']}" in report


def test_corrected_biases_rank_after_every_other_tensor(tmp_path):
    """Bias correction moves the int32 biases on purpose: their 'error' against the fp32
    bias is the correction (YOLOv8n's worst ten were all biases, 18.6–24 dB), so they are
    kind "bias" and rank last, whatever their SQNR."""
    from tests.test_kernel_truth import _folded_depthwise_model

    model = _folded_depthwise_model()
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((32, 4, 16, 16)).astype(np.float32))
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((8, 4, 16, 16)).astype(np.float32))
    result = StaticQuantize(calibration=tmp_path / "c.npz", progress=False, target="avx2")(model)
    assert result.stats["bias_correction"]["layers"] == 2
    errors = node_errors(
        prepare_reference(model), result.model, sample_feeds(tmp_path / "d.npz", model, 4)
    )
    kinds = [e.kind for e in errors]
    assert kinds.count("bias") == 2 and kinds[-2:] == ["bias", "bias"]
    assert {e.tensor for e in errors if e.kind == "bias"} == {"b1", "b2"}
    others = [e.sqnr_db for e in errors if e.kind != "bias"]
    assert min(e.sqnr_db for e in errors if e.kind == "bias") < max(others)  # not SQNR order
