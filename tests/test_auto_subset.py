"""auto scores every candidate on a stratified subset first (issue #22, "score cheaply
first"; converter/search/subset.py): a candidate the subset proves a miss is not scored
further unless a decision reads its score, and then it is completed to the whole-set score.
Every decision must be the one a whole-set scoring makes: checked by running the same search
with the subset switched off (SAMPLES larger than any set)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import two_matmul_mlp

from converter.check.validate import validate
from converter.core.data import model_input_specs, open_data
from converter.core.machine import host_target
from converter.search import auto as auto_module
from converter.search import stages, subset
from converter.search.auto import auto
from converter.search.budget import Budget
from converter.search.builder import Builder
from converter.search.candidates import Candidate, passes_of

OFF = 10**6  # SAMPLES larger than any scoring set here: every candidate scored whole at once


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    """A seeded two-MatMul MLP, 96 scoring samples (sample 0, outside the subset, 8 times
    larger than the others: int8 ranges calibrated on the others clip it; plain.npz without
    it) and 64 others to calibrate on."""
    d = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(11)
    onnx.save(two_matmul_mlp(rng), str(d / "mlp.onnx"))
    x = rng.standard_normal((160, 32)).astype(np.float32)
    score = x[:96].copy()
    score[0] *= 8
    np.savez(d / "score.npz", x=score)
    np.savez(d / "plain.npz", x=x[:96])  # the same without the large sample
    np.savez(d / "calib.npz", x=x[96:])
    return d


def _only(monkeypatch, *names: str) -> None:
    every = auto_module._configs
    monkeypatch.setattr(
        auto_module, "_configs", lambda m, t: [c for c in every(m, t) if c[0] in names]
    )


def _auto(d: Path, out: Path, min_score: float, min_worst: float, data="score", **options):
    return auto(
        d / "mlp.onnx", d / f"{data}.npz", out, metric="cosine", min_score=min_score,
        min_worst=min_worst, calib=d / "calib.npz", bench_runs=3, **options,
    )  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(out: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads((out / "manifest.json").read_text())["candidates"]}


def test_the_subset_is_evenly_spaced_and_the_rest_is_the_other_samples(mlp, tmp_path) -> None:
    x = np.load(mlp / "score.npz")["x"]
    index = subset.stratified(96, 32)
    assert index.tolist() == list(range(1, 96, 3))  # the middle of each slice of 3
    assert len(set(subset.stratified(65, 32).tolist())) == 32
    specs = model_input_specs(onnx.load(str(mlp / "mlp.onnx")))
    parts = subset.split_scoring(open_data(mlp / "score.npz", specs), specs, tmp_path / "p")
    assert (parts.samples, parts.total) == (32, 96)
    first = np.load(parts.first)["x"]
    rest = np.concatenate([np.load(p)["x"] for p in sorted(parts.rest.glob("*.npz"))])
    np.testing.assert_array_equal(first, x[index])
    np.testing.assert_array_equal(rest, np.delete(x, index, axis=0))
    # fewer than twice the subset: scored whole, as before
    assert subset.split_scoring(open_data(mlp / "score.npz", specs), specs, tmp_path, 49) is None


def test_what_the_subset_proves() -> None:
    parts = subset.ScoreParts(Path("a"), Path("b"), 32, 96)
    # worst-sample cosine below --min-worst: the whole set's is at most as high
    assert subset.proven_miss(parts, "cosine", 0.9, 0.98, 0.99, 0.97).startswith("worst cosine")
    # the mean with the other 64 samples at 1: (32 × 0.6 + 64) / 96 = 0.8667 < 0.9
    assert subset.proven_miss(parts, "cosine", 0.9, None, 0.6, 0.5) == (
        "cosine at most 0.8667 < 0.9000"
    )
    # 0.7 on the subset could still reach 0.9 on the whole set: not proven
    assert subset.proven_miss(parts, "accuracy", 0.9, None, 0.7, 0.99) == ""
    assert subset.proven_miss(parts, "cosine", 0.9, 0.98, 0.95, 0.98) == ""
    whole = subset.combine(
        parts,
        {"score": 0.9, "cosine": 0.9, "worst": 0.5},
        {"score": 0.6, "cosine": 0.6, "worst": 0.7},
    )
    assert whole == pytest.approx({"score": 0.7, "cosine": 0.7, "worst": 0.5})


def _builder(d: Path, out: Path, min_worst: float | None) -> Builder:
    fp32 = onnx.load(str(d / "mlp.onnx"))
    specs = model_input_specs(fp32)
    parts = subset.split_scoring(open_data(d / "score.npz", specs), specs, out / "parts")
    budget = Budget(0.5, None, min_worst, metric="cosine")
    cache = out / "cache"
    cache.mkdir(parents=True)
    builder = Builder(
        fp32, d / "calib.npz", d / "score.npz", d / "mlp.onnx", budget, cache, HOST, parts
    )
    builder.threshold = 0.5
    return builder


HOST = host_target().name
STATIC = {"pass": "quantize-static", "scheme": "transformer", "target": HOST}
DYNAMIC = {"pass": "quantize-dynamic", "per_channel": True, "target": HOST}


def _cosine(model: Path, data: Path, reference: Path):
    report = validate(model, data, reference=reference, metrics=["cosine"], progress=False,
                      kernel_samples=0)  # fmt: skip
    return report, report.outputs[report.output]["cosine"]


@pytest.mark.parametrize("config", [STATIC, DYNAMIC], ids=["static", "dynamic"])
def test_a_miss_the_subset_cannot_see_is_scored_whole_as_validate_does(
    mlp, tmp_path, config
) -> None:
    """The worst sample is not in the subset (static int8: sample 0, the large one): with
    --min-worst between the subset's worst cosine and the whole set's, the subset cannot
    prove the miss, so the other samples are scored and the parts combined — the numbers of
    one validate of the whole set, at the same batch (static 64 at a time, dynamic at 1)."""
    first = _builder(mlp, tmp_path / "a", None)
    built = first.evaluate(Candidate("c", passes_of(config, [])))
    whole, cosine = _cosine(built.path, mlp / "score.npz", mlp / "mlp.onnx")
    _, on_subset = _cosine(built.path, first.parts.first, mlp / "mlp.onnx")
    assert on_subset.worst > cosine.worst
    min_worst = (on_subset.worst + cosine.worst) / 2
    c = _builder(mlp, tmp_path / "b", min_worst).evaluate(Candidate("c", passes_of(config, [])))
    assert c.subset is None and not c.meets
    assert (c.score, c.cosine, c.worst) == pytest.approx(
        (cosine.value, cosine.value, cosine.worst), rel=1e-12, abs=1e-12
    )
    assert c.scored_at == whole.scoring()  # the batch, the threads, all 96 samples
    assert c.scored_at["batch_size"] == (1 if config is DYNAMIC else 64)


def test_a_cache_entry_made_on_the_subset_is_completed_later(mlp, tmp_path) -> None:
    """An entry decided on the subset holds the subset's numbers apart ("subset"); read by
    a run whose budget the subset does not prove missed, it is completed (the rest scored,
    the model not built again) and the entry upgraded to the whole set's numbers."""
    strict = _builder(mlp, tmp_path / "a", 0.99999)
    c = strict.evaluate(Candidate("c", passes_of(STATIC, [])))
    assert c.subset is not None and c.score is None and not c.meets
    entry = json.loads((strict.cache / f"{c.key}.json").read_text())
    assert "score" not in entry and entry["subset"]["samples"] == 32
    assert entry["scored_at"]["samples"] == 32
    # the same budget reads it back as decided on the subset, not scored further
    again = Candidate("c", passes_of(STATIC, []))
    assert strict.read_cache(again) and again.subset == c.subset and again.score is None

    lax = _builder(mlp, tmp_path / "b", 0.5)
    lax.cache = strict.cache
    built = []
    lax.build = lambda passes: built.append(passes)  # type: ignore[method-assign]
    later = lax.evaluate(Candidate("c", passes_of(STATIC, [])))
    assert built == [] and later.cached and later.subset is None and later.meets
    whole = validate(later.path, mlp / "score.npz", reference=mlp / "mlp.onnx",
                     metrics=["cosine"], progress=False, kernel_samples=0)  # fmt: skip
    cosine = whole.outputs[whole.output]["cosine"]
    assert (later.score, later.worst) == pytest.approx((cosine.value, cosine.worst), abs=1e-12)
    entry = json.loads((strict.cache / f"{c.key}.json").read_text())
    assert "subset" not in entry and entry["score"] == later.score
    assert entry["scored_at"]["samples"] == 96


