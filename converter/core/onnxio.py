"""Loading and atomically saving ONNX files, and checking output paths."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import onnx

from converter.core.errors import BadInputError

__all__ = [
    "load_model",
    "save_model",
    "check_output_path",
    "atomic_path",
    "atomic_write_text",
    "remove_stale_temporaries",
    "TWO_GB",
]

TWO_GB = 2**31 - 1


def load_model(path: str | os.PathLike, *, what: str = "model") -> onnx.ModelProto:
    """Load an ONNX file (with any external data) or raise a BadInputError saying why."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what} file {path} does not exist", "check the path")
    try:
        return onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError, OSError, ValueError...
        raise BadInputError(
            f"{what} file {path} is not a readable ONNX model ({type(e).__name__})",
            "pass a .onnx file written by onnx or an exporter",
        ) from e


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output path that equals an input, or whose folder cannot be written."""
    out = Path(out)
    for src in inputs:
        if src is not None and out.resolve() == Path(src).resolve():
            raise BadInputError(
                f"output path {out} is also an input", "write the output to a different file"
            )
    folder = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise BadInputError(f"output path {out} is a folder", "give a file name, e.g. model.onnx")
    if not folder.is_dir():
        raise BadInputError(
            f"output folder {folder} does not exist", f"create it first: mkdir -p {folder}"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(
            f"output folder {folder} is not writable", "choose a folder you can write to"
        )
    return out


# Temporaries are named ``.<out name>.onnxship-<pid>-<random><suffix>``: the pid tells a
# later run whether the process that made one is gone (killed by SIGKILL, power loss).
_TMP_MARK = "onnxship-"


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``out``; rename it to ``out`` only on success. Stale
    temporaries of dead onnxship processes in that folder are removed first."""
    out = Path(out)
    remove_stale_temporaries(out.parent)
    tmp_path = _new_file(out.parent, f".{out.name}.{_TMP_MARK}{os.getpid()}-", suffix or ".tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, out)
    finally:
        tmp_path.unlink(missing_ok=True)


def _new_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file with a random name. Unlike mkstemp (mode 0600), the kernel
    applies the process's umask to mode 0666, so the result gets the usual permissions
    without reading the umask (which only os.umask, a process-wide change, can do)."""
    for _ in range(100):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {folder}")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` left by onnxship processes that no longer run
    (a SIGKILL gives no chance to clean up); returns what was removed."""
    removed = []
    for path in folder.glob(f".*.{_TMP_MARK}*-*"):
        pid = path.name.rpartition(_TMP_MARK)[2].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def atomic_write_text(out: str | os.PathLike, text: str) -> Path:
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(out)


def save_model(
    model: onnx.ModelProto, out: str | os.PathLike, data_name: str | None = None
) -> Path:
    """Write ``model`` to ``out``: one self-contained file, atomically, below 2 GB; above,
    the tensors go to external data ``data_name`` (default ``<out name>.data``) next to it
    (from a copy: ``model`` itself is never changed)."""
    out = Path(out)
    if model.ByteSize() < TWO_GB:
        with atomic_path(out) as tmp:
            tmp.write_bytes(model.SerializeToString(deterministic=True))
        return out
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx moves the tensors out of the proto it saves
    with atomic_path(out) as tmp:
        onnx.save_model(
            copy,
            str(tmp),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name or out.name + ".data",
            size_threshold=1024,
        )
    return out
