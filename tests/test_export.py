"""`onnxship export`: verified export of the reference models, an off-the-shelf-style CNN
and a transformers BERT encoder, and every bad input of the export issue."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from converter.cli import main
from converter.core.runtime import make_session
from converter.torch.export import export
from converter.torch.verify import compare_outputs

ROOT = Path(__file__).resolve().parent.parent

TINY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(x).relu()

def build():
    torch.manual_seed(0)
    return Net()

def not_a_module():
    return 42

class Counter(nn.Module):
    # Python state baked in at trace time: torch and ONNX disagree after the first call.
    def __init__(self):
        super().__init__()
        self.calls = 0
    def forward(self, x):
        self.calls += 1
        return x * self.calls

def counter():
    return Counter()

class Eig(nn.Module):
    def forward(self, x):
        return torch.linalg.eig(x)[0].real

def eig():
    return Eig()

class Branchy(nn.Module):
    # Data-dependent control flow: a trace keeps only the branch the example took.
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return -self.a(x)

def branchy():
    torch.manual_seed(0)
    return Branchy()

class SameBranch(Branchy):
    def forward(self, x):
        if x.abs().sum() >= 0:  # data-dependent for the tracer, but true for every input
            return self.a(x)
        return -self.a(x)

def same_branch():
    torch.manual_seed(0)
    return SameBranch()

class Dicty(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
    def forward(self, x):
        y = self.a(x)
        return {"logits": y, "aux": y.sum(-1)}

def dicty():
    torch.manual_seed(0)
    return Dicty()

import collections
Pair = collections.namedtuple("Pair", ["scores", "hidden"])

class Named(Dicty):
    def forward(self, x):
        y = self.a(x)
        return Pair(y, {"twice": y * 2, "half": y / 2})

def named():
    torch.manual_seed(0)
    return Named()
"""


