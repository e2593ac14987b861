"""`make bench`: run every benchmark script in this folder, in name order, one at a time,
after one line naming the machine (every table in the README is headed by it)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine_header() -> str:
    """CPU model, int8-relevant ISA flags, cores, onnxruntime version and date, one line."""
    import onnxruntime

    sys.path.insert(0, str(HERE.parents[1]))
    from converter.core.machine import machine

    m = machine()
    flags = [f for f, present in m["int8_flags"].items() if present]
    vnni = "VNNI" if m["vnni"] else "no VNNI"
    return (
        f"{m['cpu']}, {' '.join(flags) or 'no x86 SIMD flags'} ({vnni}), {m['cores']} cores, "
        f"onnxruntime {onnxruntime.__version__}, {datetime.date.today().isoformat()}"
    )


def main() -> int:
    print(f"machine: {machine_header()}", flush=True)
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n=== {script.name} ===", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
