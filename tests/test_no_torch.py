"""`pip install onnxship` has no torch: every verb but export must run with torch missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from converter.core.runtime import make_session


def test_passes_and_search_run_without_torch(digits_mlp, tmp_path: Path) -> None:
    m, calib, test = digits_mlp.onnx, digits_mlp.calib, digits_mlp.test
    calls = [
        ["prune", m, "-o", tmp_path / "p.onnx", "--sparsity", "0.5"],
        ["pack", tmp_path / "p.onnx", "-o", tmp_path / "pk.onnx"],
        ["unpack", tmp_path / "pk.onnx", "-o", tmp_path / "u.onnx"],
        ["quantize", m, "-o", tmp_path / "q.onnx", "--mode", "static", "--calib", calib],
        ["fp16", m, "-o", tmp_path / "f.onnx"],
        ["sensitivity", m, "--data", test, "--top", "3"],
        [
            "auto",
            m,
            "--data",
            test,
            "--max-drop",
            "0.02",
            "-o",
            tmp_path / "a",
            "--bench-runs",
            "3",
        ],
    ]
    code = "\n".join(
        ["import sys", "sys.modules['torch'] = None", "from converter.cli import main"]
        + [f"assert main({['-q', *map(str, c)]!r}) == 0, {c[0]!r}" for c in calls]
        + ["assert sys.modules['torch'] is None"]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = np.load(test)["x"][:20]
    want = make_session(m).run(None, {"x": x})[0]
    packed = make_session(tmp_path / "pk.onnx").run(None, {"x": x})[0]
    assert np.array_equal(packed, make_session(tmp_path / "p.onnx").run(None, {"x": x})[0])
    for name in ("q.onnx", "a/model.onnx"):
        got = make_session(tmp_path / name).run(None, {"x": x})[0]
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    sparse = onnx.load(str(tmp_path / "p.onnx"))
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in sparse.graph.initializer)
    assert zeros > 0


def test_quantize_never_imports_torch_even_when_installed(digits_mlp, tmp_path: Path) -> None:
    """onnxruntime.tools imports torch whenever it is installed; quantize keeps it out
    (1-5 s and hundreds of MB per call)."""
    for mode in (["--mode", "dynamic"], ["--mode", "static", "--calib", str(digits_mlp.calib)]):
        out = tmp_path / f"{mode[1]}.onnx"
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "converter", "-q", "quantize",
             str(digits_mlp.onnx), "-o", str(out), *mode],
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0 and out.exists(), proc.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert "onnxruntime.quantization" in imported and "torch" not in imported
