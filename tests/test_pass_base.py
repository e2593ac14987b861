"""The pass interface's input-mutation check: structure always, every byte under --debug; a
pass that breaks it is an internal error (exit 3), not bad input."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.core.errors import InternalError
from passes.base import Pass, PassResult


def _model() -> onnx.ModelProto:
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


class _AddsNode(Pass):
    name = "adds-node"

    def call(self, model):
        model.graph.node.append(helper.make_node("Identity", ["y"], ["z"]))  # edits the input
        return PassResult(model, True)


class _EditsWeight(Pass):
    name = "edits-weight"

    def call(self, model):
        model.graph.initializer[0].CopyFrom(
            numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
        )
        return PassResult(model, True)


class _Copies(Pass):
    name = "copies"

    def call(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[0].name = "renamed"
        return PassResult(out, True)


def test_a_structural_edit_of_the_input_is_caught():
    with pytest.raises(InternalError, match="adds-node modified its input model"):
        _AddsNode()(_model())


def test_a_value_edit_is_caught_under_debug_only(caplog):
    assert _EditsWeight()(_model()).modified  # cheap check: shapes and names unchanged
    with caplog.at_level(logging.DEBUG, logger="passes"):
        with pytest.raises(InternalError, match="edits-weight modified its input model"):
            _EditsWeight()(_model())


def test_a_pass_that_returns_a_new_model_passes_both_checks(caplog):
    model = _model()
    before = model.SerializeToString(deterministic=True)
    with caplog.at_level(logging.DEBUG, logger="passes"):
        result = _Copies()(model)
    assert result.model.graph.node[0].name == "renamed"
    assert model.SerializeToString(deterministic=True) == before


def test_an_input_edit_is_exit_3_naming_itself_an_internal_error():
    with pytest.raises(InternalError) as caught:
        _AddsNode()(_model())
    assert caught.value.exit_code == 3
    assert caught.value.message == (
        "internal error: pass adds-node modified its input model — rerun with --debug and report it"
    )
