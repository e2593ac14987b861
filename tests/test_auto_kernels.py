"""auto on the kernel figure (converter/search/fallback.py, builder, auto_report): every
candidate's score is what onnxruntime's optimized session computes; its report row also
shows the QDQ semantics figure and the int8 share of multiply-adds; the fp32 fallback keeps a
step only if its kernel score is not below the step before, and retries a step that left a
Conv onnxruntime re-quantizes with the float region widened around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_kernel_truth import _folded_depthwise_model

from converter.cli import main
from converter.core.executor import InProcess
from converter.search import auto as auto_module
from converter.search import fallback, stages
from converter.search.candidates import Candidate
from converter.search.tasks import Deadline
from passes.float_region import FLOAT_REGION

# ---------------------------------------------------------------- the walk, on given scores


class _Scores:
    """A builder whose candidates score from a table: (nodes kept fp32, widened) → (kernel
    score, nodes onnxruntime re-quantizes); the budget is met at ``meets`` and above."""

    def __init__(self, table: dict, meets: float = 0.99) -> None:
        self.table, self.meets, self.built = table, meets, []

    def evaluate(self, c: Candidate) -> Candidate:
        kept = tuple(c.passes[0].get("nodes_to_exclude", ()))
        widened = c.passes[-1] == {"pass": FLOAT_REGION}
        self.built.append((kept, widened))
        c.score, requantized = self.table[kept, widened]
        c.worst = c.cosine = c.score
        c.int8_macs = {"share": 0.5, "requantized": list(requantized)}
        c.meets = c.score >= self.meets
        return c

    def read_cache(self, c: Candidate) -> bool:
        return False


def _walk(table: dict, ranked: list[str], full: float = 0.90) -> tuple[list[Candidate], list]:
    builder = _Scores(table)
    best = Candidate("s", [], score=full)
    config = {"pass": "quantize-static", "scheme": "default"}
    found = list(
        fallback.exclusions(
            builder, best, config, len(ranked), InProcess(), Deadline(None),
            rank=lambda *_: ranked,
        )
    )  # fmt: skip
    return found, builder.built


def test_a_step_that_lowers_the_kernel_score_is_not_kept():
    """a lowers the score (0.85 < 0.90) and leaves nothing to widen: not kept, so the next
    step keeps b alone (0.93, kept); b+c lowers it again (0.92 < 0.93): not kept."""
    found, built = _walk(
        {(("a",), False): (0.85, ()), (("b",), False): (0.93, ()),
         (("b", "c"), False): (0.92, ())},
        ["a", "b", "c"],
    )  # fmt: skip
    assert [c.name for c in found] == ["s_fp32x1", "s_fp32x1_step2", "s_fp32x2_step3"]
    assert built == [(("a",), False), (("b",), False), (("b", "c"), False)]
    assert [c.fallback for c in found] == [
        "not kept: kernel score 0.8500 < 0.9000, the step before",
        "kept (kernel score ≥ 0.9000)",
        "not kept: kernel score 0.9200 < 0.9300, the step before",
    ]
    kept = [c.score for c in found if c.fallback.startswith("kept")]
    assert kept == sorted(kept) and min(kept) >= 0.90


def test_a_step_that_leaves_nothing_in_int8_is_not_kept(monkeypatch):
    """Keeping a and b in fp32 leaves no node in int8 (the fp32 model, or a float region
    that took the rest): scoring higher does not make it a fallback step."""
    evaluate = _Scores.evaluate

    def counted(self, c: Candidate) -> Candidate:
        c = evaluate(self, c)
        c.int8_macs["int8_nodes"] = 2 - len(c.passes[0].get("nodes_to_exclude", ()))
        return c

    monkeypatch.setattr(_Scores, "evaluate", counted)
    found, _ = _walk(
        {(("a",), False): (0.93, ()), (("a", "b"), False): (1.0, ())}, ["a", "b"]
    )  # fmt: skip
    assert [c.fallback for c in found] == [
        "kept (kernel score ≥ 0.9000)",
        "not kept: no node left in int8 (the fp32 model)",
    ]


def test_a_requantized_step_is_retried_with_the_float_region_widened():
    """a lowers the score and onnxruntime re-quantizes it: retried widened (0.95, kept), and
    every later step is widened too; the walk ends at the first that meets (0.995)."""
    found, built = _walk(
        {(("a",), False): (0.80, ("a",)), (("a",), True): (0.95, ()),
         (("a", "b"), True): (0.995, ())},
        ["a", "b", "c"],
    )  # fmt: skip
    assert [c.name for c in found] == ["s_fp32x1", "s_fp32x1_wide", "s_fp32x2_wide"]
    assert built == [(("a",), False), (("a",), True), (("a", "b"), True)]
    assert found[1].passes[-1] == {"pass": FLOAT_REGION}
    assert found[1].fallback.startswith("kept") and found[2].meets


def test_a_widened_retry_that_still_lowers_the_score_is_not_kept():
    found, built = _walk(
        {(("a",), False): (0.80, ("a",)), (("a",), True): (0.88, ()),
         (("b",), False): (0.91, ())},
        ["a", "b"],
    )  # fmt: skip
    assert built == [(("a",), False), (("a",), True), (("b",), False)]
    assert [c.fallback.split(":")[0] for c in found] == [
        "not kept",
        "not kept",
        "kept (kernel score ≥ 0.9000)",
    ]


def test_the_walk_stops_after_stall_nodes_in_a_row_not_kept():
    """a is kept (0.93); b, c and d each lower it: after STALL (3) rejections in a row the
    walk stops, e and f are not tried. One kept in between resets the count."""
    assert fallback.STALL == 3
    table = {(("a",), False): (0.93, ())}
    table |= {(("a", n), False): (0.92, ()) for n in "bcdef"}
    notes: list[str] = []
    builder, best = _Scores(table), Candidate("s", [], score=0.90)
    config = {"pass": "quantize-static", "scheme": "default"}
    found = list(
        fallback.exclusions(
            builder, best, config, 6, InProcess(), Deadline(None),
            rank=lambda *_: list("abcdef"), note=notes.append,
        )
    )  # fmt: skip
    assert builder.built == [(("a",), False)] + [(("a", n), False) for n in "bcd"]
    assert notes == [
        "the fp32 fallback of s stopped after 3 nodes in a row that did not raise its kernel "
        "score (2 more of the ranking not tried)"
    ]
    assert [c.fallback.split(":")[0] for c in found] == ["kept (kernel score ≥ 0.9000)"] + [
        "not kept"
    ] * 3
    table[(("a", "d"), False)] = (0.94, ())  # d raises it: the count starts again
    table |= {(("a", "d", n), False): (0.93, ()) for n in "ef"}
    found, built = _walk(table, list("abcdef"))
    assert len(built) == 6 and built[-1] == (("a", "d", "f"), False)  # all tried


# ---------------------------------------------------------------- auto end to end


def _auto(d: Path):
    """auto on the folded-depthwise model (tests/test_kernel_truth.py): one configuration
    (static u8, per-channel, minmax, no equalization: conv2 as built), the fallback ranking
    given (conv2, conv3, conv1: the ranking is not what is tested), 7-bit weights."""
    every = auto_module._configs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            auto_module,
            "_configs",
            lambda m, t: [(n, {**c, "equalize": False}) for n, c in every(m, t)
                          if n == "static_u8_pc_minmax"],
        )  # fmt: skip
        mp.setattr(stages, "_ranking", lambda *_: ["conv2", "conv3", "conv1"])
        return auto_module.auto(
            d / "m.onnx", d / "t.npz", d / "o", metric="cosine", min_score=0.9999,
            calib=d / "c.npz", target="avx2", bench_runs=3, max_excluded=3,
        )  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("auto_kernels")
    rng = np.random.default_rng(1)
    np.savez(d / "c.npz", x=rng.standard_normal((32, 4, 16, 16)).astype(np.float32))
    np.savez(d / "t.npz", x=rng.standard_normal((40, 4, 16, 16)).astype(np.float32))
    onnx.save(_folded_depthwise_model(), d / "m.onnx")
    return _auto(d), d / "o"


def test_auto_rejects_the_requantized_exclusion_and_the_fp32_model_it_widens_to(run):
    """Keeping conv2 in fp32 is 0.9996 in the model's semantics and 0.946 in the kernels
    (onnxruntime re-quantizes it per tensor): not kept. Widened (conv2 really fp32) it is
    0.9997 in both, but in this tiny model the widened region takes conv1 and conv3 too:
    nothing is left in int8, so it is not a fallback step either. The walk goes on with
    conv3 (0.9997, 92 % of the MACs int8) and conv1; no kept step is below the one before."""
    result, _ = run
    found = {c.name: c for c in result.candidates}
    assert list(found) == [
        "static_u8_pc_minmax", "static_u8_pc_minmax_fp32x1", "static_u8_pc_minmax_fp32x1_wide",
        "static_u8_pc_minmax_fp32x1_step2", "static_u8_pc_minmax_fp32x2_step3",
    ]  # fmt: skip
    full, step, wide, conv3, last = found.values()
    assert full.score == pytest.approx(0.9995, abs=3e-4)
    assert full.semantics is None  # measured only for finalists and steps not kept
    assert step.score == pytest.approx(0.9464, abs=0.005)
    assert step.semantics["semantics_score"] == pytest.approx(0.9996, abs=3e-4)
    assert step.semantics["diverged"] and step.semantics["parts"] == ["conv2, relu2"]
    assert step.int8_macs["requantized"] == ["conv2"] and step.fallback.startswith("not kept")
    assert wide.score == pytest.approx(0.9997, abs=3e-4)
    assert wide.int8_macs["share"] == 0.0 and wide.int8_macs["int8_nodes"] == 0
    assert wide.fallback == "not kept: no node left in int8 (the fp32 model)"
    assert wide.semantics["diverged"] is False  # measured: a step not kept
    assert conv3.fallback.startswith("kept") and conv3.int8_macs["share"] > 0.9
    kept = [full.score] + [c.score for c in found.values() if c.fallback.startswith("kept")]
    assert kept == sorted(kept)
    assert result.best is None and result.written is last  # 0.99987 < 0.9999: the closest
    assert last.semantics["diverged"] is False  # a finalist: measured


def test_the_report_and_manifest_show_both_figures_and_the_int8_share(run):
    result, out = run
    md = (out / "report.md").read_text()
    assert "| semantics score | int8 MACs |" in md
    step = next(c for c in result.candidates if c.name == "static_u8_pc_minmax_fp32x1")
    semantics = step.semantics["semantics_score"]
    assert (
        f"| {step.score:.4f} | {semantics:.4f} (first 40) DIVERGES at conv2, relu2 | 100.0% |" in md
    )
    assert "auto ranks and accepts on it" in md
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {c["name"]: c for c in manifest["candidates"]}
    assert rows["static_u8_pc_minmax_fp32x1"]["semantics"]["kernel_score"] == pytest.approx(
        rows["static_u8_pc_minmax_fp32x1"]["score"]
    )
    assert rows["static_u8_pc_minmax"]["int8_macs"]["int8_macs"] == 100352
    assert manifest["int8_macs"] == result.written.int8_macs


def test_a_rerun_reads_both_figures_from_the_cache(run):
    result, out = run
    again = _auto(out.parent)
    assert [c.name for c in again.candidates] == [c.name for c in result.candidates]
    assert all(c.cached for c in again.candidates)
    for old, new in zip(result.candidates, again.candidates):
        assert (new.score, new.semantics, new.int8_macs) == (
            old.score,
            old.semantics,
            old.int8_macs,
        )
        assert new.fallback == old.fallback


def test_a_recipe_rebuilds_the_widened_step_byte_for_byte(run, capsys):
    """A widened step is quantize-static then float-region: both are recipe passes, so
    `onnxship run` with the manifest's passes writes the same model as auto did."""
    result, out = run
    manifest = json.loads((out / "manifest.json").read_text())
    name = "static_u8_pc_minmax_fp32x1_wide"
    wide = next(c for c in manifest["candidates"] if c["name"] == name)
    assert [p["pass"] for p in wide["passes"]] == ["quantize-static", "float-region"]
    d = out.parent
    entries = ", ".join(
        "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in p.items()) + " }"
        for p in wide["passes"]
    )
    recipe = d / "wide.toml"
    recipe.write_text(
        f'name = "wide"\n[model]\nonnx = "{d / "m.onnx"}"\n'
        f'[data]\ncalibration = "{d / "c.npz"}"\nvalidation = "{d / "t.npz"}"\n'
        f'[[variants]]\nname = "wide"\npasses = [{entries}]\n'
        "[bench]\nthreads = [1]\nwarmup = 1\nruns = 3\n"
    )
    assert main(["-q", "run", str(recipe), "-o", str(d / "r")]) == 0, capsys.readouterr().err
    built = next(c for c in result.candidates if c.name == name)
    assert (d / "r" / "wide.onnx").read_bytes() == built.path.read_bytes()
