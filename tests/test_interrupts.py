"""Signals and the environment: SIGTERM/SIGINT end a command with 128 + N, one line, and no
temporaries; a full disk or a permission problem is exit 3 with the path and the fix; a run
after a SIGKILL removes the temporaries the killed process left."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from converter.core import onnxio

ROOT = Path(__file__).resolve().parent.parent


def _conv_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "onnxship" in p.name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_quantize_exits_128_plus_n_and_leaves_nothing(tmp_path, signum):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    _conv_model(model)
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.standard_normal((200_000, 1, 16, 16)).astype(np.float32))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "converter", "quantize", str(model), "-o", str(out)]
    cmd += ["--mode", "static", "--calib", str(calib), "--calib-batch-size", "1"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not _leftovers(tmpdir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the work has made its temporary folder
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: interrupted by {signal.Signals(signum).name} — nothing was written; run it again"
    ]
    assert "Traceback" not in err
    assert _leftovers(tmpdir) == [] and not out.exists()


def test_a_full_disk_is_exit_3_naming_the_path(tmp_path, capsys, monkeypatch):
    model = tmp_path / "m.onnx"
    _conv_model(model)

    def full(folder, prefix, suffix):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "x.tmp"))

    monkeypatch.setattr(onnxio, "_new_file", full)
    code = main(["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1] == (
        f"error: No space left on device ({tmp_path / 'x.tmp'}) — free disk space (or point "
        "TMPDIR and -o at a larger disk)"
    )


def test_a_killed_run_s_temporaries_go_with_the_next_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".model.onnx.onnxship-{dead}-0123456789ab.tmp"
    alive = tmp_path / f".model.onnx.onnxship-{os.getpid()}-0123456789ab.tmp"
    mine = tmp_path / ".model.onnx.7.tmp"  # not onnxship's: never touched
    for path in (stale, alive, mine):
        path.write_bytes(b"partial")
    onnxio.atomic_write_text(tmp_path / "report.txt", "done")
    assert not stale.exists()
    assert alive.exists() and mine.exists()
    assert (tmp_path / "report.txt").read_text() == "done"