@pytest.fixture()
def user_code(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(TINY)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def torch_vs_onnx(model: torch.nn.Module, path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Max abs diff between torch and onnxruntime on ``feeds``."""
    with torch.no_grad():
        want = model(*(torch.from_numpy(a) for a in feeds.values()))
    got = make_session(path).run(None, feeds)[0]
    assert got.shape == tuple(want.shape)
    return float(np.abs(got - want.numpy()).max())


# --- working exports -------------------------------------------------------------------


def test_export_tiny_reports_and_verifies(user_code: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "net.onnx"
    code, stdout, _ = run_cli(
        capsys, "export", f"{user_code}:build", "-o", str(out), "--input", "x:batch,4:float32"
    )
    assert code == 0
    assert "dynamo exporter, opset 18" in stdout
    assert "x[batch,4] float32" in stdout and "output[batch,3] float32" in stdout
    assert "max abs" in stdout and "(batch=3)" in stdout
    for case in ("the example input", "the example negated", "new random values"):
        assert f"verified on {case}" in stdout
    model = onnx.load(str(out))
    assert not Path(str(out) + ".data").exists()  # weights inline
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sys.path.insert(0, str(user_code.parent))
    net = __import__("net").build().eval()
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        assert torch_vs_onnx(net, out, {"x": x}) < 1e-5


def test_same_options_give_same_bytes(user_code: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export(f"{user_code}:build", a, ["x:batch,4"])
    export(f"{user_code}:build", b, ["x:batch,4"])
    assert a.read_bytes() == b.read_bytes()


def test_torchscript_exporter_and_weights(user_code: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(user_code.parent))
    net = __import__("net").build()
    with torch.no_grad():
        net.fc.weight.mul_(3.0)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    path, report = export(
        f"{user_code}:build",
        tmp_path / "n.onnx",
        ["x:batch,4"],
        weights=tmp_path / "w.pt",
        exporter="torchscript",
    )
    assert report.exporter == "torchscript" and report.parameters == 15
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert torch_vs_onnx(net.eval(), path, {"x": x}) < 1e-5


def test_example_npz_is_traced_and_verified(user_code: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    np.savez(tmp_path / "ex.npz", x=x)
    result = export(
        f"{user_code}:build", tmp_path / "n.onnx", ["x:batch,4"], example=tmp_path / "ex.npz"
    )
    first = result.report.comparisons[0]
    assert first.outputs[0].shape == (6, 3) and first.ok
    assert result.report.comparisons[-1].outputs[0].shape == (5, 3)  # the resized input


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp"])
def test_reference_digits_models(name: str, request) -> None:
    ref = request.getfixturevalue(name)
    sys.path.insert(0, str(ROOT / "models"))
    module = _load_model_module(name)
    model = module.trained()
    test = np.load(ref.test)
    for batch in (1, 7):
        assert torch_vs_onnx(model, ref.onnx, {"x": test["x"][:batch]}) < 1e-4
    logits = make_session(ref.onnx).run(None, {"x": test["x"]})[0]
    onnx_acc = float((logits.argmax(1) == test["labels"]).mean())
    assert onnx_acc == pytest.approx(module.test_accuracy(model), abs=1e-9)
    assert onnx_acc > 0.95


def test_reference_encoder_two_batches_two_lengths(tiny_encoder) -> None:
    model = _load_model_module("tiny_encoder").trained()
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 8), (3, 64)):
        ids = rng.integers(1, 18, (batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[:, seq // 2 :] = rng.integers(0, 2, (batch, seq - seq // 2))
        diff = torch_vs_onnx(model, tiny_encoder.onnx, {"input_ids": ids, "attention_mask": mask})
        assert diff < 1e-4


def _load_model_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"ref_{name}", ROOT / "models" / name / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESNET = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))
    def forward(self, x):
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))

class ResNet18(nn.Module):
    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for j in range(2):
                layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
    def forward(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
        return self.fc(torch.flatten(pooled, 1))

def build():
    torch.manual_seed(0)
    m = ResNet18()
    for mod in m.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m
"""


def test_resnet18_shaped_cnn(tmp_path: Path) -> None:
    (tmp_path / "resnet.py").write_text(RESNET)
    path, report = export(
        f"{tmp_path}/resnet.py:build", tmp_path / "r.onnx", ["image:batch,3,64,64"]
    )
    assert report.exporter == "dynamo"
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"Conv", "MaxPool"}
    assert [c.ok for c in report.comparisons] == [True] * 4  # example, negated, random, batch 3


BERT = """
import torch
from transformers import BertConfig, BertModel

class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=64)
        torch.manual_seed(0)
        self.bert = BertModel(config, add_pooling_layer=True)
    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, out.pooler_output

def build():
    return Encoder()
"""


def test_transformers_bert_two_batches_two_lengths(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "bert.py").write_text(BERT)
    path, report = export(
        f"{tmp_path}/bert.py:build",
        tmp_path / "bert.onnx",
        ["input_ids:batch,seq:int64", "attention_mask:batch,seq:int64"],
        output_names=["last_hidden_state", "pooler_output"],
        dims={"seq": 8},
    )
    assert [c.ok for c in report.comparisons] == [True] * 3  # example, random ids, resized
    labels = [c.label for c in report.comparisons]
    assert "batch=3, seq=7" in labels[-1]
    assert [o.name for o in onnx.load(str(path)).graph.output] == [
        "last_hidden_state",
        "pooler_output",
    ]


def test_cli_without_torch_gives_clear_error(tmp_path: Path, user_code: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from converter.cli import main\n"
        f"sys.exit(main(['export', '{user_code}:build', '-o', '{tmp_path}/a.onnx',"
        " '--input', 'x:batch,4']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: export needs PyTorch")
    assert "pip install 'onnxship[torch]'" in proc.stderr


# --- bad input: exit 2 (or 1 for a failed verification), one line, no output ------------


def _bad(capsys, tmp_path: Path, argv: list[str], code: int = 2) -> str:
    out = tmp_path / "out.onnx"
    got, _, err = run_cli(capsys, "export", *argv, "-o", str(out))
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    return lines[0]


def test_missing_spec_file(capsys, tmp_path: Path) -> None:
    msg = _bad(capsys, tmp_path, [f"{tmp_path}/nope.py:build", "--input", "x:2,4"])
    assert "does not exist" in msg


def test_spec_without_callable_part(capsys, tmp_path: Path, user_code: Path) -> None:
    assert "bad model SPEC" in _bad(capsys, tmp_path, [str(user_code), "--input", "x:2,4"])


def test_unimportable_spec_file(capsys, tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import torch\nraise ValueError('boom at import')\n")
    msg = _bad(capsys, tmp_path, [f"{tmp_path}/broken.py:build", "--input", "x:2,4"])
    assert "importing" in msg and "boom at import" in msg


@pytest.mark.parametrize("where", ["import", "call"])
def test_a_module_the_user_code_lacks_says_install_it(capsys, tmp_path: Path, where) -> None:
    """A package the model's code imports and this Python lacks (resemblyzer needs webrtcvad,
    facenet-pytorch torchvision) is to be installed, not a file to fix."""
    missing = "import onnxship_no_such_module"
    top, inside = (missing, "") if where == "import" else ("", missing)
    lines = [
        "import torch",
        top,
        "",
        "def build():",
        f"    {inside}",
        "    return torch.nn.Linear(4, 2)",
    ]
    (tmp_path / "needs.py").write_text("\n".join(lines) + "\n")
    msg = _bad(capsys, tmp_path, [f"{tmp_path}/needs.py:build", "--input", "x:2,4"])
    assert "No module named 'onnxship_no_such_module'" in msg
    assert "install the package that provides 'onnxship_no_such_module'" in msg


def test_missing_callable_names_the_ones_there(capsys, tmp_path: Path, user_code: Path) -> None:
    msg = _bad(capsys, tmp_path, [f"{user_code}:buld", "--input", "x:2,4"])
    assert "no callable 'buld'" in msg and "build" in msg


def test_callable_not_returning_module(capsys, tmp_path: Path, user_code: Path) -> None:
    msg = _bad(capsys, tmp_path, [f"{user_code}:not_a_module", "--input", "x:2,4"])
    assert "returned int, not a torch.nn.Module" in msg


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("x", "bad --input"),
        ("x:2,,4", "bad dimension"),
        ("x:2,4:float33", "unknown dtype"),
        ("x:2,-4", "bad dimension"),
        ("x:b-1,4", "bad dimension"),
    ],
)
def test_bad_input_syntax(capsys, tmp_path, user_code, spec, expected) -> None:
    assert expected in _bad(capsys, tmp_path, [f"{user_code}:build", "--input", spec])


