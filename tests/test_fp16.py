"""fp16 conversion: outputs close to fp32 on the trained models, fp32 I/O by default, the
block list, the Cast fix, determinism, and bad inputs through the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import one_line_error, run_batches
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.core.data import model_input_specs, open_data
from converter.core.errors import BadInputError, PassError
from converter.core.metrics import accuracy, per_sample_cosine
from converter.core.runtime import make_session
from passes import fp16 as fp16_module
from passes.base import fingerprint
from passes.fp16 import FP32_OPS, Float16, default_block_list


def elem_types(values) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values}


def pow_model(bias: float = 0.5) -> onnx.ModelProto:
    """y = (x @ w + b) ** 2 + c: a Pow (blocked by default) between fp16 ops."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["h2"], name="add"),
            helper.make_node("Pow", ["h2", "two"], ["sq"], name="square"),
            helper.make_node("Add", ["sq", "c"], ["y"], name="add_c"),
        ],
        "pow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        [
            numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
            numpy_helper.from_array(np.full(16, bias, np.float32), "b"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.full(16, 0.25, np.float32), "c"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("fixture", ["digits_cnn", "digits_mlp", "tiny_encoder"])
def test_trained_models_stay_close(fixture, request):
    ref = request.getfixturevalue(fixture)
    model = onnx.load(str(ref.onnx))
    result = Float16()(model)
    specs = model_input_specs(model)
    assert model_input_specs(result.model) == specs  # fp32 I/O by default
    data = open_data(ref.test, specs)
    base = next(iter(run_batches(make_session(str(ref.onnx)), data.batches(specs, 128)).values()))
    feeds = data.batches(specs, 128)
    out = next(iter(run_batches(make_session(result.model.SerializeToString()), feeds).values()))
    assert out.dtype == np.float32
    assert per_sample_cosine(out, base).min() >= 0.999
    assert accuracy(out, data.labels()) >= accuracy(base, data.labels()) - 0.01
    assert result.stats["size_ratio"] < 0.65
    weights = [t for t in result.model.graph.initializer if len(t.dims) >= 2]
    assert all(t.data_type == TensorProto.FLOAT16 for t in weights)


def test_encoder_cast_to_float_is_made_fp16(tiny_encoder):
    """The encoder casts its int64 mask to float; the converter declares that output fp16
    but leaves Cast(to=FLOAT), which onnxruntime rejects. The pass fixes the Cast."""
    result = Float16()(onnx.load(str(tiny_encoder.onnx)))
    casts = [n for n in result.model.graph.node if n.name == "node__to_copy"]
    assert casts and casts[0].attribute[0].i == TensorProto.FLOAT16
    make_session(result.model.SerializeToString())


def test_strict_type_check_catches_a_broken_conversion(tiny_encoder, monkeypatch):
    monkeypatch.setattr(fp16_module, "_fix_casts", lambda *args: None)
    with pytest.raises(PassError, match="inconsistent types.*node__to_copy"):
        Float16()(onnx.load(str(tiny_encoder.onnx)))


def test_fp16_io_when_asked(digits_mlp):
    result = Float16(keep_io_types=False)(onnx.load(str(digits_mlp.onnx)))
    assert elem_types(result.model.graph.input) == {"x": TensorProto.FLOAT16}
    x = np.random.default_rng(0).random((4, 64)).astype(np.float16)
    out = make_session(result.model.SerializeToString()).run(None, {"x": x})[0]
    assert out.dtype == np.float16


def test_block_list_keeps_ops_in_fp32():
    model = pow_model()
    result = Float16()(model)
    assert result.stats["kept_fp32"] == {"square": "op type Pow is on the fp32 block list"}
    assert set(FP32_OPS) <= set(default_block_list())
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    base = make_session(model.SerializeToString()).run(None, {"x": x})[0]
    out = make_session(result.model.SerializeToString()).run(None, {"x": x})[0]
    assert per_sample_cosine(out, base).min() > 0.999
    by_node = Float16(block_ops=[], block_nodes=["^add_c$"])(model)
    assert by_node.stats["kept_fp32"] == {"add_c": "node name matched --block-node"}
    extra = Float16(extra_block_ops=["MatMul"])(model)
    assert set(extra.stats["kept_fp32"]) == {"mm", "square"}
    assert "MatMul" in extra.stats["block_ops"]


def test_values_beyond_the_fp16_range_are_reported():
    result = Float16()(pow_model(bias=1e6))
    assert result.stats["clamped_values"] == ["1000000.0 → 10000.0"]


def test_deterministic_and_json_stats(tiny_encoder):
    model = onnx.load(str(tiny_encoder.onnx))
    before = fingerprint(model)
    first, second = Float16()(model), Float16()(model)
    assert fingerprint(first.model) == fingerprint(second.model)
    assert fingerprint(model) == before
    assert json.loads(json.dumps(first.stats)) == first.stats


def test_refuses_fp16_and_quantized_models(digits_mlp):
    from passes.quantize import DynamicQuantize

    model = onnx.load(str(digits_mlp.onnx))
    with pytest.raises(BadInputError, match="already float16"):
        Float16()(Float16()(model).model)
    with pytest.raises(BadInputError, match="already float16"):
        Float16()(Float16(keep_io_types=False)(model).model)
    with pytest.raises(BadInputError, match="quantized"):
        Float16()(DynamicQuantize()(model).model)
    with pytest.raises(BadInputError, match="regular expression"):
        Float16(block_nodes=["("])


def test_cli_converts_and_says_it_is_about_size(tmp_path, capsys, digits_cnn):
    out = tmp_path / "half.onnx"
    assert main(["fp16", str(digits_cnn.onnx), "-o", str(out)]) == 0
    report = capsys.readouterr().out
    assert "float32 inputs/outputs" in report and "saves size, not time" in report
    first = out.read_bytes()
    assert main(["fp16", str(digits_cnn.onnx), "-o", str(out), "-q"]) == 0
    assert out.read_bytes() == first
    assert main(["fp16", str(digits_cnn.onnx), "-o", str(out), "--fp16-io", "-q"]) == 0
    assert elem_types(onnx.load(str(out)).graph.input) == {"x": TensorProto.FLOAT16}


def test_cli_bad_inputs_are_exit_2(tmp_path, capsys, digits_mlp):
    half = tmp_path / "half.onnx"
    data = Float16()(onnx.load(str(digits_mlp.onnx))).model.SerializeToString()
    half.write_bytes(data)
    out = tmp_path / "out.onnx"
    cases = [
        (["fp16", str(half), "-o", str(out)], "nothing to convert"),
        (["fp16", str(tmp_path / "none.onnx"), "-o", str(out)], "does not exist"),
        (["fp16", str(half), "-o", str(half)], "also an input"),
        (["fp16", str(half), "-o", str(out), "--block-node", "["], "regular expression"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        assert words in one_line_error(capsys)
        assert not out.exists() and half.read_bytes() == data
