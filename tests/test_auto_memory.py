"""What auto's cost cuts (issue 22) must keep: the same numbers, less memory and time.

- percentile calibration counts its later batches in linear time
  (passes.calibration.histogram_on_edges): the very histograms and ranges ORT's collector
  makes;
- validate drops the sessions it made once a candidate is scored (onnxruntime's arena keeps
  the memory of its largest run: auto on MobileNetV2 held four candidates' and the fp32
  model's, 4.9 GB peak RSS);
- bias correction measures the float model once per set of calibration ranges
  (passes.bias_correction.FloatTargets): the same int32 biases as measuring it each time;
- auto's sensitivity ranking reuses the ranges its candidates were built with.

Tiny seeded models built here; no timings.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxruntime.quantization.calibrate import HistogramCollector
from test_cnn_ranges import _cnn
from test_validate_reference_cache import _linear

from converter.check import validate_score
from converter.check.validate import validate
from converter.core import runtime
from passes import bias_correction
from passes.calibration import MaskSafeHistogramCollector, histogram_on_edges
from passes.quantize import StaticQuantize

# ------------------------------------------------------------------ percentile histograms


def test_histogram_on_edges_counts_as_numpy_does() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        x = (rng.standard_normal(int(rng.integers(1, 3000))) * rng.uniform(0.1, 10)).astype(
            np.float32
        )
        if trial % 2:
            x = np.abs(x)
        _, edges = np.histogram(x[: max(1, x.size // 3)], bins=int(rng.integers(1, 300)))
        edges = edges.astype(np.float32)  # as ORT keeps them, then extends them
        width = edges[1] - edges[0]
        if x.max() > edges[-1] and width > 0:
            edges = np.hstack((edges, np.arange(edges[-1] + width, x.max() + width, width)))
        if trial % 7 == 0:
            x[:5] = edges[min(3, edges.size - 1)]  # on an edge
        if trial % 11 == 0:
            x[-3:] = edges[-1]  # on the last edge: counted in the last bin
        if trial % 13 == 0:
            x[0] = np.nan  # not counted
        got, want = histogram_on_edges(x, edges), np.histogram(x, bins=edges)[0]
        assert got.dtype == want.dtype and np.array_equal(got, want), trial
    with pytest.raises(ValueError):
        histogram_on_edges(np.zeros(3, np.float32), np.array([1.0, 0.0]))


def _collected(settings: dict, batches: list[dict[str, np.ndarray]]) -> tuple:
    """(Ours, ORT's) histogram collectors with ``settings``, each given every batch."""
    ours, ort = MaskSafeHistogramCollector(**settings), HistogramCollector(**settings)
    for batch in batches:
        ours.collect({k: [v] for k, v in batch.items()})
        ort.collect({k: [v] for k, v in batch.items()})
    return ours, ort


def test_percentile_collector_makes_ort_s_histograms() -> None:
    """Batches whose maximum grows (the bins are extended), one with a value on an edge:
    every tensor's histogram, edges, min and max equal ORT's collector's, and so do the
    percentile ranges."""
    rng = np.random.default_rng(1)
    settings = dict(
        method="percentile", symmetric=True, num_bins=64, num_quantized_bins=128,
        percentile=99.9, scenario="same",
    )  # fmt: skip
    batches = [
        {
            "a": (scale * rng.standard_normal((4, 3, 5, 5))).astype(np.float32),
            "b": np.maximum(scale * rng.standard_normal((4, 50)), 0).astype(np.float32),
        }
        for scale in (1.0, 3.0, 0.5, 7.0)
    ]
    ours, ort = _collected(settings, batches)
    assert ours.histogram_dict.keys() == ort.histogram_dict.keys()
    for name, mine in ours.histogram_dict.items():
        theirs = ort.histogram_dict[name]
        assert len(mine[0]) > 64  # the bins were extended
        for a, b in zip(mine, theirs):
            assert np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype
    got, want = ours.compute_percentile(), ort.compute_percentile()
    for name in want:
        assert [float(v) for v in got[name][:2]] == [float(v) for v in want[name][:2]]


def test_entropy_collector_makes_ort_s_histograms() -> None:
    """The value histograms (entropy, distribution), thresholds growing batch by batch:
    the same histograms, edges, extremes and thresholds as ORT's collector, and the same
    entropy ranges."""
    rng = np.random.default_rng(4)
    settings = dict(
        method="entropy", symmetric=False, num_bins=128, num_quantized_bins=128,
        percentile=99.999, scenario="same",
    )  # fmt: skip
    batches = [
        {"a": (scale * rng.standard_normal((4, 3, 5, 5)) + 0.3).astype(np.float32)}
        for scale in (1.0, 3.0, 0.5, 7.0)
    ]
    ours, ort = _collected(settings, batches)
    for a, b in zip(ours.histogram_dict["a"], ort.histogram_dict["a"]):
        assert np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype
    assert len(ours.histogram_dict["a"][0]) > 128  # the range grew: merged histograms
    got, want = ours.compute_entropy()["a"], ort.compute_entropy()["a"]
    assert [float(v) for v in got[:2]] == [float(v) for v in want[:2]]


# ------------------------------------------------------------------- sessions released


def test_validate_keeps_no_session_of_a_scored_candidate(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    onnx.save(_linear(w), tmp_path / "ref.onnx")
    noise = rng.standard_normal(w.shape).astype(np.float32)
    for i in range(6):
        onnx.save(_linear(w + 0.05 * (i + 1) * noise), tmp_path / f"c{i}.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((40, 8)).astype(np.float32))
    sessions = runtime._SessionCache(size=4)
    monkeypatch.setattr(runtime, "_SESSIONS", sessions)
    outputs = validate_score._ReferenceOutputs(budget=2**20)
    monkeypatch.setattr(validate_score, "_REFERENCE_OUTPUTS", outputs)
    scores = []
    for i in range(6):
        report = validate(tmp_path / f"c{i}.onnx", data, reference=tmp_path / "ref.onnx",
                          metrics=["cosine"], progress=False, batch_size=16)  # fmt: skip
        scores.append(report.outputs["y"]["cosine"].value)
        assert len(sessions.sessions) == 0  # neither the candidate's nor the reference's
        assert len(outputs.entries) == 1  # the reference's outputs are what is kept
    assert scores == sorted(scores, reverse=True)  # more noise, lower cosine
    # reference outputs over the budget: the reference's session is kept for the next one
    monkeypatch.setattr(validate_score, "_REFERENCE_OUTPUTS", validate_score._ReferenceOutputs(0))
    again = validate(tmp_path / "c0.onnx", data, reference=tmp_path / "ref.onnx",
                     metrics=["cosine"], progress=False, batch_size=16)  # fmt: skip
    assert again.outputs["y"]["cosine"].value == scores[0]
    assert len(sessions.sessions) == 1


def test_release_drops_every_thread_count_of_a_model() -> None:
    cache = runtime._SessionCache(size=4)
    model = _linear(np.eye(3, dtype=np.float32)).SerializeToString()
    cache.get("m", model, 1)
    cache.get("m", model, 2)
    cache.get("other", model, 1)
    assert cache.release(["m", "absent"]) == 2
    assert list(cache.sessions) == [("other", 1)]


# --------------------------------------------------------------- bias correction targets


def test_shared_float_targets_give_the_same_biases(tmp_path, monkeypatch) -> None:
    """Quantizations made from one set of ranges: the float model is measured once (all its
    Convs), and every model is byte for byte the one measuring it each time makes — also
    with a node kept float (a subset of the targets)."""
    rng = np.random.default_rng(0)
    model = _cnn(rng)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.normal(0, 1, (48, 3, 10, 10)).astype(np.float32))
    kw = {"calibration": path, "calib_method": "minmax", "target": "avx2", "progress": False}
    ranges = StaticQuantize(**kw).calibrate(model)
    measured = []
    real = bias_correction._mean_outputs
    monkeypatch.setattr(
        bias_correction, "_mean_outputs", lambda m, n, *a: measured.append(n) or real(m, n, *a)
    )

    def build(shared: bool, exclude: list[str]) -> bytes:
        given = {"ranges": ranges} if shared else {}  # unshared: calibrated, measured here
        out = StaticQuantize(**kw, **given, bias_correction=True, nodes_to_exclude=exclude)
        result = out(model)
        assert result.stats["bias_correction"]["layers"] == 3 - len(exclude)
        return result.model.SerializeToString(deterministic=True)

    for exclude in ([], ["dw"], ["conv1", "conv3"]):
        alone = build(False, exclude)
        outputs = {"conv1": "h1", "dw": "h2", "conv3": "y"}
        assert measured[-1] == [out for node, out in outputs.items() if node not in exclude]
        count = len(measured)
        assert build(True, exclude) == alone, exclude
        assert len(measured) == count + (not exclude)  # the first shared build measures
    assert [n for n in measured if n == ["h1", "h2", "y"]] == [["h1", "h2", "y"]] * 2
    assert len(ranges.float_targets.means) == 3
    # other calibration samples: measured again, not read from the entry
    other = tmp_path / "other.npz"
    np.savez(other, x=rng.normal(0, 2, (48, 3, 10, 10)).astype(np.float32))
    before = len(measured)
    StaticQuantize(**{**kw, "calibration": other}, ranges=ranges, bias_correction=True)(model)
    assert len(measured) == before + 1 and len(ranges.float_targets.means) == 6


def test_ranges_of_another_method_reuse_the_prepared_model(tmp_path, monkeypatch) -> None:
    """Calibrating with ``prepared_as`` (another method's ranges on the same model and data)
    skips pre-processing and equalization and measures the very ranges a fresh calibration
    does; ranges of another model are not taken."""
    rng = np.random.default_rng(2)
    model = _cnn(rng)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.normal(0, 1, (32, 3, 10, 10)).astype(np.float32))
    kw = {"calibration": path, "target": "avx2", "progress": False, "scheme": "default"}
    first = StaticQuantize(**kw, calib_method="minmax").calibrate(model)
    prepared = []
    real = StaticQuantize.prepare
    monkeypatch.setattr(
        StaticQuantize, "prepare", lambda self, m, f: prepared.append(1) or real(self, m, f)
    )
    for method in ("percentile", "entropy", "mse"):
        fresh = StaticQuantize(**kw, calib_method=method).calibrate(model)
        count = len(prepared)
        shared = StaticQuantize(**kw, calib_method=method).calibrate(model, prepared_as=first)
        assert len(prepared) == count  # not pre-processed again
        assert shared.prepared == fresh.prepared and shared.method == method
        assert shared.tensors.data.keys() == fresh.tensors.data.keys()
        for name, value in fresh.tensors.data.items():
            assert [float(v) for v in shared.tensors.data[name].range_value] == [
                float(v) for v in value.range_value
            ], (method, name)
    other = _cnn(np.random.default_rng(9))
    count = len(prepared)
    StaticQuantize(**kw, calib_method="minmax").calibrate(other, prepared_as=first)
    assert len(prepared) == count + 1  # another model: made for it


def test_channel_means_are_the_float64_sums_of_the_channel_rows() -> None:
    """The same float64 sums as widening the whole tensor first (the order of the values in
    each row is the same, so numpy sums them the same way)."""
    rng = np.random.default_rng(5)
    for shape, axis in (((4, 8, 9, 7), 1), ((16, 300), -1), ((2, 3, 130, 130), 1)):
        value = rng.standard_normal(shape).astype(np.float32)
        wide = np.moveaxis(np.asarray(value, np.float64), axis, 0)
        want = wide.reshape(wide.shape[0], -1).sum(axis=1)
        assert np.array_equal(bias_correction._channel_means(value, axis), want)
