"""The machine: this host's CPU, the int8 hardware targets, and what a manifest records about
both (versions, the machine line, content hashes).

Hardware targets for int8: what onnxruntime's integer kernels on a CPU kind need.

onnxruntime (MLAS) multiplies uint8 activations by int8 weights differently per CPU:

- ``avx2`` (also AVX-512 without VNNI): ``vpmaddubsw`` adds pairs of u8×s8 products into
  int16 with saturation; 255 · |w| · 2 overflows int16 once |w| > 64, so full-range weights
  saturate. Weights are kept to 7 bits (``reduce_range``), as onnxruntime's own docs advise
  for these CPUs.
- ``avx512-vnni`` (AVX512-VNNI or AVX-VNNI): ``vpdpbusd`` accumulates u8×s8 straight into
  int32, no saturation: full 8-bit weights are both safe and more faithful.
- ``arm64``: the dot-product instructions (``sdot``/``udot``, ``usdot``) accumulate into
  int32: full 8-bit weights.

The default target is ``host``: read from this CPU's flags. The resolved target goes into pass
stats, manifests and the model's metadata (``onnxship.target``), so ``bench`` and
``validate`` can warn when a model made for one CPU kind is measured on another. The same
model, options and target give the same bytes on any machine.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

from converter.core.errors import BadInputError

__all__ = [
    "TARGETS",
    "TARGET_CHOICES",
    "Target",
    "resolve_target",
    "host_target",
    "host_flags",
    "METADATA_KEY",
    "warn_if_other_target",
    "target_line",
    "machine_line",
    "TARGET_FLAGS",
    "sha256_file",
    "sha256_data",
    "versions",
    "machine",
    "cpu_model_and_flags",
    "cpu_id",
    "INT8_FLAGS",
]

METADATA_KEY = "onnxship.target"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """The CPU kind an int8 model is made for, resolved once (from ``--target``, a recipe's
    ``target`` or ``host``) by :func:`resolve_target` and carried as this object through
    quantize, validate, bench, auto, the manifests and the reports."""

    name: str
    reduce_range: bool  # 7-bit weights: needed where u8×s8 pair sums saturate int16
    why: str

    def summary(self, reduce_range: bool | None = None) -> dict[str, object]:
        """What stats, reports and manifests record about this target and this host;
        ``reduce_range`` given: the weight bits a setting chose instead of the target's."""
        host = host_target()
        bits = self.reduce_range if reduce_range is None else bool(reduce_range)
        return {
            "target": self.name,
            "reduce_range": bits,
            "overridden": bits != self.reduce_range,
            "why": self.why,
            "host_target": host.name,
            "host_flags": sorted(f for f in host_flags() if f in TARGET_FLAGS),
        }

    def __str__(self) -> str:
        return self.name


# The CPU flags a target summary shows: the ones that decide which int8 kernels run.
TARGET_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp", "amx_int8")

TARGETS: dict[str, Target] = {
    "avx2": Target(
        "avx2",
        True,
        "x86 without VNNI: u8×s8 via saturating vpmaddubsw, so 7-bit weights (reduce_range)",
    ),
    "avx512-vnni": Target(
        "avx512-vnni",
        False,
        "x86 with VNNI: u8×s8 via vpdpbusd into int32, full 8-bit weights",
    ),
    "arm64": Target(
        "arm64",
        False,
        "ARM64: dot-product instructions into int32, full 8-bit weights",
    ),
}
ALIASES = {
    "avx512": "avx2",
    "x86-64": "avx2",
    "x86_64": "avx2",
    "vnni": "avx512-vnni",
    "avx-vnni": "avx512-vnni",
    "avx512_vnni": "avx512-vnni",
    "aarch64": "arm64",
    "arm": "arm64",
}
TARGET_CHOICES = ("host", *TARGETS)


def host_flags() -> frozenset[str]:
    """The CPU flags this process sees (Linux /proc/cpuinfo; empty elsewhere)."""
    return cpu_model_and_flags()[1]


