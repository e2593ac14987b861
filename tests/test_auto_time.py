"""`onnxship auto --time-budget`: the search stops starting candidates once the time is spent,
and a miss still writes the closest candidate. Time is simulated by a clock that advances one
second per reading, so how many candidates fit does not depend on the machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli, two_matmul_mlp

from converter.core.errors import GateFailed
from converter.core.metrics import per_sample_cosine
from converter.core.runtime import make_session
from converter.search.auto import _configs, auto, check_result


class Ticks:
    """A clock that reads 0, 1, 2, ... seconds: each reading is one second later."""

    def __init__(self) -> None:
        self.now = -1.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A seeded two-MatMul MLP, its scoring data and its calibration data."""
    d = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(3)
    model = two_matmul_mlp(rng)
    onnx.save(model, str(d / "mlp.onnx"))
    for name in ("score", "calib"):
        np.savez(d / f"{name}.npz", x=rng.standard_normal((40, 32)).astype(np.float32))
    return d / "mlp.onnx", d / "score.npz", d / "calib.npz"


def _auto(mlp, out: Path, min_score: float, **options):
    model, score, calib = mlp
    return auto(
        model,
        score,
        out,
        metric="cosine",
        min_score=min_score,
        calib=calib,
        bench_runs=3,
        **options,
    )


def _names(mlp) -> list[str]:
    return [name for name, _ in _configs(onnx.load(str(mlp[0])), "avx2")]


def _outputs(path: Path, mlp, batch: int | None = None) -> np.ndarray:
    """The model's outputs on the scoring data, run ``batch`` samples at a time (all)."""
    x, session = np.load(mlp[1])["x"], make_session(path)
    batch = batch or len(x)
    return np.concatenate(
        [session.run(None, {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def _cosine_to_fp32(path: Path, mlp, batch: int) -> float:
    """At the batch auto scored at (1 for dynamic int8: its outputs depend on the batch)."""
    return float(per_sample_cosine(_outputs(path, mlp, batch), _outputs(mlp[0], mlp)).mean())


def test_time_budget_stops_the_search(mlp, tmp_path) -> None:
    """Budget 2.5 s, the clock read once before each candidate: two start (at 1 s and 2 s),
    the third would start at 3 s. What was found is written, exit 0."""
    names = _names(mlp)
    result = _auto(mlp, tmp_path / "out", 0.5, time_budget=2.5, clock=Ticks())
    assert [c.name for c in result.candidates] == names[:2]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    timed = manifest["time_budget"]
    assert timed["stopped"] and (timed["tried"], timed["planned"]) == (2, len(names))
    assert timed["not_tried"] == names[2:]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "stopped at the time budget, --time-budget 2.5 s" in report
    assert f"after 2 of {len(names)} candidates; not tried: {', '.join(names[2:])}" in report
    check_result(result)  # a hit: exit 0
    assert result.best is result.written and result.best.name in names[:2]
    assert manifest["written"] == {
        "candidate": result.best.name,
        "within_budget": True,
        "short_by": {},
    }
    model = tmp_path / "out" / "model.onnx"
    assert np.array_equal(_outputs(model, mlp), _outputs(result.best.path, mlp))
    batch = result.best.scored_at["batch_size"]
    assert _cosine_to_fp32(model, mlp, batch) == pytest.approx(result.best.score, abs=1e-6)
    # Spent at the first reading: the candidates in the cache are still read, no other.
    again = _auto(mlp, tmp_path / "out", 0.5, time_budget=0.5, clock=Ticks())
    assert [c.name for c in again.candidates] == names[:2]
    assert all(c.cached for c in again.candidates)
    assert again.time_budget["not_tried"] == names[2:]


def test_time_budget_miss_writes_the_closest_and_fails(mlp, tmp_path) -> None:
    """Nothing reaches cosine 1.0: the closest of the two tried is written, marked as a
    miss, and check_result fails (exit 1) naming --time-budget. The fp32 fallback of the
    dynamic mode would need the sensitivity ranking: not started, listed as not tried."""
    names = _names(mlp)
    out = tmp_path / "out"
    result = _auto(mlp, out, 1.0, time_budget=2.5, clock=Ticks(), max_excluded=2)
    assert result.best is None and [c.name for c in result.candidates] == names[:2]
    closest = max(result.candidates, key=lambda c: c.score)
    assert result.written is closest
    fallback = [f"{closest.name}_fp32x1", f"{closest.name}_fp32x2"]
    assert result.time_budget["not_tried"] == names[2:] + fallback
    model = out / "model.onnx"
    assert np.array_equal(_outputs(model, mlp), _outputs(closest.path, mlp))
    cosine = _cosine_to_fp32(model, mlp, closest.scored_at["batch_size"])
    assert cosine == pytest.approx(closest.score, abs=1e-6) and cosine < 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chosen"] is None and manifest["artifacts"]["model"]["sha256"]
    written = manifest["written"]
    assert written["candidate"] == closest.name and written["within_budget"] is False
    assert written["short_by"]["score"] == pytest.approx(1.0 - cosine, abs=1e-6)
    assert "NOT within budget" in (out / "report.md").read_text()
    with pytest.raises(GateFailed) as failed:
        check_result(result)
    message = failed.value.message
    assert failed.value.exit_code == 1 and "\n" not in message
    assert f"closest: {closest.name}" in message and "raise --time-budget" in message


def test_no_candidate_within_the_time_budget(mlp, tmp_path, capsys) -> None:
    """A budget spent before the first candidate (the data split alone takes longer than a
    nanosecond): exit 1, no model.onnx (a stale one is removed), the report still written."""
    model, score, calib = mlp
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"stale")
    args = ["--metric", "cosine", "--min-score", "0.5", "--calib", calib, "--bench-runs", "3"]
    code, _, err = cli(
        capsys, "-q", "auto", model, "--data", score, *args, "--time-budget", "1e-9", "-o", out
    )
    assert code == 1 and "no candidate was tried within --time-budget 1e-09 s" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "model.onnx").exists() and (out / "report.md").exists()
    timed = json.loads((out / "manifest.json").read_text())["time_budget"]
    assert timed["tried"] == 0 and timed["not_tried"] == _names(mlp)


def test_cli_time_budget_hit_exits_0(mlp, tmp_path, capsys) -> None:
    """Time enough: every candidate tried, exit 0; a re-run with no time left reads them all
    from the cache and chooses again."""
    model, score, calib = mlp
    out = tmp_path / "out"
    args = ["--metric", "cosine", "--min-score", "0.5", "--calib", calib, "--bench-runs", "3"]
    for seconds in ("3600", "1e-9"):
        code, _, _ = cli(
            capsys, "-q", "auto", model, "--data", score, *args, "--time-budget", seconds, "-o", out
        )
        assert code == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert not manifest["time_budget"]["stopped"]
        assert manifest["time_budget"]["tried"] == len(manifest["candidates"])
        assert manifest["written"]["within_budget"] is True
    assert all(c["cached"] for c in manifest["candidates"])
    assert "every candidate of the search was tried" in (out / "report.md").read_text()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "ten"])
