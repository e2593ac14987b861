"""onnxship validate: numbers against a direct onnxruntime computation, gates, reports,
baseline regressions, and every bad input as exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from converter.check.validate import DEFAULT_BASELINE_TOLERANCE, DEFAULT_BATCH_SIZE, validate
from converter.cli import main
from converter.core import metrics
from converter.core.errors import BadInputError
from converter.core.runtime import make_session

ROOT = Path(__file__).resolve().parent.parent


def _perturbed(src: Path, out: Path, prune: float = 0.0, noise: float = 0.0) -> Path:
    """A copy of ``src`` with the ``prune`` fraction of smallest weights of every float
    matrix/kernel zeroed, and/or seeded relative noise added to them."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        if prune:
            w = np.where(np.abs(w) < np.quantile(np.abs(w), prune), 0.0, w)
        if noise:
            w = w * (1 + noise * rng.standard_normal(w.shape))
        tensor.CopyFrom(numpy_helper.from_array(w.astype(np.float32), tensor.name))
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def models(digits_cnn, tmp_path_factory):
    """The fp32 reference, a faithful copy (noise 1e-4) and a broken one (80 % pruned)."""
    folder = tmp_path_factory.mktemp("validate")
    return {
        "ref": digits_cnn.onnx,
        "good": _perturbed(digits_cnn.onnx, folder / "good.onnx", noise=1e-4),
        "bad": _perturbed(digits_cnn.onnx, folder / "bad.onnx", prune=0.8),
        "test": digits_cnn.test,
        "calib": digits_cnn.calib,
    }


def _outputs(model: Path, data: Path) -> np.ndarray:
    with np.load(data) as npz:
        return make_session(model).run(None, {"x": npz["x"]})[0]


def test_numbers_equal_a_direct_computation(models):
    report = validate(
        models["good"],
        models["test"],
        reference=models["ref"],
        metrics=["accuracy", "agreement", "cosine", "max-abs", "mean-abs"],
        batch_size=50,  # 450 samples: batches must add up exactly
        progress=False,
    )
    cand, ref = _outputs(models["good"], models["test"]), _outputs(models["ref"], models["test"])
    labels = np.load(models["test"])["labels"]
    got = report.outputs["output"]
    cos = metrics.per_sample_cosine(cand, ref)
    assert got["accuracy"].value == metrics.accuracy(cand, labels)
    assert got["agreement"].value == metrics.agreement(cand, ref)
    assert got["cosine"].value == pytest.approx(cos.mean(), abs=1e-12)
    assert got["cosine"].worst == cos.min() and got["cosine"].worst_sample == int(cos.argmin())
    assert got["max-abs"].value == metrics.max_abs_error(cand, ref)
    assert got["mean-abs"].value == pytest.approx(metrics.mean_abs_error(cand, ref), rel=1e-9)
    assert report.reference_outputs["output"]["accuracy"].value == metrics.accuracy(ref, labels)
    assert 0 < got["max-abs"].value < 0.05 and got["cosine"].worst > 0.999
    assert report.passed and report.gates == []  # no gates asked for


def test_default_metric_is_accuracy_with_labels_else_cosine(models):
    with_labels = validate(models["good"], models["test"], progress=False)
    assert with_labels.metrics == ["accuracy"] and with_labels.reference is None
    no_labels = validate(models["good"], models["calib"], reference=models["ref"], progress=False)
    assert no_labels.metrics == ["cosine"]
    assert "accuracy" not in no_labels.outputs["output"]


def test_faithful_model_passes_every_gate(models, tmp_path, capsys):
    code, out, err = cli(
        capsys, "validate", models["good"], "--data", models["test"], "--reference",
        models["ref"], "--metric", "accuracy", "--metric", "cosine", "--min-score", "0.95",
        "--max-drop", "0.01", "--min-worst", "0.99", "--json", tmp_path / "v.json",
        "--junit", tmp_path / "v.xml",
    )  # fmt: skip
    assert code == 0, err
    assert "PASSED" in out and "FAIL" not in out
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["passed"] is True
    assert [g["name"] for g in doc["gates"]] == ["min-score", "max-drop", "min-worst"]
    suite = ET.parse(tmp_path / "v.xml").getroot().find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "0"
    assert suite.findall("testcase/failure") == []


