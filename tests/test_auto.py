"""`onnxship auto`: the fastest candidate within the budget, verified through onnxruntime."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import two_matmul_mlp

from converter.cli import main
from converter.core.errors import BadInputError
from converter.core.machine import machine_line
from converter.core.metrics import accuracy, per_sample_cosine
from converter.core.runtime import make_session


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def auto_digits(ref, out: Path) -> int:
    """auto on a digits model: accuracy at most 1 point below fp32."""
    args = ["--metric", "accuracy", "--max-drop", "0.01", "--bench-runs", "20"]
    return main(["-q", "auto", str(ref.onnx), "--data", str(ref.test), *args, "-o", str(out)])


@pytest.fixture(scope="module")
def mlp_auto(digits_mlp, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "out"
    code = auto_digits(digits_mlp, out)
    return code, out


def test_auto_digits_meets_budget(mlp_auto, digits_mlp) -> None:
    code, out = mlp_auto
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    chosen = next(c for c in manifest["candidates"] if c["name"] == manifest["chosen"])
    assert chosen["meets"] and chosen["speedup"] is not None
    # the written model really scores what the report says, on the scoring split
    score = np.load(out / "data" / "score.npz")
    logits = make_session(out / "model.onnx").run(None, {"x": score["x"]})[0]
    assert accuracy(logits, score["labels"]) == pytest.approx(chosen["score"])
    fp32 = make_session(digits_mlp.onnx).run(None, {"x": score["x"]})[0]
    assert accuracy(logits, score["labels"]) >= accuracy(fp32, score["labels"]) - 0.01
    # the fastest of those meeting the budget (within the 5 % timing-noise band)
    meeting = [c["speedup"] for c in manifest["candidates"] if c["meets"]]
    assert chosen["speedup"] >= max(meeting) * 0.95
    assert manifest["artifacts"]["model"]["sha256"]
    assert (out / "pareto.png").stat().st_size > 0 and "Chosen" in (out / "report.md").read_text()
    assert f"Machine: {machine_line(manifest['machine'])}." in (out / "report.md").read_text()
    assert manifest["budget"] == {
        "metric": "accuracy", "min_score": None, "max_drop": 0.01, "min_worst": None,
        "threshold": pytest.approx(manifest["budget"]["reference_score"] - 0.01),
        "reference_score": manifest["budget"]["reference_score"],
    }  # fmt: skip
    assert manifest["artifacts"]["fp32"]["sha256"] == _sha(digits_mlp.onnx)
    assert manifest["artifacts"]["model"]["sha256"] == _sha(out / "model.onnx")


def test_auto_calibration_kept_apart_from_scoring(mlp_auto, digits_mlp) -> None:
    _, out = mlp_auto
    calib, score = np.load(out / "data" / "calib.npz"), np.load(out / "data" / "score.npz")
    total = np.load(digits_mlp.test)["x"]
    assert len(calib["x"]) + len(score["x"]) == len(total)
    rows = {r.tobytes() for r in calib["x"]}
    assert not any(r.tobytes() in rows for r in score["x"])
    assert "every 4th sample" in (out / "report.md").read_text()


def test_auto_rerun_is_cached(mlp_auto, digits_mlp) -> None:
    _, out = mlp_auto
    before = json.loads((out / "manifest.json").read_text())
    assert auto_digits(digits_mlp, out) == 0
    after = json.loads((out / "manifest.json").read_text())
    assert all(c["cached"] for c in after["candidates"])
    assert [c["score"] for c in after["candidates"]] == [c["score"] for c in before["candidates"]]


def test_auto_encoder_cosine_budget(tiny_encoder, tmp_path: Path) -> None:
    out = tmp_path / "enc"
    code = main(
        [
            "-q",
            "auto",
            str(tiny_encoder.onnx),
            "--data",
            str(tiny_encoder.test),
            "--metric",
            "cosine",
            "--min-score",
            "0.99",
            "--bench-runs",
            "10",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    score = dict(np.load(out / "data" / "score.npz"))
    score.pop("labels")
    got = make_session(out / "model.onnx").run(None, score)[0]
    want = make_session(tiny_encoder.onnx).run(None, score)[0]
    assert per_sample_cosine(got, want).mean() >= 0.99


def test_impossible_budget_is_exit_1_writing_the_closest(digits_mlp, tmp_path, capsys) -> None:
    code = main(
        [
            "-q",
            "auto",
            str(digits_mlp.onnx),
            "--data",
            str(digits_mlp.test),
            "--metric",
            "cosine",
            "--min-score",
            "1.0",
            "--min-worst",
            "1.0",
            "--max-excluded",
            "1",
            "--bench-runs",
            "5",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "no candidate meets cosine ≥ 1.0000" in err and "closest:" in err and "short by" in err
    # the closest candidate is written all the same, marked as a miss
    out = tmp_path / "o"
    manifest = json.loads((out / "manifest.json").read_text())
    closest = max((c for c in manifest["candidates"] if c["score"] is not None), key=_score)
    written = manifest["written"]
    assert written["candidate"] == closest["name"] and not written["within_budget"]
    assert written["short_by"]["score"] == pytest.approx(1.0 - closest["score"])
    assert written["short_by"]["worst"] == pytest.approx(1.0 - closest["worst"])
    assert f"closest: {closest['name']}" in err and "written to model.onnx" in err
    score = np.load(out / "data" / "score.npz")
    got = make_session(out / "model.onnx").run(None, {"x": score["x"]})[0]
    want = make_session(digits_mlp.onnx).run(None, {"x": score["x"]})[0]
    cosine = per_sample_cosine(got, want)
    assert cosine.mean() == pytest.approx(closest["score"]) and cosine.min() < 1.0
    assert "NOT within budget" in (out / "report.md").read_text()


def _score(candidate: dict) -> float:
    return candidate["score"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metric", "accuracy"], "no budget given"),
        (["--min-score", "2"], "--min-score 2.0 is outside [-1, 1]"),
        (["--max-drop", "-0.01"], "--max-drop -0.01 is outside [0, 1]"),  # ScoreLimits' range
        (["--max-drop", "0.01", "--min-worst", "1.5"], "--min-worst 1.5 is outside [-1, 1]"),
        (["--max-drop", "0.01", "--sparsity-grid", "1.5"], "outside (0, 1)"),
    ],
)
def test_bad_options_exit_2(args, expected, digits_mlp, tmp_path, capsys) -> None:
    code = main(
        [
            "auto",
            str(digits_mlp.onnx),
            "--data",
            str(digits_mlp.test),
            *args,
            "-o",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_budget_is_score_limits_on_one_metric() -> None:
    """The budget's limits and ranges are ScoreLimits' (max_drop in [0, 1], as in validate);
    its threshold is the higher of min_score and the reference's score less max_drop."""
    from converter.core.gates import ScoreLimits
    from converter.search.budget import Budget

    budget = Budget(min_score=0.9, max_drop=0.02, min_worst=0.8, metric="accuracy")
    assert isinstance(budget, ScoreLimits)
    assert budget.threshold(0.95) == pytest.approx(0.93)
    assert budget.threshold(0.90) == pytest.approx(0.9)
    gates = budget.candidate_gates(0.95, 0.92, 0.85)
    assert [(g.name, g.passed) for g in gates] == [
        ("min-score", True),
        ("max-drop", False),
        ("min-worst", True),
    ]
    assert gates[1].value == pytest.approx(0.03) and gates[1].metric == "accuracy drop"
    with pytest.raises(BadInputError, match=r"--max-drop -0.1 is outside \[0, 1\]"):
        Budget(max_drop=-0.1, metric="cosine")