def test_bad_time_budget_is_exit_2(value, mlp, tmp_path, capsys) -> None:
    model, score, _ = mlp
    code, _, err = cli(
        capsys, "auto", model, "--data", score, "--min-score", "0.5", "--time-budget", value,
        "-o", tmp_path / "o",
    )  # fmt: skip
    assert code == 2 and "--time-budget" in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_deadline_starts_a_batch_per_executor_width() -> None:
    """On an executor running two at a time (Ray on two CPUs) the time is checked before each
    batch: budget 1.5 s, checks at 1 s (two start) and 2 s (spent); of the rest only the
    cached one is read, the others are listed as not tried."""
    from types import SimpleNamespace

    from converter.core.executor import InProcess
    from converter.search.tasks import Deadline

    class Builder:
        def __init__(self) -> None:
            self.built: list[str] = []

        def evaluate(self, c):
            self.built.append(c.name)
            return c

        def read_cache(self, c) -> bool:
            return c.name == "d"

    executor = InProcess()
    executor.width = 2
    builder, deadline = Builder(), Deadline(1.5, Ticks())
    items = [SimpleNamespace(name=n) for n in "abcde"]
    got = deadline.evaluate(builder, items, executor)
    assert [c and c.name for c in got] == ["a", "b", None, "d", None]
    assert builder.built == ["a", "b"] and deadline.not_tried == ["c", "e"]
    assert Deadline(None, Ticks()).evaluate(Builder(), items, executor) == items