def test_the_choice_is_the_one_a_whole_set_scoring_makes(mlp, tmp_path, monkeypatch) -> None:
    """static_transformer misses on the subset (worst cosine below 0.99) and no decision
    reads its score (static_u8_pc_minmax meets): it stays at the subset. The chosen model,
    its numbers and the written file are those of the search scoring everything whole."""
    _only(monkeypatch, "static_transformer", "static_u8_pc_minmax")
    on = _auto(mlp, tmp_path / "on", 0.99, 0.99, data="plain")
    monkeypatch.setattr(subset, "SAMPLES", OFF)
    off = _auto(mlp, tmp_path / "off", 0.99, 0.99, data="plain")
    assert on.best.name == off.best.name == "static_u8_pc_minmax"
    assert (on.best.score, on.best.worst) == pytest.approx((off.best.score, off.best.worst))
    assert _sha(tmp_path / "on" / "model.onnx") == _sha(tmp_path / "off" / "model.onnx")
    rows, whole = _rows(tmp_path / "on"), _rows(tmp_path / "off")
    decided = rows["static_transformer"]
    assert decided["score"] is None and decided["subset"]["of"] == 96
    assert decided["subset"]["miss"].startswith("worst cosine")
    assert not whole["static_transformer"]["meets"]  # (it misses on the whole set too)
    assert whole["static_transformer"]["worst"] <= decided["subset"]["worst"]
    assert any("1 of 2 candidates was decided on 32" in n for n in on.notes)
    report = (tmp_path / "on" / "report.md").read_text()
    assert "no: misses on 32 of 96 samples: worst cosine" in report
    assert "32 samples" not in report.split("Scores:")[1].split("\n")[0]


