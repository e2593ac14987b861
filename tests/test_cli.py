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
