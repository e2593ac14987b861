"""`onnxship auto` when something fails (issue 21 items 1, 7, 8, 11, 14): a candidate or a
stage that fails is a failed row of the report and the search goes on, writing what it found;
the GPTQ candidate is repaired with its calibration data; every option is checked before
anything is written, and a bad input leaves OUTDIR as it was."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli, two_matmul_mlp
from onnx import TensorProto, helper, numpy_helper
from test_sensitivity import _data, _outlier_mlp

from converter.core.errors import BadInputError
from converter.core.machine import host_target
from converter.search import auto as auto_module
from converter.search import stages
from converter.search.builder import Builder

ROOT = Path(__file__).resolve().parent.parent


def _only(monkeypatch, *names: str) -> None:
    """Narrow auto's full-int8 configurations to ``names`` (in their order)."""
    every = auto_module._configs
    monkeypatch.setattr(
        auto_module, "_configs", lambda m, t: [c for c in every(m, t) if c[0] in names]
    )


def _manifest(out: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads((out / "manifest.json").read_text())["candidates"]}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(11)
    onnx.save(two_matmul_mlp(rng), str(d / "mlp.onnx"))
    for name in ("score", "calib"):
        np.savez(d / f"{name}.npz", x=rng.standard_normal((40, 32)).astype(np.float32))
    return d / "mlp.onnx", d / "score.npz", d / "calib.npz"


def _auto_cli(capsys, mlp, out: Path, *extra) -> tuple[int, str]:
    model, score, calib = mlp
    args = ["auto", model, "--data", score, "--calib", calib, "--metric", "cosine"]
    code, _, err = cli(capsys, "-q", *args, "--bench-runs", "3", *extra, "-o", out)
    return code, err


# ---------------------------------------------------------------- GPTQ repaired (item 1)


