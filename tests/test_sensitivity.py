"""onnxship sensitivity: a deliberately sensitive node ranks first, every number matches a
direct onnxruntime run of the variant the quantization pass builds, reports are
deterministic, and every bad input is exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from converter.check.sensitivity import DEFAULT_BATCH_SIZE, DEFAULT_SAMPLES, sensitivity
from converter.core import metrics
from converter.core.errors import BadInputError
from converter.core.runtime import make_session
from passes.quantize import DynamicQuantize, StaticQuantize

ROOT = Path(__file__).resolve().parent.parent
OUTLIER = 500.0  # scale of input feature 0: quantizing x crushes every other feature to 0


def _outlier_mlp() -> onnx.ModelProto:
    """x[batch,16] → mm1 → Relu → mm2 → Relu → mm3 → y[batch,8]. Feature 0 of x is
    ``OUTLIER`` times larger than the others (see :func:`_data`) and mm1's weight row 0 is as
    much smaller, so fp32 is well-behaved but int8 x (read only by mm1) loses features 1..15."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32) / 4
    w1[0] /= OUTLIER
    weights = [w1, rng.standard_normal((32, 32)) / 6, rng.standard_normal((32, 8)) / 6]
    inits = [
        numpy_helper.from_array(w.astype(np.float32), f"w{i}") for i, w in enumerate(weights, 1)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="mm2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("MatMul", ["a2", "w3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _data(path: Path, seed: int, n: int = 128) -> Path:
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    x[:, 0] *= OUTLIER
    np.savez(path, x=x)
    return path


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sensitivity")
    model = _outlier_mlp()
    onnx.save(model, str(folder / "model.onnx"))
    return {
        "proto": model,
        "path": folder / "model.onnx",
        "calib": _data(folder / "calib.npz", seed=1),
        "data": _data(folder / "data.npz", seed=2),
    }


@pytest.fixture(scope="module")
def static_report(outlier):
    return sensitivity(
        outlier["path"], outlier["data"], calib=outlier["calib"], gain=True, progress=False
    )


def _loss(
    model: onnx.ModelProto, reference: onnx.ModelProto, data: Path, samples: int, batch: int = 1
):
    """1 − mean cosine and the worst cosine, run directly through onnxruntime in batches of
    ``batch`` (dynamic quantization measures activation ranges per batch: sensitivity scores
    it at the deployment batch, 1, by default)."""
    x = np.load(data)["x"][:samples]

    def run(m: onnx.ModelProto) -> np.ndarray:
        session = make_session(m.SerializeToString())
        batches = range(0, len(x), batch)
        return np.concatenate([session.run(None, {"x": x[i : i + batch]})[0] for i in batches])

    cos = metrics.per_sample_cosine(run(model), run(reference))
    return 1.0 - cos.mean(), cos.min()


# ---------------------------------------------------------------- the ranking and its numbers


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_the_node_reading_the_outlier_ranks_first(outlier, static_report, mode):
    if mode == "static":
        report = static_report
    else:
        report = sensitivity(outlier["path"], outlier["data"], mode="dynamic", progress=False)
    assert report.ranked_nodes()[0] == "mm1"
    losses = {n.name: n.loss for n in report.nodes}
    others = max(v for k, v in losses.items() if k != "mm1")
    assert losses["mm1"] > 0.05  # features 1..15 crushed: far from fp32
    assert losses["mm1"] > 20 * others, losses
    assert {"mm1", "mm2", "mm3"} <= set(losses)
    assert report.nodes[0].worst_cosine < 1 - losses["mm1"] + 1e-12  # worst ≤ mean
    assert [n.loss for n in report.nodes] == sorted((n.loss for n in report.nodes), reverse=True)


def _fake_quant_forward(
    fp32: onnx.ModelProto, qdq: onnx.ModelProto, x: np.ndarray, name: str
) -> np.ndarray:
    """The outlier MLP in numpy with only node ``name``'s input activation and weight
    quantized, with the scales and zero points of the fully quantized QDQ model ``qdq``."""
    weights = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    node = next(n for n in qdq.graph.node if n.name == name)
    dq_act, dq_w = producers[node.input[0]], producers[node.input[1]]
    q_act = producers[dq_act.input[0]]
    scale, zp = inits[q_act.input[1]].astype(np.float64), inits[q_act.input[2]].astype(np.float64)
    w_q, w_scale, w_zp = (inits[i].astype(np.float64) for i in dq_w.input)
    weight = (w_q - w_zp) * w_scale  # per output channel (axis 1)
    h = x.astype(np.float64)
    for layer in ("mm1", "mm2", "mm3"):
        w = weights[f"w{layer[-1]}"].astype(np.float64)
        if layer == name:
            h = (np.clip(np.round(h / scale) + zp, 0, 255) - zp) * scale
            w = weight
        h = h @ w
        h = np.maximum(h, 0) if layer != "mm3" else h
    return h


def test_loss_is_the_error_of_quantizing_only_that_nodes_inputs(outlier, static_report):
    """Each loss is 1 − cosine of the fp32 model with only that node's input and weight
    fake-quantized as in the fully quantized model (numpy; onnxruntime runs the int8 kernels,
    so equal to ~1e-3 relative), and the fully quantized loss is a direct onnxruntime run."""
    model, data, samples = outlier["proto"], outlier["data"], static_report.samples
    assert samples == min(DEFAULT_SAMPLES, 128)
    full = StaticQuantize(ranges=static_report.ranges)(model).model
    assert _loss(full, model, data, samples, DEFAULT_BATCH_SIZE)[0] == pytest.approx(
        static_report.all_quantized.loss, rel=1e-9, abs=1e-15
    )
    x = np.load(data)["x"][:samples]
    reference = make_session(model.SerializeToString()).run(None, {"x": x})[0]
    for entry in static_report.nodes:
        cos = metrics.per_sample_cosine(_fake_quant_forward(model, full, x, entry.name), reference)
        assert entry.loss == pytest.approx(1.0 - cos.mean(), rel=2e-3), entry.name
        assert entry.worst_cosine == pytest.approx(cos.min(), abs=1e-6)


def test_gain_equals_a_direct_run_of_the_pass_with_the_node_excluded(outlier, static_report):
    """gain = full loss − loss of StaticQuantize(nodes_to_exclude=[node]): what auto builds."""
    model, data, ranges = outlier["proto"], outlier["data"], static_report.ranges
    for entry in static_report.nodes:
        kept = StaticQuantize(ranges=ranges, nodes_to_exclude=[entry.name])(model).model
        kept_loss = _loss(kept, model, data, static_report.samples, DEFAULT_BATCH_SIZE)[0]
        gain = static_report.all_quantized.loss - kept_loss
        assert entry.gain == pytest.approx(gain, rel=1e-9, abs=1e-15), entry.name


def test_gain_ranks_the_outlier_node_first_too(static_report):
    assert static_report.ranked_nodes(by="gain")[0] == "mm1"
    mm1 = static_report.nodes[0]
    # Keeping mm1 in fp32 recovers most of the fully quantized model's loss.
    assert mm1.gain > 0.9 * static_report.all_quantized.loss
    with pytest.raises(BadInputError):
        static_report.ranked_nodes(by="speed")


def test_precomputed_ranges_give_the_same_numbers(outlier, static_report):
    again = sensitivity(
        outlier["proto"], outlier["data"], calib=static_report.ranges, progress=False
    )
    assert [(n.name, n.loss) for n in again.nodes] == [
        (n.name, n.loss) for n in static_report.nodes
    ]
    assert again.calibration["data"] is None
    assert again.model is None  # given as a ModelProto


def test_excluded_nodes_stay_fp32_in_every_variant(outlier, static_report):
    report = sensitivity(
        outlier["path"],
        outlier["data"],
        calib=static_report.ranges,
        quant_settings={"nodes_to_exclude": ["mm1"]},
        progress=False,
    )
    assert "mm1" not in report.ranked_nodes()
    assert report.all_quantized.loss < static_report.all_quantized.loss / 20


def test_dynamic_numbers_equal_a_direct_run_of_the_pass(outlier):
    """Dynamic mode: each node's variant computes what DynamicQuantize builds when every
    other node is excluded."""
    report = sensitivity(outlier["path"], outlier["data"], mode="dynamic", progress=False)
    assert report.calibration is None and report.ranges is None
    assert report.batch_size == 1  # the deployment batch: each run's own activation ranges
    names = report.ranked_nodes()
    assert sorted(names) == ["mm1", "mm2", "mm3"]
    for entry in report.nodes:
        others = [n for n in names if n != entry.name]
        alone = DynamicQuantize(nodes_to_exclude=others)(outlier["proto"]).model
        loss, worst = _loss(alone, outlier["proto"], outlier["data"], report.samples)
        assert entry.loss == pytest.approx(loss, rel=1e-9, abs=1e-15), entry.name
        assert entry.worst_cosine == pytest.approx(worst, rel=1e-12)


def _three_convs() -> onnx.ModelProto:
    """x[batch,3,8,8] → (Conv 3×3 → Relu) ×3 → y[batch,4,8,8], seeded weights. Dynamic
    quantization turns each Conv into ConvInteger plus an *unnamed* bias Reshape."""
    rng = np.random.default_rng(3)
    nodes, inits, x, channels = [], [], "x", 3
    for i, out in enumerate([8, 8, 4]):
        w = rng.standard_normal((out, channels, 3, 3)).astype(np.float32) / 4
        b = rng.standard_normal(out).astype(np.float32) / 4
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        y = "y" if i == 2 else f"r{i}"
        nodes += [
            helper.make_node(
                "Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4
            ),
            helper.make_node("Relu", [f"c{i}"], [y], name=f"relu{i}"),
        ]
        x, channels = y, out
    graph = helper.make_graph(
        nodes,
        "three_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_conv_models_in_both_modes(mode, tmp_path, capsys):
    """Issue 21 item 1: dynamic mode on Conv failed to load the per-tensor error model ("two
    nodes with same node name (/onnxship_alone)": the copies of the unnamed bias Reshapes).
    Every Conv is scored in both modes, and in dynamic mode each loss is a direct run of
    DynamicQuantize with the other Convs excluded."""
    model = _three_convs()
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(4).standard_normal((24, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    calib = ["--calib", tmp_path / "d.npz"] if mode == "static" else []
    code, _, err = cli(
        capsys, "sensitivity", tmp_path / "m.onnx", "--data", tmp_path / "d.npz",
        "--mode", mode, *calib, "--json", tmp_path / "r.json", "-q",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    names = sorted(n["name"] for n in doc["nodes"])
    assert names == ["conv0", "conv1", "conv2"]
    measured = {(e["tensor"], e["kind"]) for e in doc["tensor_errors"]}
    assert {("x", "activation"), ("r0", "activation"), ("r1", "activation")} <= measured
    assert {("w0", "weight"), ("w1", "weight"), ("w2", "weight")} <= measured
    if mode == "static":
        return
    assert {("c0", "output"), ("c1", "output"), ("c2", "output")} <= measured
    for entry in doc["nodes"]:
        others = [n for n in names if n != entry["name"]]
        alone = DynamicQuantize(nodes_to_exclude=others)(model).model
        loss, worst = _loss(alone, model, tmp_path / "d.npz", doc["samples"])
        assert entry["loss"] == pytest.approx(loss, rel=1e-9, abs=1e-15), entry["name"]
        assert entry["worst_cosine"] == pytest.approx(worst, rel=1e-12)


# ---------------------------------------------------------------- CLI, reports, determinism


def test_json_is_deterministic_across_processes(digits_mlp, tmp_path, capsys):
    """Same model, data and options → the same JSON bytes (one run in-process, one not)."""
    args = ["sensitivity", digits_mlp.onnx, "--data", digits_mlp.test, "--calib", digits_mlp.calib]
    code, out, _ = cli(capsys, *args, "--json", tmp_path / "a.json", "--top", "2")
    assert code == 0
    subprocess.run(
        [sys.executable, "-m", "converter", "-q", *map(str, args), "--json", tmp_path / "b.json"],
        check=True,
        cwd=ROOT,
    )
    first, second = (tmp_path / "a.json").read_bytes(), (tmp_path / "b.json").read_bytes()
    assert first == second
    doc = json.loads(first)
    assert doc["samples"] == DEFAULT_SAMPLES and doc["calibration"]["samples"] == 256
    losses = [n["loss"] for n in doc["nodes"]]
    assert losses == sorted(losses, reverse=True) and losses[0] > 0
    assert [n["rank"] for n in doc["nodes"]] == list(range(1, len(losses) + 1))
    # The table: a header, two rows (--top 2), then how many more.
    assert f"scored on {digits_mlp.test} ({DEFAULT_SAMPLES} samples, batch 32)" in out
    assert f"  1  {doc['nodes'][0]['name']}" in out
    assert f"... {len(losses) - 2} more" in out


@pytest.fixture(scope="module")
def quantized_model(outlier, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantized") / "int8.onnx"
    onnx.save(DynamicQuantize()(outlier["proto"]).model, str(path))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "not onnx",
        "data does not fit",
        "already quantized",
        "bad mode",
        "calib with dynamic",
        "samples 0",
        "unknown output",
        "json folder missing",
        "tensor errors negative",
    ],
)
def test_bad_input_is_exit_2_one_line(case, outlier, digits_cnn, quantized_model, tmp_path, capsys):
    model, data = outlier["path"], outlier["data"]
    extra: list = []
    if case == "missing model":
        model = tmp_path / "nope.onnx"
    elif case == "not onnx":
        model = data
    elif case == "data does not fit":
        data = digits_cnn.test
    elif case == "already quantized":
        model = quantized_model
    elif case == "bad mode":
        extra = ["--mode", "fp8"]
    elif case == "calib with dynamic":
        extra = ["--mode", "dynamic", "--calib", outlier["calib"]]
    elif case == "samples 0":
        extra = ["--samples", "0"]
    elif case == "unknown output":
        extra = ["--output", "logits"]
    elif case == "tensor errors negative":
        extra = ["--tensor-errors", "-1"]
    json_path = tmp_path / ("missing/r.json" if case == "json folder missing" else "r.json")
    code, out, err = cli(
        capsys, "sensitivity", model, "--data", data, "--json", json_path, "-q", *extra
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not json_path.exists()


def test_quant_settings_are_checked(outlier):
    with pytest.raises(BadInputError, match="parameters of sensitivity"):
        sensitivity(outlier["path"], outlier["data"], quant_settings={"calibration": "x.npz"})
    with pytest.raises(BadInputError, match="unknown setting"):
        sensitivity(
            outlier["path"], outlier["data"], mode="dynamic", quant_settings={"format": "qdq"}
        )
