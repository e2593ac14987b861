"""Magnitude pruning: exact sparsity, what is eligible, determinism, accuracy on the trained
digits models, zeros surviving quantization, and the CLI's bad-input handling."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import one_line_error, run_batches
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.core.data import model_input_specs, open_data
from converter.core.errors import BadInputError
from converter.core.metrics import accuracy, per_sample_cosine
from converter.core.runtime import make_session
from passes.base import PassRunner, fingerprint, make_pass
from passes.prune import SCOPES, MagnitudePrune


def _init(rng: np.random.Generator, name: str, *shape: int, scale: float = 1.0):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def toy_model(seed: int = 0) -> onnx.ModelProto:
    """x[b,16] → MatMul w1 → Gemm w2 (+bias) → MatMul shared → MatMul shared → LayerNorm;
    plus an embedding table read by Gather and by a MatMul (tied), and a small head."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "w1", 16, 64),
        _init(rng, "w2", 64, 48, scale=0.1),
        _init(rng, "b2", 48),
        _init(rng, "shared", 48, 48),
        _init(rng, "ln_scale", 48),
        _init(rng, "ln_bias", 48),
        _init(rng, "emb", 48, 40),
        _init(rng, "head", 40, 4),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "ids"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], name="gemm"),
        helper.make_node("MatMul", ["h2", "shared"], ["h3"], name="mm_shared_a"),
        helper.make_node("MatMul", ["h3", "shared"], ["h4"], name="mm_shared_b"),
        helper.make_node("LayerNormalization", ["h4", "ln_scale", "ln_bias"], ["h5"], name="ln"),
        helper.make_node("MatMul", ["h5", "emb"], ["h6"], name="tied"),
        helper.make_node("Gather", ["emb", "ids"], ["g"], name="lookup"),
        helper.make_node("MatMul", ["h6", "head"], ["y"], name="mm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 40]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def zero_fraction(a: np.ndarray) -> float:
    return float(np.mean(a == 0))


def outputs(model: onnx.ModelProto | str, data, specs) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return next(iter(run_batches(make_session(source), data.batches(specs, 128)).values()))


# ----------------------------------------------------------------------- the pass


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_hits_the_target_exactly_on_eligible_weights(scope, sparsity):
    model = toy_model()
    result = MagnitudePrune(sparsity, scope=scope, min_params=0)(model)
    after = weights(result.model)
    eligible = ["w1", "w2", "shared", "head"]
    zeros = sum(int(np.sum(after[n] == 0)) for n in eligible)
    total = sum(after[n].size for n in eligible)
    assert abs(zeros / total - sparsity) <= 0.005
    assert result.stats["sparsity"] == pytest.approx(zeros / total)
    assert result.stats["eligible_params"] == total
    if scope == "layer":
        for n in eligible:
            assert abs(zero_fraction(after[n]) - sparsity) <= 0.005 + 1 / after[n].size
    assert result.modified == (sparsity > 0)


def test_biases_norms_and_embedding_tables_are_untouched():
    model = toy_model()
    before, after = weights(model), weights(MagnitudePrune(0.7, min_params=0)(model).model)
    for name in ("b2", "ln_scale", "ln_bias", "emb", "ids"):
        np.testing.assert_array_equal(before[name], after[name])
    skipped = {s["name"]: s["reason"] for s in MagnitudePrune(0.7)(model).stats["skipped"]}
    assert "embedding table" in skipped["emb"] and "Gather lookup" in skipped["emb"]


def test_shared_initializer_is_pruned_once_and_stays_shared():
    model = toy_model()
    result = MagnitudePrune(0.5, scope="layer", min_params=0)(model)
    names = [t.name for t in result.model.graph.initializer]
    assert names.count("shared") == 1
    assert zero_fraction(weights(result.model)["shared"]) == pytest.approx(0.5, abs=1e-3)
    uses = [n.name for n in result.model.graph.node if "shared" in n.input]
    assert uses == ["mm_shared_a", "mm_shared_b"]
    assert [t["name"] for t in result.stats["tensors"]].count("shared") == 1


def test_size_floor_exclude_and_first_last_are_reported():
    model = toy_model()
    skipped = {s["name"]: s["reason"] for s in MagnitudePrune(0.5)(model).stats["skipped"]}
    assert "below the size floor (160 < 1024" in skipped["head"]
    result = MagnitudePrune(0.5, min_params=0, exclude=["^mm_shared_b$", "^w2$"])(model)
    skipped = {s["name"]: s["reason"] for s in result.stats["skipped"]}
    assert "--exclude '^mm_shared_b$'" in skipped["shared"]  # matched by a node name
    assert "--exclude '^w2$'" in skipped["w2"]  # matched by the initializer name
    np.testing.assert_array_equal(weights(model)["shared"], weights(result.model)["shared"])
    result = MagnitudePrune(0.5, min_params=0, skip_first_last=True)(model)
    skipped = {s["name"]: s["reason"] for s in result.stats["skipped"]}
    assert "first weighted layer" in skipped["w1"] and "last weighted layer" in skipped["head"]
    assert {t["name"] for t in result.stats["tensors"]} == {"w2", "shared"}


def test_size_floor_boundary():
    model = toy_model()
    kept = {t["name"] for t in MagnitudePrune(0.5, min_params=1024)(model).stats["tensors"]}
    assert "w1" in kept  # exactly 1024 elements: not below the floor
    kept = {t["name"] for t in MagnitudePrune(0.5, min_params=1025)(model).stats["tensors"]}
    assert "w1" not in kept


def test_ties_are_broken_deterministically_in_flat_order():
    w = np.tile(np.array([1.0, -1.0, 2.0, -2.0], dtype=np.float32), 300).reshape(40, 30)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 30])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    first = MagnitudePrune(0.3)(model)
    second = MagnitudePrune(0.3)(model)
    assert fingerprint(first.model) == fingerprint(second.model)
    pruned = weights(first.model)["w"].ravel()
    k = round(0.3 * w.size)  # 360 of the 600 magnitude-1 weights
    assert np.count_nonzero(pruned == 0) == k
    ones = np.flatnonzero(np.abs(w.ravel()) == 1)
    assert np.all(pruned[ones[:k]] == 0) and np.all(pruned[ones[k:]] != 0)


