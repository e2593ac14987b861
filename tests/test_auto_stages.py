"""How auto spends its time (converter/search/stages.py, auto.py): a stage starts only when it
can still win, the sensitivity ranking is cached, only finalists are benched, calibration
sizes are reported, and --calib may not overlap --data unless the user allows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import two_matmul_mlp
from onnx import TensorProto, helper

from converter.cli import main
from converter.core.executor import InProcess
from converter.search import stages
from converter.search.candidates import Candidate, configs
from converter.search.tasks import Deadline


def _graph(ops: list[str]) -> onnx.ModelProto:
    """A model made of ``ops`` chained (only their types matter to the search order)."""
    nodes = [helper.make_node(op, [f"t{i}"], [f"t{i + 1}"]) for i, op in enumerate(ops)]
    x = helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info(f"t{len(ops)}", TensorProto.FLOAT, [1, 4])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]))


ENCODER = _graph(["MatMul", "Softmax", "LayerNormalization"])
CNN = _graph(["Conv", "Relu", "Gemm"])


class _Scores:
    """A builder whose candidates score from ``scores`` by name (fallback steps: ``step``);
    the budget is met at ``threshold`` and above. Records what it built."""

    def __init__(
        self, model, scores: dict[str, float], step: float = 0.5, cache=None, shares=None,
        speeds=None,
    ) -> None:  # fmt: skip
        self.model, self.scores, self.step, self.shares = model, scores, step, shares or {}
        self.threshold, self.built, self.cache = 0.99, [], cache
        self.speed, self.probed = speeds or {}, []
        self.sample_shapes: dict = {}  # the model's own input shapes

    def speeds(self, candidates: list[Candidate]) -> dict[str, float]:
        self.probed.append([c.name for c in candidates])
        return {c.name: self.speed.get(c.name, 2.0) for c in candidates}

    def evaluate(self, c: Candidate) -> Candidate:
        self.built.append(c.name)
        default = self.step if "fp32x" in c.name else 0.5
        c.score = c.worst = c.cosine = self.scores.get(c.name, default)
        c.meets = c.score >= self.threshold
        if c.name in self.shares:
            c.int8_macs = {"share": self.shares[c.name]}
        return c

    def read_cache(self, c: Candidate) -> bool:
        return False

    def key(self, passes) -> str:
        return "k" + str(abs(hash(json.dumps(passes, sort_keys=True))) % 10**8)


def _search(builder, monkeypatch, ranked=("a", "b")) -> tuple[list[Candidate], list[str], list]:
    ranking_calls = []

    def rank(b, config, executor):
        ranking_calls.append(config["pass"])
        return list(ranked)

    monkeypatch.setattr(stages, "_ranking", rank)
    log = stages.SearchLog()
    found = list(
        stages.search(
            builder, configs(builder.model, "avx2"), [], 2, InProcess(), Deadline(None), log
        )
    )
    return found, log.notes, ranking_calls


def test_fallbacks_skipped_when_a_static_full_int8_candidate_meets(monkeypatch) -> None:
    """A static configuration meets: neither fallback can be faster (keeping nodes in fp32
    only slows a model), so no ranking runs and the notes say why."""
    scores = {"dynamic_pc": 0.98, "dynamic_pt": 0.97, "static_transformer": 0.995}
    found, notes, ranked = _search(_Scores(ENCODER, scores), monkeypatch)
    assert ranked == []
    assert not any("fp32x" in c.name for c in found)
    assert any("dynamic fp32 fallback (from dynamic_pc) was skipped" in n for n in notes)
    assert any("static_transformer meets the budget" in n for n in notes)


def test_static_fallback_still_runs_when_only_dynamic_meets(monkeypatch) -> None:
    """On a CNN dynamic int8 can meet the budget and still be slower than fp32: the static
    fallback may beat it, so it runs (from the best static configuration)."""
    scores = {"dynamic_pc": 0.995, "static_u8_pc_minmax": 0.95, "static_u8_pc_percentile": 0.96}
    builder = _Scores(CNN, scores, step=0.995)
    found, notes, ranked = _search(builder, monkeypatch)
    assert ranked == ["quantize-static"]
    steps = [c.name for c in found if "fp32x" in c.name]
    assert steps == ["static_u8_pc_percentile_fp32x1"]  # meets at once: the walk ends
    assert not any("was skipped" in n for n in notes)


def test_static_fallback_runs_when_what_meets_is_hardly_int8(monkeypatch) -> None:
    """On a CNN the transformer scheme quantizes only the final Gemm (0.4 % of the MACs)
    and meets the budget: the every-op static fallback (100 %) may give a faster model, so
    it runs, from the best every-op configuration; the dynamic one too (nothing as int8 as
    dynamic_pc meets)."""
    scores = {"static_transformer": 0.9999, "static_u8_pc_percentile": 0.95, "dynamic_pc": 0.9}
    shares = {"static_transformer": 0.004}
    builder = _Scores(CNN, scores, step=0.995, shares=shares)
    found, notes, ranked = _search(builder, monkeypatch)
    assert ranked == ["quantize-dynamic", "quantize-static"]
    assert "static_u8_pc_percentile_fp32x1" in [c.name for c in found]
    assert any("static_transformer meets the budget with only 0.4%" in n for n in notes)


def test_the_fallback_starts_from_a_fast_parent_not_the_best_scored_slow_one(monkeypatch):
    """MobileNetV2 on x86: int8 activations (s8) score like uint8 but run at 1.27x fp32
    against 2.2x; no fp32 fallback step of the slow parent can be fast. The probe measures
    every repairable static parent once; the best scored among those within PARENT_SPEED
    of the fastest is repaired, and the note says why it is not the best scored."""
    scores = {"static_s8_pc_mse": 0.976, "static_u8_pc_mse": 0.975, "static_u8_pc_minmax": 0.95}
    speeds = {"static_s8_pc_mse": 1.27, "static_u8_pc_mse": 2.2, "static_u8_pc_minmax": 2.25}
    builder = _Scores(CNN, scores, step=0.995, speeds=speeds)
    found, notes, _ = _search(builder, monkeypatch)
    static = [n for n, cfg in configs(CNN, "avx2") if cfg["pass"] == "quantize-static"]
    assert [set(p) for p in builder.probed if "static_u8_pc_mse" in p] == [set(static)]
    assert [c.name for c in found if "static" in c.name and "fp32x" in c.name] == [
        "static_u8_pc_mse_fp32x1"
    ]
    (note,) = [n for n in notes if "fallback starts from" in n]
    assert "static_u8_pc_mse (2.20x" in note and "static_s8_pc_mse (0.9760, 1.27x)" in note
    # within 0.9 of the fastest: the best scored is repaired, and no note
    speeds["static_s8_pc_mse"] = 0.9 * 2.25
    builder = _Scores(CNN, scores, step=0.995, speeds=speeds)
    found, notes, _ = _search(builder, monkeypatch)
    assert [c.name for c in found if "static" in c.name and "fp32x" in c.name] == [
        "static_s8_pc_mse_fp32x1"
    ]
    assert not any("fallback starts from" in n for n in notes)


def test_both_fallbacks_run_when_nothing_meets(monkeypatch) -> None:
    found, notes, ranked = _search(_Scores(CNN, {"dynamic_pc": 0.9}), monkeypatch)
    assert ranked == ["quantize-dynamic", "quantize-static"]
    assert notes == []


def test_every_op_variants_skipped_on_an_encoder_far_from_the_budget(monkeypatch) -> None:
    """The probe (static_u8_pc_minmax) scores 0.86 against a 0.99 budget: its five
    calibration variants are not built; the note names them and the probe's score."""
    scores = {"static_transformer": 0.995, "static_u8_pc_minmax": 0.86}
    builder = _Scores(ENCODER, scores)
    found, notes, _ = _search(builder, monkeypatch)
    every_op = [n for n, cfg in configs(ENCODER, "avx2") if cfg.get("scheme") == "default"]
    assert len(every_op) == 6
    assert [n for n in builder.built if n in every_op] == ["static_u8_pc_minmax"]
    (note,) = [n for n in notes if "not tried" in n]
    assert all(n in note for n in every_op[1:]) and "0.8600" in note and "0.1300" in note


