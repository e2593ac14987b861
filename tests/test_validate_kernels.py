"""validate's kernel truth (converter/check/validate_kernels.py): a QDQ model scored with
onnxruntime's optimizations off (its semantics) and on (the kernels that ship, what the gates
read), on the model of tests/test_kernel_truth.py built to diverge on any CPU: its depthwise
conv2 kept in fp32 between a DequantizeLinear and a QuantizeLinear, which onnxruntime's
WeightBiasQuantization quantizes per tensor at load (docs/ort-kernel-divergence.md). 7-bit
weights (target avx2) and exact depthwise products: nothing here depends on the CPU's int8
instructions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from test_kernel_truth import _folded_depthwise_model

from converter.check import validate_kernels
from converter.check.validate import validate
from converter.check.validate_kernels import ReferenceCache
from converter.core.errors import BadInputError
from converter.core.machine import METADATA_KEY, TARGETS, host_target
from passes.quantize import StaticQuantize


def quantized(folder: Path, exclude: tuple[str, ...]) -> onnx.ModelProto:
    """The int8 build keeping ``exclude`` in fp32 (no equalization: conv2 as built; minmax
    ranges, no bias correction: the numbers below were measured so)."""
    return StaticQuantize(
        equalize=False,
        calib_method="minmax",
        bias_correction=False,
        calibration=folder / "calib.npz",
        target="avx2",
        nodes_to_exclude=exclude,
        progress=False,
    )(_folded_depthwise_model()).model


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """fp32.onnx, faithful.onnx (full int8), excluded.onnx (conv2 kept fp32), calib.npz and
    test.npz (40 samples) in one folder."""
    folder = tmp_path_factory.mktemp("validate_kernels")
    rng = np.random.default_rng(1)
    np.savez(folder / "calib.npz", x=rng.standard_normal((32, 4, 16, 16)).astype(np.float32))
    np.savez(folder / "test.npz", x=rng.standard_normal((40, 4, 16, 16)).astype(np.float32))
    onnx.save(_folded_depthwise_model(), folder / "fp32.onnx")
    onnx.save(quantized(folder, ()), folder / "faithful.onnx")
    onnx.save(quantized(folder, ("conv2",)), folder / "excluded.onnx")
    return folder


def _validate(folder: Path, name: str, **kw):
    return validate(
        folder / f"{name}.onnx", folder / "test.npz", reference=folder / "fp32.onnx",
        progress=False, **kw,
    )  # fmt: skip


def test_a_faithful_model_agrees_both_ways(built):
    r = _validate(built, "faithful", min_score=0.99)
    k = r.kernel_truth
    assert not k.diverged and k.parts == () and k.unavailable is None
    assert (k.output, k.metric, k.samples, k.threshold) == ("y", "cosine", 40, 0.01)
    assert k.score("kernels") == pytest.approx(0.99956, abs=3e-4)
    assert k.score("semantics") == pytest.approx(k.score("kernels"), abs=1e-5)
    assert k.score("kernels") == r.outputs["y"]["cosine"].value  # the same 40 samples
    assert "agree" in r.summary() and "DIVERGE" not in r.summary()
    assert r.int8_macs.share == 1.0 and r.int8_macs.requantized == ()


def test_a_diverging_model_is_named_and_gated_on_its_kernel_figure(built, capsys, tmp_path):
    """conv2 kept fp32: the model's semantics keep 0.9997 to fp32, the kernels 0.947; a
    0.99 gate fails (exit 1) on the kernel figure, and the JSON, JUnit and text carry both
    figures and name conv2."""
    args = [built / "excluded.onnx", "--data", built / "test.npz", "--reference"]
    args += [built / "fp32.onnx", "--min-score", "0.99"]
    args += ["--json", tmp_path / "v.json", "--junit", tmp_path / "v.xml"]
    code, out, err = cli(capsys, "validate", *args)
    assert code == 1, err
    report = json.loads((tmp_path / "v.json").read_text())
    k = report["kernel_truth"]
    assert k["diverged"] is True and k["samples"] == 40 and k["semantics_unavailable"] is None
    assert k["semantics_score"] == pytest.approx(0.99965, abs=3e-4)
    assert k["kernel_score"] == pytest.approx(0.9467, abs=0.005)
    assert k["kernel_score"] == report["outputs"]["y"]["cosine"]["value"]  # what is gated
    assert report["gates"][0]["value"] == k["kernel_score"] and not report["passed"]
    assert [p["nodes"] for p in k["parts"]] == [["conv2", "relu2"]] and k["located"] is True
    assert report["int8_macs"]["requantized"] == ["conv2"]
    assert "kernels 0.9467, semantics 0.9997 — DIVERGE" in out
    assert "parts at conv2, relu2" in out
    xml = (tmp_path / "v.xml").read_text()
    assert 'name="kernel_truth.diverged" value="true"' in xml
    assert 'name="kernel_truth.parts" value="conv2, relu2"' in xml
    assert f'name="kernel_truth.kernel_score" value="{k["kernel_score"]!r}"' in xml


def test_accuracy_is_compared_both_ways(built, tmp_path):
    """Labels: the fp32 argmax over the last axis (4×16 positions per sample). The
    semantics keep 96.6 % of them, the kernels 68.7 %: more than one point apart."""
    x = np.load(built / "test.npz")["x"]
    from converter.core.runtime import make_session

    y = make_session(str(built / "fp32.onnx")).run(None, {"x": x})[0]
    np.savez(tmp_path / "labelled.npz", x=x, labels=y.argmax(-1))
    r = validate(built / "excluded.onnx", tmp_path / "labelled.npz", progress=False)
    k = r.kernel_truth
    assert k.metric == "accuracy" and set(k.kernels) == {"accuracy"}  # no reference: no cosine
    assert k.score("semantics") == pytest.approx(0.9664, abs=0.005)
    assert k.score("kernels") == pytest.approx(0.6867, abs=0.01)
    assert k.diverged and k.score("kernels") == r.outputs["y"]["accuracy"].value


def test_semantics_that_cannot_run_are_reported_not_fatal(built, capsys, monkeypatch, tmp_path):
    """onnxruntime refusing the model with optimizations off: the validation still passes
    its gate (exit 0); the semantics figure is unavailable, with the reason."""
    real = validate_kernels.make_session

    def refuse_unoptimized(model, threads=1, optimize=True, **kw):
        if not optimize:
            raise BadInputError("onnxruntime cannot load the model: NOT_IMPLEMENTED", "fix")
        return real(model, threads, optimize=optimize, **kw)

    monkeypatch.setattr(validate_kernels, "make_session", refuse_unoptimized)
    args = [built / "faithful.onnx", "--data", built / "test.npz", "--reference"]
    args += [built / "fp32.onnx", "--min-score", "0.99", "--json", tmp_path / "v.json"]
    code, out, err = cli(capsys, "validate", *args)
    assert code == 0, err
    k = json.loads((tmp_path / "v.json").read_text())["kernel_truth"]
    assert k["semantics_score"] is None and k["diverged"] is False
    assert k["semantics_unavailable"] == "onnxruntime cannot load the model: NOT_IMPLEMENTED"
    assert k["kernel_score"] == pytest.approx(0.99956, abs=3e-4)
    assert "semantics (optimizations off) unavailable: onnxruntime cannot load" in out


def test_the_target_note_says_when_the_host_is_not_the_target(built, tmp_path):
    model = onnx.load(built / "faithful.onnx")
    other = next(t for t in TARGETS if t != host_target().name)
    for value, expected in ((other, True), (host_target().name, False)):
        for p in model.metadata_props:
            if p.key == METADATA_KEY:
                p.value = value
        onnx.save(model, tmp_path / "m.onnx")
        r = validate(tmp_path / "m.onnx", built / "test.npz", reference=built / "fp32.onnx",
                     progress=False)  # fmt: skip
        note = r.kernel_truth.target_note
        assert (note is not None) == expected
        if expected:
            assert f"this host's ({host_target().name}), not the target's ({other})" in note


def test_the_reference_outputs_are_computed_once_per_scoring_set(built, monkeypatch):
    cache = ReferenceCache()
    first = _validate(built, "faithful", references=cache, kernel_samples=16)
    calls = []
    real = validate_kernels.make_session
    monkeypatch.setattr(
        validate_kernels,
        "make_session",
        lambda m, *a, **k: calls.append(str(m)) or real(m, *a, **k),
    )
    second = _validate(built, "excluded", references=cache, kernel_samples=16)
    assert (
        len(cache.entries) == 1 and first.kernel_truth.samples == 16 == second.kernel_truth.samples
    )
    assert calls and all(c.endswith("excluded.onnx") for c in calls)  # fp32 not run again


def test_only_qdq_models_are_read_both_ways(built):
    assert _validate(built, "faithful", kernel_samples=0).kernel_truth is None
    fp32 = _validate(built, "fp32")
    assert fp32.kernel_truth is None and fp32.int8_macs is None
    assert "kernel_truth" in json.loads(fp32.to_json()) and "kernel truth" not in fp32.summary()


def test_the_figures_alone_are_validates_without_scoring_the_whole_set(built, monkeypatch):
    """semantics_figures (auto's finalists and rejected steps) gives validate's kernel_truth
    for the same inputs, and scores nothing else: the whole-set scoring is not run."""
    from converter.check import validate as validate_module

    full = _validate(built, "excluded").kernel_truth
    monkeypatch.setattr(validate_module, "score", lambda *a, **k: pytest.fail("scored"))
    alone = validate_module.semantics_figures(
        built / "excluded.onnx", built / "test.npz", reference=built / "fp32.onnx"
    )
    assert alone.compact() == full.compact() and alone.diverged
    fp32, test, ref = built / "fp32.onnx", built / "test.npz", built / "fp32.onnx"
    assert validate_module.semantics_figures(fp32, test, reference=ref) is None  # not QDQ