def test_weights_not_a_state_dict(capsys, tmp_path: Path, user_code: Path) -> None:
    torch.save([torch.zeros(3)], tmp_path / "w.pt")
    msg = _bad(
        capsys,
        tmp_path,
        [f"{user_code}:build", "--input", "x:2,4", "--weights", str(tmp_path / "w.pt")],
    )
    assert "not a state_dict" in msg


@pytest.mark.parametrize("layout", ["training", "dataparallel"])
def test_weights_of_a_training_or_dataparallel_checkpoint(user_code, tmp_path, layout) -> None:
    """The state_dict inside a training checkpoint (resemblyzer ships {"model_state": ...,
    "optimizer_state": ..., "step": ...}) and keys that torch.nn.DataParallel prefixed with
    "module." (easyocr's CRAFT) load as the model's own."""
    sys.path.insert(0, str(user_code.parent))
    net = __import__("net").build()
    with torch.no_grad():
        net.fc.weight.mul_(3.0)
    state = net.state_dict()
    if layout == "training":
        saved = {"model_state": state, "optimizer_state": {"lr": 0.1, "state": {}}, "step": 7}
    else:
        saved = {f"module.{k}": v for k, v in state.items()}
    torch.save(saved, tmp_path / "w.pt")
    path, _ = export(
        f"{user_code}:build", tmp_path / "n.onnx", ["x:batch,4"], weights=tmp_path / "w.pt"
    )
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    assert torch_vs_onnx(net.eval(), path, {"x": x}) < 1e-5


def test_weights_with_two_state_dicts_name_them(capsys, tmp_path: Path, user_code: Path) -> None:
    state = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}
    torch.save({"model": state, "ema": dict(state)}, tmp_path / "w.pt")
    msg = _bad(
        capsys,
        tmp_path,
        [f"{user_code}:build", "--input", "x:2,4", "--weights", str(tmp_path / "w.pt")],
    )
    assert "holds 2 state_dicts (ema, model)" in msg and "checkpoint[KEY]" in msg


def test_weights_not_a_checkpoint(capsys, tmp_path: Path, user_code: Path) -> None:
    (tmp_path / "w.pt").write_text("hello")
    msg = _bad(
        capsys,
        tmp_path,
        [f"{user_code}:build", "--input", "x:2,4", "--weights", str(tmp_path / "w.pt")],
    )
    assert "not a PyTorch checkpoint" in msg