def test_every_op_variants_tried_when_the_probe_comes_close(monkeypatch) -> None:
    scores = {"static_u8_pc_minmax": 0.96}  # 0.03 short of 0.99: within reach
    builder = _Scores(ENCODER, scores)
    _search(builder, monkeypatch)
    every_op = [n for n, cfg in configs(ENCODER, "avx2") if cfg.get("scheme") == "default"]
    assert [n for n in builder.built if n in every_op] == every_op


def test_every_op_variants_always_tried_on_a_cnn(monkeypatch) -> None:
    builder = _Scores(CNN, {"static_u8_pc_minmax": 0.5})
    _search(builder, monkeypatch)
    every_op = [n for n, cfg in configs(CNN, "avx2") if cfg.get("scheme") == "default"]
    assert set(every_op) <= set(builder.built)


def test_the_sensitivity_ranking_is_cached_by_content(tmp_path, monkeypatch) -> None:
    calls = []

    class _Node:
        def __init__(self, name: str, loss: float) -> None:
            self.name, self.loss = name, loss

    class _Ranked:
        nodes = [_Node("n2", 0.02), _Node("n1", 0.01)]

    def fake_sensitivity(*args, **kwargs):
        calls.append(kwargs["mode"])
        return _Ranked()

    monkeypatch.setattr(stages, "sensitivity", fake_sensitivity)
    builder = _Scores(CNN, {}, cache=tmp_path)
    builder.score = builder.calib = None
    config = {"pass": "quantize-static", "scheme": "default", "target": "avx2"}
    assert stages._ranking(builder, config, InProcess()) == ["n2", "n1"]
    assert stages._ranking(builder, config, InProcess()) == ["n2", "n1"]
    assert calls == ["static"]  # the second read the cache
    (path,) = list(tmp_path.iterdir())
    other = {**config, "calib_method": "entropy"}
    stages._ranking(builder, other, InProcess())
    assert calls == ["static", "static"]  # other settings: ranked again
    path.write_text("{not json")  # a corrupt entry is measured again, not trusted
    stages._ranking(builder, config, InProcess())
    assert len(calls) == 3


