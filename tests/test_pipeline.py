"""`onnxship run`: recipes, artifacts, manifest, report, determinism and recipe errors."""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import two_matmul_mlp

from converter.cli import main
from converter.core.gates import ScoreLimits
from converter.core.machine import machine, machine_line
from converter.core.metrics import accuracy
from converter.core.runtime import make_session


def write_recipe(folder: Path, ref, variants: str, gates: str = "max_drop = 0.02") -> Path:
    recipe = folder / "recipe.toml"
    recipe.write_text(f"""
name = "t"
[model]
onnx = "{ref.onnx}"
[data]
calibration = "{ref.calib}"
validation = "{ref.test}"
{variants}
[gates]
{gates}
[bench]
runs = 20
warmup = 2
""")
    return recipe


VARIANTS = """
[[variants]]
name = "pruned"
passes = [{ pass = "prune", sparsity = 0.3 }]
[[variants]]
name = "int8"
passes = [{ pass = "quantize", mode = "static" }]
[[variants]]
name = "dyn"
passes = [{ pass = "quantize", mode = "dynamic" }]
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mlp_run(digits_mlp, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    recipe = write_recipe(folder, digits_mlp, VARIANTS)
    assert main(["-q", "run", str(recipe), "-o", str(folder / "out")]) == 0
    return folder / "out", recipe


def test_run_writes_every_artifact_with_matching_hashes(mlp_run) -> None:
    out, _ = mlp_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"fp32", "pruned", "int8", "dyn"}
    for entry in manifest["artifacts"].values():
        path = out / entry["path"]
        assert entry["sha256"] == sha(path) and entry["size"] == path.stat().st_size
    assert manifest["versions"]["onnxruntime"] and manifest["machine"]["cpu"]
    assert "vnni" in manifest["machine"]
    assert manifest["recipe"]["variants"][0]["passes"][0]["sparsity"] == 0.3
    for name in ("report.md", "report.html", "size.png", "latency.png", "accuracy_vs_latency.png"):
        assert (out / name).stat().st_size > 0
    line = f"Machine: {machine_line(manifest['machine'])}."  # the one rendering, in both
    assert line in (out / "report.md").read_text() and line in (out / "report.html").read_text()


def test_run_numbers_match_onnxruntime(mlp_run, digits_mlp) -> None:
    out, _ = mlp_run
    manifest = json.loads((out / "manifest.json").read_text())
    test = np.load(digits_mlp.test)
    for name in ("fp32", "int8"):
        logits = make_session(out / f"{name}.onnx").run(None, {"x": test["x"]})[0]
        reported = manifest["validation"][name]["outputs"]["output"]["accuracy"]["value"]
        assert reported == pytest.approx(accuracy(logits, test["labels"]))
    stats = manifest["artifacts"]["pruned"]["passes"][0]["stats"]
    assert stats["sparsity"] == pytest.approx(0.3, abs=0.005)
    report = (out / "report.md").read_text()
    assert re.search(r"^\| (\*\*)?int8(\*\*)? ", report, re.M) and "speedup" in report
    assert manifest["validation"]["int8"]["passed"] is True


def test_rerun_reproduces_artifact_hashes(mlp_run, tmp_path: Path) -> None:
    out, recipe = mlp_run
    assert main(["-q", "run", str(recipe), "-o", str(tmp_path / "again")]) == 0
    first = json.loads((out / "manifest.json").read_text())["artifacts"]
    second = json.loads((tmp_path / "again" / "manifest.json").read_text())["artifacts"]
    assert {k: v["sha256"] for k, v in first.items()} == {k: v["sha256"] for k, v in second.items()}


def test_run_from_pytorch_spec(tmp_path: Path, digits_mlp) -> None:
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),"
        " torch.nn.Linear(32, 10))\n"
    )
    (tmp_path / "recipe.toml").write_text(f"""