def test_global_scope_prunes_small_scale_layers_harder():
    stats = MagnitudePrune(0.5, scope="global", min_params=0)(toy_model()).stats
    by_name = {t["name"]: t["sparsity"] for t in stats["tensors"]}
    assert by_name["w2"] > 0.9  # 10x smaller weights than the others
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_deterministic_and_does_not_touch_its_input():
    model = toy_model()
    before = fingerprint(model)
    a = MagnitudePrune(0.6, min_params=0)(model)
    b = MagnitudePrune(0.6, min_params=0)(model)
    assert fingerprint(model) == before
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(
        deterministic=True
    )


def test_stats_are_plain_json():
    stats = MagnitudePrune(0.5, min_params=0)(toy_model()).stats
    assert json.loads(json.dumps(stats)) == stats


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity_is_rejected(bad):
    with pytest.raises(BadInputError, match="sparsity"):
        MagnitudePrune(bad)


def test_bad_settings_are_rejected():
    with pytest.raises(BadInputError, match="scope"):
        MagnitudePrune(0.5, scope="channel")
    with pytest.raises(BadInputError, match="regular expression"):
        MagnitudePrune(0.5, exclude=["("])
    with pytest.raises(BadInputError, match="min_params"):
        MagnitudePrune(0.5, min_params=-1)
    with pytest.raises(BadInputError, match="unknown setting"):
        make_pass(MagnitudePrune, {"sparsity": 0.5, "granularity": "row"})


# ----------------------------------------------------------------------- trained models


@pytest.mark.parametrize("fixture", ["digits_cnn", "digits_mlp"])
def test_trained_models_hit_sparsity(fixture, request):
    ref = request.getfixturevalue(fixture)
    model = onnx.load(str(ref.onnx))
    for sparsity in (0.5, 0.8):
        stats = MagnitudePrune(sparsity)(model).stats
        assert abs(stats["sparsity"] - sparsity) <= 0.005
        assert 0 < stats["eligible_params"] <= stats["total_params"]