def test_the_fallback_keeps_the_most_fidelity_per_fp32_cost_first() -> None:
    """A node that costs much fidelity but holds half the multiply-adds is kept in fp32
    after cheap nodes that cost less fidelity each: per share of MACs (+ KEEP_COST) it
    gives the least back. Unknown MACs count as the mean; no MACs known: loss order."""
    losses = {"big": 0.010, "cheap": 0.006, "small": 0.001, "unknown": 0.002}
    macs = {"big": 500, "cheap": 10, "small": 10, "unknown": None, "other": 480}
    assert stages.cost_order(losses, macs) == ["cheap", "small", "big", "unknown"]
    # ratios: cheap 0.006 / 0.015 = 0.4, small 0.067, big 0.010 / 0.505 = 0.0198,
    # unknown (mean share 1000 / 4 / 1000 = 0.25) 0.002 / 0.255 = 0.0078
    assert stages.cost_order(losses, {}) == ["big", "cheap", "unknown", "small"]


# ------------------------------------------------------------------- end to end, tiny MLP


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("mlp")
    model = folder / "mlp.onnx"
    onnx.save(two_matmul_mlp(rng), model)
    x = rng.standard_normal((96, 32)).astype(np.float32)
    np.savez(folder / "data.npz", x=x[:64])
    np.savez(folder / "calib.npz", x=x[64:])
    np.savez(folder / "overlapping.npz", x=np.concatenate([x[64:80], x[:3]]))
    return folder


def _auto(folder: Path, out: Path, *extra: str) -> int:
    args = ["--metric", "cosine", "--min-score", "0.99", "--bench-runs", "5", *extra]
    return main(["-q", "auto", str(folder / "mlp.onnx"), "--data", str(folder / "data.npz"),
                 *args, "-o", str(out)])  # fmt: skip


