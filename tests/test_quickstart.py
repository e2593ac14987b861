"""The README's quickstart, run as written: its stand-in files, its data script (class folders
or a flat folder), its commands, and the validate output it shows; and no progress-bar
remnants in piped output."""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, two_matmul_mlp

from converter.core.render import progress_bar

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
QUICKSTART = README[README.index("## Quickstart") : README.index("## How to choose")]


def _block(kind: str, first: str) -> str:
    """The quickstart's ```kind block whose first line starts with ``first``."""
    blocks = re.findall(rf"```{kind}\n(.*?)```", QUICKSTART, flags=re.S)
    return next(b for b in blocks if b.startswith(first))


def _commands(script: str) -> list[list[str]]:
    """The shell block's commands, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [shlex.split(line) for line in joined.splitlines() if line and line[0] != "#"]


def _shape(lines: list[str]) -> list[str]:
    """Lines with every number masked, spaces collapsed: what must not differ between runs."""
    return [" ".join(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", line).split()) for line in lines]


def _python(tmp_path: Path, script: str) -> None:
    subprocess.run([sys.executable, script], cwd=tmp_path, check=True, timeout=600)


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("PIL")
    for name in ("my_net.py", "make_example.py", "make_npz.py"):
        (tmp_path / name).write_text(_block("python", f"# {name}"))
    _python(tmp_path, "make_example.py")
    assert (tmp_path / "my_net.pt").is_file()
    assert len(list((tmp_path / "images" / "train").glob("*/*.png"))) == 300
    _python(tmp_path, "make_npz.py")
    calib, test = np.load(tmp_path / "calib.npz"), np.load(tmp_path / "test.npz")
    assert set(calib) == {"x"} and calib["x"].shape == (200, 3, 32, 32)
    assert test["x"].shape == (90, 3, 32, 32) and sorted(set(test["labels"])) == [0, 1, 2]
    monkeypatch.chdir(tmp_path)
    printed = {}
    for command in _commands(_block("sh", "mkdir -p build")):
        if command[0] == "mkdir":
            (tmp_path / command[-1]).mkdir(parents=True, exist_ok=True)
            continue
        assert command[0] == "onnxship"
        code, out, _ = cli(capsys, *command[1:])
        assert code == 0, (command, out)
        printed[command[1]] = out
    # the README shows validate's whole output: the same lines, numbers aside
    shown = _block("console", "exported build/my_net.onnx").splitlines()
    start = next(i for i, line in enumerate(shown) if line.startswith("validate "))
    end = shown.index("PASSED", start) + 1
    assert _shape(shown[start:end]) == _shape(printed["validate"].splitlines())


def test_make_npz_takes_a_flat_folder_without_labels(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 5)):  # flat: images/<split>/*.png
        (tmp_path / "images" / split).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / split / f"{i}.png")
    (tmp_path / "make_npz.py").write_text(_block("python", "# make_npz.py"))
    _python(tmp_path, "make_npz.py")
    calib, test = np.load(tmp_path / "calib.npz"), np.load(tmp_path / "test.npz")
    assert set(calib) == {"x"} and calib["x"].shape == (12, 3, 32, 32)
    assert set(test) == {"x"} and test["x"].shape == (5, 3, 32, 32)
    shutil.rmtree(tmp_path / "images" / "test")
    (tmp_path / "images" / "test").mkdir()
    failed = subprocess.run(
        [sys.executable, "make_npz.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert failed.returncode == 1 and "no .png/.jpg images in images/test" in failed.stderr


def test_piped_output_has_no_progress_bar_remnants(tmp_path) -> None:
    import onnx

    onnx.save(two_matmul_mlp(np.random.default_rng(0)), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((100, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    m, d = str(tmp_path / "m.onnx"), str(tmp_path / "d.npz")
    for args in (
        ["validate", m, "--data", d, "--reference", m],
        ["bench", m, m, "--runs", "50"],
        ["quantize", m, "-o", str(tmp_path / "q.onnx"), "--mode", "static", "--calib", d],
    ):
        run = subprocess.run(
            [sys.executable, "-m", "converter", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        assert "\r" not in run.stderr and "%|" not in run.stderr, (args, run.stderr)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_are_drawn_on_a_terminal_only(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(total=3, desc="x", progress=True) as bar:
        assert not bar.disable
        bar.update(3)
    assert "x:" in sys.stderr.getvalue()
    with progress_bar(total=3, progress=False) as bar:
        assert bar.disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a file
    with progress_bar(total=3, progress=True) as bar:
        assert bar.disable
