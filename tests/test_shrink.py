"""shrink: structured pruning (torch-pruning) + distillation recovery + verified export.

Tiny models are written to a file in-test (SPEC needs a file); the trained digits_cnn of
tests/conftest.py shows that distillation wins accuracy back. Every numeric check compares
numbers measured in the same test (onnxruntime vs torch, distilled vs pruned), never
constants from one machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from converter.cli import main  # noqa: E402
from converter.torch.distill import DistillSettings, kd_loss  # noqa: E402
from converter.torch.shrink import ShrinkOptions, shrink  # noqa: E402
from converter.torch.structured import PruneSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# torchscript exports in a fraction of dynamo's time; the first test below uses the default
FAST = ShrinkOptions(bench_runs=0, progress=False, exporter="torchscript")

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A residual CNN: stem and block are coupled through the add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.block = nn.Conv2d(32, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.block(h))
        return self.fc(torch.relu(self.down(h)).mean((2, 3)))


class Heads(nn.Module):
    """Splits a Linear's output into 4 heads of a hard-coded width, as hand-written
    attention does: torch-pruning cannot follow the constant in reshape."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.mix = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = self.mix(torch.relu(self.inp(x)))
        h = h.reshape(x.shape[0], 4, 8).softmax(-1).reshape(x.shape[0], 32)
        return self.out(h)


def build():
    torch.manual_seed(0)
    return Net().eval()


def plain():
    """Net without BatchNorm: DDP on CPU has no SyncBatchNorm, so BN statistics are per rank."""
    net = build()
    net.bn = nn.Identity()
    return net


def heads():
    torch.manual_seed(0)
    return Heads().eval()


def not_a_module():
    return 42