def test_weights_that_do_not_match_name_the_keys(capsys, tmp_path, user_code) -> None:
    state = {"fc.weight": torch.zeros(3, 5), "head.bias": torch.zeros(3)}
    torch.save(state, tmp_path / "w.pt")
    msg = _bad(
        capsys,
        tmp_path,
        [f"{user_code}:build", "--input", "x:2,4", "--weights", str(tmp_path / "w.pt")],
    )
    assert "missing keys [fc.bias]" in msg
    assert "unexpected keys [head.bias]" in msg
    assert "fc.weight (3, 5) vs model (3, 4)" in msg


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_refused_never_executed(capsys, tmp_path, user_code) -> None:
    marker = tmp_path / "executed"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": _Evil(str(marker))}, f)
    msg = _bad(
        capsys,
        tmp_path,
        [f"{user_code}:build", "--input", "x:2,4", "--weights", str(tmp_path / "evil.pt")],
    )
    assert "refused" in msg
    assert not marker.exists()


def test_output_equal_to_input(capsys, tmp_path: Path, user_code: Path) -> None:
    code, _, err = run_cli(
        capsys, "export", f"{user_code}:build", "--input", "x:2,4", "-o", str(user_code)
    )
    assert code == 2 and "is also an input" in err
    assert user_code.read_text() == TINY


def test_output_folder_missing(capsys, tmp_path: Path, user_code: Path) -> None:
    code, _, err = run_cli(
        capsys,
        "export",
        f"{user_code}:build",
        "--input",
        "x:2,4",
        "-o",
        str(tmp_path / "no" / "such" / "m.onnx"),
    )
    assert code == 2 and "does not exist" in err and "mkdir -p" in err


