"""Int8 embedding tables (passes/gather_int8.py): per-row int8 rows gathered, then scaled;
alone and inside the transformer scheme of static quantization. Tiny seeded models built here,
every number measured through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converter.core.runtime import make_session
from passes.gather_int8 import MIN_TABLE_VALUES, int8_tables, quantize_rows, quantize_tables
from passes.quantize import StaticQuantize

VOCAB, DIM = 512, 128  # 65 536 values: the smallest table that is converted


def embedding_model(tied: bool = False, vocab: int = VOCAB) -> onnx.ModelProto:
    """ids [batch, 8] → Gather(table) → MatMul(w) → [batch, 8, 16]; ``tied``: the table is
    also read by a second MatMul (as an LM head would), so it must stay float."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, DIM)).astype(np.float32)
    table[3] = 0.0  # an all-zero row (padding token)
    table[5, 7] = 40.0  # an outlier in one row only
    w = (rng.standard_normal((DIM, 16)) / np.sqrt(DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], "embed"),
        helper.make_node("MatMul", ["emb", "w"], ["y"], "proj"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, 16])]
    if tied:
        nodes.append(helper.make_node("MatMul", ["y_t", "table"], ["logits"], "head"))
        nodes.insert(2, helper.make_node("MatMul", ["y", "wt"], ["y_t"], "back"))
        wt = numpy_helper.from_array(w.T.copy(), "wt")
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 8])],
        outputs,
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")]
        + ([wt] if tied else []),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ids(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, (n, 8)).astype(np.int64)


def run(model: onnx.ModelProto, x: np.ndarray, output: str = "y") -> np.ndarray:
    session = make_session(model.SerializeToString())
    return session.run([output], {"ids": x})[0]


def test_rows_round_to_within_half_a_step():
    table = np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32)
    table[0] = 0.0
    q, scale = quantize_rows(table)
    assert q.dtype == np.int8 and scale.shape == (64, 1) and scale.dtype == np.float32
    assert np.abs(q).max() == 127 and not q[0].any() and scale[0, 0] == 1.0
    error = np.abs(q * scale - table)
    assert np.all(error <= scale / 2 + 1e-7)


def test_table_becomes_int8_outputs_close_bytes_deterministic():
    model = embedding_model()
    x = ids()
    before = run(model, x)
    stats = quantize_tables(model)
    assert stats["tables"] == ["table"] and stats["values"] == VOCAB * DIM
    # int8 rows + one fp32 scale per row: 65 536 + 2 048 bytes (+ headers) vs 262 144
    assert stats["bytes_after"] < 0.27 * stats["bytes_before"]
    assert "table" not in {t.name for t in model.graph.initializer}
    assert [n.op_type for n in model.graph.node] == ["Gather", "Cast", "Gather", "Mul", "MatMul"]
    after = run(model, x)
    # The graph computes exactly the per-row dequantized table, gathered and projected...
    table = numpy_helper.to_array(embedding_model().graph.initializer[0])
    w = numpy_helper.to_array(embedding_model().graph.initializer[1])
    q, scale = quantize_rows(table)
    np.testing.assert_allclose(after, (q * scale)[x] @ w, atol=1e-5)
    assert np.abs(after - before).max() > 0  # (it did change the weights)
    # ...and stays close to fp32: per-token cosine of the outputs.
    cos = np.sum(before * after, -1) / np.linalg.norm(before, axis=-1)
    cos /= np.linalg.norm(after, axis=-1)
    assert cos.min() > 0.999
    again = embedding_model()
    quantize_tables(again)
    assert model.SerializeToString(deterministic=True) == again.SerializeToString(
        deterministic=True
    )
    onnx.checker.check_model(model)


def test_tied_small_and_excluded_tables_stay_float():
    tied = embedding_model(tied=True)
    assert int8_tables(tied) == {}
    assert quantize_tables(tied)["tables"] == []
    small = embedding_model(vocab=MIN_TABLE_VALUES // DIM - 1)
    assert int8_tables(small) == {}
    model = embedding_model()
    assert int8_tables(model) == {"embed": "table"}
    assert quantize_tables(model, skip={"embed"})["tables"] == []
    assert "table" in {t.name for t in model.graph.initializer}


def test_transformer_scheme_quantizes_the_embedding_table(tmp_path):
    model = embedding_model()
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=ids(32))
    kw = {"calibration": calib, "scheme": "transformer", "progress": False, "target": "avx2"}
    result = StaticQuantize(**kw)(model)
    assert result.stats["embedding_tables"]["tables"] == ["table"]
    assert result.stats["by_op"]["Gather"] == {"quantized": 1, "fp32": 0}
    assert result.model.ByteSize() < 0.3 * model.ByteSize()
    x = ids(8)
    base, out = run(model, x), run(result.model, x)
    cos = np.sum(base * out, -1) / np.linalg.norm(base, axis=-1) / np.linalg.norm(out, axis=-1)
    assert cos.min() > 0.99
    # --exclude-op Gather keeps the table float (and says why)
    kept = StaticQuantize(**kw, exclude_ops=("Gather",))(model)
    assert kept.stats["embedding_tables"]["tables"] == []
    assert kept.stats["by_op"]["Gather"] == {"quantized": 0, "fp32": 1}
    assert "table" in {t.name for t in kept.model.graph.initializer}
