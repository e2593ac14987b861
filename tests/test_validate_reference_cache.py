"""validate reuses the reference model's outputs within a process (auto scores many candidates
against one fp32 model on one data set): the same numbers as computing them, never stale
when the data or the reference changes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.check import validate_score
from converter.check.validate import validate


def _linear(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_reference_outputs_are_reused_and_never_stale(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    onnx.save(_linear(w), tmp_path / "ref.onnx")
    onnx.save(
        _linear(w + 0.05 * rng.standard_normal(w.shape).astype(np.float32)), tmp_path / "a.onnx"
    )
    onnx.save(
        _linear(w + 0.10 * rng.standard_normal(w.shape).astype(np.float32)), tmp_path / "b.onnx"
    )
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((50, 8)).astype(np.float32))
    cache = validate_score._ReferenceOutputs(budget=2**20)
    monkeypatch.setattr(validate_score, "_REFERENCE_OUTPUTS", cache)
    runs = []
    real = validate_score.run_session
    monkeypatch.setattr(
        validate_score, "run_session", lambda s, f, what="": runs.append(what) or real(s, f, what)
    )

    def cosine(model: str) -> float:
        report = validate(tmp_path / model, data, reference=tmp_path / "ref.onnx",
                          metrics=["cosine"], progress=False, batch_size=16)  # fmt: skip
        return report.outputs["y"]["cosine"].value

    first = cosine("a.onnx")
    assert sum(w.startswith("reference") for w in runs) == 4  # 50 samples, batches of 16
    second = cosine("b.onnx")
    assert sum(w.startswith("reference") for w in runs) == 4  # reused for the next candidate
    cache.entries.clear()
    assert cosine("a.onnx") == first and cosine("b.onnx") == second  # the same numbers
    # new data in the same file: computed again, and the score follows it
    np.savez(data, x=10 + rng.standard_normal((50, 8)).astype(np.float32))
    before = sum(w.startswith("reference") for w in runs)
    changed = cosine("a.onnx")
    assert sum(w.startswith("reference") for w in runs) == before + 4
    assert changed != first
    # a different reference (same data): computed again
    onnx.save(_linear(-w), tmp_path / "ref.onnx")
    assert cosine("a.onnx") < 0


def test_the_cache_keeps_within_its_budget() -> None:
    cache = validate_score._ReferenceOutputs(budget=1000)
    big = [[np.zeros(200, np.float32)]]  # 800 bytes
    cache.put(("a",), big)
    cache.put(("b",), big)
    assert list(cache.entries) == [("b",)]  # a dropped: both would not fit
    cache.put(("c",), [[np.zeros(300, np.float32)]])  # above the budget alone: not kept
    assert list(cache.entries) == [("b",)] and cache.get(("c",)) is None