def test_a_miss_completes_the_fallback_parent_and_the_closest(mlp, tmp_path, monkeypatch) -> None:
    """Nothing meets: the static fallback starts from the best scored full-int8 candidate
    and the closest one is written — both read scores, so every candidate decided on the
    subset is completed first. The same rows, scores and written model as the whole-set
    search; the parent's score when the walk starts is already the whole set's."""
    _only(monkeypatch, "static_transformer", "static_u8_pc_minmax", "static_u8_pt_mse")
    parents = []
    walk = stages.fallback.exclusions

    def spy(builder, best, *args, **kwargs):
        parents.append((best.name, best.subset, best.score))
        return walk(builder, best, *args, **kwargs)

    completed = []
    complete = Builder.complete

    def counted(builder, c):
        if c.subset:
            completed.append(c.name)
        return complete(builder, c)

    monkeypatch.setattr(stages.fallback, "exclusions", spy)
    monkeypatch.setattr(Builder, "complete", counted)
    on = _auto(mlp, tmp_path / "on", 0.99999, 0.9999, max_excluded=1)
    # each candidate was decided on the subset, then completed when read (the fallback's
    # parents before the walk, its step before its verdict)
    assert sorted(completed) == [
        "static_transformer", "static_u8_pc_minmax", "static_u8_pc_minmax_fp32x1",
        "static_u8_pt_mse",
    ]  # fmt: skip
    monkeypatch.setattr(subset, "SAMPLES", OFF)
    off = _auto(mlp, tmp_path / "off", 0.99999, 0.9999, max_excluded=1)
    assert on.best is None and off.best is None
    assert on.written.name == off.written.name
    assert _sha(tmp_path / "on" / "model.onnx") == _sha(tmp_path / "off" / "model.onnx")
    rows, whole = _rows(tmp_path / "on"), _rows(tmp_path / "off")
    assert list(rows) == list(whole)
    for name, row in rows.items():
        assert row["subset"] is None
        assert (row["score"], row["worst"]) == pytest.approx(
            (whole[name]["score"], whole[name]["worst"]), rel=1e-12, abs=1e-12
        )
        assert row["scored_at"]["samples"] == 96
    (name, decided, score), (name_off, _, score_off) = parents  # the walk of each run
    assert name == name_off and decided is None and score == pytest.approx(score_off, abs=1e-12)
    assert any("none was decided" in n for n in on.notes)