'''


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nets") / "nets.py"
    path.write_text(NETS)
    return path


def _npz(path: Path, samples: int = 48, labels: bool = True, name: str = "x") -> Path:
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((samples, 1, 8, 8)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 10, samples)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _npz(tmp_path_factory.mktemp("data") / "train.npz")


def _conv_widths(path: Path) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Conv/Gemm/MatMul of an ONNX file, by initializer name."""
    model = onnx.load(str(path))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {
        name: inits[name]
        for node in model.graph.node
        if node.op_type in ("Conv", "Gemm", "MatMul")
        for name in node.input[1:2]
        if name in inits
    }


def _ort(path: Path, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# ------------------------------------------------------------------ the distillation loss


def test_kd_loss_matches_hand_computed_value():
    # student [1, 0], teacher [0, 1], T = 2: softmax(s/T) = [σ, 1-σ], softmax(t/T) = [1-σ, σ]
    # with σ = sigmoid(0.5), so KL(teacher ‖ student) = (2σ - 1) · ln(σ / (1 - σ)) = (2σ - 1)/2
    sigma = 1 / (1 + math.exp(-0.5))
    soft = (2 * sigma - 1) * 0.5 * 2**2  # × T²
    hard = math.log(1 + math.exp(-1))  # cross-entropy of [1, 0] with label 0
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    labels = torch.tensor([0])
    got = kd_loss(student, teacher, 2.0, labels, alpha=0.25)
    assert float(got) == pytest.approx(0.75 * soft + 0.25 * hard, rel=1e-6)
    assert float(kd_loss(student, teacher, 2.0, None)) == pytest.approx(soft, rel=1e-6)
    assert float(kd_loss(teacher, teacher, 4.0, None)) == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------ pruning, export, report


def test_shrink_prunes_to_multiples_of_8_and_onnx_equals_torch(nets, data, tmp_path):
    out = tmp_path / "small.onnx"
    path, report, model = shrink(
        f"{nets}:build",
        out,
        ["x:batch,1,8,8:float32"],
        data,
        distill=DistillSettings(steps=4, batch_size=16),
        options=ShrinkOptions(bench_runs=0, progress=False),
    )
    widths = _conv_widths(path)
    convs = [shape for shape in widths.values() if len(shape) == 4]
    assert convs and all(s[0] % 8 == 0 and s[1] % 8 == 0 or s[1] == 1 for s in convs)
    assert sorted(s[0] for s in convs) == [16, 16, 24]  # 32, 32, 48 halved; stem+block coupled
    assert report.params["after"] < report.params["before"] / 2
    assert report.macs["after"] < report.macs["before"] / 2
    assert report.kept_whole == ["fc"]
    x = np.random.default_rng(5).standard_normal((7, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = _ort(path, {"x": x})
    assert got.shape == (7, 10)  # the classifier keeps every class
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert all(c.ok for c in report.export.comparisons)


def test_shrink_is_deterministic(nets, data, tmp_path):
    settings = DistillSettings(steps=3, batch_size=8)
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        shrink(f"{nets}:build", out, ["x:batch,1,8,8"], data, distill=settings, options=FAST)
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_ignore_and_taylor_importance(nets, data, tmp_path):
    path, report, _ = shrink(
        f"{nets}:build",
        tmp_path / "t.onnx",
        ["x:batch,1,8,8"],
        data,
        prune=PruneSettings(keep=0.5, importance="taylor", ignore=("down",)),
        distill=DistillSettings(steps=2, batch_size=8),
        options=FAST,
    )
    out_channels = sorted(s[0] for s in _conv_widths(path).values() if len(s) == 4)
    assert out_channels == [16, 16, 48]  # down kept whole
    assert "down" in report.kept_whole
    assert report.pruned_layers["down"] == "32x48 → 16x48"  # its inputs follow the stem


def test_cli_writes_model_json_and_plot(nets, data, tmp_path, capsys):
    out, js, plot = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "loss.png"
    code = main(
        ["shrink", f"{nets}:build", "--input", "x:batch,1,8,8", "--data", str(data), "-o",
         str(out), "--steps", "3", "--batch-size", "8", "--bench-runs", "5", "--json", str(js),
         "--plot", str(plot), "--exporter", "torchscript"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(js.read_text())
    assert set(report["scores"]) == {"unpruned", "pruned", "distilled"}
    assert report["file_size"]["after"] == out.stat().st_size
    assert report["latency_ms"]["speedup"] == pytest.approx(
        report["latency_ms"]["before"] / report["latency_ms"]["after"]
    )
    assert len(report["history"]["train_loss"]) == 3
    assert plot.read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "pruned + distilled" in text and "verified vs torch" in text


# ------------------------------------------------------------------ distillation on digits


def _digits_train(tmp_path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "models"))
    import _shared

    x_tr, y_tr, _, _ = _shared.digits_split()
    path = tmp_path / "digits-train.npz"
    np.savez(path, x=(x_tr.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32), labels=y_tr)
    return path


@pytest.mark.slow
def test_distillation_recovers_digits_cnn(digits_cnn, tmp_path):
    spec = f"{ROOT}/models/digits_cnn/model.py:trained"
    path, report, _ = shrink(
        spec,
        tmp_path / "cnn-small.onnx",
        ["x:batch,1,8,8:float32"],
        _digits_train(tmp_path),
        prune=PruneSettings(keep=0.25),
        distill=DistillSettings(steps=40, lr=3e-3),
        options=FAST,
    )
    scores = report.scores
    assert scores["distilled"]["accuracy"] > scores["pruned"]["accuracy"]
    assert scores["distilled"]["cosine"] > scores["pruned"]["cosine"]
    # on the real test split, through onnxruntime: the distilled model beats the pruned
    # one's held-out accuracy measured above, and is far smaller than the reference
    with np.load(digits_cnn.test) as test:
        acc = float(np.mean(_ort(path, {"x": test["x"]}).argmax(-1) == test["labels"]))
    assert acc > scores["pruned"]["accuracy"]
    assert path.stat().st_size < digits_cnn.onnx.stat().st_size / 4


@pytest.mark.slow
def test_unlabelled_data_distills_from_the_teacher_alone(digits_cnn, tmp_path):
    _, report, _ = shrink(
        f"{ROOT}/models/digits_cnn/model.py:trained",
        tmp_path / "cnn.onnx",
        ["x:batch,1,8,8:float32"],
        digits_cnn.calib,  # 256 training samples, no labels
        prune=PruneSettings(keep=0.25),
        distill=DistillSettings(steps=30, lr=3e-3),
        options=FAST,
    )
    assert "accuracy" not in report.scores["distilled"]
    assert report.scores["distilled"]["agreement"] > report.scores["pruned"]["agreement"]


# ------------------------------------------------------------------ bad input: exit 2


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(["shrink", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--keep", "0"], "--keep 0.0 is outside (0, 1]"),
        (["--keep", "1.5"], "--keep 1.5 is outside (0, 1]"),
        (["--ignore", "nothing_here"], "match no layer"),
        (["--temperature", "0"], "--temperature 0.0 is not a finite number > 0"),
        (["--temperature", "nan"], "--temperature nan is not a finite number > 0"),
        (["--temperature", "inf"], "--temperature inf is not a finite number > 0"),
        (["--lr", "inf"], "--lr inf is not a finite number > 0 — e.g. --lr 1e-3"),
        (["--lr", "nan"], "--lr nan is not a finite number > 0"),
        (["--alpha", "nan"], "--alpha nan is not a number in [0, 1]"),
        (["--held-out", "nan"], "--held-out nan is not a number in (0, 1)"),
        (["--keep", "nan"], "--keep nan is outside (0, 1]"),
        (["--patience", "-1"], "--patience -1 is not a whole number ≥ 0"),
    ],
)
def test_bad_settings_exit_2(nets, data, tmp_path, capsys, extra, needle):
    out = tmp_path / "o.onnx"
    code, err = _cli(capsys, f"{nets}:build", "--input", "x:batch,1,8,8", "--data", data,
                     "-o", out, "--steps", "1", *extra)  # fmt: skip
    assert code == 2 and needle in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists()


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"epochs": 2.5}, "--epochs 2.5 is not a whole number ≥ 1"),
        ({"lr": "fast"}, "--lr fast is not a finite number > 0"),
        ({"temperature": True}, "--temperature True is not a finite number > 0"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_bad_input(nets, data, tmp_path, settings, needle):
    from converter.core.errors import BadInputError

    out = tmp_path / "o.onnx"
    with pytest.raises(BadInputError, match=needle):
        shrink(f"{nets}:build", out, ["x:batch,1,8,8"], data, distill=DistillSettings(**settings))
    assert not out.exists()


def test_spec_not_returning_a_module(nets, data, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = _cli(capsys, f"{nets}:not_a_module", "--input", "x:batch,1,8,8", "--data",
                     data, "-o", out)  # fmt: skip
    assert code == 2 and "not a torch.nn.Module" in err and err.count("\n") == 1
    assert not out.exists()


def test_no_samples(nets, tmp_path, capsys):
    empty = _npz(tmp_path / "empty.npz", samples=0)
    code, err = _cli(capsys, f"{nets}:build", "--input", "x:batch,1,8,8", "--data", empty,
                     "-o", tmp_path / "o.onnx")  # fmt: skip
    assert code == 2 and "no samples" in err and err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


def test_input_names_not_matching(nets, data, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, err = _cli(capsys, f"{nets}:build", "--input", "image:batch,1,8,8", "--data", data,
                     "-o", out)  # fmt: skip
    assert code == 2 and "missing inputs ['image']" in err and err.count("\n") == 1
    code, err = _cli(capsys, f"{nets}:build", "--input", "x:batch,1,8,8", "--input",
                     "y:batch,4", "--data", data, "-o", out)  # fmt: skip
    assert code == 2 and "forward takes ['x']" in err
    assert not out.exists()


def test_layer_the_library_cannot_prune_is_named(nets, tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "v.npz"
    np.savez(data, x=rng.standard_normal((16, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    args = [f"{nets}:heads", "--input", "x:batch,16", "--data", data, "-o", out, "--steps", "1",
            "--bench-runs", "0"]  # fmt: skip
    code, err = _cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1
    assert "cannot prune mix" in err and "--ignore 'mix$'" in err
    assert not out.exists()
    assert _cli(capsys, *args, "--ignore", "mix$")[0] == 0  # the suggestion works
    assert out.exists()


# ------------------------------------------------------------------ data-parallel


@pytest.mark.slow
def test_torchrun_two_processes_matches_one(nets, data, tmp_path):
    """2 ranks, each half of every global batch: the same model as one process, up to the
    float rounding of the gradient all-reduce (BatchNorm-free: on CPU, BN statistics are
    per rank, as PyTorch's SyncBatchNorm needs a GPU)."""
    args = ["shrink", f"{nets}:plain", "--input", "x:batch,1,8,8", "--data", str(data),
            "--steps", "4", "--batch-size", "16", "--bench-runs", "0", "-q",
            "--exporter", "torchscript"]  # fmt: skip
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    assert main([*args, "-o", str(one)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*torchrun, "--master-port", "29517", "-m", "converter", *args, "-o", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    x = np.random.default_rng(1).standard_normal((8, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_ort(two, {"x": x}), _ort(one, {"x": x}), atol=1e-4, rtol=1e-3)


def test_early_stopping_keeps_the_best_weights():
    """A student equal to its teacher cannot improve on step 0; a huge learning rate makes
    every step worse, so training stops after `patience` scores and restores step 0."""
    from converter.torch.distill import distill

    torch.manual_seed(0)
    teacher = torch.nn.Linear(6, 4)
    student = torch.nn.Linear(6, 4)
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(64, 6)
    train, held = {"x": x[:48]}, {"x": x[48:]}
    settings = DistillSettings(steps=50, batch_size=8, lr=10.0, patience=2)
    history = distill(student, teacher, train, held, ["x"], settings, progress=False)
    assert history.stopped_early and history.best_step == 0
    assert len(history.train_loss) < 50 and len(history.eval_loss) == 1 + settings.patience
    for got, want in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(got, want)


def test_without_torch_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from converter.cli import main\n"
        f"sys.exit(main(['shrink', 'm.py:build', '--input', 'x:1,4', '--data', 'd.npz', "
        f"'-o', {str(tmp_path / 'o.onnx')!r}]))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "pip install 'onnxship[torch,shrink]'" in run.stderr


# --- a recipe variant that starts with shrink ------------------------------------------------


def test_recipe_variant_starts_with_shrink(digits_mlp, tmp_path, capsys):
    """[[variants]] shrink = {...}: the PyTorch model is pruned and distilled, exported, then
    the variant's passes run on it; the manifest records the shrink step first."""
    import json

    from converter.cli import main
    from converter.core.runtime import make_session

    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),"
        " torch.nn.Linear(64, 10))\n"
    )
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
[model]
spec = "net.py:build"
inputs = ["x:batch,64:float32"]
[data]
validation = "{digits_mlp.test}"
[[variants]]
name = "small"
shrink = {{ keep = 0.5, data = "{digits_mlp.calib}", steps = 3, batch_size = 32 }}
passes = [{{ pass = "quantize", mode = "dynamic" }}]
[bench]
runs = 5
warmup = 1
""")
    assert main(["-q", "run", str(recipe), "-o", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    steps = [p["pass"] for p in manifest["artifacts"]["small"]["passes"]]
    assert steps == ["shrink", "quantize-dynamic"]
    params = manifest["artifacts"]["small"]["passes"][0]["stats"]["params"]
    assert params["after"] < params["before"]
    shrunk = onnx.load(str(tmp_path / "o" / "small.shrunk.onnx"))
    hidden = [t for t in shrunk.graph.initializer if len(t.dims) == 2 and 10 not in t.dims]
    assert hidden and all(d % 8 == 0 for t in hidden for d in t.dims)
    x = np.load(digits_mlp.test)["x"][:4]
    assert make_session(tmp_path / "o" / "small.onnx").run(None, {"x": x})[0].shape == (4, 10)
    recipe.write_text(recipe.read_text().replace("steps = 3", "stepz = 3"))
    assert main(["-q", "run", str(recipe), "-o", str(tmp_path / "o2")]) == 2
    assert "unknown key(s) ['stepz']" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "fp32.onnx").exists()  # refused before anything ran