@pytest.mark.parametrize("fixture", ["digits_cnn", "digits_mlp", "tiny_encoder"])
def test_lightly_pruned_models_stay_close(fixture, request):
    ref = request.getfixturevalue(fixture)
    model = onnx.load(str(ref.onnx))
    specs = model_input_specs(model)
    data = open_data(ref.test, specs)
    pruned = MagnitudePrune(0.2)(model).model
    base, out = outputs(str(ref.onnx), data, specs), outputs(pruned, data, specs)
    labels = data.labels()
    assert per_sample_cosine(out, base).mean() >= 0.995
    assert accuracy(out, labels) >= accuracy(base, labels) - 0.01


def _quantized_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The int8 weight ORT made of float initializer ``name`` (static: name_quantized;
    dynamic Gemm: name_Transposed_quantized, transposed back)."""
    found = weights(model)
    if f"{name}_quantized" in found:
        return found[f"{name}_quantized"]
    return found[f"{name}_Transposed_quantized"].T


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_pruned_weights_stay_exactly_zero_after_quantization(mode, digits_cnn):
    from passes.quantize import DynamicQuantize, StaticQuantize

    model = onnx.load(str(digits_cnn.onnx))
    prune = MagnitudePrune(0.6)
    quantize = (
        StaticQuantize(calibration=digits_cnn.calib, progress=False)
        if mode == "static"
        else DynamicQuantize()
    )
    final, (pruned, _) = PassRunner([prune, quantize]).run(model)
    sparse = weights(pruned.model)
    for tensor in pruned.stats["tensors"]:
        q = _quantized_weight(final, tensor["name"])
        assert q.dtype == np.int8  # symmetric int8 weights: zero point 0
        zero = sparse[tensor["name"]] == 0
        assert zero.sum() > 0 and np.all(q[zero] == 0)


# ----------------------------------------------------------------------- CLI


def _save(model: onnx.ModelProto, path) -> bytes:
    data = model.SerializeToString()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("sparsity", ["1.0", "-0.2", "1.5"])
def test_cli_sparsity_out_of_range_is_exit_2(sparsity, tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    data = _save(toy_model(), src)
    assert main(["prune", str(src), "-o", str(out), "--sparsity", sparsity]) == 2
    assert "sparsity" in one_line_error(capsys)
    assert not out.exists() and src.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_cli_bad_inputs_are_exit_2(tmp_path, capsys):
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    data = _save(toy_model(), src)
    cases = [
        (["prune", str(tmp_path / "missing.onnx"), "-o", str(out), "--sparsity", "0.5"], "exist"),
        (["prune", str(src), "-o", str(src), "--sparsity", "0.5"], "also an input"),
        (["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--exclude", "("], "regular"),
        (["prune", str(src), "-o", str(tmp_path / "no" / "o.onnx"), "--sparsity", "0.5"], "folder"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        assert words in one_line_error(capsys)
        assert not out.exists() and src.read_bytes() == data
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["prune", str(tmp_path / "junk.onnx"), "-o", str(out), "--sparsity", "0.5"]) == 2
    assert "not a readable ONNX model" in one_line_error(capsys)


def test_cli_refuses_a_quantized_model(tmp_path, capsys, digits_mlp):
    from passes.quantize import DynamicQuantize

    src, out = tmp_path / "int8.onnx", tmp_path / "out.onnx"
    data = _save(DynamicQuantize()(onnx.load(str(digits_mlp.onnx))).model, src)
    capsys.readouterr()  # the quantize pass's own log line
    assert main(["prune", str(src), "-o", str(out), "--sparsity", "0.5"]) == 2
    assert "already quantized" in one_line_error(capsys)
    assert not out.exists() and src.read_bytes() == data


def test_cli_prunes_and_reports(tmp_path, capsys, digits_cnn):
    out = tmp_path / "sparse.onnx"
    argv = ["prune", str(digits_cnn.onnx), "-o", str(out), "--sparsity", "0.5"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "50.0% of" in report and "below the size floor" in report
    first = out.read_bytes()
    assert main([*argv, "-q"]) == 0
    assert out.read_bytes() == first  # deterministic bytes
    stats = MagnitudePrune(0.5)(onnx.load(str(digits_cnn.onnx))).stats
    assert zero_fraction(
        np.concatenate([weights(onnx.load(str(out)))[t["name"]].ravel() for t in stats["tensors"]])
    ) == pytest.approx(0.5, abs=0.005)