def host_target() -> Target:
    """The target this CPU is: ARM64 by architecture, VNNI by flag, AVX2 otherwise."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return TARGETS["arm64"]
    flags = host_flags()
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return TARGETS["avx512-vnni"]
    return TARGETS["avx2"]


def resolve_target(name: str | Target | None) -> Target:
    """``host`` (or None) → this CPU's target; a name or alias → its target; a Target →
    itself; anything else (an empty name too) → exit 2."""
    if isinstance(name, Target):
        return name
    key = "host" if name is None else str(name).strip().lower()
    if key == "host":
        return host_target()
    key = ALIASES.get(key, key)
    if key not in TARGETS:
        raise BadInputError(
            f"unknown target {name!r}",
            f"use one of {', '.join(TARGET_CHOICES)} (aliases: {', '.join(sorted(ALIASES))})",
        )
    return TARGETS[key]


def target_summary(target: str | Target | None) -> dict[str, object]:
    """:meth:`Target.summary` of the resolved ``target``."""
    return resolve_target(target).summary()


def target_line(summary: dict[str, object]) -> str:
    """The one rendering of a target, from :meth:`Target.summary` (quantize's output, the
    run and auto reports): the target, its weight bits and why, and whether this host is
    that CPU kind (int8 results and latency measured here are the target's only then)."""
    bits = "7-bit" if summary["reduce_range"] else "8-bit"
    why = "set explicitly" if summary.get("overridden") else summary["why"]
    host = summary["host_target"]
    flags = ", ".join(summary.get("host_flags", ())) or "no int8 flags"
    where = (
        f"this host ({flags})"
        if summary["target"] == host
        else f"not this host ({host}; {flags}): int8 results and latency here are not the target's"
    )
    return f"int8 target: {summary['target']} → {bits} weights ({why}); {where}."


def machine_line(m: dict[str, object]) -> str:
    """The one rendering of :func:`machine` (every report's machine line)."""
    vnni = "VNNI" if m["vnni"] else "no VNNI"
    cpu_id = f"{m['cpu_id']}, " if m.get("cpu_id") else ""
    return (
        f"{m['cpu']} ({cpu_id}{m['logical_cores']} logical cores, {vnni}, "
        f"host target {m['target']})"
    )


def warn_if_other_target(model, path: object) -> str | None:
    """Warn (and return the warning) when ``model`` was quantized for another CPU kind than
    this host: its speed and its int8 results measured here are not the target's."""
    made_for = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if made_for is None or made_for not in TARGETS:
        return None
    host = host_target()
    if made_for == host.name:
        return None
    text = (
        f"{path} was quantized for target {made_for}, but this host is {host.name}: "
        "its latency and int8 results here are not what the target CPU will give"
    )
    logger.warning("warning: %s", text)
    return text


# --------------------------------------------------------------------------- provenance

# CPU flags that decide int8 speed on x86: VNNI (AVX512 or AVX) runs U8×S8 dot products
# natively; without it onnxruntime falls back to AVX2 code paths.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "fma")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_data(path: str | Path) -> str:
    """Content hash of a data file, or of a folder's .npz shards (names and bytes, in order)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for shard in sorted(path.glob("*.npz")):
        digest.update(shard.name.encode() + b"\0" + sha256_file(shard).encode())
    return digest.hexdigest()


def versions(with_torch: bool) -> dict[str, str]:
    """Versions of onnxship and the libraries that shape its outputs."""
    names = ["onnxship", "onnx", "onnxruntime", "numpy"] + (
        ["torch", "onnxscript"] if with_torch else []
    )
    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def cpu_id(cpuinfo: str | None = None) -> str:
    """The x86 CPU family and model numbers ("family 25 model 17": AMD Zen 4), which tell
    generations apart where the model name does not (a VM's "AMD EPYC"); "" elsewhere.
    ``cpuinfo``: the text of /proc/cpuinfo (read from the file when None)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.is_file():
            return ""
        cpuinfo = path.read_text(errors="replace")
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("cpu family", "model") and key not in fields:
            fields[key] = value.strip()
        if not line.strip() and fields:  # the first processor's block is enough
            break
    if "cpu family" not in fields or "model" not in fields:
        return ""
    return f"family {fields['cpu family']} model {fields['model']}"


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its flags (x86 ``flags``, ARM ``Features``), read from
    /proc/cpuinfo once per process on Linux; elsewhere what platform knows and no flags."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    return model, frozenset(flags)


def machine() -> dict[str, object]:
    """CPU model, core counts, system and the int8-relevant flags: what every report and
    manifest records about the machine (one reader of /proc/cpuinfo for all of them)."""
    model, flags = cpu_model_and_flags()
    return {
        "cpu": model,
        "cpu_id": cpu_id(),
        "cores": os.cpu_count(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "platform": platform.platform(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "int8_flags": {f: f in flags for f in INT8_FLAGS},
        "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        "target": host_target().name,
    }
