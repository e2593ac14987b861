"""Gates shared by the CI verbs (``validate``, ``bench``): one :class:`Gate` type, one way to
print them, one JUnit writer, one exception for a failure and one check of the report paths.

A gate is ``value op threshold`` with ``op`` ``>=`` or ``<=``; a missing or NaN value fails.
The CLI exits 1 (:class:`~converter.core.errors.GateFailed`) when any gate fails, after writing
the ``--json`` and ``--junit`` reports.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from converter.core.errors import BadInputError, GateFailed
from converter.core.onnxio import check_output_path

__all__ = [
    "Gate",
    "Gated",
    "score_gates",
    "ScoreLimits",
    "check_fraction",
    "gate_lines",
    "junit_xml",
    "failure",
    "check_report_paths",
    "json_number",
    "fmt",
]


def json_number(x) -> float | int | None:
    """A JSON-safe number: NaN and infinities become null."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return x


def fmt(x: float | None) -> str:
    """A score for people: 5 decimals, small values in scientific notation, "n/a" when
    missing or not a number."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.5f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


@dataclass(frozen=True)
class Gate:
    """One gate: ``value op threshold`` must hold (op is ``>=`` or ``<=``). ``output`` is
    what the gate reads: a model output (validate) or a model at a thread count (bench)."""

    name: str  # validate: min-score | max-drop | min-worst | baseline; bench: see benchmark.py
    metric: str  # what was compared, e.g. "accuracy drop", "p90 ms", "slowdown vs baseline"
    output: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    detail: str = ""

    @classmethod
    def check(
        cls, name: str, metric: str, output: str, op: str, threshold: float, value, detail=""
    ) -> Gate:
        """A NaN or missing value fails every gate."""
        ok = value is not None and not math.isnan(value)
        ok = ok and (value >= threshold if op == ">=" else value <= threshold)
        return cls(name, metric, output, op, threshold, value, ok, detail)

    def describe(self) -> str:
        text = f"{self.metric} {fmt(self.value)} (needs {self.op} {self.threshold:.6g})"
        return f"{text}, {self.detail}" if self.detail else text

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "metric": self.metric,
            "output": self.output,
            "op": self.op,
            "threshold": json_number(self.threshold),
            "value": json_number(self.value),
            "passed": self.passed,
            "detail": self.detail,
        }


class Gated:
    """What every gated report (validation, bench) answers from its ``gates`` list."""

    gates: list[Gate]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


@dataclass(frozen=True)
class ScoreLimits:
    """The accuracy and fidelity limits, declared once for ``validate`` (its flags), ``run``
    (a recipe's ``[gates]``) and ``auto`` (its budget). ``min_score``: the metric's value must
    be ≥ this; ``max_drop``: at most this far below the fp32 reference's; ``min_worst``: the
    worst sample's cosine to the reference ≥ this. None is no limit. Checked when made: a
    value out of its range is exit 2, naming the flag."""

    min_score: float | None = None
    max_drop: float | None = None
    min_worst: float | None = None

    # field -> (flag, low, high): the one place these ranges are written
    RANGES: ClassVar[dict[str, tuple[str, float, float]]] = {
        "min_score": ("--min-score", -1.0, 1.0),
        "max_drop": ("--max-drop", 0.0, 1.0),
        "min_worst": ("--min-worst", -1.0, 1.0),
    }

    def __post_init__(self) -> None:
        for name, (flag, low, high) in self.RANGES.items():
            check_fraction(getattr(self, name), flag, low, high)

    @property
    def given(self) -> bool:
        return any(getattr(self, name) is not None for name in self.RANGES)

    def gates(
        self,
        output: str,
        score: tuple[str, float | None],
        drop: tuple[str, float | None, str],
        worst: tuple[float | None, str],
    ) -> list[Gate]:
        """These limits as gates, see :func:`score_gates`."""
        return score_gates(
            output, self.min_score, self.max_drop, self.min_worst, score, drop, worst
        )


def check_fraction(value: object, flag: str, low: float, high: float) -> None:
    """Refuse (exit 2) a value that is not a number in ``[low, high]`` (NaN included);
    None passes (no limit)."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        raise BadInputError(
            f"{flag} {value} is outside [{low:g}, {high:g}]",
            "scores and drops are fractions, e.g. 0.9 for 90 %",
        )


