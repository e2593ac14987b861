"""Scale-out on Ray: every number equals the in-process run's, a worker that dies loses no
sample, bad data names its shard, and a missing Ray is one clear error.

One local Ray (2 CPUs, no dashboard) is shared by every test here: starting it is most of
the cost. Executors made in the tests find it running and leave it running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter.check.validate import validate
from converter.cli import main
from converter.core.errors import DataError
from converter.core.executor import InProcess, RayExecutor

ROOT = Path(__file__).resolve().parent.parent
SHARD_SIZES = (100, 37, 150, 1, 162)  # uneven, one single-sample shard: 450 samples


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sharded(digits_cnn, tmp_path_factory) -> Path:
    """digits_cnn's test data cut into uneven shards (with labels)."""
    folder = tmp_path_factory.mktemp("shards")
    with np.load(digits_cnn.test) as npz:
        x, labels = npz["x"], npz["labels"]
    assert len(x) == sum(SHARD_SIZES)
    start = 0
    for i, size in enumerate(SHARD_SIZES):
        np.savez(
            folder / f"part-{i:02d}.npz",
            x=x[start : start + size],
            labels=labels[start : start + size],
        )
        start += size
    return folder


@pytest.fixture(scope="module")
def small(sharded, tmp_path_factory) -> Path:
    """The first three shards (287 samples): enough for auto's calibration/scoring split."""
    folder = tmp_path_factory.mktemp("small")
    for shard in sorted(sharded.glob("*.npz"))[:3]:
        (folder / shard.name).write_bytes(shard.read_bytes())
    return folder


@pytest.fixture(scope="module")
def pruned(digits_cnn, tmp_path_factory) -> Path:
    """A candidate that differs from the fp32 model (50 % of the weights pruned)."""
    from converter.core.onnxio import load_model, save_model
    from passes import PassRunner
    from passes.registry import make_recipe_pass

    model, _ = PassRunner([make_recipe_pass("prune", {"sparsity": 0.5})]).run(
        load_model(digits_cnn.onnx)
    )
    return save_model(model, tmp_path_factory.mktemp("pruned") / "pruned.onnx")


def _validate_cli(candidate, reference, data, out: Path, *extra: str) -> tuple[int, str]:
    code = main(
        [
            "-q",
            "validate",
            str(candidate),
            "--data",
            str(data),
            "--reference",
            str(reference),
            *("--metric accuracy --metric agreement --metric cosine".split()),
            *("--metric max-abs --metric mean-abs --batch-size 16".split()),
            *("--min-score 0.5 --max-drop 0.2 --min-worst 0.5".split()),
            "--json",
            str(out),
            *extra,
        ]
    )
    return code, out.read_text(encoding="utf-8")


def test_validate_on_ray_writes_the_in_process_report(
    ray_local, sharded, pruned, digits_cnn, tmp_path
):
    code_local, local = _validate_cli(pruned, digits_cnn.onnx, sharded, tmp_path / "local.json")
    code_ray, on_ray = _validate_cli(
        pruned, digits_cnn.onnx, sharded, tmp_path / "ray.json", "--executor", "ray"
    )
    assert code_ray == code_local
    assert on_ray == local  # every number: sample count, metrics, worst sample, gates
    report = json.loads(on_ray)
    assert report["num_samples"] == sum(SHARD_SIZES)
    cosine = report["outputs"][report["output"]]["cosine"]
    assert 0 < cosine["worst_sample"] < sum(SHARD_SIZES)  # an index into the whole data
    assert cosine["worst"] < cosine["value"] < 1.0  # the pruned model does differ
    assert [g["name"] for g in report["gates"]] == ["min-score", "max-drop", "min-worst"]


def test_the_same_numbers_as_one_pass_over_the_whole_data(sharded, pruned, digits_cnn):
    """Sharding changes nothing: the shards' merge equals scoring the whole data at once."""
    from converter.core import metrics as M
    from converter.core.runtime import make_session

    report = validate(pruned, sharded, reference=digits_cnn.onnx, metrics=["cosine", "accuracy"])
    with np.load(digits_cnn.test) as npz:
        x, labels = npz["x"], npz["labels"]
    cand = make_session(pruned).run(None, {"x": x})[0]
    ref = make_session(digits_cnn.onnx).run(None, {"x": x})[0]
    cos = M.per_sample_cosine(cand, ref)
    got = report.outputs[report.output]
    assert got["cosine"].worst_sample == int(np.argmin(cos))
    np.testing.assert_allclose(got["cosine"].value, cos.mean(), rtol=1e-12)
    assert got["accuracy"].value == M.accuracy(cand, labels)