def test_accuracy_needs_labels(digits_mlp, tmp_path, capsys) -> None:
    np.savez(tmp_path / "nolabels.npz", x=np.load(digits_mlp.test)["x"])
    code = main(
        [
            "auto",
            str(digits_mlp.onnx),
            "--data",
            str(tmp_path / "nolabels.npz"),
            "--max-drop",
            "0.01",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "needs `labels`" in capsys.readouterr().err


# --- the cache key holds everything that feeds a number ------------------------------------


def _mlp(path: Path) -> Path:
    import onnx

    onnx.save(two_matmul_mlp(np.random.default_rng(0)), str(path))
    return path


def _auto_cosine(model: Path, data: Path, calib: Path, out: Path) -> dict:
    from converter.search.auto import auto

    auto(model, data, out, metric="cosine", min_score=0.5, calib=calib, bench_runs=3)
    return json.loads((out / "manifest.json").read_text())


def _real_cosine(candidate: dict, reference: Path, data: Path) -> float:
    """The candidate's mean cosine to fp32, run at the batch its score was measured at (1
    for dynamic int8: its outputs depend on the batch)."""
    x, batch = np.load(data)["x"], candidate["scored_at"]["batch_size"]
    session = make_session(data.parent / "out" / candidate["path"])
    got = np.concatenate(
        [session.run(None, {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )
    want = make_session(reference).run(None, {"x": x})[0]
    return float(per_sample_cosine(got, want).mean())


@pytest.fixture()
def mlp_data(tmp_path):
    rng = np.random.default_rng(7)
    for name, scale in (("a", 1.0), ("b", 6.0), ("c", 1.0)):
        np.savez(
            tmp_path / f"{name}.npz", x=(scale * rng.standard_normal((40, 32))).astype(np.float32)
        )
    return _mlp(tmp_path / "mlp.onnx"), tmp_path


def test_cache_rescored_when_the_scoring_data_changes(mlp_data):
    """auto --data a then --data b into the same OUTDIR: b's numbers, never a's."""
    model, d = mlp_data
    first = _auto_cosine(model, d / "a.npz", d / "c.npz", d / "out")
    second = _auto_cosine(model, d / "b.npz", d / "c.npz", d / "out")
    built = [c for c in second["candidates"] if c["cosine"] is not None]
    assert built and not any(c["cached"] for c in built)
    for c in built:
        assert c["cosine"] == pytest.approx(_real_cosine(c, model, d / "b.npz"), abs=1e-6)
    assert {c["key"] for c in first["candidates"]}.isdisjoint(
        c["key"] for c in second["candidates"]
    )
    third = _auto_cosine(model, d / "b.npz", d / "c.npz", d / "out")  # same inputs: cached
    assert all(c["cached"] for c in third["candidates"] if c["cosine"] is not None)


def test_cache_key_changes_with_calibration_metric_and_target(mlp_data):
    from converter.core.onnxio import load_model
    from converter.search.budget import Budget
    from converter.search.builder import Builder

    model, d = mlp_data
    fp32 = load_model(model)
    passes = [{"pass": "quantize-static"}]

    def key(calib="c.npz", metric="cosine", target="avx2") -> str:
        budget = Budget(min_score=0.5, metric=metric)
        builder = Builder(fp32, d / calib, d / "a.npz", model, budget, d / "cache", target)
        return builder.key(passes)

    base = key()
    assert base == key()
    assert len({base, key(calib="b.npz"), key(metric="agreement"), key(target="arm64")}) == 4


def test_corrupt_cache_entries_are_recomputed(mlp_data, caplog):
    model, d = mlp_data
    first = _auto_cosine(model, d / "a.npz", d / "c.npz", d / "out")
    built = [c for c in first["candidates"] if c["cosine"] is not None]
    truncated, garbled = built[0], built[1]
    path = d / "out" / truncated["path"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (path.parent / f"{garbled['key']}.json").write_text('{"score": ')
    with caplog.at_level("WARNING", logger="converter"):
        second = _auto_cosine(model, d / "a.npz", d / "c.npz", d / "out")
    again = {c["name"]: c for c in second["candidates"]}
    for entry in (truncated, garbled):
        assert again[entry["name"]]["cached"] is False
        assert again[entry["name"]]["cosine"] == pytest.approx(entry["cosine"], abs=1e-9)
    assert (
        sum("is corrupt" in r.message and "recomputing" in r.message for r in caplog.records) == 2
    )
    assert all(c["cached"] for c in second["candidates"][2:] if c["cosine"] is not None)
