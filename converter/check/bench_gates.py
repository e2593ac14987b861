"""CI gates of ``onnxship bench``: speed ratio, p90 latency, file size, and speed ratios
against a stored run.

Absolute times are only compared with thresholds the user sets for the machine CI runs on
(``max_p90_ms``). Across runs and machines only *ratios* are compared: the speedup of each
model against the first model of the same run, measured interleaved (see
:mod:`converter.check.bench`). A ratio still depends on the CPU kind — int8 gains much more
with VNNI than without — so a baseline is only meaningful on the CPU kind it was recorded on.

Everything that can be wrong with the settings or the baseline is checked before measuring.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from converter.check.bench_report import BenchReport, ModelInfo
from converter.core.errors import BadInputError
from converter.core.gates import Gate
from converter.core.render import MB

__all__ = ["BenchGates", "BenchBaseline", "DEFAULT_MAX_SLOWDOWN", "MB"]

logger = logging.getLogger(__name__)

# A speed ratio measured interleaved on a quiet runner moves by a few percent between runs;
# a shared CI runner needs more: a ratio more than 1.10 times worse than the baseline's fails.
DEFAULT_MAX_SLOWDOWN = 1.10
TOOL = "onnxship bench"
_RECORD = "record one with `onnxship bench MODELS... --json bench.json` on the CPU kind CI uses"


@dataclass(frozen=True)
class BenchGates:
    """Thresholds; None = not checked.

    ``min_speedup``: every model after the first, at every thread count: p50 of the first
    model / p50 of this one ≥ X. ``max_p90_ms``: every model at every thread count: p90
    latency ≤ MS. ``max_size_mb``: every model's file (with its external data) ≤ MB × 10^6
    bytes. ``baseline``: a ``bench --json`` report of the same models; every model after the
    first, at every thread count: baseline speedup / this run's speedup ≤ ``max_slowdown``
    (a factor ≥ 1, default DEFAULT_MAX_SLOWDOWN).
    """

    min_speedup: float | None = None
    max_p90_ms: float | None = None
    max_size_mb: float | None = None
    baseline: str | os.PathLike | None = None
    max_slowdown: float | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--min-speedup", self.min_speedup),
            ("--max-p90-ms", self.max_p90_ms),
            ("--max-size-mb", self.max_size_mb),
        ):
            if value is not None and not (_finite(value) and value >= 0):
                raise BadInputError(f"{flag} {value} is not a number ≥ 0", f"e.g. {flag} 1.5")
        if self.max_slowdown is not None:
            if self.baseline is None:
                raise BadInputError(
                    "--max-slowdown needs --baseline", "give --baseline bench.json, " + _RECORD
                )
            if not (_finite(self.max_slowdown) and self.max_slowdown >= 1):
                raise BadInputError(
                    f"--max-slowdown {self.max_slowdown} is below 1",
                    "it is a factor: 1.10 allows a speed ratio 10 % below the baseline's",
                )

    @property
    def slowdown_limit(self) -> float:
        return DEFAULT_MAX_SLOWDOWN if self.max_slowdown is None else self.max_slowdown

    def check_models(self, count: int) -> BenchBaseline | None:
        """Before measuring: the ratio gates need two models; read the baseline."""
        if count < 2:
            for flag, value in (("--min-speedup", self.min_speedup), ("--baseline", self.baseline)):
                if value is not None:
                    raise BadInputError(
                        f"{flag} compares each model's speed with the first model's, and only "
                        "one model was given",
                        "give the reference model first, e.g. bench model.onnx model-int8.onnx",
                    )
        return None if self.baseline is None else BenchBaseline.read(self.baseline)

    def check(self, report: BenchReport, baseline: BenchBaseline | None) -> list[Gate]:
        """Every gate, in a fixed order: min-speedup, max-p90-ms, max-size-mb, baseline."""
        gates = []
        rows = [(r, _where(report, r.model, r.threads)) for r in report.results]
        if self.min_speedup is not None:
            gates += [
                Gate.check("min-speedup", "speedup (p50)", where, ">=", self.min_speedup, r.speedup)
                for r, where in rows
                if r.model > 0
            ]
        if self.max_p90_ms is not None:
            gates += [
                Gate.check("max-p90-ms", "p90 ms", where, "<=", self.max_p90_ms, r.latency.p90_ms)
                for r, where in rows
            ]
        if self.max_size_mb is not None:
            gates += [
                Gate.check(
                    "max-size-mb", "size MB", m.path, "<=", self.max_size_mb, m.file_size / MB
                )
                for m in report.models
            ]
        if baseline is not None:
            gates += [
                _slowdown_gate(r.speedup, baseline.speedup(r.model, r.threads), where, self)
                for r, where in rows
                if r.model > 0
            ]
        return gates


def _slowdown_gate(now: float, then: float, where: str, gates: BenchGates) -> Gate:
    slowdown = then / now if now > 0 else math.inf
    detail = f"speedup {now:.3f}x now, {then:.3f}x in the baseline"
    return Gate.check(
        "baseline", "slowdown vs baseline", where, "<=", gates.slowdown_limit, slowdown, detail
    )


def _where(report: BenchReport, model: int, threads: int) -> str:
    path = report.models[model].path
    return f"{path} @ {threads} thread{'s' if threads > 1 else ''}"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class BenchBaseline:
    """The parts of a stored ``bench --json`` report the baseline gate compares with."""

    path: str
    names: list[str]  # file names of the models, in order
    inputs: list[list[str]]  # per model: name:shape:dtype of the feeds
    speedups: dict[tuple[int, int], float]  # (model index, threads) → p50 speedup vs first
    cpu: str

    @classmethod
    def read(cls, path: str | os.PathLike) -> BenchBaseline:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise BadInputError(f"--baseline {path} does not exist", _RECORD) from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInputError(f"--baseline {path} is not readable JSON: {e}", _RECORD) from e
        if not isinstance(doc, dict) or doc.get("tool") != TOOL:
            raise BadInputError(f"--baseline {path} is not a `bench --json` report", _RECORD)
        try:
            return cls(
                str(path),
                [Path(m["path"]).name for m in doc["models"]],
                [list(m["inputs"]) for m in doc["models"]],
                {
                    (int(r["model_index"]), int(r["threads"])): float(r["speedup_p50_vs_first"])
                    for r in doc["results"]
                },
                str(doc.get("machine", {}).get("cpu", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BadInputError(
                f"--baseline {path} lacks a field of a `bench --json` report ({e})", _RECORD
            ) from e

    def check_fits(self, models: list[ModelInfo], threads: list[int], cpu: str) -> None:
        """Before measuring: same models in the same order, same inputs, every thread count."""
        names = [Path(m.path).name for m in models]
        if names != self.names:
            raise BadInputError(
                f"--baseline {self.path} measured {', '.join(self.names)}; this run measures "
                f"{', '.join(names)}",
                "give the same models in the same order (the first is what every ratio is "
                "relative to), or record a new baseline",
            )
        for model, recorded in zip(models, self.inputs):
            if model.inputs != recorded:
                raise BadInputError(
                    f"--baseline {self.path} ran {Path(model.path).name} on inputs "
                    f"{' '.join(recorded)}, this run on {' '.join(model.inputs)}",
                    "use the same --data, --dim and --batch as the baseline run",
                )
        recorded_threads = sorted({t for _, t in self.speedups})
        for count in threads:
            if any((i, count) not in self.speedups for i in range(len(models))):
                raise BadInputError(
                    f"--baseline {self.path} has no results at {count} thread(s)",
                    f"it was measured with --threads {','.join(map(str, recorded_threads))}",
                )
        if self.cpu and cpu and self.cpu != cpu:
            logger.warning(
                "warning: the baseline was measured on %s, this run is on %s; int8 speed "
                "ratios differ between CPU kinds (VNNI, AVX-512, ARM)",
                self.cpu,
                cpu,
            )

    def speedup(self, model: int, threads: int) -> float:
        return self.speedups[(model, threads)]
