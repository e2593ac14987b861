"""onnxship bench: statistics from the recorded runs, interleaving vs a separate timing loop,
inputs, reports, startup imports, and every bad input as exit 2 with one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import TensorProto, helper, numpy_helper

from converter.check.bench import DEFAULT_RUNS, DEFAULT_WARMUP, BenchGates, bench
from converter.check.bench_gates import DEFAULT_MAX_SLOWDOWN
from converter.cli import main
from converter.core import metrics
from converter.core.machine import machine_line
from converter.core.render import MB

ROOT = Path(__file__).resolve().parent.parent


def _mlp(path: Path, layers: int, width: int = 256, batch: int | str = "batch") -> Path:
    """x[batch, width] → ``layers`` × (MatMul, Relu): work grows with ``layers``."""
    rng = np.random.default_rng(layers)
    nodes, inits, name = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [name, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        name = f"r{i}"
    nodes.append(helper.make_node("Identity", [name], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _sequence_model(path: Path) -> Path:
    """input_ids[batch, seq] int64 → y[batch] = sum over seq (a symbolic seq dim)."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["f", "axes"], ["y"], keepdims=0),
        ],
        "seq",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    (folder / "not.onnx").write_text("not a model")
    np.savez(folder / "d.npz", x=np.ones((3, 256), np.float32))
    np.savez(folder / "wrong.npz", x=np.ones((3, 8), np.float32))
    small, large = _mlp(folder / "small.onnx", layers=2), _mlp(folder / "large.onnx", layers=8)
    base = json.loads(bench([small, large], runs=3, warmup=1).to_json())
    (folder / "base.json").write_text(json.dumps(base))
    (folder / "notjson.json").write_text("{not json")
    (folder / "validate.json").write_text(json.dumps({"tool": "onnxship validate"}))
    (folder / "swapped.json").write_text(json.dumps(_edited(base, swap=True)))
    return {
        "small": small,
        "large": large,
        "base": folder / "base.json",
        "notjson": folder / "notjson.json",
        "validate_json": folder / "validate.json",
        "swapped": folder / "swapped.json",
        "fixed": _mlp(folder / "fixed.onnx", layers=1, batch=2),
        "seq": _sequence_model(folder / "seq.onnx"),
        "not_onnx": folder / "not.onnx",
        "data": folder / "d.npz",
        "wrong": folder / "wrong.npz",
        "tmp": folder,
    }


def _edited(doc: dict, swap: bool = False, speedup: float | None = None) -> dict:
    """A copy of a bench --json report with the models swapped, or the second model's speedup
    set to ``speedup`` (a ratio no real run of these models gets)."""
    doc = json.loads(json.dumps(doc))
    if swap:
        doc["models"].reverse()
    if speedup is not None:
        for row in doc["results"]:
            if row["model_index"] == 1:
                row["speedup_p50_vs_first"] = speedup
    return doc


def test_statistics_come_from_the_recorded_runs(tiny):
    report = bench([tiny["small"], tiny["large"]], runs=30, warmup=2)
    assert [m.path for m in report.models] == [str(tiny["small"]), str(tiny["large"])]
    for r in report.results:
        lat, ms = r.latency, r.latencies_ms
        assert lat.runs == len(ms) == 30
        assert lat.p50_ms == pytest.approx(np.percentile(ms, 50))
        assert lat.p90_ms == pytest.approx(np.percentile(ms, 90))
        assert lat.p99_ms == pytest.approx(np.percentile(ms, 99))
        assert lat.mean_ms == pytest.approx(ms.mean()) and lat.std_ms == pytest.approx(
            ms.std(ddof=1)
        )
        assert lat.min_ms == ms.min() <= lat.p50_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
        assert lat.throughput_per_s == pytest.approx(1e3 / lat.mean_ms)  # batch 1
        assert r.session_ms > 0
    first, second = report.results
    assert first.speedup == 1.0
    assert second.speedup == metrics.speedup(first.latency.p50_ms, second.latency.p50_ms)
    assert report.models[1].file_size == os.path.getsize(tiny["large"])
    assert report.models[0].inputs == ["x:1,256:float32"] and report.models[0].batch == 1
    assert report.settings["threads"] == [1] and report.settings["inter_op_threads"] == 1


