"""The CLI's exit codes: a crash (an exception onnxship did not expect) is exit 3 with one
line, never 1 (which CI reads as "the model got worse"); and the one-line error helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.cli import INTERNAL_ERROR, main
from converter.core.errors import first_line
from passes.base import PassResult
from passes.prune import MagnitudePrune


def _model(path: Path) -> Path:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("error", [RuntimeError(""), KeyError("w"), ValueError("bad\nmore")])
def test_an_internal_error_is_exit_3_with_one_line(error, tmp_path, capsys, monkeypatch):
    def crash(self, model):
        raise error

    monkeypatch.setattr(MagnitudePrune, "call", crash)
    out = tmp_path / "o.onnx"
    code = main(["prune", str(_model(tmp_path / "m.onnx")), "-o", str(out), "--sparsity", "0.5"])
    err = capsys.readouterr().err
    assert code == INTERNAL_ERROR == 3 and not out.exists()
    assert err.strip().splitlines() == [
        f"error: internal error: {first_line(error)} — rerun with --debug and report it"
    ]
    assert type(error).__name__ in err and "Traceback" not in err


def test_debug_shows_the_internal_error_traceback(tmp_path, capsys, monkeypatch):
    def crash(self, model):
        raise RuntimeError("boom")

    monkeypatch.setattr(MagnitudePrune, "call", crash)
    code = main(
        [
            "prune",
            str(_model(tmp_path / "m.onnx")),
            "-o",
            str(tmp_path / "o.onnx"),
            "--sparsity",
            "0.5",
            "--debug",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" in err and "RuntimeError: boom" in err


def test_first_line_never_fails():
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(ValueError("\n\n  \nsecond line\nthird")) == "ValueError: second line"
    assert first_line(KeyError("w")) == "KeyError: 'w'"
    assert first_line(OSError("x" * 500), limit=10) == "OSError: " + "x" * 10


# ---------------------------------------------------------------- our own failures are exit 3


def test_a_pass_producing_an_invalid_model_is_an_internal_error(tmp_path, capsys, monkeypatch):
    """The checker refusing a pass's output is a bug of ours: exit 3 naming itself, not the
    exit 2 of a bad input (issue 21 item 11)."""

    def broken(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[0].input[1] = "nowhere"  # reads a tensor nothing makes
        return PassResult(out, True)

    monkeypatch.setattr(MagnitudePrune, "call", broken)
    out = tmp_path / "o.onnx"
    code = main(["prune", str(_model(tmp_path / "m.onnx")), "-o", str(out), "--sparsity", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and not out.exists()
    assert len(err) == 1, err
    assert err[0].startswith("error: internal error: pass prune failed (already ran: none): ")
    assert "produced an invalid model" in err[0] and "nowhere" in err[0]
    assert err[0].endswith(" — rerun with --debug and report it")


def _three_convs(path: Path) -> Path:
    rng = np.random.default_rng(5)
    nodes, inits, x = [], [], "x"
    for i in range(3):
        w = rng.standard_normal((4, 4 if i else 3, 3, 3)).astype(np.float32) / 4
        b = rng.standard_normal(4).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"))
        x = f"c{i}"
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 9, 9])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", 4, 3, 3])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnxruntime_refusing_a_model_we_built_is_an_internal_error(tmp_path, capsys, monkeypatch):
    """The failure of issue 21 items 1 and 11 (two copies named alike in the per-tensor error
    model, which onnxruntime refuses) made again: exit 3, "internal error", one line; the same
    refusal of the user's own model stays exit 2."""
    from converter.check.node_error_graphs import Graphs

    model = _three_convs(tmp_path / "m.onnx")
    x = np.random.default_rng(6).standard_normal((8, 3, 9, 9)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    monkeypatch.setattr(Graphs, "_copy_name", lambda self, node: "same")
    args = ["sensitivity", str(model), "--data", str(tmp_path / "d.npz"), "--mode", "dynamic"]
    code = main([*args, "-q", "--json", str(tmp_path / "r.json")])
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.startswith("error")]
    assert code == 3 and not (tmp_path / "r.json").exists()
    assert len(err) == 1 and err[0].startswith(
        "error: internal error: onnxruntime cannot load a model onnxship built: "
    ), err
    assert "two nodes with same node name" in err[0]
    assert err[0].endswith(" — rerun with --debug and report it")

    bad = onnx.load(str(model))
    bad.graph.node[1].name = bad.graph.node[0].name  # the user's model itself is refused
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    data = ["--data", str(tmp_path / "d.npz"), "--reference", str(model), "--metric", "cosine"]
    code = main(["validate", str(tmp_path / "bad.onnx"), *data, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "onnxruntime cannot load" in err[0], err
    assert "internal error" not in err[0]
