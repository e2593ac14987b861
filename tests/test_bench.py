"""onnxship bench: statistics from the recorded runs, interleaving vs a separate timing loop,
inputs, reports, startup imports, and every bad input as exit 2 with one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import metrics
from converter.benchmark import DEFAULT_RUNS, DEFAULT_WARMUP, bench
from converter.cli import main

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
    return {
        "small": _mlp(folder / "small.onnx", layers=2),
        "large": _mlp(folder / "large.onnx", layers=8),
        "fixed": _mlp(folder / "fixed.onnx", layers=1, batch=2),
        "seq": _sequence_model(folder / "seq.onnx"),
        "not_onnx": folder / "not.onnx",
        "data": folder / "d.npz",
        "wrong": folder / "wrong.npz",
        "tmp": folder,
    }


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; stderr without the progress bar (drawn with carriage returns)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.rsplit("\r", 1)[-1]


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
        assert r.session_ms > 0 and r.peak_rss_mb >= 0
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
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_states_the_api_defaults_and_mlperf(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"untimed runs ({DEFAULT_WARMUP})" in text and f"per model ({DEFAULT_RUNS})" in text
    assert "MLPerf's SingleStream scenario" in text and "90th percentile" in text
    assert "Peak RSS" in text


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
