"""Models with external data (`onnx.save(m, p, save_as_external_data=True)`, every model
above 2 GB): every verb reads them as it reads the same model in one file, and writes what it
writes as one file below 2 GB, `<name>` + `<name>.data` above; a data `location` that is
absolute, leaves the model's folder or is missing is exit 2 (#21 item 2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli, one_line_error, two_matmul_mlp

from converter.cli import main
from converter.core import onnxio
from converter.core.onnxio import copy_model, load_model, save_model, session_source
from converter.core.runtime import make_session


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _has_external(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The same MLP twice, inline (one/m.onnx) and with every tensor in external data
    (ext/m.onnx + ext/m.onnx.data), and 40 seeded samples with labels."""
    rng = np.random.default_rng(0)
    model = two_matmul_mlp(rng)
    (tmp_path / "one").mkdir()
    (tmp_path / "ext").mkdir()
    inline, ext = tmp_path / "one" / "m.onnx", tmp_path / "ext" / "m.onnx"
    onnx.save(model, inline)
    onnx.save(model, ext, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert _has_external(ext) and ext.stat().st_size < 1000
    x = rng.standard_normal((40, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=rng.integers(0, 10, 40))
    return inline, ext, tmp_path / "d.npz"


def _relocated(ext: Path, location: str, name: str) -> Path:
    """A copy of ``ext`` whose tensors say their data is at ``location``."""
    model = onnx.load(str(ext), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    out = ext.with_name(name)
    out.write_bytes(model.SerializeToString())
    return out


def test_validate_scores_it_as_the_same_model_in_one_file(models, tmp_path, capsys) -> None:
    inline, ext, data = models
    reports = []
    for model in (inline, ext):
        js = tmp_path / f"{model.parent.name}.json"
        args = ["--reference", ext, "--metric", "accuracy", "--metric", "cosine", "--json", js]
        code, _, err = cli(capsys, "validate", model, "--data", data, *args, "--min-worst", 0.99)
        assert code == 0, err
        reports.append(json.loads(js.read_text())["outputs"])
    assert reports[0] == reports[1]
    assert reports[1]["y"]["cosine"]["value"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("../m.onnx.data", "is at '../m.onnx.data', outside the model's folder"),
        ("ABS", "not a relative path"),
        ("gone.data", "gone.data, which does not exist"),
    ],
)
def test_a_bad_location_is_exit_2_naming_it(models, location, expected, capsys) -> None:
    inline, ext, data = models
    (ext.parent.parent / "m.onnx.data").write_bytes((ext.parent / "m.onnx.data").read_bytes())
    location = str(ext.parent / "m.onnx.data") if location == "ABS" else location
    bad = _relocated(ext, location, "bad.onnx")
    for args in (["validate", bad, "--data", data], ["bench", bad, "--runs", 2]):
        assert main([str(a) for a in args]) == 2
        line = one_line_error(capsys)
        assert f"model file {bad}: the external data of w1, w2 " in line and expected in line


def test_a_location_in_a_subfolder_is_read(models, capsys) -> None:
    inline, ext, data = models
    (ext.parent / "weights").mkdir()
    (ext.parent / "m.onnx.data").rename(ext.parent / "weights" / "m.onnx.data")
    sub = _relocated(ext, "weights/m.onnx.data", "sub.onnx")
    assert load_model(sub) == load_model(inline)
    assert main(["-q", "validate", str(sub), "--data", str(data), "--reference", str(inline)]) == 0


def test_bench_counts_the_data_in_the_size(models, tmp_path, capsys) -> None:
    inline, ext, _ = models
    js = tmp_path / "b.json"
    code, _, err = cli(capsys, "bench", ext, inline, "--runs", 5, "--warmup", 1, "--json", js)
    assert code == 0, err
    sizes = [m["file_size"] for m in json.loads(js.read_text())["models"]]
    data = (ext.parent / "m.onnx.data").stat().st_size
    assert sizes[0] == ext.stat().st_size + data == onnxio.model_file_size(ext)
    assert data == (32 * 64 + 64 * 10) * 4


@pytest.mark.parametrize(
    "verb",
    [
        ["prune", "--sparsity", "0.5", "--min-params", "1"],
        ["quantize", "--mode", "dynamic", "--target", "avx2"],
        ["quantize", "--mode", "static", "--calib", "DATA", "--target", "avx2"],
        ["fp16"],
    ],
)
def test_each_pass_reads_it_and_writes_one_file(models, verb, tmp_path, capsys) -> None:
    """The pass on the external-data model writes the bytes it writes for the same model in
    one file: one self-contained file (below 2 GB)."""
    inline, ext, data = models
    args = [str(data) if a == "DATA" else a for a in verb[1:]]
    outs = []
    for model in (inline, ext):
        out = tmp_path / f"{verb[0]}-{model.parent.name}.onnx"
        assert main(["-q", verb[0], str(model), "-o", str(out), *args]) == 0
        outs.append(out)
    assert _sha(outs[0]) == _sha(outs[1])
    assert not _has_external(outs[1]) and not list(tmp_path.glob("*.data"))


def test_pack_reads_it(models, tmp_path, capsys) -> None:
    """pack of a pruned model kept in external data: the bytes of packing it in one file,
    and the outputs of the unpacked model, bit for bit."""
    inline, _, data = models
    pruned = tmp_path / "pruned.onnx"
    assert main(["-q", "prune", str(inline), "-o", str(pruned), "--sparsity", "0.7",
                 "--min-params", "1"]) == 0  # fmt: skip
    (tmp_path / "pext").mkdir()
    pruned_ext = tmp_path / "pext" / "pruned.onnx"
    onnx.save(load_model(pruned), pruned_ext, save_as_external_data=True, size_threshold=0)
    packed = [tmp_path / "packed-one.onnx", tmp_path / "packed-ext.onnx"]
    for src, out in zip((pruned, pruned_ext), packed):
        code, _, err = cli(capsys, "pack", src, "-o", out, "--min-saved-bytes", 1)
        assert code == 0 and "nothing to pack" not in err, err
    assert _sha(packed[0]) == _sha(packed[1])
    x = {"x": np.load(data)["x"]}
    want = make_session(pruned).run(None, x)[0]
    assert np.array_equal(make_session(packed[1]).run(None, x)[0], want)


def test_sensitivity_reads_it(models, tmp_path, capsys) -> None:
    inline, ext, data = models
    found = []
    for model in (inline, ext):
        js = tmp_path / f"s-{model.parent.name}.json"
        args = ["--mode", "dynamic", "--target", "avx2", "--json", js, "-q"]
        assert main([str(a) for a in ("sensitivity", model, "--data", data, *args)]) == 0
        found.append(json.loads(js.read_text())["nodes"])
    assert found[0] == found[1] and len(found[0]) == 2


def test_run_copies_the_reference_with_its_data(models, tmp_path, capsys) -> None:
    inline, ext, data = models
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[model]
onnx = "{ext}"
[data]
validation = "{data}"
[[variants]]
name = "dyn"
passes = [{{ pass = "quantize", mode = "dynamic", target = "avx2" }}]
[gates]
min_worst = 0.9
[bench]
runs = 3
warmup = 1
""")
    out = tmp_path / "out"
    assert main(["-q", "run", str(recipe), "-o", str(out)]) == 0
    assert not _has_external(out / "fp32.onnx")  # one file: the data came along
    assert load_model(out / "fp32.onnx") == load_model(inline)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["dyn"]["outputs"]["y"]["cosine"]["value"] > 0.99


def test_run_refuses_a_model_without_its_data_before_any_work(models, tmp_path, capsys):
    inline, ext, data = models
    (ext.parent / "m.onnx.data").unlink()
    (tmp_path / "r.toml").write_text(f'[model]\nonnx = "{ext}"\n')
    assert main(["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")]) == 2
    assert "m.onnx.data, which does not exist" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_auto_copies_the_reference_with_its_data(models, tmp_path, capsys) -> None:
    inline, ext, data = models
    out = tmp_path / "auto"
    args = ["--metric", "cosine", "--min-score", "0.9", "--bench-runs", "3", "--target", "avx2"]
    assert main(["-q", "auto", str(ext), "--data", str(data), *args, "-o", str(out)]) == 0
    assert not _has_external(out / "fp32.onnx")
    assert load_model(out / "fp32.onnx") == load_model(inline)
    assert make_session(out / "model.onnx").get_inputs()[0].name == "x"


# --- above 2 GB: external data written beside the model (the limit lowered for the test) ---


@pytest.fixture
def two_gb_is_small(monkeypatch):
    monkeypatch.setattr(onnxio, "TWO_GB", 4096)


def test_a_large_model_is_written_with_its_data_atomically(models, tmp_path, two_gb_is_small):
    inline, _, _ = models
    model = load_model(inline)
    out = tmp_path / "big" / "m.onnx"
    out.parent.mkdir()
    for _ in range(2):  # the second write replaces the data file whole (onnx would append)
        save_model(model, out)
        data = out.with_name("m.onnx.data")
        assert _has_external(out) and data.stat().st_size == (32 * 64 + 64 * 10) * 4
        assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
        assert load_model(out) == model
    assert not model.graph.initializer[0].external_data  # the model given is not changed
    # copying it carries its data, under the copy's name
    copy = copy_model(out, tmp_path / "copy.onnx")
    assert _has_external(copy) and (tmp_path / "copy.onnx.data").is_file()
    assert load_model(copy) == model


def test_validate_runs_a_large_model_from_its_path(models, tmp_path, capsys, two_gb_is_small):
    inline, ext, data = models
    assert session_source(ext) == str(ext)  # above the limit: onnxruntime reads the path
    assert isinstance(session_source(inline), bytes)
    js = tmp_path / "v.json"
    code, _, err = cli(capsys, "validate", ext, "--data", data, "--reference", inline,
                       "--metric", "cosine", "--json", js)  # fmt: skip
    assert code == 0, err
    assert json.loads(js.read_text())["outputs"]["y"]["cosine"]["value"] == pytest.approx(1.0)