def score_gates(
    output: str,
    min_score: float | None,
    max_drop: float | None,
    min_worst: float | None,
    score: tuple[str, float | None],
    drop: tuple[str, float | None, str],
    worst: tuple[float | None, str],
) -> list[Gate]:
    """The accuracy/fidelity gates of ``validate``, ``run`` and ``auto``, decided here only:
    ``score`` = (metric, value) must reach ``min_score``; ``drop`` = (metric, how far below
    the reference, detail) at most ``max_drop``; ``worst`` = (worst-sample cosine, detail) at
    least ``min_worst``. A limit that is None is no gate."""
    gates = []
    if min_score is not None:
        gates.append(Gate.check("min-score", score[0], output, ">=", min_score, score[1]))
    if max_drop is not None:
        metric, value, detail = drop
        gates.append(
            Gate.check("max-drop", f"{metric} drop", output, "<=", max_drop, value, detail)
        )
    if min_worst is not None:
        value, detail = worst
        gates.append(
            Gate.check("min-worst", "cosine worst", output, ">=", min_worst, value, detail)
        )
    return gates


def gate_lines(gates: Sequence[Gate], label: bool = False) -> list[str]:
    """``PASS``/``FAIL`` per gate, then ``PASSED`` or ``FAILED: n of m gates``. ``label``
    adds what each gate reads (when gates read different things, as in bench)."""
    width = max((len(g.name) for g in gates), default=0)
    lines = [
        f"  {'PASS' if g.passed else 'FAIL'}  {g.name:<{max(width, 9)}}  "
        + (f"{g.output}: " if label else "")
        + g.describe()
        for g in gates
    ]
    failed = sum(not g.passed for g in gates)
    lines.append("PASSED" if not failed else f"FAILED: {failed} of {len(gates)} gates")
    return lines


def junit_xml(
    tool: str,
    subject: str,
    gates: Sequence[Gate],
    properties: Sequence[tuple[str, str]],
    system_out: str,
    reads: str = "",
) -> str:
    """JUnit XML: one testsuite named ``tool subject``, one testcase per gate (class
    ``onnxship.<verb>.<gate>``), a failure element for each failed gate, every number as a
    property and the printed summary as system-out. ``reads`` names what ``Gate.output`` is
    ("output" for validate) in the failure text."""
    failures = str(sum(not g.passed for g in gates))
    suites = ET.Element("testsuites", name=tool, tests=str(len(gates)), failures=failures)
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"{tool} {subject}",
        tests=str(len(gates)),
        failures=failures,
        errors="0",
        skipped="0",
    )
    props = ET.SubElement(suite, "properties")
    for key, value in properties:
        ET.SubElement(props, "property", name=key, value=value)
    verb = tool.split()[-1]
    where = f"{reads} " if reads else ""
    for g in gates:
        name = f"{g.name}: {g.metric} {g.op} {g.threshold:.6g} ({g.output})"
        case = ET.SubElement(suite, "testcase", classname=f"onnxship.{verb}.{g.name}", name=name)
        if not g.passed:
            element = ET.SubElement(case, "failure", message=g.describe(), type="GateFailed")
            element.text = f"{g.name} failed on {where}{g.output}: {g.describe()}"
    ET.SubElement(suite, "system-out").text = system_out
    ET.indent(suites)
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    )


def failure(
    what: str, gates: Sequence[Gate], fix: str, json_path: str | None, label: bool | None = None
) -> GateFailed:
    """The exit-1 error for failed gates: ``<what> failed: <gate> <value, threshold>; ...``,
    naming what each gate read when ``label`` (default: when they read more than one thing)."""
    label = len({g.output for g in gates}) > 1 if label is None else label
    failed = [
        f"{g.name} {g.output + ': ' if label else ''}{g.describe()}" for g in gates if not g.passed
    ]
    return GateFailed(
        f"{what} failed: " + "; ".join(failed), fix + (f" and {json_path}" if json_path else "")
    )


def check_report_paths(
    json_path: str | None, junit_path: str | None, *inputs: str | os.PathLike | None
) -> None:
    """Before any work: each report path is writable and none is an input or the other."""

    for path in (json_path, junit_path):
        if path:
            check_output_path(path, *inputs)
    if json_path and junit_path and Path(json_path).resolve() == Path(junit_path).resolve():
        raise BadInputError("--json and --junit name the same file", "give them different paths")