def test_output_folder_not_writable(capsys, tmp_path: Path, user_code: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if (folder / "probe").exists() or _can_write(folder):
            pytest.skip("running as a user that ignores permissions (root)")
        code, _, err = run_cli(
            capsys, "export", f"{user_code}:build", "--input", "x:2,4", "-o", str(folder / "m.onnx")
        )
        assert code == 2 and "not writable" in err
    finally:
        folder.chmod(0o700)


def _can_write(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("")
        (folder / "probe").unlink()
        return True
    except OSError:
        return False


def test_unwritable_output_path_is_a_file_parent(capsys, tmp_path: Path, user_code) -> None:
    (tmp_path / "afile").write_text("")
    code, _, err = run_cli(
        capsys,
        "export",
        f"{user_code}:build",
        "--input",
        "x:2,4",
        "-o",
        str(tmp_path / "afile" / "m.onnx"),
    )
    assert code == 2 and err.startswith("error: output folder")


def test_model_neither_exporter_handles(capsys, tmp_path: Path, user_code: Path) -> None:
    msg = _bad(capsys, tmp_path, [f"{user_code}:eig", "--input", "x:batch,4,4"])
    assert "dynamo: op aten.linalg_eig" in msg
    assert "torchscript: op aten::linalg_eig" in msg


def test_verification_mismatch_is_exit_1_and_writes_nothing(capsys, tmp_path, user_code):
    msg = _bad(capsys, tmp_path, [f"{user_code}:counter", "--input", "x:batch,4"], code=1)
    assert "ONNX outputs differ from PyTorch" in msg
    assert "max abs diff" in msg and "atol" in msg
    # Python state: every call after the first differs, from the second input on
    assert "the example negated: output: 8 of 8 values outside tolerance" in msg
    assert "a resized input (batch=3): output: 12 of 12 values outside tolerance" in msg


def test_no_verify_says_so_loudly(capsys, tmp_path: Path, user_code: Path) -> None:
    out = tmp_path / "c.onnx"
    code, stdout, err = run_cli(
        capsys,
        "export",
        f"{user_code}:counter",
        "--input",
        "x:batch,4",
        "-o",
        str(out),
        "--no-verify",
    )
    assert code == 0 and out.exists()
    assert "VERIFICATION SKIPPED" in stdout and "NOT compared" in err


def test_example_with_size_one_dynamic_axis(capsys, tmp_path: Path, user_code: Path) -> None:
    np.savez(tmp_path / "one.npz", x=np.zeros((1, 4), np.float32))
    msg = _bad(
        capsys,
        tmp_path,
        [f"{user_code}:build", "--input", "x:batch,4", "--example", str(tmp_path / "one.npz")],
    )
    assert "size < 2" in msg


def test_example_that_does_not_fit(capsys, tmp_path: Path, user_code: Path) -> None:
    np.savez(tmp_path / "ex.npz", y=np.zeros((3, 5), np.int64))
    msg = _bad(
        capsys,
        tmp_path,
        [f"{user_code}:build", "--input", "x:batch,4", "--example", str(tmp_path / "ex.npz")],
    )
    assert "missing inputs ['x']" in msg


def test_debug_shows_traceback(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(
        capsys,
        "export",
        f"{tmp_path}/nope.py:build",
        "--input",
        "x:2,4",
        "-o",
        str(tmp_path / "o.onnx"),
        "--debug",
    )
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: model file")


def test_help_does_not_import_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "converter", "--help"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "export" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "onnxruntime" not in imported


# --- traced branches and output names ---------------------------------------------------


def test_data_dependent_branch_is_refused_naming_the_line(capsys, tmp_path, user_code):
    """The tracer froze `if x.sum() > 0`: exit 1, the user's line named, nothing written."""
    out = tmp_path / "b.onnx"
    code, _, err = run_cli(
        capsys, "export", f"{user_code}:branchy", "--input", "x:4", "-o", str(out)
    )
    assert code == 1 and not out.exists() and "Traceback" not in err
    assert "dynamo exporter failed" in err  # the fallback is said, then the refusal
    msg = err.strip().splitlines()[-1]
    assert msg.startswith("error: the exported graph may be wrong for inputs")
    line = next(i for i, text in enumerate(TINY.splitlines(), 1) if "if x.sum() > 0" in text)
    assert f"{user_code}:{line}: if x.sum() > 0:" in msg
    assert "--accept-traced-branches" in msg


def test_accepted_traced_branch_is_still_verified(capsys, tmp_path, user_code):
    out = tmp_path / "b.onnx"
    argv = ["export", f"{user_code}:branchy", "--input", "x:batch,4", "-o", str(out)]
    code, _, err = run_cli(capsys, *argv, "--accept-traced-branches")
    # accepted, but the negated example takes the other branch: verification catches it
    assert code == 1 and not out.exists()
    assert "the example negated: output" in err
    argv[1] = f"{user_code}:same_branch"
    code, stdout, err = run_cli(capsys, *argv, "--accept-traced-branches")
    assert code == 0 and out.exists()
    assert "accepted traced branches" in stdout and "torchscript" in stdout
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    sys.path.insert(0, str(user_code.parent))
    assert torch_vs_onnx(__import__("net").same_branch().eval(), out, {"x": x}) < 1e-5


def test_dict_and_namedtuple_outputs_keep_their_names(capsys, tmp_path, user_code):
    for spec, names in (
        ("dicty", ["logits", "aux"]),
        ("named", ["scores", "hidden.twice", "hidden.half"]),
    ):
        out = tmp_path / f"{spec}.onnx"
        export(f"{user_code}:{spec}", out, ["x:batch,4:float32"])
        assert [o.name for o in onnx.load(str(out)).graph.output] == names
    out = tmp_path / "renamed.onnx"
    export(f"{user_code}:dicty", out, ["x:batch,4:float32"], output_names=["y", "s"])
    x = np.ones((2, 4), np.float32)
    got = dict(zip(["y", "s"], make_session(out).run(["y", "s"], {"x": x})))
    assert got["s"] == pytest.approx(got["y"].sum(-1), abs=1e-5)


def test_wrong_number_of_output_names(capsys, tmp_path, user_code):
    msg = _bad(
        capsys, tmp_path, [f"{user_code}:dicty", "--input", "x:batch,4", "--output-name", "a"]
    )
    assert "1 --output-name given (a) for a model with 2 outputs (logits, aux)" in msg


def test_verification_reports_its_rule_and_how_close_each_output_came():
    want = [np.array([1.0, 2.0, 0.0])]
    near = compare_outputs("x", ["y"], [np.array([1.0, 2.0001, 0.00005])], ["y"], want, 1e-4, 1e-4)
    far = compare_outputs("x", ["y"], [np.array([1.0, 2.0005, 0.0])], ["y"], want, 1e-4, 1e-4)
    assert near.ok and near.outputs[0].worst_ratio == pytest.approx(0.5)  # 5e-5 / 1e-4
    assert not far.ok
    assert far.outputs[0].worst_ratio == pytest.approx(5e-4 / 3e-4, rel=1e-6)  # 1e-4 + 1e-4·2


@pytest.mark.parametrize("flag", [("--atol", "nan"), ("--rtol", "nan"), ("--atol=-1e-3",)])
def test_tolerance_that_is_not_a_number_at_least_zero(capsys, tmp_path, user_code, flag) -> None:
    """NaN compared False with 0 and passed the check; every comparison with it fails."""
    msg = _bad(capsys, tmp_path, [f"{user_code}:build", "--input", "x:2,4", *flag])
    assert "tolerances must be numbers ≥ 0" in msg
