"""Hardware targets: names and aliases, host detection, what each target makes the int8
passes do (checked on the quantized weights), reproducible bytes per target, the target
recorded in stats and model metadata, and the warning when a model made for another CPU kind
is measured here. Nothing here depends on which CPU runs it: the host is simulated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.core import machine as targets
from converter.core.errors import BadInputError
from converter.core.machine import METADATA_KEY, resolve_target
from passes.quantize import DynamicQuantize, StaticQuantize


def _matmul_model(path: Path | None = None) -> onnx.ModelProto:
    """x[batch, 16] @ W[16, 8]: one constant-weight MatMul, enough to see the weight bits."""
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if path is not None:
        onnx.save(model, str(path))
    return model


def _int8_weight(model: onnx.ModelProto) -> np.ndarray:
    found = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == TensorProto.INT8 and t.dims and np.prod(t.dims) == 128
    ]
    assert len(found) == 1, [t.name for t in model.graph.initializer]
    return found[0].astype(np.int32)


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture()
def host(monkeypatch):
    """Simulate the host CPU: host("avx512_vnni avx2") or host(machine="aarch64")."""

    def set_host(flags: str = "", machine: str = "x86_64") -> None:
        monkeypatch.setattr(targets, "host_flags", lambda: set(flags.split()))
        monkeypatch.setattr(targets.platform, "machine", lambda: machine)

    return set_host


def test_names_and_aliases():
    assert resolve_target("avx2").reduce_range is True
    assert resolve_target("avx512-vnni").reduce_range is False
    assert resolve_target("arm64").reduce_range is False
    assert resolve_target("VNNI").name == "avx512-vnni"
    assert resolve_target("avx-vnni").name == "avx512-vnni"
    assert resolve_target("aarch64").name == "arm64"
    assert resolve_target("avx512").name == "avx2"  # AVX-512 without VNNI


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(BadInputError) as e:
        resolve_target("sse4")
    assert "host, avx2, avx512-vnni, arm64" in e.value.message


@pytest.mark.parametrize(
    "flags, machine, expected",
    [
        ("avx2 fma", "x86_64", "avx2"),
        ("avx2 avx512f avx512bw", "x86_64", "avx2"),
        ("avx2 avx512f avx512_vnni", "x86_64", "avx512-vnni"),
        ("avx2 avx_vnni", "x86_64", "avx512-vnni"),
        ("fp asimd asimddp", "aarch64", "arm64"),
        ("", "arm64", "arm64"),
    ],
)
def test_host_is_read_from_the_cpu_flags(host, flags, machine, expected):
    host(flags, machine)
    assert resolve_target("host").name == expected


def test_each_target_sets_the_weight_bits_and_is_recorded():
    model = _matmul_model()
    seven = DynamicQuantize(target="avx2")(model)
    eight = DynamicQuantize(target="avx512-vnni")(model)
    # 7-bit weights where u8×s8 pair sums saturate int16, full 8 bits with VNNI
    assert np.abs(_int8_weight(seven.model)).max() <= 64
    assert np.abs(_int8_weight(eight.model)).max() == 127
    assert _metadata(seven.model)[METADATA_KEY] == "avx2"
    assert _metadata(eight.model)[METADATA_KEY] == "avx512-vnni"
    stats = seven.stats["target"]
    assert stats["target"] == "avx2" and stats["reduce_range"] is True
    assert not stats["overridden"] and "vpmaddubsw" in stats["why"]
    assert "host_flags" in stats and stats["host_target"] in targets.TARGETS


def test_same_target_same_bytes_on_any_host(host):
    """The output depends on the target, never on the machine that runs the pass."""
    model = _matmul_model()
    made = {}
    for flags in ("avx2", "avx2 avx512_vnni"):
        host(flags)
        for name in ("avx2", "avx512-vnni", "arm64"):
            q = DynamicQuantize(target=name)(model).model.SerializeToString(deterministic=True)
            assert made.setdefault(name, q) == q
    assert len(set(made.values())) == 3
    host("avx2 avx512_vnni")
    assert (
        DynamicQuantize()(model).model.SerializeToString(deterministic=True) == made["avx512-vnni"]
    )


def test_explicit_reduce_range_overrides_the_target(tmp_path):
    model = _matmul_model()
    result = DynamicQuantize(target="avx512-vnni", reduce_range=True)(model)
    assert np.abs(_int8_weight(result.model)).max() <= 64
    assert result.stats["target"]["overridden"] is True


def test_static_quantization_takes_the_target(tmp_path):
    model = _matmul_model()
    x = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    for name, limit in (("avx2", 64), ("arm64", 127)):
        q = StaticQuantize(calibration=tmp_path / "calib.npz", target=name, progress=False)
        result = q(model)
        assert np.abs(_int8_weight(result.model)).max() == pytest.approx(limit, abs=1)
        assert _metadata(result.model)[METADATA_KEY] == name


def test_cli_unknown_target_is_exit_2(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    _matmul_model(src)
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(src), "-o", str(out), "--mode", "dynamic", "--target", "sse4"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.strip().splitlines() == [
        line for line in err.strip().splitlines() if line.startswith("error: unknown target")
    ]
    assert "avx512-vnni" in err


def test_cli_prints_the_target(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    _matmul_model(src)
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(src), "-o", str(out), "--mode", "dynamic", "--target", "arm64"])
    stdout = capsys.readouterr().out
    assert code == 0 and "target: arm64 → 8-bit weights" in stdout
    assert _metadata(onnx.load(str(out)))[METADATA_KEY] == "arm64"


def test_bench_and_validate_warn_about_a_model_for_another_cpu(tmp_path, capsys, host):
    host("avx2")  # this "host" has no VNNI
    src = tmp_path / "m.onnx"
    _matmul_model(src)
    for name in ("avx2", "avx512-vnni"):
        assert main(["-q", "quantize", str(src), "-o", str(tmp_path / f"{name}.onnx"),
                     "--mode", "dynamic", "--target", name]) == 0  # fmt: skip
    capsys.readouterr()
    np.savez(tmp_path / "d.npz", x=np.ones((4, 16), np.float32))
    for verb in (
        ["bench", "--runs", "3", "--warmup", "1"],
        ["validate", "--data", str(tmp_path / "d.npz"), "--reference", str(src)],
    ):
        for name, warned in (("avx2", False), ("avx512-vnni", True)):
            model = str(tmp_path / f"{name}.onnx")
            argv = [verb[0], model, *verb[1:]]
            assert main(argv) == 0
            err = capsys.readouterr().err
            said = f"quantized for target {name}, but this host is avx2" in err
            assert said is warned, (verb, name, err)


def test_cpu_id_tells_generations_apart_where_the_model_name_does_not():
    from converter.core.machine import cpu_id, machine_line

    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    zen4 += "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 23\nmodel\t\t: 1\n"
    assert cpu_id(zen4) == "family 25 model 17"  # the first processor's block
    assert cpu_id("processor\t: 0\nFeatures\t: asimd asimddp\n") == ""  # ARM: no family
    m = {"cpu": "AMD EPYC", "cpu_id": "family 25 model 17", "logical_cores": 2}
    m |= {"vnni": True, "target": "avx512-vnni"}
    line = machine_line(m)
    assert line == "AMD EPYC (family 25 model 17, 2 logical cores, VNNI, host target avx512-vnni)"
    assert machine_line({**m, "cpu_id": ""}).startswith("AMD EPYC (2 logical cores")
