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
        # names become files and folders: one plain path component each (#21 item 3)
        ('name = "../escape"\n[model]\nonnx = "M"', "recipe name '../escape' is not a plain"),
        ('name = "/tmp/abs"\n[model]\nonnx = "M"', "recipe name '/tmp/abs' is not a plain"),
        ('name = "a/b"\n[model]\nonnx = "M"', "recipe name 'a/b' is not a plain name"),
        ('name = ".."\n[model]\nonnx = "M"', "recipe name '..' is not a plain name"),
        ('name = 1\n[model]\nonnx = "M"', "recipe name 1 is not a plain name"),
        (VARIANT.replace('"v"', '"../up"') + "]", "variant name '../up' is not a plain name"),
        (VARIANT.replace('"v"', '"/tmp/x"') + "]", "variant name '/tmp/x' is not a plain"),
        (VARIANT.replace('"v"', '".."') + "]", "variant name '..' is not a plain name"),
        (VARIANT.replace('"v"', '"fp32"') + "]", "variant name 'fp32' is not a plain name"),
        # every value typed and in range at load (#21 items 6, 7)
        ('[model]\nonnx = "M"\n[bench]\nruns = "many"', "[bench] runs 'many' is not a whole"),
        ('[model]\nonnx = "M"\n[bench]\nruns = 0', "recipe [bench] runs 0 is not a whole"),
        ('[model]\nonnx = "M"\n[bench]\nwarmup = -1', "[bench] warmup -1 is not a whole"),
        ('[model]\nonnx = "M"\n[bench]\nruns = 5\nseconds = 1', "gives both runs and seconds"),
        ('[model]\nonnx = "M"\n[bench]\nseconds = -1', "[bench] seconds -1 is not a positive"),
        ('[model]\nonnx = "M"\n[bench]\nseconds = "2"', "[bench] seconds '2' is not a positive"),
        ('[model]\nonnx = "M"\n[bench]\nseconds = nan', "[bench] seconds nan is not a positive"),
        ('[model]\nonnx = "M"\n[bench]\nthreads = 2', "[bench] threads 2 must be a list"),
        ('[model]\nonnx = "M"\n[bench]\nthreads = [1, 0]', "[bench] threads [1, 0] must be"),
        ('[model]\nonnx = "M"\n[bench]\nthreads = [1, 1]', "[bench] threads [1, 1] repeat"),
        ('[model]\nonnx = "M"\n[bench]\ndims = { batch = -3 }', "dims batch = -3 is not a dim"),
        ('[model]\nonnx = "M"\n[bench]\ndims = { nope = 4 }', "dims ['nope'] name no dim of"),
        ('[model]\nonnx = "M"\n[gates]\nmetrics = ["cosinus"]', "'cosinus' is unknown"),
        ('[model]\nonnx = "M"\n[gates]\nmetrics = "cosine"', "metrics must be a list of str"),
        ('[model]\nonnx = "M"\n[gates]\nmetrics = ["cosine", "cosine"]', "each metric once"),
        ('[model]\nonnx = "M"\n[gates]\nmin_score = 0.5', "has [gates] but no [data] valid"),
        (
            '[model]\nonnx = "M"\n[gates]\nmin_score = 0.5\nmetrics = ["max-abs"]',
            "min_score reads the first metric, and max-abs is an error",
        ),
        ('[model]\nonnx = "M"\ndims = { batch = 2 }', "are settings of the export from `spec`"),
        ('executor = 3\n[model]\nonnx = "M"', "recipe `executor` must be a string, got 3"),
        ('[model]\nspec = "n.py:b"\ninputs = ["x:b,4"]\ndims = { b = -3 }', "b = -3 is not a"),
        ('[model]\nspec = "n.py:b"\ninputs = ["x:b,4"]\ndims = { c = 3 }', "['c'] name no dim"),
        ('[model]\nspec = "n.py:b"\ninputs = "x:b,4"', "inputs must be a list of strings"),
        ('[model]\nspec = "n.py:b"\ninputs = ["x:b,4y"]', "bad dimension '4y' in recipe [model]"),
        ('[model]\nspec = "n.py:b"\ninputs = ["x:b"]\nopset = 99', "opset 99 is out of range"),
        ('[model]\nspec = "n.py:b"\ninputs = ["x:b"]\natol = -1', "[model] atol -1 is not a"),
        ('[model]\nspec = "n.py"\ninputs = ["x:b"]', "spec 'n.py' is not FILE.py:CALLABLE"),
        ('[model]\nspec = "n.py:b"\ninputs = ["x:b"]', "spec file"),
        ('[model]\nonnx = "M"\n[data]\nvalidation = "nope.npz"', "[data] validation: data"),
    ],
)
def test_recipe_errors_are_exit_2_naming_the_key(text, expected, digits_mlp, tmp_path, capsys):
    (tmp_path / "r.toml").write_text(text.replace('"M"', f'"{digits_mlp.onnx}"'))
    code = main(["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not list((tmp_path / "out").glob("*.onnx")) if (tmp_path / "out").exists() else True


def test_recipe_errors_come_before_any_work(tmp_path: Path, capsys) -> None:
    """A bad value is exit 2 at load: the model's code is never run (no export), OUTDIR
    (and build/<name>) never made."""
    (tmp_path / "net.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('imported').touch()\n"
        "def build():\n    raise SystemExit('exported')\n"
    )
    for bad in ('[bench]\nruns = "many"', "[bench]\nthreads = [0]", '[gates]\nmetrics = ["x"]'):
        (tmp_path / "r.toml").write_text(
            f'name = "n"\n[model]\nspec = "net.py:build"\ninputs = ["x:batch,4"]\n'
            f'[data]\nvalidation = "v.npz"\n{bad}\n'
        )
        code = main(["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
        assert code == 2 and "error: recipe [" in capsys.readouterr().err
    assert not (tmp_path / "imported").exists() and not (tmp_path / "out").exists()


def test_a_recipe_name_writes_only_below_build(digits_mlp, tmp_path: Path, monkeypatch, capsys):
    """Without -o the run goes to build/<name>: a name that is a path is refused (nothing
    written anywhere); a recipe without a name takes its file's, made one component."""
    from converter.recipes.schema import load_recipe

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("../outside", str(tmp_path / "abs")):
        (work / "r.toml").write_text(f'name = "{name}"\n[model]\nonnx = "{digits_mlp.onnx}"\n')
        assert main(["run", str(work / "r.toml")]) == 2
        assert "is not a plain name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["r.toml"]
    (work / "..my recipe.toml").write_text(f'[model]\nonnx = "{digits_mlp.onnx}"\n')
    assert load_recipe(work / "..my recipe.toml").name == "my_recipe"


def test_missing_data_file_is_refused_before_any_work(digits_mlp, tmp_path: Path, capsys):
    (tmp_path / "r.toml").write_text(
        f'[model]\nonnx = "{digits_mlp.onnx}"\n[data]\nvalidation = "nope.npz"\n'
    )
    code = main(["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "error: recipe [data] validation: data " in err
    assert "nope.npz does not exist" in err and not (tmp_path / "out").exists()


def test_data_checked_after_the_export_names_the_step(tmp_path: Path, capsys) -> None:
    """A `spec` model's code may write the data (the bundled recipes' does), so its data
    is checked right after the export: the failure names the step, the export is kept."""
    (tmp_path / "net.py").write_text(
        "import torch\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Linear(4, 2)\n"
    )
    np.savez(tmp_path / "v.npz", y=np.zeros((3, 4), np.float32))  # named y, the input is x
    (tmp_path / "r.toml").write_text(
        '[model]\nspec = "net.py:build"\ninputs = ["x:batch,4"]\nexporter = "torchscript"\n'
        '[data]\nvalidation = "v.npz"\n'
    )
    code = main(["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "step 'check data' failed (done: export fp32 reference" in err
    assert "missing inputs ['x']" in err
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


# --- [bench] seconds; the manifest of an OUTDIR that held an earlier run (#21 items 4, 10) ---


def test_bench_seconds_in_a_recipe_measures_for_that_time(digits_mlp, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nonnx = "{digits_mlp.onnx}"\n[bench]\nseconds = 0.3\nwarmup = 1\n')
    assert main(["-q", "run", str(recipe), "-o", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["recipe"]["bench"]["seconds"] == 0.3
    assert manifest["recipe"]["bench"]["runs"] is None
    settings = manifest["bench"]["settings"]
    assert (settings["seconds"], settings["runs"]) == (0.3, None)
    assert (
        manifest["bench"]["results"][0]["runs"] > 10
    )  # a 0.3 s budget on a model of microseconds, not a fixed count
    # neither given: the default count, as written in the manifest
    recipe.write_text(f'[model]\nonnx = "{digits_mlp.onnx}"\n')
    from converter.recipes.schema import load_recipe

    assert (load_recipe(recipe).bench.runs, load_recipe(recipe).bench.seconds) == (100, None)


def _artifacts_agree(out: Path) -> bool:
    """Every artifact the manifest names has the sha256 and size it records."""
    manifest = json.loads((out / "manifest.json").read_text())
    return all(
        sha(out / a["path"]) == a["sha256"] and (out / a["path"]).stat().st_size == a["size"]
        for a in manifest["artifacts"].values()
    )


@pytest.mark.parametrize("where", ["bench", "reports"])
def test_an_interrupted_run_leaves_no_stale_manifest(where, digits_mlp, tmp_path, monkeypatch):
    """OUTDIR holds a complete earlier run; a new run with other variants is interrupted
    (SIGTERM) while benching, or while writing its reports: no manifest is left that
    disagrees with the files (the old one is removed before anything is written, the new
    one is written last)."""
    from converter.core.errors import Interrupted
    from converter.recipes import pipeline

    out = tmp_path / "out"
    first = write_recipe(tmp_path, digits_mlp, VARIANTS.split('[[variants]]\nname = "int8"')[0])
    assert main(["-q", "run", str(first), "-o", str(out)]) == 0
    assert _artifacts_agree(out) and (out / "report.md").exists()

    def interrupt(*args, **kwargs):
        raise Interrupted(15, "SIGTERM")

    monkeypatch.setattr(pipeline, "_bench_all" if where == "bench" else "write_reports", interrupt)
    again = write_recipe(tmp_path, digits_mlp, VARIANTS.replace("0.3", "0.6"))
    assert main(["-q", "run", str(again), "-o", str(out)]) == 143
    assert (out / "pruned.onnx").exists()  # rewritten by the new run (60 % sparsity)
    assert not (out / "manifest.json").exists()
    assert not (out / "report.md").exists() and not (out / "report.html").exists()
