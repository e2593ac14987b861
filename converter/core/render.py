"""One rendering layer for every verb's reports: number cells, Markdown and HTML tables, the
self-contained HTML page (one stylesheet, images embedded), and matplotlib figures saved
atomically. ``run``'s report (converter.recipes.report) and ``auto``'s
(converter.recipes.auto_report) are both written with it."""

from __future__ import annotations

import base64
import html
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from converter.core.onnxio import atomic_path

__all__ = [
    "progress_bar",
    "mb",
    "cell",
    "markdown_table",
    "html_table",
    "html_page",
    "embedded_png",
    "figure",
    "save_figure",
    "MB",
]

logger = logging.getLogger(__name__)

MB = 1_000_000  # bytes in the "MB" every report prints (10**6: file sizes and peak RSS alike)


def progress_bar(iterable: Iterable | None = None, *, progress: bool, **kwargs: Any) -> tqdm:
    """The one progress bar (tqdm, on stderr, erased when done), drawn only when ``progress``
    is asked for *and* stderr is a terminal: output piped or redirected (a CI log, ``2>
    file``) gets no bar remnants. ``kwargs`` go to tqdm (``total``, ``desc``, ``unit``)."""
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    shown = progress and callable(isatty) and bool(isatty())
    return tqdm(iterable, file=stream, disable=not shown, leave=False, **kwargs)


def mb(size: float) -> str:
    """``size`` bytes as people read it: "0.77 MB" (MB = 10**6 bytes)."""
    return f"{size / MB:.2f} MB"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3;font-weight:600}td{text-align:right}td:first-child{text-align:left}
tr.recommended td{background:#e6f4ea;font-weight:600}.ship{border-left:6px solid #2e7d32;
background:#e6f4ea;padding:.6em 1em;margin:1em 0}.noship{border-left:6px solid #c62828;
background:#fdecea;padding:.6em 1em;margin:1em 0}.fail{color:#c62828;font-weight:600}
.passes{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.pass{border:1px solid #ddd;padding:.5em;max-width:36em}
.pass h3{margin:.2em 0;font-size:1em}.pass td{text-align:left;font-size:.9em}
.meta{color:#555;font-size:.95em}img{max-width:100%}"""

FAILED_CELLS = ("FAIL", "no")


def cell(value: float | None, spec: str, suffix: str = "") -> str:
    """A number as a table cell: ``format(value, spec)`` + suffix, or "—" when missing."""
    return "—" if value is None else format(value, spec) + suffix


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], highlight: int | None = None
) -> str:
    """A table; row ``highlight`` marked as the recommended one, failing cells in red."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = ' class="recommended"' if i == highlight else ""
        tds = "".join(
            f'<td class="fail">{esc(c)}</td>' if c in FAILED_CELLS else f"<td>{esc(c)}</td>"
            for c in row
        )
        body.append(f"<tr{css}>{tds}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def embedded_png(path: Path, title: str) -> str:
    """A heading and the PNG inlined as a data URI: the page needs no file beside it."""
    esc = html.escape
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<h3>{esc(title)}</h3><img alt="{esc(title)}" src="data:image/png;base64,{data}">'


def html_page(title: str, body: str) -> str:
    """A complete, self-contained page (no network: styles inline, images embedded)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def figure(size: tuple[float, float], what: str) -> Any:
    """A matplotlib Figure (no pyplot state), or None with a warning when the plot extra is
    missing: ``what`` names the plot the report will lack."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning(
            "warning: matplotlib is not installed: no %s (pip install 'onnxship[plot]')", what
        )
        return None
    return Figure(figsize=size, layout="constrained")


def save_figure(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
