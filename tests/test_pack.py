"""pack / unpack: bit-identical onnxruntime outputs (fp32, fp16, int8 QDQ with its fusions),
byte-identical unpacked weights, determinism, sizes, and bad inputs through the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.core import packed as packed_format
from converter.core.errors import BadInputError
from converter.core.runtime import make_session
from passes import pack as pack_module
from passes.base import PassRunner
from passes.fp16 import Float16
from passes.pack import Pack, Unpack, decode, encode, is_packed, packed_size, packed_weights
from passes.prune import MagnitudePrune
from passes.quantize import StaticQuantize
from passes.registry import make_recipe_pass

LOGGERS = ("converter", "passes")


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() binds the package loggers to the stderr capsys gives that test; undo it."""
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in LOGGERS}
    yield
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-pool-MatMul (no bias, so int8 it becomes QLinearMatMul): weights
    of a few thousand values, c2.w with rows of 405 values (chunks can end mid-byte)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)

    node = helper.make_node
    graph = helper.make_graph(
        [
            node("Conv", ["x", "c1.w", "c1.b"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], "relu1"),
            node(
                "Conv", ["r1", "c2.w", "c2.b"], ["c2"], "conv2", pads=[1, 1, 1, 1], strides=[2, 2]
            ),
            node("Relu", ["c2"], ["r2"], "relu2"),
            node("GlobalAveragePool", ["r2"], ["g"], "pool"),
            node("Flatten", ["g"], ["f"], "flatten"),
            node("MatMul", ["f", "fc.w"], ["y"], "fc"),
        ],
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [
            numpy_helper.from_array(w(45, 3, 3, 3), "c1.w"),
            numpy_helper.from_array(np.full(45, 0.01, np.float32), "c1.b"),
            numpy_helper.from_array(w(64, 45, 3, 3), "c2.w"),
            numpy_helper.from_array(np.zeros(64, np.float32), "c2.b"),
            numpy_helper.from_array(w(64, 64), "fc.w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def inputs(seed: int = 1, n: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, Path) else model.SerializeToString()
    return make_session(source).run(None, {"x": x})[0]


def weights(model: onnx.ModelProto) -> dict[str, bytes]:
    """Every initializer's dtype, shape and value bytes."""
    out = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        out[t.name] = (str(a.dtype), a.shape, a.tobytes())
    return out


@pytest.fixture(scope="module")
def pruned() -> onnx.ModelProto:
    return MagnitudePrune(0.6, scope="layer", min_params=0).call(cnn()).model


@pytest.fixture(scope="module")
def qdq(pruned, tmp_path_factory) -> onnx.ModelProto:
    calib = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(calib, x=inputs(seed=2, n=32))
    return StaticQuantize(calibration=calib, progress=False)(pruned).model


def check_round_trip(model: onnx.ModelProto, chunk: int = pack_module.CHUNK) -> onnx.ModelProto:
    """Pack ``model``: outputs bit-identical, smaller, unpack gives every weight back."""
    result = Pack(chunk=chunk)(model)
    assert result.modified and result.stats["tensors_packed"] >= 1
    assert result.model.ByteSize() < model.ByteSize() == result.stats["bytes_before"]
    x = inputs()
    np.testing.assert_array_equal(run(result.model, x), run(model, x))
    undone = Unpack()(result.model)
    restored = undone.model
    assert weights(restored) == weights(model)
    # the sizes unpack computes (not serializes) are the serialized sizes
    assert undone.stats["bytes_before"] == result.model.ByteSize()
    assert undone.stats["bytes_after"] == restored.ByteSize()
    assert sorted(n.op_type for n in restored.graph.node) == sorted(
        n.op_type for n in model.graph.node
    )
    np.testing.assert_array_equal(run(restored, x), run(model, x))
    return result.model


def test_fp32_round_trip_bit_identical(pruned):
    packed = check_round_trip(pruned)
    # each packed weight costs ~1 bit per value + its nonzeros (40 % of 32 bits here)
    big = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "c2.w"))
    assert packed.ByteSize() < 0.5 * pruned.ByteSize()
    assert packed_weights(packed)["c2.w"].tobytes() == big.tobytes()


def test_many_chunks_ending_mid_byte(pruned):
    # 3 rows of c2.w per chunk: 1215 values, not a multiple of 8, so the last byte is padded
    packed = check_round_trip(pruned, chunk=1215)
    assert sum(n.op_type == "Slice" for n in packed.graph.node) > 1
    assert any(n.op_type == "Concat" for n in packed.graph.node)


def test_fp16_round_trip_bit_identical(pruned):
    check_round_trip(Float16()(pruned).model)


def _optimized_ops(model: onnx.ModelProto, folder: Path, name: str) -> list[str]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(folder / f"{name}.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(folder / f"{name}.onnx")).graph.node]


def test_int8_qdq_round_trip_keeps_the_int8_fusions(qdq, tmp_path):
    packed = check_round_trip(qdq)
    names = {t["name"] for t in Pack()(qdq).stats["tensors"] if t["packed"]}
    assert {"c2.w_quantized", "fc.w_quantized"} <= names  # the int8 weights below the DQ
    dense_ops = _optimized_ops(qdq, tmp_path, "dense")
    packed_ops = _optimized_ops(packed, tmp_path, "packed")
    assert packed_ops == dense_ops  # decoders folded away, same fused graph
    assert dense_ops.count("QLinearConv") == 2 and "QLinearMatMul" in dense_ops


def test_negative_zero_and_nan_come_back_byte_identical():
    a = np.zeros((16, 9), np.float32)
    a[0, 1], a[3, 4], a[7, 8] = -0.0, np.nan, 2.5
    chunks = encode(a, chunk=40)
    assert len(chunks) > 1 and decode(chunks).tobytes() == a.tobytes()


def test_same_input_gives_the_same_bytes(qdq, tmp_path, capsys):
    src = tmp_path / "q.onnx"
    src.write_bytes(qdq.SerializeToString())
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert main(["pack", str(src), "-o", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes() == Pack()(qdq).model.SerializeToString(deterministic=True)


def test_cli_pack_and_undo(pruned, tmp_path, capsys):
    src, packed, back, back2 = (tmp_path / f"{n}.onnx" for n in ("src", "p", "u", "u2"))
    src.write_bytes(pruned.SerializeToString())
    assert main(["pack", str(src), "-o", str(packed)]) == 0
    out = capsys.readouterr().out
    ratio = src.stat().st_size / packed.stat().st_size
    assert f"({ratio:.2f}x)" in out and "c2.w: float32 [64, 45, 3, 3], 60.0% zeros" in out
    assert main(["pack", str(packed), "-o", str(back), "--undo"]) == 0
    assert main(["unpack", str(packed), "-o", str(back2)]) == 0
    assert back.read_bytes() == back2.read_bytes()
    assert weights(onnx.load(str(back))) == weights(pruned)


def test_nothing_to_pack_is_not_an_error(tmp_path, capsys):
    src, out = tmp_path / "dense.onnx", tmp_path / "out.onnx"
    src.write_bytes(cnn().SerializeToString())
    assert main(["pack", str(src), "-o", str(out)]) == 0
    assert "nothing to pack" in capsys.readouterr().out
    assert weights(onnx.load(str(out))) == weights(cnn())
    assert not Pack()(cnn()).modified


def test_already_packed_is_left_as_is(pruned, tmp_path, capsys):
    packed = Pack()(pruned).model
    again = Pack()(packed)
    assert not again.modified and again.stats["already_packed"] == 3
    assert "already packed (3 weights)" in again.stats["summary"]
    src, out = tmp_path / "p.onnx", tmp_path / "out.onnx"
    src.write_bytes(packed.SerializeToString(deterministic=True))
    assert main(["pack", str(src), "-o", str(out)]) == 0
    assert out.read_bytes() == src.read_bytes()


def _corrupt(model: onnx.ModelProto, cut: int) -> onnx.ModelProto:
    """``model`` with the first chunk mask of c2.w ``cut`` bytes shorter."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    record = next(n for n in bad.graph.node if n.output[0] == "c2.w").doc_string
    mask = json.loads(record.split(" ", 3)[3])["chunks"][0][0]
    init = next(t for t in bad.graph.initializer if t.name == mask)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:-cut], mask))
    return bad


def _cli_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # drop what the test's own passes logged before the command
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0]
    return lines[0]


@pytest.mark.parametrize("verb", [["pack"], ["unpack"], ["pack", "--undo"]])
def test_corrupt_mask_is_refused(pruned, tmp_path, capsys, verb):
    src, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    src.write_bytes(_corrupt(Pack()(pruned).model, 1).SerializeToString())
    before = src.read_bytes()
    line = _cli_error([verb[0], str(src), "-o", str(out), *verb[1:]], capsys)
    assert "packed weight 'c2.w' is corrupt: mask of" in line
    assert not out.exists() and src.read_bytes() == before


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("junk", "is not a readable ONNX model"),
        ("same", "is also an input"),
        ("opset", "needs opset ≥ 11"),
        ("setting", "min_saved_bytes = 0 must be ≥ 1"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(pruned, tmp_path, capsys, case, expected):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    extra = []
    if case == "junk":
        src.write_bytes(b"not onnx")
    elif case == "opset":
        model = MagnitudePrune(0.6, min_params=0).call(cnn(opset=10)).model
        src.write_bytes(model.SerializeToString())
    elif case != "missing":
        src.write_bytes(pruned.SerializeToString())
    if case == "same":
        out = src
    if case == "setting":
        extra = ["--min-saved-bytes", "0"]
    before = src.read_bytes() if src.exists() else None
    assert expected in _cli_error(["pack", str(src), "-o", str(out), *extra], capsys)
    assert (src.read_bytes() if src.exists() else None) == before
    assert case == "same" or not out.exists()


def test_models_above_2_gb_are_refused(pruned, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(packed_format, "MAX_BYTES", 10_000)  # the check, without 2 GB of data
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    src.write_bytes(pruned.SerializeToString())
    assert "pack supports models below 2 GB" in _cli_error(
        ["pack", str(src), "-o", str(out)], capsys
    )
    assert not out.exists()
    external = onnx.ModelProto()
    external.CopyFrom(pruned)
    external.graph.initializer[0].data_location = TensorProto.EXTERNAL
    with pytest.raises(BadInputError, match="external data"):
        Pack()(external)


def test_recipes_and_later_passes_see_dense_weights(pruned, qdq, tmp_path):
    packed = make_recipe_pass("pack", {"min_saved_bytes": 64})(pruned).model
    assert is_packed(packed)
    # a pass that reads weights gets them unpacked by the runner: same result as on dense
    again, _ = PassRunner([MagnitudePrune(0.8, scope="layer", min_params=0)]).run(packed)
    direct = MagnitudePrune(0.8, scope="layer", min_params=0)(pruned).model
    assert not is_packed(again) and weights(again) == weights(direct)
    recipe = [make_recipe_pass("unpack", {})]
    assert weights(PassRunner(recipe).run(packed)[0]) == weights(pruned)


def test_validate_bench_and_auto_size_take_packed_models(qdq, tmp_path):
    from converter.check.bench import bench
    from converter.check.validate import validate

    dense, packed, data = tmp_path / "d.onnx", tmp_path / "p.onnx", tmp_path / "x.npz"
    dense.write_bytes(qdq.SerializeToString())
    packed.write_bytes(Pack()(qdq).model.SerializeToString())
    np.savez(data, x=inputs(seed=3, n=20))
    report = validate(
        packed, data, reference=dense, metrics=["max-abs", "agreement"], progress=False
    )
    values = report.outputs[report.output]
    assert values["max-abs"].value == 0.0 and values["agreement"].value == 1.0
    timed = bench([dense, packed], warmup=1, runs=3, data=data)
    assert [m.file_size for m in timed.models] == [dense.stat().st_size, packed.stat().st_size]
    assert timed.get(1, 1).latency.p50_ms > 0
    assert packed_size(dense) == Pack()(qdq).model.ByteSize() < dense.stat().st_size
    assert packed_size(packed) == packed.stat().st_size


def test_sensitivity_of_a_packed_model_equals_the_dense_one(pruned, tmp_path):
    from converter.check.sensitivity import sensitivity

    dense, packed, data = tmp_path / "d.onnx", tmp_path / "p.onnx", tmp_path / "x.npz"
    dense.write_bytes(pruned.SerializeToString())
    packed.write_bytes(Pack()(pruned).model.SerializeToString())
    np.savez(data, x=inputs(seed=4, n=16))
    reports = [sensitivity(m, data, samples=16, progress=False) for m in (dense, packed)]
    losses = [[(n.name, n.alone.loss) for n in r.nodes] for r in reports]
    assert losses[0] == losses[1] and len(losses[0]) == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8])
@pytest.mark.parametrize("shape", [(1000,), (37, 11, 3), (64, 96)])
@pytest.mark.parametrize("chunk", [8, 40, 1215, pack_module.CHUNK])
def test_decode_round_trip_is_exact_on_seeded_weights(dtype, shape, chunk):
    """decode(encode(a)) gives a back byte for byte: any dtype, rank, chunk size (chunks
    ending mid-byte, one row per chunk, one chunk), 60 % zeros."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal(shape) * 50).astype(dtype)
    a[rng.random(shape) < 0.6] = 0
    out = decode(encode(a, chunk=chunk))
    assert out.shape == a.shape and out.dtype == a.dtype
    assert out.tobytes() == a.tobytes()


def test_decode_refuses_chunks_of_mixed_types():
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    chunks = encode(a, chunk=16)
    chunks[1].values = chunks[1].values.astype(np.float16)
    with pytest.raises(BadInputError, match="corrupt"):
        decode(chunks)


def _layouts(model: onnx.ModelProto) -> list[int]:
    """The rank of every packed chunk's values: 1 flat, 2 columns."""
    inits = {t.name: t for t in model.graph.initializer}
    return [len(inits[c[1]].dims) for r in packed_format.records(model) for c in r.chunks]


def test_columns_and_flat_chunks_decode_exactly_in_onnxruntime(monkeypatch):
    """One weight whose chunks take both layouts (columns where the chunk splits into whole
    bytes, flat for its odd last chunk), with -0.0 and NaN: the weight onnxruntime folds and
    the one unpack restores are byte for byte the original; a model packed flat only (the
    previous decoder's form) still unpacks."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((21, 401)).astype(np.float32)  # 8 rows per chunk, then 5 rows
    a[rng.random(a.shape) < 0.5] = 0
    a[0, 3], a[9, 7], a[20, 400] = -0.0, np.nan, np.float32(-np.nan)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [21, 401])],
        [numpy_helper.from_array(a, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    monkeypatch.setattr(pack_module, "COLUMN_SLACK", 1.0)
    packed = Pack(chunk=3208, min_saved_bytes=1)(model).model
    assert _layouts(packed) == [2, 2, 1] and len(packed.graph.node) > 5
    folded = make_session(packed.SerializeToString()).run(None, {})[0]
    assert folded.tobytes() == a.tobytes()
    assert numpy_helper.to_array(Unpack()(packed).model.graph.initializer[0]).tobytes() == (
        a.tobytes()
    )
    monkeypatch.setattr(pack_module, "COLUMN_SLACK", -1.0)  # every chunk flat, as before
    old = Pack(chunk=3208, min_saved_bytes=1)(model).model
    assert _layouts(old) == [1, 1, 1]
    assert make_session(old.SerializeToString()).run(None, {})[0].tobytes() == a.tobytes()
    assert packed_weights(old)["w"].tobytes() == a.tobytes()


def test_columns_layout_is_checked(monkeypatch):
    monkeypatch.setattr(pack_module, "COLUMN_SLACK", 100.0)  # mostly padding: columns anyway
    a = np.zeros((8, 8), np.float32)
    a[::3, 1] = 1.5
    (chunk,) = encode(a, chunk=64)
    assert chunk.values.shape == (4, 8) and decode([chunk]).tobytes() == a.tobytes()
    chunk.values[3, 5] = 7.0  # a value where column 5 stores none
    with pytest.raises(BadInputError, match="not zero where no value is stored"):
        decode([chunk])
    chunk.values = chunk.values[:3]  # one row too few for column 1
    with pytest.raises(BadInputError, match="per column"):
        decode([chunk])