def test_thread_counts_and_seconds(tiny):
    report = bench([tiny["small"], tiny["large"]], threads=[1, 2], seconds=0.2, warmup=1)
    assert [(r.model, r.threads) for r in report.results] == [(0, 1), (1, 1), (0, 2), (1, 2)]
    assert report.get(0, 2).speedup == 1.0
    for threads in (1, 2):  # interleaved rounds: every model ran as often as the others
        assert report.get(0, threads).latency.runs == report.get(1, threads).latency.runs >= 1
    assert report.settings["runs"] is None and report.settings["seconds"] == 0.2


def test_inputs_from_data_and_generated(tiny, digits_cnn):
    from_data = bench([digits_cnn.onnx], data=digits_cnn.test, runs=3, warmup=1, batch=4)
    assert from_data.models[0].inputs == ["x:4,1,8,8:float32"]
    assert from_data.results[0].latency.throughput_per_s == pytest.approx(
        4e3 / from_data.results[0].latency.mean_ms
    )
    generated = bench([tiny["seq"]], dims={"seq": 16}, runs=3, warmup=1)
    assert generated.models[0].inputs == ["input_ids:1,16:int64"]
    fixed = bench([tiny["fixed"]], runs=3, warmup=1)  # a fixed batch of 2 is used as is
    assert fixed.models[0].batch == 2


