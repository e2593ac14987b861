"""The latency table of the README's Benchmarks section: the trained digits CNN in fp32 and
in static int8 (QDQ, U8 activations, S8 per-channel weights), batch 1, at 1 and 2 intra-op
threads, 3000 interleaved runs each (`onnxship bench cnn.onnx cnn-int8.onnx --data test.npz
--threads 1,2 --runs 3000`, in its own process). Prints a line naming the machine, then the
table in markdown.

Run: .venv/bin/python tests/benchmarks/bench_latency.py   (about 30 seconds)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from run_all import machine_header

    from converter.torch.export import export
    from passes import StaticQuantize
    from passes.base import apply_to_file

    data = ROOT / "build" / "models" / "digits_cnn"
    with tempfile.TemporaryDirectory() as tmp:
        cnn, int8, out = (Path(tmp) / n for n in ("cnn.onnx", "cnn-int8.onnx", "bench.json"))
        spec = f"{ROOT}/models/digits_cnn/model.py:trained"  # trains once, cached in build/
        export(spec, cnn, ["x:batch,1,8,8:float32"])
        apply_to_file([StaticQuantize(calibration=data / "calib.npz")], cnn, int8, data)
        # the CLI in a fresh process, as the README shows it: torch's memory, freed after the
        # export above, would otherwise be reused by the sessions and hide their peak RSS
        command = ["bench", cnn, int8, "--data", data / "test.npz", "--threads", "1,2"]
        command += ["--runs", "3000", "--json", out, "-q"]
        run = [sys.executable, "-m", "converter", *map(str, command)]
        subprocess.run(run, cwd=ROOT, check=True)
        doc = json.loads(out.read_text())
    print(machine_header())
    columns = ["threads", "model", "p50 ms", "p90 ms", "p99 ms", "speedup", "session ms"]
    print("| " + " | ".join([*columns, "peak RSS MB", "size MB"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in doc["results"]:
        size = doc["models"][r["model_index"]]["file_size"] / 1e6
        print(
            f"| {r['threads']} | `{Path(r['model']).name}` | {r['p50_ms']:.3f} | {r['p90_ms']:.3f}"
            f" | {r['p99_ms']:.3f} | {r['speedup_p50_vs_first']:.2f}x"
            f" | {r['session_create_ms']:.1f} | {r['peak_rss_mb']:.1f} | {size:.2f} |"
        )


if __name__ == "__main__":
    main()