def _crash_once(inner, marker: Path, victim: int):
    """An executor that runs ``inner`` but whose worker process dies (os._exit) the first
    time it scores shard ``victim``: the marker file records that it happened."""

    class Faulty:
        name, width = inner.name, inner.width

        def map(self, fn, items, **kwargs):
            def dies_once(shared, item):
                if item.index == victim and not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os._exit(1)
                return fn(shared, item)

            return inner.map(dies_once, items, **kwargs)

    return Faulty()


def test_a_worker_that_dies_loses_no_sample(ray_local, sharded, pruned, digits_cnn, tmp_path):
    marker = tmp_path / "died"
    options = dict(reference=digits_cnn.onnx, metrics=["accuracy", "cosine", "mean-abs"])
    with RayExecutor() as ray_executor:
        faulty = _crash_once(ray_executor, marker, victim=2)
        report = validate(pruned, sharded, executor=faulty, progress=False, **options)
    assert marker.exists(), "the worker did not die: the test tested nothing"
    import psutil

    assert not psutil.pid_exists(int(marker.read_text()))
    local = validate(pruned, sharded, progress=False, **options)
    assert report.num_samples == local.num_samples == sum(SHARD_SIZES)
    assert report.to_json() == local.to_json()


def test_bad_data_in_a_shard_is_an_error_naming_it(ray_local, sharded, pruned, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for shard in sorted(sharded.glob("*.npz")):
        (bad / shard.name).write_bytes(shard.read_bytes())
    with np.load(bad / "part-02.npz") as npz:
        x, labels = npz["x"].copy(), npz["labels"]
    x[5, 0, 3, 3] = np.nan
    np.savez(bad / "part-02.npz", x=x, labels=labels)
    errors = []
    for executor in (InProcess(), RayExecutor()):
        with executor, pytest.raises(DataError) as e:
            validate(pruned, bad, executor=executor, progress=False)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    assert "shard part-02.npz (samples 137–286" in errors[1] and "NaN" in errors[1]


def test_missing_ray_is_one_clear_error(monkeypatch, capsys, pruned, sharded, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code = main(["validate", str(pruned), "--data", str(sharded), "--executor", "ray"])
    assert code == 2
    err = capsys.readouterr().err
    assert err == "error: --executor ray needs Ray — pip install 'onnxship[ray]'\n"
    assert not list(tmp_path.iterdir())


def test_in_process_never_imports_ray(pruned, sharded):
    code = (
        "import sys\n"
        "from converter.cli import main\n"
        f"main(['-q', 'validate', {str(pruned)!r}, '--data', {str(sharded)!r}])\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _sensitivity_cli(ref, out: Path, *extra: str) -> str:
    args = ["-q", "sensitivity", str(ref.onnx), "--data", str(ref.test), "--calib", str(ref.calib)]
    assert main([*args, "--samples", "32", "--json", str(out), *extra]) == 0
    return out.read_text(encoding="utf-8")


def test_sensitivity_on_ray_is_the_in_process_report(ray_local, digits_cnn, tmp_path):
    local = _sensitivity_cli(digits_cnn, tmp_path / "local.json")
    on_ray = _sensitivity_cli(digits_cnn, tmp_path / "ray.json", "--executor", "ray")
    assert on_ray == local
    nodes = json.loads(on_ray)["nodes"]
    assert len(nodes) >= 2 and len({n["loss"] for n in nodes}) > 1


# What a candidate is, apart from its timing (measured locally, noisy) and where it is cached.
_SAME = ("name", "passes", "key", "score", "cosine", "worst", "meets", "error", "size")


def _auto(ref, data: Path, out: Path, *extra: str) -> tuple[int, dict]:
    args = ["--metric", "accuracy", "--bench-runs", "5", *extra, "-o", str(out)]
    code = main(["-q", "auto", str(ref.onnx), "--data", str(data), *args])
    return code, json.loads((out / "manifest.json").read_text())


def _candidates(manifest: dict, out: Path) -> list[dict]:
    rows = [{k: c[k] for k in _SAME} for c in manifest["candidates"]]
    for row, c in zip(rows, manifest["candidates"]):
        row["sha256"] = c["path"] and hashlib.sha256((out / c["path"]).read_bytes()).hexdigest()
    return rows


@pytest.fixture
def one_config(monkeypatch):
    """auto tries one full-int8 configuration only (the search itself runs in this process;
    the tasks build and score what it asks for): the same stages, a third of the time."""
    from converter.search import auto

    every = auto._configs
    monkeypatch.setattr(
        auto, "_configs", lambda m, t: [c for c in every(m, t) if "minmax" in c[0]][:1]
    )


@pytest.mark.parametrize(
    ("budget", "stage"),
    [
        (["--max-drop", "0.02", "--sparsity-grid", "0.5"], "prune0.5+"),  # pruning too
        (["--max-drop", "0", "--min-worst", "0.9999", "--max-excluded", "3"], "_fp32x"),
    ],
    ids=["met", "sensitive-nodes-kept"],
)
def test_auto_on_ray_builds_and_scores_the_in_process_candidates(
    ray_local, digits_cnn, small, tmp_path, one_config, budget, stage
):
    code, local = _auto(digits_cnn, small, tmp_path / "local", *budget)
    code_ray, on_ray = _auto(digits_cnn, small, tmp_path / "ray", *budget, "--executor", "ray")
    assert code_ray == code
    assert _candidates(on_ray, tmp_path / "ray") == _candidates(local, tmp_path / "local")
    assert any(stage in c["name"] for c in on_ray["candidates"])  # the stage did run
    # The choice reads the candidates and their local bench timings (noisy even between two
    # in-process runs): given the same timings it is the same model.
    from converter.search.auto import Candidate, _choose

    timed = {c["name"]: c["speedup"] for c in local["candidates"]}
    fields = [*_SAME, "cached"]
    again = [
        Candidate(**{k: c[k] for k in fields}, speedup=timed[c["name"]])
        for c in on_ray["candidates"]
    ]
    chosen = _choose(again)
    assert (chosen.name if chosen else None) == local["chosen"]
    report = (tmp_path / "ray" / "report.md").read_text()
    assert "latencies were measured here" in report


def _recipe(tmp_path: Path, ref, data: Path, executor: str) -> Path:
    path = tmp_path / f"recipe-{executor}.toml"
    path.write_text(
        f'name = "digits"\nexecutor = "{executor}"\n'
        f"[model]\nonnx = {str(ref.onnx)!r}\n"
        f"[data]\nvalidation = {str(data)!r}\n"
        '[[variants]]\nname = "pruned"\npasses = [{ pass = "prune", sparsity = 0.5 }]\n'
        "[gates]\nmax_drop = 0.2\n[bench]\nwarmup = 1\nruns = 3\n",
        encoding="utf-8",
    )
    return path


def test_recipe_executor_ray_validates_as_in_process(ray_local, digits_cnn, sharded, tmp_path):
    from converter.recipes.pipeline import run_recipe

    runs = {
        executor: run_recipe(_recipe(tmp_path, digits_cnn, sharded, executor), tmp_path / executor)
        for executor in ("in-process", "ray")
    }
    local, on_ray = (
        [a.validation.to_json().replace(str(tmp_path / name), "OUT") for a in r.artifacts]
        for name, r in runs.items()
    )
    assert on_ray == local and len(on_ray) == 2
    assert runs["ray"].manifest.read_text().count('"executor": "ray"') == 1


def test_recipe_executor_is_checked_before_anything_runs(monkeypatch, digits_cnn, tmp_path):
    from converter.core.errors import BadInputError
    from converter.recipes.schema import load_recipe

    with pytest.raises(BadInputError, match="executor 'dask' is unknown"):
        load_recipe(_recipe(tmp_path, digits_cnn, tmp_path, "dask"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BadInputError) as e:
        load_recipe(_recipe(tmp_path, digits_cnn, tmp_path, "ray"))
    assert str(e.value) == "--executor ray needs Ray — pip install 'onnxship[ray]'"


def test_an_address_nobody_answers_is_a_quick_clear_error(capsys, pruned, sharded):
    import socket

    from converter.core.errors import BadInputError
    from converter.core.executor import _check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BadInputError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")
    args = ["validate", str(pruned), "--data", str(sharded), "--ray-address", "127.0.0.1:1"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: a Ray address was given without --executor")


def test_a_worker_dying_every_time_is_an_error_not_a_short_count(
    ray_local, sharded, pruned, tmp_path
):
    from converter.core.errors import OnnxshipError

    with RayExecutor(max_retries=0) as no_retry:
        faulty = _crash_once(no_retry, tmp_path / "died", victim=1)
        died = r"validate 1: its Ray worker process died, 1 time\(s\) in a row"
        with pytest.raises(OnnxshipError, match=died):
            validate(pruned, sharded, executor=faulty, progress=False)
