"""What a manifest records besides the artifacts: versions and the machine."""

from __future__ import annotations

import functools
import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["sha256_file", "sha256_data", "versions", "machine", "INT8_FLAGS"]

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
    import os

    import psutil

    from converter.targets import host_target

    model, flags = cpu_model_and_flags()
    return {
        "cpu": model,
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
