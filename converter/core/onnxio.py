"""Loading and atomically saving ONNX files, and checking output paths.

External data (``onnx.save(m, p, save_as_external_data=True)``, every model above 2 GB) is
read wherever a model is read: :func:`load_model` loads it from beside the ``.onnx`` file,
after checking each ``location`` as onnx does (relative, inside the model's folder, present),
and :func:`session_source` gives onnxruntime the model with its data. Writing, one rule:
below 2 GB a model is written as one self-contained file (its tensors inline), above 2 GB as
``<name>`` plus ``<name>.data`` (:func:`save_model`, :func:`copy_model`)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto
from onnx.external_data_helper import load_external_data_for_tensor, set_external_data

from converter.core.errors import BadInputError, first_line

__all__ = [
    "load_model",
    "save_model",
    "copy_model",
    "session_source",
    "external_data_files",
    "model_file_size",
    "check_output_path",
    "atomic_path",
    "atomic_write_text",
    "remove_stale_temporaries",
    "TWO_GB",
]

TWO_GB = 2**31 - 1


def load_model(
    path: str | os.PathLike, *, what: str = "model", external_data: bool = True
) -> onnx.ModelProto:
    """Load an ONNX file with any external data beside it, or raise a BadInputError saying
    why (not ONNX; a data ``location`` that is absolute, leaves the model's folder or is
    missing). ``external_data=False`` reads the graph alone (inputs, outputs, nodes), the
    data files only checked."""
    path = Path(path)
    model = _read(path, what)[1]
    if external_data:
        _load_external_data(model, path, what)
    else:
        for location, tensors in _external(model).items():
            _data_file(location, tensors, path, what)
    return model


def _read(path: Path, what: str) -> tuple[bytes, onnx.ModelProto]:
    """The file's bytes and the model they hold, external data not loaded."""
    if not path.is_file():
        raise BadInputError(f"{what} file {path} does not exist", "check the path")
    data = path.read_bytes()
    try:
        return data, onnx.load_model_from_string(data)
    except (DecodeError, ValueError) as e:  # protobuf's parse errors
        raise BadInputError(
            f"{what} file {path} is not a readable ONNX model ({type(e).__name__})",
            "pass a .onnx file written by onnx or an exporter",
        ) from e


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph`` that can hold weights: initializers, sparse initializers and
    node attributes, subgraphs (If, Loop, Scan bodies) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:  # a function's Constant nodes
        yield from _node_tensors(function.node)


def _external(model: onnx.ModelProto) -> dict[str, list[onnx.TensorProto]]:
    """Data location → the tensors stored there."""
    found: dict[str, list[onnx.TensorProto]] = {}
    for tensor in _model_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            found.setdefault(entries.get("location", ""), []).append(tensor)
    return found


def _data_file(location: str, tensors: list[onnx.TensorProto], path: Path, what: str) -> Path:
    """The file ``location`` names, beside ``path``; refused as onnx refuses it when it is
    absolute or leaves the model's folder, and when it does not exist."""
    names = [t.name for t in tensors]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    where = f"{what} file {path}: the external data of {shown}"
    fix = "keep the data file in the model's folder and its location relative, as onnx.save does"
    if not location or os.path.isabs(location) or Path(location).is_absolute():
        raise BadInputError(f"{where} is at {location!r}, not a relative path", fix)
    folder = path.parent.resolve()
    file = (folder / location).resolve()
    if ".." in Path(location).parts or not file.is_relative_to(folder):
        raise BadInputError(f"{where} is at {location!r}, outside the model's folder", fix)
    if not file.is_file():
        raise BadInputError(
            f"{where} is in {path.parent / location}, which does not exist",
            "copy the model's .onnx file together with its data file",
        )
    return file