@pytest.mark.parametrize(
    "gate, flags",
    [
        ("min-score", ["--min-score", "0.9"]),
        ("max-drop", ["--max-drop", "0.02"]),
        ("min-worst", ["--min-worst", "0.9"]),
    ],
)
def test_broken_model_fails_each_gate(models, tmp_path, capsys, gate, flags):
    code, out, err = cli(
        capsys, "validate", models["bad"], "--data", models["test"], "--reference",
        models["ref"], *flags, "--json", tmp_path / "v.json",
    )  # fmt: skip
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"error: validation failed: {gate} ")
    doc = json.loads((tmp_path / "v.json").read_text())  # written although the gate failed
    (only,) = doc["gates"]
    assert only["name"] == gate and only["passed"] is False
    values = doc["outputs"]["output"]
    cand = _outputs(models["bad"], models["test"])
    ref = _outputs(models["ref"], models["test"])
    labels = np.load(models["test"])["labels"]
    expected = {
        "min-score": metrics.accuracy(cand, labels),
        "max-drop": metrics.accuracy(ref, labels) - metrics.accuracy(cand, labels),
        "min-worst": float(metrics.per_sample_cosine(cand, ref).min()),
    }[gate]
    assert only["value"] == pytest.approx(expected, abs=1e-12)
    assert values["accuracy"]["value"] < 0.5  # 80 % pruned: the model is broken
    assert f"FAIL  {gate}" in out


def test_json_and_junit_carry_every_number(models, tmp_path, capsys):
    code, _, _ = cli(
        capsys, "validate", models["bad"], "--data", models["test"], "--reference",
        models["ref"], "--metric", "cosine", "--metric", "max-abs", "--min-score", "0.99",
        "--max-drop", "0.05", "--min-worst", "0.5", "--json", tmp_path / "v.json",
        "--junit", tmp_path / "v.xml",
    )  # fmt: skip
    assert code == 1
    doc = json.loads((tmp_path / "v.json").read_text())
    report = validate(
        models["bad"], models["test"], reference=models["ref"], metrics=["cosine", "max-abs"],
        min_score=0.99, max_drop=0.05, min_worst=0.5, progress=False,
    )  # fmt: skip
    assert doc == json.loads(report.to_json())
    assert doc["passed"] is False and doc["num_samples"] == 450
    out = doc["outputs"]["output"]
    assert set(out) == {"accuracy", "cosine", "max-abs"}  # accuracy: for --max-drop
    assert out["cosine"]["value"] == report.outputs["output"]["cosine"].value
    assert doc["gates"][1]["metric"] == "accuracy drop"  # labels exist: the accuracy drop

    suites = ET.parse(tmp_path / "v.xml").getroot()
    suite = suites.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 3 and suite.get("failures") == "3" and suites.get("tests") == "3"
    assert all(case.find("failure") is not None for case in cases)
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert float(props["output.cosine"]) == out["cosine"]["value"]
    assert float(props["output.cosine.worst"]) == out["cosine"]["worst"]
    assert float(props["output.max-abs"]) == out["max-abs"]["value"]
    # the reference's accuracy as onnxruntime gives it on this machine (training, and so the
    # weights, differ between CPUs: never a number measured elsewhere)
    data = np.load(models["test"])
    logits = make_session(models["ref"]).run(None, {"x": data["x"]})[0]
    reference_accuracy = metrics.accuracy(logits, data["labels"])
    assert float(props["reference.output.accuracy"]) == pytest.approx(reference_accuracy, abs=1e-12)


def test_same_inputs_give_the_same_report_bytes(models, tmp_path, capsys):
    for name in ("a.json", "b.json"):
        args = ["validate", models["good"], "--data", models["test"], "--reference"]
        code, _, _ = cli(capsys, *args, models["ref"], "--json", tmp_path / name)
        assert code == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_baseline_catches_a_regression(models, tmp_path, capsys):
    base = tmp_path / "base.json"
    common = ["--data", models["test"], "--reference", models["ref"], "--metric", "accuracy"]
    assert cli(capsys, "validate", models["good"], *common, "--json", base)[0] == 0

    code, out, err = cli(capsys, "validate", models["good"], *common, "--baseline", base)
    assert code == 0, err
    code, out, err = cli(capsys, "validate", models["bad"], *common, "--baseline", base)
    assert code == 1
    assert "error: validation failed: baseline accuracy" in err and "FAIL  baseline" in out

    baseline_acc = json.loads(base.read_text())["outputs"]["output"]["accuracy"]["value"]
    report = validate(models["bad"], models["test"], baseline=base, progress=False)
    (gate,) = report.gates
    assert gate.threshold == pytest.approx(baseline_acc - DEFAULT_BASELINE_TOLERANCE)
    assert not gate.passed and gate.value < baseline_acc - 0.5
    lenient = validate(
        models["bad"], models["test"], baseline=base, baseline_tolerance=1.0, progress=False
    )
    assert lenient.passed  # the tolerance is absolute