def _layernorm_mlp() -> onnx.ModelProto:
    """x[batch,4,16] → LayerNormalization → MatMul → Relu → MatMul: a model auto tries
    SmoothQuant + GPTQ on."""
    rng = np.random.default_rng(12)
    inits = [
        numpy_helper.from_array(np.ones(16, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
        numpy_helper.from_array((rng.standard_normal((16, 32)) / 4).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((32, 16)) / 6).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "ln_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_the_gptq_candidate_is_repaired_with_its_calibration_data(tmp_path, monkeypatch):
    """The fp32 fallback of a GPTQ candidate ranks its nodes with GPTQ too, which reads the
    calibration samples again besides the reused ranges; it failed with "GPTQ weight
    rounding needs calibration data, also with reused ranges"."""
    onnx.save(_layernorm_mlp(), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(13).standard_normal((64, 4, 16)).astype(np.float32)
    x[..., 3] *= 20  # an outlier channel: int8 misses a budget of 1.0
    np.savez(tmp_path / "d.npz", x=x)
    _only(monkeypatch, "smooth0.8_static_transformer_gptq")
    result = auto_module.auto(
        tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "out", metric="cosine",
        min_score=1.0, max_excluded=2, bench_runs=3, target="avx2",
    )  # fmt: skip
    found = {c.name: c for c in result.candidates}
    assert list(found) == [
        "smooth0.8_static_transformer_gptq",
        "smooth0.8_static_transformer_gptq_fp32x1",
        "smooth0.8_static_transformer_gptq_fp32x2",
    ]
    assert not any(c.error for c in found.values())
    one = found["smooth0.8_static_transformer_gptq_fp32x1"].passes[-1]
    assert one["weight_rounding"] == "gptq" and len(one["nodes_to_exclude"]) == 1
    scores = [c.score for c in found.values()]
    assert scores[2] > scores[0] and scores[2] == pytest.approx(1.0, abs=1e-9)  # all fp32


# ---------------------------------------------------------------- failures are rows (item 1)


def test_a_failing_stage_is_reported_and_what_was_found_is_written(tmp_path, capsys, monkeypatch):
    """No full-int8 configuration of the outlier MLP meets the budget; the fp32 fallback of
    the dynamic mode does, and the static one's ranking fails: exit 0, the dynamic repair
    written, the static stage a failed row with its reason."""
    onnx.save(_outlier_mlp(), str(tmp_path / "m.onnx"))
    data, calib = _data(tmp_path / "d.npz", 2, 160), _data(tmp_path / "c.npz", 1)
    _only(monkeypatch, "dynamic_pc", "static_transformer")
    ranking = stages._ranking

    def static_fails(builder, config, executor):
        if config["pass"] == "quantize-static":
            raise RuntimeError("boom")
        return ranking(builder, config, executor)

    monkeypatch.setattr(stages, "_ranking", static_fails)
    code, err = _auto_cli(capsys, (tmp_path / "m.onnx", data, calib), tmp_path / "o",
                          "--min-score", "0.99", "--max-excluded", "2")  # fmt: skip
    assert code == 0, err
    found = _manifest(tmp_path / "o")
    assert list(found) == [
        "dynamic_pc", "static_transformer", "dynamic_pc_fp32x1", "static_transformer_fp32x1..2",
    ]  # fmt: skip
    failed = found["static_transformer_fp32x1..2"]
    assert failed["error"] == (
        "ranking the nodes by sensitivity failed: internal error: RuntimeError: boom — rerun "
        "with --debug and report it"
    )
    assert failed["score"] is None and failed["path"] is None
    chosen = json.loads((tmp_path / "o" / "manifest.json").read_text())["chosen"]
    assert chosen == "dynamic_pc_fp32x1" and found[chosen]["score"] >= 0.99
    assert (tmp_path / "o" / "model.onnx").read_bytes() == (
        tmp_path / "o" / found[chosen]["path"]
    ).read_bytes()
    report = (tmp_path / "o" / "report.md").read_text()
    assert f"| failed: {failed['error']} |" in report
    assert "warning: static_transformer_fp32x1..2: ranking the nodes" in err


def test_a_failing_candidate_is_a_failed_row_not_the_end(mlp, tmp_path, capsys, monkeypatch):
    """A candidate whose build raises what onnxship did not expect: reported as an internal
    error on its row, the other candidates decide (exit 0)."""
    _only(monkeypatch, "dynamic_pc", "dynamic_pt", "static_u8_pc_minmax")
    build = Builder.build

    def per_tensor_fails(self, passes):
        if passes[-1].get("per_channel") is False:
            raise KeyError("w9")
        return build(self, passes)

    monkeypatch.setattr(Builder, "build", per_tensor_fails)
    code, err = _auto_cli(capsys, mlp, tmp_path / "o", "--min-score", "0.5")
    assert code == 0, err
    found = _manifest(tmp_path / "o")
    assert found["dynamic_pt"]["error"] == (
        "internal error: KeyError: 'w9' — rerun with --debug and report it"
    )
    assert found["dynamic_pt"]["path"] is None and found["dynamic_pt"]["score"] is None
    assert all(found[n]["score"] > 0.5 for n in ("dynamic_pc", "static_u8_pc_minmax"))
    assert not list((tmp_path / "o" / "cache").glob(f"{found['dynamic_pt']['key']}*"))
    assert "warning: candidate dynamic_pt failed: internal error: KeyError" in err
    assert (tmp_path / "o" / "model.onnx").exists()


@pytest.mark.parametrize("bug", [True, False])
def test_every_candidate_failing_is_exit_3_for_a_bug_else_1(
    bug, mlp, tmp_path, capsys, monkeypatch
):
    """Nothing built because of a bug of ours is no verdict on the model (exit 3, internal
    error); because onnxruntime could not quantize any configuration, it is (exit 1)."""
    from converter.core.errors import PassError

    _only(monkeypatch, "dynamic_pc", "dynamic_pt")

    def fails(self, passes):
        raise KeyError("w9") if bug else PassError("onnxruntime could not quantize", "exclude")

    monkeypatch.setattr(Builder, "build", fails)
    code, err = _auto_cli(capsys, mlp, tmp_path / "o", "--min-score", "0.5")
    last = err.strip().splitlines()[-1]
    if bug:
        assert code == 3 and last == (
            "error: internal error: no candidate could be built (dynamic_pc: KeyError: 'w9'); "
            "no model.onnx written — rerun with --debug and report it"
        )
    else:
        assert code == 1 and last.startswith("error: no candidate could be built; ")
    assert not (tmp_path / "o" / "model.onnx").exists()
    assert (tmp_path / "o" / "report.md").exists()


def test_a_candidate_the_bench_cannot_run_is_marked_failed(mlp, tmp_path, capsys, monkeypatch):
    _only(monkeypatch, "dynamic_pc", "static_u8_pc_minmax")
    """The static candidate fails in the bench (alone too): marked failed with the bench's
    reason, the others benched without it, the choice made among them."""
    bench, static_key = auto_module.bench, {}

    def fails_on_static(models, **options):
        if static_key["path"] in [Path(m) for m in models]:
            raise BadInputError("onnxruntime failed during the timed runs: Fail", "warm up")
        return bench(models, **options)

    evaluate = Builder.evaluate

    def remember(self, candidate):
        done = evaluate(self, candidate)
        if candidate.name == "static_u8_pc_minmax":
            static_key["path"] = done.path
        return done

    monkeypatch.setattr(Builder, "evaluate", remember)
    monkeypatch.setattr(auto_module, "bench", fails_on_static)
    code, err = _auto_cli(capsys, mlp, tmp_path / "o", "--min-score", "0.5")
    assert code == 0, err
    found = _manifest(tmp_path / "o")
    static = found["static_u8_pc_minmax"]
    assert static["error"] == (
        "the bench failed: onnxruntime failed during the timed runs: Fail — warm up"
    )
    assert not static["meets"] and static["speedup"] is None
    assert found["dynamic_pc"]["speedup"] > 0 and not found["dynamic_pc"]["error"]
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["chosen"] == "dynamic_pc"


def test_max_excluded_0_ranks_no_node(mlp, tmp_path, capsys, monkeypatch):
    """--max-excluded 0 keeps no node in fp32: the sensitivity ranking (minutes on a real
    model, and where issue 21 item 11's run died) is not computed at all."""
    _only(monkeypatch, "dynamic_pc")

    def never(*args):
        raise AssertionError("ranked the nodes for --max-excluded 0")

    monkeypatch.setattr(stages, "_ranking", never)
    code, err = _auto_cli(capsys, mlp, tmp_path / "o", "--min-score", "1.0", "--max-excluded", "0")
    assert code == 1 and "no candidate meets" in err, err
    assert list(_manifest(tmp_path / "o")) == ["dynamic_pc"]


# ---------------------------------------------------------------- bad input (items 7, 8)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--bench-runs", "0"], "error: --bench-runs 0 is not a whole number ≥ 1 — "),
        (["--bench-runs", "-2"], "error: --bench-runs -2 is not a whole number ≥ 1 — "),
        (["--max-excluded", "-1"], "error: --max-excluded -1 is not a whole number ≥ 0 — "),
        (["--sparsity-grid", "nan"], "error: sparsity nan in --sparsity-grid is outside (0, 1)"),
        (["--sparsity-grid", "inf"], "error: sparsity inf in --sparsity-grid is outside (0, 1)"),
        (["--sparsity-grid", "0.5,0.5"], "error: --sparsity-grid [0.5, 0.5] repeats a value"),
        (["--time-budget", "nan"], "error: --time-budget nan is not a number of seconds > 0"),
        (["--time-budget", "-5"], "error: --time-budget -5.0 is not a number of seconds > 0"),
        (["--max-drop", "inf"], "error: --max-drop inf is outside [0, 1]"),
        (["--min-worst", "nan"], "error: --min-worst nan is outside [-1, 1]"),
        (["--calib", "WRONG"], "error: data "),
        (["--target", "sparc"], "error: unknown"),
    ],
)
def test_bad_options_exit_2_before_any_work(extra, expected, mlp, tmp_path, capsys, monkeypatch):
    """Each option is checked before the first file is written or anything is run: no
    OUTDIR, and neither the data split nor the search started."""

    def never(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(auto_module, "_calib_and_score", never)
    monkeypatch.setattr(auto_module, "search", never)
    if "WRONG" in extra:  # calibration data that does not fit the model
        np.savez(tmp_path / "wrong.npz", x=np.zeros((8, 5), np.float32))
        extra = ["--calib", str(tmp_path / "wrong.npz")]
    model, score, _ = mlp
    args = ["auto", model, "--data", score, "--metric", "cosine", "--min-score", "0.5"]
    code, out, err = cli(capsys, *args, *extra, "-o", tmp_path / "new" / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expected), err
    assert " — " in lines[0] and out == ""
    assert not (tmp_path / "new").exists()


def test_an_output_that_is_a_file_is_exit_2(mlp, tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    code, err = _auto_cli(capsys, mlp, tmp_path / "taken", "--min-score", "0.5")
    assert code == 2 and err.strip() == (
        f"error: -o {tmp_path / 'taken'} is a file, not a folder — give a folder: auto writes "
        "model.onnx, its report and a cache there"
    )
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_bad_input_found_late_leaves_outdir_as_it_was(mlp, tmp_path, capsys):
    """Too few samples to split is found after fp32.onnx is written: what this run created
    is removed — a new OUTDIR (and the folders made above it) whole, in an existing one only
    the new files; the files that were there stay, byte for byte."""
    model = mlp[0]
    np.savez(tmp_path / "few.npz", x=np.zeros((2, 32), np.float32))
    args = ["-q", "auto", model, "--data", tmp_path / "few.npz", "--metric", "cosine"]
    code, _, err = cli(capsys, *args, "--min-score", "0.5", "-o", tmp_path / "a" / "b" / "out")
    assert code == 2 and "too few samples" in err, err
    assert not (tmp_path / "a").exists()

    old = tmp_path / "old"
    (old / "cache").mkdir(parents=True)
    (old / "cache" / "entry.json").write_text("{}")
    (old / "notes.txt").write_text("keep")
    code, _, err = cli(capsys, *args, "--min-score", "0.5", "-o", old)
    assert code == 2 and "too few samples" in err, err
    kept = sorted(p.relative_to(old).as_posix() for p in old.rglob("*"))
    assert kept == ["cache", "cache/entry.json", "notes.txt"]
    assert (old / "notes.txt").read_text() == "keep"


# ---------------------------------------------------------------- help and README (item 14)


def test_help_and_readme_search_on_validation_and_keep_test_for_validate(capsys):
    code, out, _ = cli(capsys, "auto", "--help")
    assert code == 0
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### auto (fastest") :]
    section = section[: section.index("\n### ")]
    for text in (out, section):
        autos = re.findall(r"onnxship auto .*?--data (\S+)", text)
        assert autos and not any("test" in d for d in autos), autos
        assert re.search(r"onnxship validate \S+ --data test\.npz", text)


def test_another_target_is_warned_once_not_per_candidate(mlp, tmp_path, capsys, monkeypatch):
    """Candidates made for a CPU kind other than this host: one warning for the search,
    not one per candidate validated and benched."""
    other = "arm64" if host_target().name != "arm64" else "avx2"
    _only(monkeypatch, "dynamic_pc", "dynamic_pt", "static_u8_pc_mse")
    model, score, calib = mlp
    args = ["auto", model, "--data", score, "--calib", calib, "--metric", "cosine"]
    args += ["--min-score", "0.99", "--bench-runs", "3", "--max-excluded", "0"]
    code, _, err = cli(capsys, *args, "--target", other, "-o", tmp_path / "o")
    assert code in (0, 1), err
    assert len(_manifest(tmp_path / "o")) == 3
    assert err.count(f"made for target {other}") == 1, err
    assert "was quantized for target" not in err, err  # validate/bench stayed quiet