def _load_external_data(model: onnx.ModelProto, path: Path, what: str) -> None:
    """Each external tensor's data read into it (by onnx, which checks offsets and lengths)
    and the tensor marked as the same model saved in one file marks it: a model gives the
    same bytes whichever way it was stored."""
    external = _external(model)
    for location, tensors in external.items():
        _data_file(location, tensors, path, what)
    try:
        for tensor in (t for tensors in external.values() for t in tensors):
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.ClearField("data_location")
    except (OSError, ValueError, onnx.checker.ValidationError) as e:  # a short or bad file
        raise BadInputError(
            f"{what} file {path}: its external data cannot be read ({first_line(e)})",
            "copy the model's .onnx file together with its data file, as written",
        ) from e


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files the model file ``path`` points to, each checked as
    :func:`load_model` does (none for a self-contained model)."""
    path = Path(path)
    external = _external(_read(path, "model")[1])
    return sorted({_data_file(loc, tensors, path, "model") for loc, tensors in external.items()})


def model_file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of the model file ``path`` with its external data files."""
    return Path(path).stat().st_size + sum(f.stat().st_size for f in external_data_files(path))


def session_source(path: str | os.PathLike, *, what: str = "model") -> bytes | str:
    """What onnxruntime is given for the model file ``path``: the file's bytes when it is
    self-contained; with external data, the model and its data serialized as one (bytes that
    can travel to other processes: onnxruntime cannot find external data from bytes) below
    2 GB; above 2 GB, the path itself (onnxruntime reads the data beside it)."""
    path = Path(path)
    data, model = _read(path, what)
    if not _external(model):
        return data
    _load_external_data(model, path, what)
    if model.ByteSize() < TWO_GB:
        return model.SerializeToString(deterministic=True)
    return str(path)


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
    """Write ``model`` to ``out``, atomically: one self-contained file below 2 GB; above, the
    tensors of 1 KB or more go to the external data file ``data_name`` (default
    ``<out name>.data``) next to it, written first, from a copy (``model`` itself is never
    changed), replacing any earlier file of that name whole."""
    out = Path(out)
    data = serialized_below_2gb(model)
    if data is not None:
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        return out
    data_name = data_name or out.name + ".data"
    if Path(data_name).name != data_name or data_name in (".", ".."):
        raise ValueError(f"data_name {data_name!r} must be a file name, without a folder")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    # the .onnx is renamed into place after its data: a reader never sees the new model
    # pointing at old data (the inner block finishes first)
    with atomic_path(out) as tmp, atomic_path(out.parent / data_name) as data_tmp:
        with open(data_tmp, "wb") as f:
            _move_tensors_out(copy, f, data_name)
        tmp.write_bytes(copy.SerializeToString(deterministic=True))
    return out


def serialized_below_2gb(model: onnx.ModelProto) -> bytes | None:
    """``model``'s deterministic bytes when they fit protobuf's 2 GB, else None: serialized
    once (``ByteSize`` first would serialize it twice), and not at all when its tensor data
    alone is 2 GB or more."""
    raw = sum(len(t.raw_data) for t in _model_tensors(model))
    if raw >= TWO_GB:
        return None
    try:
        data = model.SerializeToString(deterministic=True)
    except ValueError:  # protobuf refuses messages above 2 GB
        return None
    return data if len(data) < TWO_GB else None


def _move_tensors_out(model: onnx.ModelProto, f, location: str, threshold: int = 1024) -> None:
    """Write the raw data of every tensor of at least ``threshold`` bytes to ``f``, in graph
    order, and point the tensor at it (``location``, offset, length)."""
    for tensor in _model_tensors(model):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
            offset = f.tell()
            f.write(tensor.raw_data)
            set_external_data(tensor, location, offset, len(tensor.raw_data))
            tensor.data_location = TensorProto.EXTERNAL
            tensor.ClearField("raw_data")


def copy_model(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy the model file ``src`` to ``out`` with its weights: byte for byte when it is
    self-contained; with external data, loaded and written by :func:`save_model` (one file
    below 2 GB, ``out`` + ``<out name>.data`` above)."""
    src = Path(src)
    data, model = _read(src, "model")
    if _external(model):
        _load_external_data(model, src, "model")
        return save_model(model, out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return Path(out)