def test_api_returns_the_report_when_a_gate_fails(models):
    report = validate(models["bad"], models["test"], min_score=0.9, progress=False)
    assert report.passed is False
    assert report.failed[0].name == "min-score" and report.failed[0].value < 0.5


def _two_output_model(path: Path, scale: float = 1.0) -> Path:
    """x[batch,4] → logits = x @ W [batch,3], embedding = x * scale [batch,4]."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5, "w")
    s = numpy_helper.from_array(np.array(scale, dtype=np.float32), "s")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["logits"]),
            helper.make_node("Mul", ["x", "s"], ["embedding"]),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4]),
        ],
        [w, s],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_metrics_per_output_and_gates_on_the_named_output(tmp_path, capsys):
    ref = _two_output_model(tmp_path / "ref.onnx")
    cand = _two_output_model(tmp_path / "cand.onnx", scale=-1.0)  # embedding flipped
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    args = ["validate", cand, "--data", tmp_path / "d.npz", "--reference", ref]
    code, out, _ = cli(capsys, *args, "--metric", "cosine", "--min-score", "0.99")
    assert code == 0  # the gates read the first output, logits: identical
    code, out, _ = cli(capsys, *args, "--min-score", "0.99", "--output", "embedding")
    assert code == 1
    report = validate(cand, tmp_path / "d.npz", reference=ref, output="embedding", progress=False)
    assert report.outputs["logits"]["cosine"].value == pytest.approx(1.0)
    assert report.outputs["embedding"]["cosine"].value == pytest.approx(-1.0)


def test_quiet_prints_nothing(models, capsys):
    code, out, err = cli(capsys, "validate", models["good"], "--data", models["test"], "-q")
    assert (code, out, err) == (0, "", "")


def test_help_states_the_api_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {DEFAULT_BATCH_SIZE}; 1 for a model with dynamic int8" in text
    assert f"default {DEFAULT_BASELINE_TOLERANCE})" in text


def _bad_data(tmp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 1, 8, 8)).astype(np.float32)
    files = {
        "wrong_name": {"image": x},
        "wrong_shape": {"x": x.reshape(10, 64)},
        "labels_length": {"x": x, "labels": np.zeros(9, np.int64)},
        "labels_float": {"x": x, "labels": np.full(10, 0.5)},
        "labels_range": {"x": x, "labels": np.full(10, 12)},
        "other_count": {"x": x, "labels": np.zeros(10, np.int64)},
    }
    out = {}
    for name, arrays in files.items():
        np.savez(tmp / f"{name}.npz", **arrays)
        out[name] = tmp / f"{name}.npz"
    (tmp / "not.onnx").write_text("not a model")
    (tmp / "not.json").write_text("{oops")
    out["not_onnx"], out["not_json"] = tmp / "not.onnx", tmp / "not.json"
    return out


BAD = {
    "missing candidate": (["validate", "{tmp}/nope.onnx", "--data", "{test}"], "does not exist"),
    "candidate not onnx": (["validate", "{not_onnx}", "--data", "{test}"], "not a readable ONNX"),
    "missing data": (["validate", "{good}", "--data", "{tmp}/nope.npz"], "does not exist"),
    "data wrong name": (["validate", "{good}", "--data", "{wrong_name}"], "missing inputs"),
    "data wrong shape": (["validate", "{good}", "--data", "{wrong_shape}"], "shape"),
    "labels wrong length": (["validate", "{good}", "--data", "{labels_length}"], "disagree"),
    "labels not integers": (["validate", "{good}", "--data", "{labels_float}"], "non-integer"),
    "label out of range": (["validate", "{good}", "--data", "{labels_range}"], "up to 12"),
    "unknown metric": (["validate", "{good}", "--data", "{test}", "--metric", "f1"], "f1"),
    "min-score not a number": (
        ["validate", "{good}", "--data", "{test}", "--min-score", "abc"],
        "not a number",
    ),
    "min-score nan": (["validate", "{good}", "--data", "{test}", "--min-score", "nan"], "finite"),
    "min-score percent": (["validate", "{good}", "--data", "{test}", "--min-score", "95"], "0.9"),
    "max-drop negative": (
        ["validate", "{good}", "--data", "{test}", "--reference", "{ref}", "--max-drop", "-0.1"],
        "outside",
    ),
    "min-worst nan": (
        ["validate", "{good}", "--data", "{test}", "--reference", "{ref}", "--min-worst", "nan"],
        "finite",
    ),
    "baseline-tolerance above 1": (
        ["validate", "{good}", "--data", "{test}", "--baseline-tolerance", "2"],
        "--baseline-tolerance 2.0 is outside [0, 1]",
    ),
    "batch size zero": (["validate", "{good}", "--data", "{test}", "--batch-size", "0"], "≥ 1"),
    "accuracy without labels": (
        ["validate", "{good}", "--data", "{calib}", "--reference", "{ref}", "--metric", "accuracy"],
        "labels",
    ),
    "nothing to compare": (["validate", "{good}", "--data", "{calib}"], "--reference"),
    "cosine without reference": (
        ["validate", "{good}", "--data", "{test}", "--metric", "cosine"],
        "--reference",
    ),
    "max-drop without reference": (
        ["validate", "{good}", "--data", "{test}", "--max-drop", "0.01"],
        "--reference",
    ),
    "min-worst without reference": (
        ["validate", "{good}", "--data", "{test}", "--min-worst", "0.9"],
        "--reference",
    ),
    "min-score on an error metric": (
        [
            "validate",
            "{good}",
            "--data",
            "{test}",
            "--reference",
            "{ref}",
            "--metric",
            "max-abs",
            "--min-score",
            "0.5",
        ],
        "score",
    ),  # fmt: skip
    "unknown output": (["validate", "{good}", "--data", "{test}", "--output", "y"], "--output"),
    "missing baseline": (
        ["validate", "{good}", "--data", "{test}", "--baseline", "{tmp}/nope.json"],
        "does not exist",
    ),
    "baseline not json": (
        ["validate", "{good}", "--data", "{test}", "--baseline", "{not_json}"],
        "not JSON",
    ),
    "baseline other data": (
        ["validate", "{good}", "--data", "{other_count}", "--baseline", "{base}"],
        "450 samples",
    ),
    "json folder missing": (
        ["validate", "{good}", "--data", "{test}", "--json", "{tmp}/no/v.json"],
        "does not exist",
    ),
    "json overwrites baseline": (
        ["validate", "{good}", "--data", "{test}", "--baseline", "{base}", "--json", "{base}"],
        "also an input",
    ),
    "reference with other outputs": (
        ["validate", "{good}", "--data", "{test}", "--reference", "{two}"],
        "outputs",
    ),
}


@pytest.fixture(scope="module")
def bad_paths(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    paths = {k: str(v) for k, v in models.items()} | {"tmp": str(tmp)}
    paths |= {k: str(v) for k, v in _bad_data(tmp).items()}
    paths["two"] = str(_two_output_model(tmp / "two.onnx"))
    base = validate(models["good"], models["test"], progress=False)
    (tmp / "base.json").write_text(base.to_json())
    paths["base"] = str(tmp / "base.json")
    return paths


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_exit_2_with_one_line(case, bad_paths, capsys):
    args, words = BAD[case]
    argv = [a.format(**bad_paths) for a in args]
    before = sorted(Path(bad_paths["tmp"]).iterdir())
    code, out, err = cli(capsys, *argv, "-q")
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and " — " in err, err
    assert words in err, err
    assert "Traceback" not in err
    assert sorted(Path(bad_paths["tmp"]).iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    "option, value, what",
    [
        ("min_score", 1.5, "--min-score 1.5 is outside [-1, 1]"),
        ("max_drop", -0.1, "--max-drop -0.1 is outside [0, 1]"),
        ("min_worst", float("nan"), "--min-worst nan is outside [-1, 1]"),
        ("baseline_tolerance", 2, "--baseline-tolerance 2 is outside [0, 1]"),
        ("baseline_tolerance", float("nan"), "--baseline-tolerance nan is outside [0, 1]"),
    ],
)
def test_api_refuses_a_limit_out_of_range_before_reading_anything(tmp_path, option, value, what):
    """The score limits are checked by core.gates.ScoreLimits, the tolerance by
    check_fraction: the same message as the CLI's, before the (missing) files are read."""
    with pytest.raises(BadInputError) as e:
        validate(tmp_path / "nope.onnx", tmp_path / "nope.npz", **{option: value})
    assert e.value.what == what
    assert e.value.fix == "scores and drops are fractions, e.g. 0.9 for 90 %"


def test_runs_without_torch(tmp_path):
    """validate must work where torch is not installed: make it unimportable."""
    ref = _two_output_model(tmp_path / "ref.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((5, 4), np.float32))
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from converter.cli import main\n"
        f"rc = main(['validate', {str(ref)!r}, '--data', {str(tmp_path / 'd.npz')!r}, "
        f"'--reference', {str(ref)!r}, '--min-worst', '0.99', '-q'])\n"
        "assert sys.modules['torch'] is None\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
