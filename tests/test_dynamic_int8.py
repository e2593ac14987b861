"""Dynamic int8 as it is deployed: scored at batch 1 (its activation ranges come from each
run, so its outputs depend on the batch), every report saying at which batch; and what
`quantize --mode dynamic` says it did (weight scales read off the model, one warning)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from converter.core.metrics import per_sample_cosine
from converter.core.runtime import make_session
from passes.quant_report import has_dynamic_quantization, percent, weight_scales
from passes.quantize import DynamicQuantize


def _matmul(rng) -> onnx.ModelProto:
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def dynamic_mm(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(fp32 model, its dynamic int8 model, 64 samples of which every 8th is 30x louder:
    in a batch with a loud sample the quiet ones get a coarse activation range)."""
    folder = tmp_path_factory.mktemp("dyn")
    rng = np.random.default_rng(0)
    fp32 = _matmul(rng)
    onnx.save(fp32, folder / "fp32.onnx")
    onnx.save(DynamicQuantize(target="avx2")(fp32).model, folder / "dyn.onnx")
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[::8] *= 30
    np.savez(folder / "data.npz", x=x)
    return folder / "fp32.onnx", folder / "dyn.onnx", folder / "data.npz"


def _cosine_at(batch: int, fp32: Path, dyn: Path, x: np.ndarray) -> float:
    """Mean per-sample cosine of the dynamic model to fp32, run ``batch`` samples at a time."""
    cand, ref = make_session(dyn), make_session(fp32)
    parts = [
        per_sample_cosine(
            cand.run(None, {"x": x[i : i + batch]})[0], ref.run(None, {"x": x})[0][i : i + batch]
        )
        for i in range(0, len(x), batch)
    ]
    return float(np.concatenate(parts).mean())


def test_dynamic_int8_is_scored_at_batch_1_by_default(dynamic_mm, tmp_path, capsys) -> None:
    fp32, dyn, data = dynamic_mm
    x = np.load(data)["x"]
    at_1, at_64 = _cosine_at(1, fp32, dyn, x), _cosine_at(64, fp32, dyn, x)
    assert at_1 - at_64 > 1e-3  # the model's outputs do depend on the batch
    args = ["validate", dyn, "--data", data, "--reference", fp32, "--metric", "cosine"]
    reports = ["--json", tmp_path / "v.json", "--junit", tmp_path / "v.xml"]
    code, out, _ = cli(capsys, *args, "--min-score", "0.5", *reports)
    assert code == 0
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["batch_size"] == 1 and doc["threads"] == 1 and doc["dynamic_quantization"]
    assert doc["outputs"]["y"]["cosine"]["value"] == pytest.approx(at_1, abs=1e-6)
    assert "deployment batch" in doc["batch_reason"]
    assert f"on {data} (batch 1, 1 thread, 64 samples)" in out.splitlines()[0]
    assert "quantizes activations at run time (dynamic int8)" in out
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "v.xml").iter("property")}
    assert props["batch_size"] == "1" and props["dynamic_quantization"] == "true"
    # --batch-size is obeyed, and said
    code, out, _ = cli(capsys, *args, "--batch-size", "64", "--json", tmp_path / "b.json")
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["batch_size"] == 64
    assert doc["outputs"]["y"]["cosine"]["value"] == pytest.approx(at_64, abs=1e-6)
    assert "(batch 64, 1 thread, 64 samples)" in out and "hold at batch 64 only" in out


def test_float_models_still_batch_freely(dynamic_mm, tmp_path, capsys) -> None:
    fp32, _, data = dynamic_mm
    args = ["validate", fp32, "--data", data, "--reference", fp32, "--json", tmp_path / "v.json"]
    code, out, _ = cli(capsys, *args)
    doc = json.loads((tmp_path / "v.json").read_text())
    assert code == 0 and doc["batch_size"] == 64 and not doc["dynamic_quantization"]
    assert "(batch 64, 1 thread, 64 samples)" in out and "deployment batch" not in out


def test_a_baseline_of_a_dynamic_model_at_another_batch_is_refused(
    dynamic_mm, tmp_path, capsys
) -> None:
    fp32, dyn, data = dynamic_mm
    args = ["validate", dyn, "--data", data, "--reference", fp32, "--metric", "cosine"]
    assert cli(capsys, *args, "--batch-size", "64", "--json", tmp_path / "b.json")[0] == 0
    code, _, err = cli(capsys, *args, "--baseline", tmp_path / "b.json")
    assert code == 2
    assert "scored at batch 64, this run at batch 1" in err and "--batch-size 64" in err


