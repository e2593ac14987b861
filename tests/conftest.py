"""Shared fixtures: the reference models of models/, trained and exported once per
source version (cached under build/test-models/), with their data files."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "test-models"

INPUTS = {
    "digits_cnn": ["x:batch,1,8,8:float32"],
    "digits_mlp": ["x:batch,64:float32"],
    "tiny_encoder": ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
}


@dataclass(frozen=True)
class RefModel:
    """A trained reference model exported to ONNX, with its calibration and test data."""

    name: str
    onnx: Path
    calib: Path  # training samples, no labels
    test: Path  # held-out samples with `labels`


def _key(name: str) -> str:
    digest = hashlib.sha256()
    for f in sorted((ROOT / "models").glob("*.py")) + sorted((ROOT / "models" / name).glob("*")):
        if f.is_file():
            digest.update(f.read_bytes())
    digest.update((ROOT / "converter" / "torch" / "export.py").read_bytes())
    return digest.hexdigest()[:12]


def _ref_model(name: str) -> RefModel:
    from converter.torch.export import export

    out = CACHE / f"{name}-{_key(name)}.onnx"
    data = ROOT / "build" / "models" / name
    if not out.exists() or not (data / "test.npz").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        export(f"{ROOT}/models/{name}/model.py:trained", out, INPUTS[name], dims={"seq": 16})
    return RefModel(name, out, data / "calib.npz", data / "test.npz")


@pytest.fixture(scope="session")
def digits_cnn() -> RefModel:
    return _ref_model("digits_cnn")


@pytest.fixture(scope="session")
def digits_mlp() -> RefModel:
    return _ref_model("digits_mlp")


@pytest.fixture(scope="session")
def tiny_encoder() -> RefModel:
    return _ref_model("tiny_encoder")


# --- tiny models built in-test ----------------------------------------------------------


def two_matmul_mlp(rng):
    """x [batch, 32] → MatMul (w1, 32×64) → Relu → MatMul (w2, 64×10), weights drawn from
    ``rng`` (w1 first): a seeded MatMul model for the auto tests."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = rng.standard_normal((32, 64)).astype(np.float32) / 4
    w2 = rng.standard_normal((64, 10)).astype(np.float32) / 8
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# --- the CLI, run in-process ----------------------------------------------------------------


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process: exit code, stdout, and stderr without the progress bar (tqdm
    draws it with carriage returns)."""
    from converter.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.rsplit("\r", 1)[-1]


def one_line_error(capsys) -> str:
    """The single ``error: ...`` line a bad input prints on stderr (asserted), no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() binds the package loggers to the stderr capsys gives that test; undo it so
    later tests do not log to a closed stream."""
    names = ("converter", "passes")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names}
    yield
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def run_batches(session, feeds) -> dict:
    """Run every feed through an onnxruntime session; each output concatenated over the
    sample axis."""
    import numpy as np

    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list] = {n: [] for n in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, dict(feed))):
            parts[name].append(value)
    return {n: np.concatenate(v) if v else np.empty(0) for n, v in parts.items()}