def test_cli_table_json_and_plot(tiny, tmp_path, capsys):
    code, out, err = cli(
        capsys, "bench", tiny["small"], tiny["large"], "--runs", "20", "--warmup", "2",
        "--data", tiny["data"], "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png",
    )  # fmt: skip
    assert code == 0, err
    assert "p50 ms" in out and "p90 ms" in out and "speedup" in out and "peak RSS MB" in out
    assert str(tiny["small"]) in out and "1.00x" in out
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["tool"] == "onnxship bench" and len(doc["results"]) == 2
    row = doc["results"][1]
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "throughput_per_s"):
        assert row[key] > 0
    assert row["speedup_p50_vs_first"] == pytest.approx(doc["results"][0]["p50_ms"] / row["p50_ms"])
    assert {"session_create_ms", "peak_rss_mb"} <= set(row)
    assert doc["models"][0]["file_size"] == os.path.getsize(tiny["small"])
    assert doc["machine"]["onnxruntime"] and doc["settings"]["warmup"] == 2
    m = doc["machine"]
    assert out.splitlines()[0] == f"bench on {machine_line(m)}, onnxruntime {m['onnxruntime']}"
    assert f"{doc['models'][0]['file_size'] / 1e6:.2f}" in out  # size MB: 10^6 bytes
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_states_the_api_defaults_and_mlperf(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"untimed runs ({DEFAULT_WARMUP})" in text and f"per model ({DEFAULT_RUNS})" in text
    assert "MLPerf's SingleStream scenario" in text and "90th percentile" in text
    assert "Peak RSS" in text and "depends on the order of measurement" in text
    assert f"(default {DEFAULT_MAX_SLOWDOWN:.2f})" in text  # the help mirrors the constant


def test_help_imports_nothing_heavy():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "converter", "bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    heavy = {m for m in imported if re.match(r"(torch|onnxruntime|onnx|numpy)(\.|$)", m)}
    assert not heavy, sorted(heavy)


def test_runs_without_torch(tiny, tmp_path):
    """bench must work where torch is not installed: make it unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from converter.cli import main\n"
        f"rc = main(['bench', {str(tiny['small'])!r}, '--runs', '3', '--warmup', '1', '-q', "
        f"'--json', {str(tmp_path / 'b.json')!r}])\n"
        "assert sys.modules['torch'] is None\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["runs"] == 3


BAD = {
    "missing model": (["{tmp}/nope.onnx"], "does not exist"),
    "not onnx": (["{not_onnx}"], "not a readable ONNX"),
    "threads zero": (["{small}", "--threads", "0"], "≥ 1"),
    "threads not a list": (["{small}", "--threads", "a,b"], "list like"),
    "threads repeated": (["{small}", "--threads", "1,1"], "repeats"),
    "runs zero": (["{small}", "--runs", "0"], "--runs 0"),
    "runs and seconds": (["{small}", "--runs", "5", "--seconds", "1"], "not allowed with"),
    "seconds negative": (["{small}", "--seconds", "-1"], "positive"),
    "warmup negative": (["{small}", "--warmup", "-1"], "--warmup -1"),
    "batch zero": (["{small}", "--batch", "0"], "--batch 0"),
    "batch vs fixed": (["{fixed}", "--batch", "4"], "fixed batch of 2"),
    "dim malformed": (["{seq}", "--dim", "seq:16"], "NAME=SIZE"),
    "dim unknown": (["{seq}", "--dim", "seq=16", "--dim", "sq=3"], "sq"),
    "dim missing": (["{seq}"], "--dim seq=SIZE"),
    "data does not fit": (["{small}", "--data", "{wrong}"], "does not fit"),
    "data and dim": (["{small}", "--data", "{data}", "--dim", "batch=1"], "--dim"),
    "data too small": (["{small}", "--data", "{data}", "--batch", "5"], "3 samples"),
    "plot suffix": (["{small}", "--plot", "{tmp}/plot.txt"], "suffix"),
    "json folder missing": (["{small}", "--json", "{tmp}/no/b.json"], "does not exist"),
    "json overwrites model": (["{small}", "--json", "{small}"], "also an input"),
    "junit is the json": (["{small}", "--json", "{tmp}/r", "--junit", "{tmp}/r"], "same file"),
    "junit overwrites baseline": (
        ["{small}", "{large}", "--baseline", "{base}", "--junit", "{base}"],
        "also an input",
    ),
    "min-speedup negative": (["{small}", "{large}", "--min-speedup", "-1"], "≥ 0"),
    "max-p90 not a number": (["{small}", "--max-p90-ms", "fast"], "not a number"),
    "max-size infinite": (["{small}", "--max-size-mb", "inf"], "finite"),
    "min-speedup one model": (["{small}", "--min-speedup", "1"], "only one model"),
    "baseline one model": (["{small}", "--baseline", "{base}"], "only one model"),
    "slowdown without baseline": (["{small}", "{large}", "--max-slowdown", "1.1"], "--baseline"),
    "slowdown below 1": (
        ["{small}", "{large}", "--baseline", "{base}", "--max-slowdown", "0.1"],
        "a factor",
    ),
    "baseline missing": (["{small}", "{large}", "--baseline", "{tmp}/none.json"], "not exist"),
    "baseline not json": (["{small}", "{large}", "--baseline", "{notjson}"], "readable JSON"),
    "baseline of validate": (["{small}", "{large}", "--baseline", "{validate_json}"], "bench"),
    "baseline other order": (["{small}", "{large}", "--baseline", "{swapped}"], "same order"),
    "baseline other threads": (
        ["{small}", "{large}", "--baseline", "{base}", "--threads", "2"],
        "--threads 1",
    ),
    "baseline other inputs": (
        ["{small}", "{large}", "--baseline", "{base}", "--data", "{data}", "--batch", "2"],
        "same --data",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_exit_2_with_one_line(case, tiny, capsys):
    args, words = BAD[case]
    argv = ["bench", *(a.format(**tiny) for a in args)]
    before = sorted(tiny["tmp"].iterdir())
    code, out, err = cli(capsys, *argv, "-q")
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and " — " in err, err
    assert words in err, err
    assert "Traceback" not in err
    assert sorted(tiny["tmp"].iterdir()) == before  # nothing written


# ---------------------------------------------------------------- gates
# Thresholds are chosen so that no CPU can change the outcome: a speedup is ≥ 0 and never
# 10^6; the size is the file's; a baseline ratio of 10^-6 or 10^6 is out of any real range.


def _gate_run(capsys, tiny, tmp_path, *gates) -> tuple[int, str, str, dict, ET.Element]:
    json_path, junit_path = tmp_path / "b.json", tmp_path / "b.xml"
    code, out, err = cli(
        capsys, "bench", tiny["small"], tiny["large"], "--runs", "5", "--warmup", "1",
        "--json", json_path, "--junit", junit_path, *gates,
    )  # fmt: skip
    return code, out, err, json.loads(json_path.read_text()), ET.parse(junit_path).getroot()


def test_gates_pass(tiny, tmp_path, capsys):
    size_mb = os.path.getsize(tiny["large"]) / 1e6
    code, out, err, doc, junit = _gate_run(
        capsys, tiny, tmp_path,
        "--min-speedup", "0", "--max-p90-ms", "1e6", "--max-size-mb", size_mb * 1.01,
    )  # fmt: skip
    assert code == 0, err
    assert doc["passed"] is True and [g["name"] for g in doc["gates"]] == [
        "min-speedup", "max-p90-ms", "max-p90-ms", "max-size-mb", "max-size-mb",
    ]  # fmt: skip
    speedup, p90a, p90b, size_a, size_b = (g["value"] for g in doc["gates"])
    assert speedup == doc["results"][1]["speedup_p50_vs_first"]  # the first model is not gated
    assert [p90a, p90b] == [row["p90_ms"] for row in doc["results"]]
    assert [size_a, size_b] == [m["file_size"] / 1e6 for m in doc["models"]]
    assert "PASS  min-speedup" in out and out.rstrip().endswith("PASSED")
    assert junit.get("tests") == "5" and junit.get("failures") == "0"
    assert not list(junit.iter("failure"))


def test_gates_fail_exit_1_and_still_write_the_reports(tiny, tmp_path, capsys):
    size_mb = os.path.getsize(tiny["large"]) / 1e6
    code, out, err, doc, junit = _gate_run(
        capsys, tiny, tmp_path,
        "--min-speedup", "1e6", "--max-p90-ms", "0", "--max-size-mb", size_mb * 0.99,
    )  # fmt: skip
    assert code == 1
    assert err.startswith("error: bench gates failed: min-speedup") and err.count("\n") == 1
    failed = {
        (g["name"], Path(g["output"].split(" @ ")[0]).name) for g in doc["gates"] if not g["passed"]
    }
    assert failed == {
        ("min-speedup", "large.onnx"),
        ("max-p90-ms", "small.onnx"),
        ("max-p90-ms", "large.onnx"),
        ("max-size-mb", "large.onnx"),  # small.onnx is 4x smaller: it passes
    }
    assert doc["passed"] is False and "FAIL  max-size-mb" in out and "FAILED: 4 of 5" in out
    assert junit.get("tests") == "5" and junit.get("failures") == "4"


def test_junit_carries_every_gate_and_number(tiny, tmp_path, capsys):
    code, _, _, doc, junit = _gate_run(
        capsys, tiny, tmp_path, "--min-speedup", "1e6", "--max-size-mb", "100"
    )
    assert code == 1
    suite = junit.find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("classname") for c in cases] == [
        "onnxship.bench.min-speedup", "onnxship.bench.max-size-mb", "onnxship.bench.max-size-mb",
    ]  # fmt: skip
    assert [c.find("failure") is not None for c in cases] == [True, False, False]
    failure = cases[0].find("failure")
    assert failure.get("type") == "GateFailed" and str(tiny["large"]) in failure.text
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    for row in doc["results"]:
        key = f"{row['model']}.threads1"
        assert float(props[f"{key}.p50_ms"]) == row["p50_ms"]
        assert float(props[f"{key}.p90_ms"]) == row["p90_ms"]
        assert float(props[f"{key}.speedup"]) == row["speedup_p50_vs_first"]
    assert int(props[f"{tiny['large']}.size_bytes"]) == os.path.getsize(tiny["large"])
    assert props["onnxruntime"] == doc["machine"]["onnxruntime"]
    assert "FAIL  min-speedup" in suite.find("system-out").text


@pytest.mark.parametrize("ratio, passed", [(1e-6, True), (1e6, False)])
def test_baseline_compares_speed_ratios(ratio, passed, tiny, tmp_path, capsys):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_edited(json.loads(tiny["base"].read_text()), speedup=ratio)))
    code, out, err, doc, junit = _gate_run(capsys, tiny, tmp_path, "--baseline", base)
    assert code == (0 if passed else 1), err
    (gate,) = doc["gates"]  # one per model after the first and thread count
    now = doc["results"][1]["speedup_p50_vs_first"]
    assert gate["name"] == "baseline" and gate["value"] == pytest.approx(ratio / now)
    assert gate["threshold"] == DEFAULT_MAX_SLOWDOWN and gate["passed"] is passed
    assert doc["baseline"] == str(base)
    if not passed:
        assert "error: bench gates failed: baseline" in err
        assert junit.find("testsuite/testcase/failure") is not None


def test_baseline_of_a_real_run_and_its_tolerance(tiny, tmp_path):
    """The stored run of the same models passes with a tolerance no noise can exceed; the
    gate's value is the baseline ratio over this run's, whatever the CPU."""
    loose = bench([tiny["small"], tiny["large"]], runs=5, warmup=1,
                  gates=BenchGates(baseline=tiny["base"], max_slowdown=1e9))  # fmt: skip
    (gate,) = loose.gates
    stored = json.loads(tiny["base"].read_text())["results"][1]["speedup_p50_vs_first"]
    assert gate.value == pytest.approx(stored / loose.results[1].speedup)
    assert loose.passed and gate.threshold == 1e9


def test_baseline_from_another_cpu_warns(tiny, tmp_path, caplog):
    doc = json.loads(tiny["base"].read_text())
    doc["machine"]["cpu"] = "Some Other CPU"
    base = tmp_path / "other.json"
    base.write_text(json.dumps(_edited(doc, speedup=1e-6)))
    report = bench(
        [tiny["small"], tiny["large"]], runs=3, warmup=1, gates=BenchGates(baseline=base)
    )
    assert report.passed
    assert "Some Other CPU" in caplog.text and "differ between CPU kinds" in caplog.text


def test_api_gates_without_the_cli(tiny):
    report = bench([tiny["small"], tiny["large"]], runs=3, warmup=1,
                   gates=BenchGates(min_speedup=1e6, max_size_mb=1e3))  # fmt: skip
    assert not report.passed and [g.name for g in report.failed] == ["min-speedup"]
    assert report.failed[0].value == report.results[1].speedup
    no_gates = bench([tiny["small"]], runs=3, warmup=1)
    assert no_gates.passed and no_gates.gates == [] and no_gates.to_dict()["gates"] == []


def test_peak_rss_counts_the_memory_a_model_adds(tmp_path):
    """A model holding 32 MB of weights: its session adds at least that much at its peak
    (the number is clamped at 0, so only a lower bound from the weights can fail)."""
    n = 8 * 2**20  # 8 M float32 = 32 MiB
    w = numpy_helper.from_array(np.full((1, n), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    r = bench([path], runs=2, warmup=1).results[0]
    assert r.peak_rss_mb >= 0.9 * 4 * n / MB  # MB: 10^6 bytes, as the size column