def test_auto_and_run_report_the_scoring_batch(dynamic_mm, tmp_path, capsys) -> None:
    fp32, _, data = dynamic_mm
    out = tmp_path / "auto"
    args = ["--metric", "cosine", "--min-score", "0.5", "--bench-runs", "3", "-o", out]
    assert (
        cli(capsys, "-q", "auto", fp32, "--data", data, "--calib", data, "--allow-overlap", *args)[
            0
        ]
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    scored = {c["name"]: c["scored_at"] for c in manifest["candidates"] if c["scored_at"]}
    assert scored["dynamic_pc"]["batch_size"] == 1 and scored["dynamic_pc"]["samples"] == 64
    assert scored["static_u8_pc_minmax"]["batch_size"] == 64
    report = (out / "report.md").read_text()
    assert "Scores: dynamic int8 at batch 1, 1 thread, 64 samples; the others at batch 64" in report
    # run: the manifest's validations and the report say the batch of each variant
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
name = "t"
[model]
onnx = "{fp32}"
[data]
calibration = "{data}"
validation = "{data}"
[[variants]]
name = "dyn"
passes = [{{ pass = "quantize", mode = "dynamic" }}]
[bench]
runs = 3
warmup = 1
""")
    assert cli(capsys, "-q", "run", recipe, "-o", tmp_path / "run")[0] == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["validation"]["dyn"]["batch_size"] == 1
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Scored: dyn at batch 1, 1 thread, 64 samples;" in report


def test_has_dynamic_quantization_reads_subgraphs_too(dynamic_mm) -> None:
    _, dyn, _ = dynamic_mm
    assert has_dynamic_quantization(onnx.load(dyn))
    body = onnx.load(dyn).graph
    branch = helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)
    outer = helper.make_graph(
        [branch], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])], []
    )
    assert has_dynamic_quantization(helper.make_model(outer))
    assert not has_dynamic_quantization(_matmul(np.random.default_rng(0)))


# ----------------------------------------------------------------------- quantize --mode dynamic


def _cnn_with_gemm(path: Path) -> None:
    """Two 3x3 Conv on 16x16 images, then a Gemm classifier: conv-dominated, not Conv only."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) / 4, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 16, 8, 3, 3), init("b2", 16)]
    inits += [init("wg", 10, 16), init("bg", 10)]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_quantize_dynamic_says_what_it_did_and_warns_once(tmp_path, capsys) -> None:
    _cnn_with_gemm(tmp_path / "cnn.onnx")
    args = ["quantize", tmp_path / "cnn.onnx", "-o", tmp_path / "q.onnx", "--mode", "dynamic"]
    code, out, err = cli(capsys, *args, "--target", "avx2")
    assert code == 0
    # what onnxruntime did, read off the model: Conv weights have one scale per tensor
    model = onnx.load(tmp_path / "q.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger"):
            scalar = not list(inits[node.input[3]].dims)
            assert scalar == (node.op_type == "ConvInteger")
    assert weight_scales(model) == {
        "Conv": {"per-channel": 0, "per-tensor": 2},
        "MatMul/Gemm": {"per-channel": 1, "per-tensor": 0},
    }
    assert "int8 per-channel weights" not in out
    assert "per channel on MatMul/Gemm, per tensor on Conv" in out
    assert "weight scales, read off the quantized model: Conv 2 per-tensor; MatMul/Gemm 1 " in out
    # the conv warning: once, about speed and fidelity, with the Gemm's share not rounded away
    both = out + err
    assert both.count("conv-dominated") == 1
    warning = next(line for line in both.splitlines() if "conv-dominated" in line)
    assert "slower than fp32" in warning and "lose fidelity" in warning
    assert "99.95 % of the multiply-adds are in Conv, 0.05 % in MatMul/Gemm" in warning


def test_percent_never_rounds_a_part_to_the_whole() -> None:
    assert percent(9995, 10000) == "99.95"
    assert percent(999999, 1000000) == "99.9999"
    assert percent(1, 1) == "100" and percent(0, 3) == "0" and percent(1, 3) == "33"
    assert percent(4, 100000) == "0.004" and percent(5, 100000) == "0.01"