def test_only_finalists_are_benched(mlp_files, tmp_path) -> None:
    """A budget some candidates meet and some miss: only those meeting it are benched."""
    out = tmp_path / "out"
    calib = str(mlp_files / "calib.npz")
    assert _auto(mlp_files, out, "--calib", calib, "--min-score", "0.9999") == 0
    rows = json.loads((out / "manifest.json").read_text())["candidates"]
    scored = [c for c in rows if c["score"] is not None]
    assert any(c["meets"] for c in scored) and not all(c["meets"] for c in scored)
    for c in scored:
        assert (c["speedup"] is not None) == c["meets"], c["name"]
        assert c["size"] > 0  # every built candidate's size, benched or not
        static = any(p["pass"] == "quantize-static" for p in c["passes"])
        if static and "fp32x" not in c["name"]:  # the semantics figure: finalists only
            assert (c["semantics"] is not None) == c["meets"], c["name"]
    report = (out / "report.md").read_text()
    assert "not benched" in report and "only finalists are" in report
    assert "| not measured |" in report
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    names = [s["stage"] for s in stages]
    assert names[0] == "full int8" and "bench of the finalists" in names
    assert all(s["seconds"] >= 0 for s in stages)
    assert stages[0]["candidates"] == 6 + 3  # every full-int8 configuration of an MLP
    bench = next(s for s in stages if s["stage"] == "bench of the finalists")
    assert bench["candidates"] == sum(c["meets"] for c in scored)
    assert "Time: full int8 (9 candidates)" in report


def test_calibration_samples_are_reported_per_candidate(mlp_files, tmp_path) -> None:
    out = tmp_path / "out"
    assert _auto(mlp_files, out, "--calib", str(mlp_files / "calib.npz")) == 0
    rows = {c["name"]: c for c in json.loads((out / "manifest.json").read_text())["candidates"]}
    assert rows["dynamic_pc"]["calib_samples"] is None  # dynamic reads no calibration data
    assert rows["static_u8_pc_minmax"]["calib_samples"] == 32
    assert "32 samples" in (out / "report.md").read_text()


def test_gptq_below_its_minimum_is_warned(mlp_files, tmp_path, monkeypatch) -> None:
    from converter.search import auto as auto_module

    def gptq_only(model, target):
        cfg = {"pass": "quantize-static", "scheme": "transformer", "target": target}
        return [("static_gptq", {**cfg, "weight_rounding": "gptq"})]

    monkeypatch.setattr(auto_module, "_configs", gptq_only)
    out = tmp_path / "out"
    _auto(mlp_files, out, "--calib", str(mlp_files / "calib.npz"))
    notes = json.loads((out / "manifest.json").read_text())["notes"]
    (note,) = [n for n in notes if "GPTQ" in n]
    assert "32 samples, fewer than the 128" in note and "static_gptq" in note


def test_overlapping_calibration_is_refused_unless_allowed(mlp_files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = _auto(mlp_files, out, "--calib", str(mlp_files / "overlapping.npz"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: 3 of the 19 samples in --calib")
    assert "--allow-overlap" in err[0]
    assert not out.exists()  # checked before anything was written
    allowed = _auto(
        mlp_files, out, "--calib", str(mlp_files / "overlapping.npz"), "--allow-overlap"
    )
    assert allowed == 0
    assert "--allow-overlap" in json.loads((out / "manifest.json").read_text())["data_split"]


def test_no_dynamic_fallback_on_a_conv_dominated_model(monkeypatch) -> None:
    """Dynamic int8 convolutions run slower than fp32: keeping nodes of a dynamic CNN in
    fp32 cannot give a model worth shipping, so only the static fallback runs."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    weights = [
        onnx.numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "g"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "g"], ["y"]),
    ]
    cnn = helper.make_model(helper.make_graph(nodes, "cnn", [x], [y], weights))
    builder = _Scores(cnn, {"dynamic_pc": 0.9}, step=0.5)
    found, notes, ranked = _search(builder, monkeypatch)
    assert ranked == ["quantize-static"]
    assert any("dynamic fp32 fallback was skipped: the model is conv-dominated" in n for n in notes)


def test_the_budget_line_shows_a_limit_with_all_its_digits() -> None:
    from converter.search.budget import Budget

    assert Budget(0.99999, None, 0.98, metric="cosine").describe(1.0) == (
        "cosine ≥ 0.99999, worst cosine ≥ 0.98"
    )  # was "≥ 1.0000"
    assert Budget(0.995, None, None, metric="cosine").describe(1.0) == "cosine ≥ 0.9950"
