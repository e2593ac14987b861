"""What every manifest records (``run``'s and ``auto``'s): the tool and its version, the
library versions, the machine, the int8 target, and each artifact with its sha256 and size.
Each verb adds its own keys (the resolved recipe, the candidates, ...) to this."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converter.core import __version__
from converter.core.machine import machine, sha256_file, versions
from converter.core.onnxio import external_data_files

__all__ = ["manifest_base", "artifact_entry"]


def artifact_entry(path: Path, outdir: Path) -> dict[str, Any]:
    """One artifact: its path relative to ``outdir``, its sha256 and its size in bytes; a
    model with external data (above 2 GB) adds ``external_data``, an entry per data file."""
    entry = {
        "path": path.relative_to(outdir).as_posix(),
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
    }
    data = external_data_files(path) if path.suffix == ".onnx" else []
    if data:
        entry["external_data"] = [artifact_entry(f, outdir) for f in data]
    return entry


def manifest_base(
    outdir: Path,
    artifacts: Mapping[str, Path],
    target: dict[str, Any],
    with_torch: bool,
) -> dict[str, Any]:
    """The keys every manifest has: ``onnxship`` (the version), ``versions`` (with torch's
    when the run used it), ``machine``, ``target`` (a Target summary, as the verb records it)
    and ``artifacts`` (name → :func:`artifact_entry`, in ``outdir``)."""
    return {
        "onnxship": __version__,
        "versions": versions(with_torch=with_torch),
        "machine": machine(),
        "target": target,
        "artifacts": {name: artifact_entry(path, outdir) for name, path in artifacts.items()},
    }