[model]
spec = "net.py:build"
inputs = ["x:batch,64:float32"]
[data]
validation = "{digits_mlp.test}"
[[variants]]
name = "dyn"
passes = [{{ pass = "quantize", mode = "dynamic" }}]
[bench]
runs = 5
warmup = 1
""")
    assert main(["-q", "run", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["export"]["exporter"] == "dynamo"
    assert manifest["versions"]["torch"].startswith("2.")
    assert manifest["validation"]["dyn"]["outputs"]["output"]["cosine"]["value"] > 0.99


def test_failed_gate_is_exit_1_with_report(digits_mlp, tmp_path: Path, capsys) -> None:
    variants = '[[variants]]\nname = "gutted"\npasses = [{ pass = "prune", sparsity = 0.97 }]\n'
    recipe = write_recipe(tmp_path, digits_mlp, variants, gates="max_drop = 0.001")
    code = main(["-q", "run", str(recipe), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "gutted" in err and "accuracy drop" in err
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "gutted.onnx").exists()


VARIANT = '[model]\nonnx = "M"\n[[variants]]\nname = "v"\npasses = ['


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('colour = "red"\n[model]\nonnx = "M"', "unknown key(s) ['colour']"),
        ('[model]\nonnx = "M"\nweight = "w.pt"', "unknown key(s) ['weight'] in recipe [model]"),
        (
            '[model]\nonnx = "M"\n[bench]\nthread = [1]',
            "unknown key(s) ['thread'] in recipe [bench]",
        ),
        ('[model]\nonnx = "missing.onnx"', "does not exist"),
        ('[model]\nspec = "net.py:build"', "has `spec` but no `inputs`"),
        (
            VARIANT + '{ pass = "prune", spars = 0.5 }]',
            "unknown setting(s) ['spars'] for pass prune",
        ),
        (
            VARIANT + '{ pass = "prune", sparsity = 1.5 }]',
            "outside [0, 1)",
        ),
        (
            VARIANT + '{ pass = "shrink" }]',
            "unknown pass 'shrink'",
        ),
        (
            VARIANT + '{ pass = "quantize", mode = "static" }]',
            "needs calibration data",
        ),
        ('[model\nonnx = "M"', "not valid TOML"),
        # the score limits' ranges (converter.core.gates.ScoreLimits), named by recipe key
        ('[model]\nonnx = "M"\n[gates]\nmax_drop = 1.5', "recipe [gates] max_drop 1.5 is outside"),
        ('[model]\nonnx = "M"\n[gates]\nmax_drop = -0.01', "max_drop -0.01 is outside [0, 1]"),
        ('[model]\nonnx = "M"\n[gates]\nmin_score = "high"', "[gates] min_score high is outside"),
        ('[model]\nonnx = "M"\n[gates]\nmin_worst = 2', "[gates] min_worst 2 is outside [-1, 1]"),
    ],
)
def test_recipe_errors_are_exit_2_naming_the_key(text, expected, digits_mlp, tmp_path, capsys):
    (tmp_path / "r.toml").write_text(text.replace('"M"', f'"{digits_mlp.onnx}"'))
    code = main(["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not list((tmp_path / "out").glob("*.onnx")) if (tmp_path / "out").exists() else True


def test_missing_data_file_names_the_step(digits_mlp, tmp_path: Path, capsys) -> None:
    (tmp_path / "r.toml").write_text(
        f'[model]\nonnx = "{digits_mlp.onnx}"\n[data]\nvalidation = "nope.npz"\n'
    )
    code = main(["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "step 'validate' failed (done: export fp32 reference" in err
    assert "nope.npz does not exist" in err
    assert (tmp_path / "out" / "fp32.onnx").exists()  # artifacts of done steps are kept


def test_every_bundled_recipe_loads() -> None:
    from converter.recipes.schema import load_recipe

    root = Path(__file__).resolve().parent.parent / "models"
    recipes = sorted(root.glob("*/recipe.toml"))
    assert {r.parent.name for r in recipes} == {"digits_cnn", "digits_mlp", "tiny_encoder"}
    for path in recipes:
        recipe = load_recipe(path)
        assert Path(recipe.model.spec.rpartition(":")[0]).is_file()
        assert len(recipe.variants) >= 2


def test_run_without_labels_scores_fidelity_only(digits_mlp, tmp_path: Path) -> None:
    """Validation data without `labels`: variants are scored against fp32 only, and the
    report says so; gates read agreement (max_drop = 1 − agreement) and cosine."""
    np.savez(tmp_path / "unlabelled.npz", x=np.load(digits_mlp.test)["x"])
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
name = "nolabels"
target = "avx2"
[model]
onnx = "{digits_mlp.onnx}"
[data]
calibration = "{digits_mlp.calib}"
validation = "{tmp_path / "unlabelled.npz"}"
[[variants]]
name = "int8"
passes = [{{ pass = "quantize", mode = "static" }}]
[gates]
max_drop = 0.05
min_worst = 0.5
[bench]
runs = 5
warmup = 1
""")
    assert main(["-q", "run", str(recipe), "-o", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert "fp32" not in manifest["validation"]  # nothing to score the reference against
    scored = manifest["validation"]["int8"]["outputs"]["output"]
    assert set(scored) == {"agreement", "cosine"}
    x = np.load(tmp_path / "unlabelled.npz")["x"]
    got = make_session(tmp_path / "o" / "int8.onnx").run(None, {"x": x})[0]
    want = make_session(digits_mlp.onnx).run(None, {"x": x})[0]
    assert scored["agreement"]["value"] == pytest.approx((got.argmax(1) == want.argmax(1)).mean())
    assert (
        "no labels" in manifest["scoring"]
        and "no labels" in (tmp_path / "o" / "report.md").read_text()
    )
    # the recipe's target reached the pass and the model
    stats = manifest["artifacts"]["int8"]["passes"][0]["stats"]
    assert stats["target"]["target"] == "avx2" and manifest["target"]["target"] == "avx2"


def test_recipe_with_an_unknown_target_fails_before_running(digits_mlp, tmp_path, capsys) -> None:
    recipe = write_recipe(tmp_path, digits_mlp, VARIANTS)
    recipe.write_text('target = "sse2"\n' + recipe.read_text())
    assert main(["-q", "run", str(recipe), "-o", str(tmp_path / "o")]) == 2
    assert "unknown target 'sse2'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_recipe_accuracy_gate_without_labels_is_bad_input(digits_mlp, tmp_path, capsys) -> None:
    np.savez(tmp_path / "unlabelled.npz", x=np.load(digits_mlp.test)["x"])
    recipe = write_recipe(tmp_path, digits_mlp, VARIANTS, gates='metrics = ["accuracy"]')
    text = recipe.read_text().replace(str(digits_mlp.test), str(tmp_path / "unlabelled.npz"))
    recipe.write_text(text)
    assert main(["-q", "run", str(recipe), "-o", str(tmp_path / "o")]) == 2
    assert "has no `labels`" in capsys.readouterr().err


# --- the report as a person reads it -------------------------------------------------------


class _Page(HTMLParser):
    """Collects the open/close balance of non-void tags, image sources and links."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sources: list[str] = []
        self.recommended_rows = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
        if attrs.get("href") or (tag == "script" and attrs.get("src")):
            self.sources.append(attrs.get("href") or attrs["src"])
        if tag == "tr" and attrs.get("class") == "recommended":
            self.recommended_rows += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_html_report_is_well_formed_and_self_contained(mlp_run) -> None:
    out, _ = mlp_run
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert page.errors == [] and page.stack == []
    assert len(page.sources) == 3  # the three plots, embedded
    assert all(src.startswith("data:image/png;base64,") for src in page.sources)
    assert page.recommended_rows == 1
    assert "Recommended:" in (out / "report.md").read_text()


def _row(name, speedup, gates="pass", size=1.0, accuracy=0.9):
    return {"name": name, "speedup": speedup, "gates": gates, "size_mb": size,
            "size_ratio": size, "accuracy": accuracy, "cosine": None}  # fmt: skip


def test_recommended_is_the_fastest_within_the_gates() -> None:
    from converter.recipes.report import recommended

    fp32 = _row("fp32", 1.0, gates="—", size=4.0)
    rows = [fp32, _row("a", 1.5), _row("b", 2.0, gates="FAIL"), _row("c", 1.45, size=0.5)]
    best, why = recommended(rows)
    assert best["name"] == "c"  # within 5 % of the fastest passing one, and smaller
    assert "1.45x fp32" in why and "accuracy 0.9000 (fp32 0.9000)" in why
    assert recommended([fp32, _row("b", 2.0, gates="FAIL")]) == (
        None,
        "no variant passes the gates: ship fp32",
    )


def test_score_plot_has_one_named_point_per_model() -> None:
    pytest.importorskip("matplotlib")
    from converter.recipes.report import score_vs_latency

    rows = [
        {"name": n, "p50_ms": t, "accuracy": a}
        for n, t, a in (("fp32", 1.0, 0.98), ("int8", 0.5, 0.98), ("pruned", 0.99, 0.97))
    ]
    ax = score_vs_latency(rows, "accuracy").axes[0]
    assert len(ax.collections) == 3
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [
        (1.0, 0.98),
        (0.5, 0.98),
        (0.99, 0.97),
    ]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fp32", "int8", "pruned"]
    assert "latency" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()


def test_manifest_base_hashes_each_artifact(tmp_path: Path) -> None:
    from converter.recipes.manifest import manifest_base

    (tmp_path / "sub").mkdir()
    a, b, c = tmp_path / "a.bin", tmp_path / "sub" / "b.bin", tmp_path / "c.onnx"
    a.write_bytes(b"first")
    b.write_bytes(b"second, longer")
    model = two_matmul_mlp(np.random.default_rng(0))
    onnx.save(model, c, save_as_external_data=True, location="w.data", size_threshold=0)
    target = {"target": "avx2"}
    base = manifest_base(tmp_path, {"a": a, "b": b, "c": c}, target, with_torch=False)
    assert set(base) == {"onnxship", "versions", "machine", "target", "artifacts"}
    data = tmp_path / "w.data"
    assert base["artifacts"] == {
        "a": {"path": "a.bin", "sha256": sha(a), "size": 5},
        "b": {"path": "sub/b.bin", "sha256": sha(b), "size": 14},
        "c": {  # a model's external data is hashed with it
            "path": "c.onnx",
            "sha256": sha(c),
            "size": c.stat().st_size,
            "external_data": [
                {"path": "w.data", "sha256": sha(data), "size": (32 * 64 + 64 * 10) * 4}
            ],
        },
    }
    assert base["target"] == target and base["machine"] == machine()
    assert "torch" not in base["versions"] and base["versions"]["onnxruntime"]


def test_recipe_gates_are_score_limits(digits_mlp, tmp_path: Path) -> None:
    from converter.recipes.schema import load_recipe

    gates = 'max_drop = 0.02\nmin_worst = 0.9\nmetrics = ["accuracy", "cosine"]'
    recipe = load_recipe(write_recipe(tmp_path, digits_mlp, VARIANTS, gates=gates))
    g = recipe.gates
    assert isinstance(g, ScoreLimits) and g.metrics == ["accuracy", "cosine"]
    assert (g.min_score, g.max_drop, g.min_worst) == (None, 0.02, 0.9)
    checked = g.gates("out", ("accuracy", 0.95), ("accuracy", 0.03, ""), (0.95, ""))
    assert [(x.name, x.threshold, x.passed) for x in checked] == [
        ("max-drop", 0.02, False),
        ("min-worst", 0.9, True),
    ]
    plain = recipe.resolved()["gates"]
    assert plain == {"metrics": ["accuracy", "cosine"], "min_score": None, "max_drop": 0.02,
                     "min_worst": 0.9}  # fmt: skip
