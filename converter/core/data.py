"""The one data loader: ``.npz`` files or folders of ``.npz`` shards, read lazily.

Arrays are named after the model's inputs, samples on the first axis; an optional
``labels`` array holds one label per sample. Calibration, validation and bench all read
data through :func:`open_data`, which checks names, dtypes and shapes against the model
up front and names every mismatch in one error.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from converter.core.errors import DataError

__all__ = ["InputSpec", "Dataset", "open_data", "model_input_specs", "LABELS"]

logger = logging.getLogger(__name__)

LABELS = "labels"

# Casts we do silently: every value of the source type is exactly representable in the
# target. float64 -> float32 is the one exception we allow, since an fp32 model computes in
# fp32 anyway; it is logged.
_LOSSLESS = {
    np.dtype(np.float32): {np.float16, np.float64},
    np.dtype(np.float16): set(),
    np.dtype(np.int64): {np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32},
    np.dtype(np.int32): {np.int8, np.int16, np.uint8, np.uint16, np.int64},
    np.dtype(np.bool_): set(),
}


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, and shape with ``str``/None for symbolic dims."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}:{dims}:{self.dtype.name}"


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, as InputSpecs. A dim value that is not
    positive is symbolic (paddle2onnx writes -1 for a dynamic batch)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def _npz_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Read every array's shape and dtype from an .npz without loading the data."""
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                out[member.removesuffix(".npy")] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise DataError(
            f"data file {path} is not a readable .npz file ({e})",
            "save it with numpy.savez(path, **{input_name: array})",
        ) from e
    return out


class _RowReader:
    """One array of an .npz shard read a batch of rows at a time, so a shard of any size is
    never in memory whole (Fortran-order arrays, which cannot be streamed, load whole)."""

    def __init__(self, zf: zipfile.ZipFile, name: str, shard: Path) -> None:
        self.stream = zf.open(f"{name}.npy")
        version = np.lib.format.read_magic(self.stream)
        if version == (1, 0):
            shape, fortran, self.dtype = np.lib.format.read_array_header_1_0(self.stream)
        else:
            shape, fortran, self.dtype = np.lib.format.read_array_header_2_0(self.stream)
        self.row_shape = tuple(shape[1:])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.whole = None
        if fortran or self.dtype.hasobject:
            with np.load(shard, allow_pickle=False) as npz:
                self.whole = npz[name]
        self.position = 0

    def read(self, rows: int) -> np.ndarray:
        if self.whole is not None:
            self.position += rows
            return self.whole[self.position - rows : self.position]
        data = bytearray(self.stream.read(rows * self.row_bytes))  # writable, like np.load's
        return np.frombuffer(data, self.dtype).reshape((rows, *self.row_shape))


class Dataset:
    """Samples from an .npz file or a folder of .npz shards (read in name order)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.shards = self._find_shards()
        self._headers = [_npz_shapes(s) for s in self.shards]
        self._check_no_objects()
        self._check_consistent()
        first = self._headers[0]
        self.names = [n for n in first if n != LABELS]
        self.has_labels = LABELS in first
        self.shard_sizes = [self._shard_samples(h, s) for h, s in zip(self._headers, self.shards)]
        self.num_samples = sum(self.shard_sizes)
        if self.num_samples == 0:
            raise DataError(f"data {self.path} holds no samples", "add at least one sample")

    def _find_shards(self) -> list[Path]:
        if self.path.is_dir():
            shards = sorted(self.path.glob("*.npz"))
            if not shards:
                raise DataError(
                    f"data folder {self.path} has no .npz files", "put .npz shards in it"
                )
            return shards
        if not self.path.is_file():
            raise DataError(f"data {self.path} does not exist", "check the path")
        return [self.path]

    def _check_no_objects(self) -> None:
        """Object arrays (Python objects: ragged lists, mixed types) are pickles, which
        onnxship never loads (they can run code): refused before anything is read."""
        for shard, header in zip(self.shards, self._headers):
            for name, (_, dtype) in header.items():
                if dtype.hasobject:
                    what = "labels" if name == LABELS else f"array {name}"
                    fix = "one integer class index per sample" if name == LABELS else "numbers"
                    raise DataError(
                        f"data {shard}: {what} is an object array (Python objects, e.g. ragged "
                        "lists or strings mixed with numbers), which onnxship does not unpickle",
                        f"save {fix}: numpy.savez(path, {name}=numpy.asarray(values, "
                        f"dtype={'numpy.int64' if name == LABELS else 'numpy.float32'}))",
                    )

    def _check_consistent(self) -> None:
        names = set(self._headers[0])
        for shard, header in zip(self.shards[1:], self._headers[1:]):
            if set(header) != names:
                raise DataError(
                    f"shard {shard.name} has arrays {sorted(header)}, the first shard "
                    f"{sorted(names)}",
                    "give every shard the same array names",
                )

    @staticmethod
    def _shard_samples(header: dict, shard: Path) -> int:
        counts = {name: (shape[0] if shape else None) for name, (shape, _) in header.items()}
        if None in counts.values():
            scalar = [n for n, c in counts.items() if c is None]
            raise DataError(
                f"{shard.name}: arrays {scalar} are scalars",
                "put samples on the first axis of every array",
            )
        if len(set(counts.values())) > 1:
            raise DataError(
                f"{shard.name}: arrays disagree on the number of samples {counts}",
                "give every array (and labels) one entry per sample on the first axis",
            )
        return next(iter(counts.values()), 0)

    def check(self, specs: Sequence[InputSpec]) -> None:
        """Raise one DataError naming every mismatch between this data and the inputs."""
        problems = []
        wanted = {s.name for s in specs}
        missing = [s.name for s in specs if s.name not in self.names]
        if missing:
            problems.append(f"missing inputs {missing} (data has {self.names})")
        extra = [n for n in self.names if n not in wanted]
        if extra:
            problems.append(f"arrays {extra} are not model inputs {sorted(wanted)}")
        for spec in specs:
            if spec.name in self.names:
                problems += self._check_input(spec)
        if problems:
            raise DataError(
                f"data {self.path} does not fit the model: " + "; ".join(problems),
                "save arrays named after the model inputs, samples on the first axis "
                "(see `onnxship validate --help`)",
            )

    def _check_input(self, spec: InputSpec) -> list[str]:
        problems = []
        for shard, header in zip(self.shards, self._headers):
            shape, dtype = header[spec.name]
            where = f"{spec.name} in {shard.name}" if len(self.shards) > 1 else spec.name
            if dtype != spec.dtype and dtype.type not in _LOSSLESS.get(spec.dtype, set()):
                problems.append(f"{where} is {dtype.name}, model wants {spec.dtype.name}")
            if len(shape) != len(spec.shape):
                problems.append(
                    f"{where} has shape {shape} (samples first), model input is {spec.describe()}"
                )
                continue
            for axis, (got, want) in enumerate(zip(shape[1:], spec.shape[1:]), start=1):
                if isinstance(want, int) and want != got:
                    problems.append(
                        f"{where} axis {axis} is {got}, model wants {want} ({spec.describe()})"
                    )
        return problems

    def batch_size_for(self, specs: Sequence[InputSpec], wanted: int) -> int:
        """The batch size to feed: the model's fixed first dim if it has one, else ``wanted``."""
        fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
        if fixed:
            return fixed.pop()
        return wanted

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """One sample's shape per input array (the first dim, the samples, left off)."""
        return {n: shape[1:] for n, (shape, _) in self._headers[0].items() if n in self.names}

    def labels(self) -> np.ndarray | None:
        if not self.has_labels:
            return None
        return np.concatenate([self._load(s, LABELS) for s in self.shards])

    def _load(self, shard: Path, name: str) -> np.ndarray:
        with np.load(shard, allow_pickle=False) as npz:
            return npz[name]

    def batches(
        self,
        specs: Sequence[InputSpec],
        batch_size: int,
        limit: int | None = None,
        check_finite: bool = False,
        with_labels: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yield feeds of ``batch_size`` samples (the last may be smaller), cast to the
        model's dtypes; only one batch is in memory at a time, read from the shard as a
        stream. ``limit`` caps the samples read."""
        remaining = self.num_samples if limit is None else min(limit, self.num_samples)
        names = [s.name for s in specs] + ([LABELS] if with_labels and self.has_labels else [])
        dtypes = {s.name: s.dtype for s in specs}
        start_index = 0
        for shard, size in zip(self.shards, self.shard_sizes):
            if remaining <= 0:
                return
            take = min(size, remaining)
            with zipfile.ZipFile(shard) as zf:
                readers = {n: _RowReader(zf, n, shard) for n in names}
                for lo in range(0, take, batch_size):
                    rows = min(batch_size, take - lo)
                    feed = {
                        n: self._cast(n, r.read(rows), dtypes.get(n)) for n, r in readers.items()
                    }
                    if check_finite:
                        self._check_finite(feed, start_index + lo)
                    yield feed
            remaining -= take
            start_index += take

    def _cast(self, name: str, array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
        if dtype is None or array.dtype == dtype:
            return array
        if array.dtype == np.float64 and dtype == np.float32:
            logger.info("casting %s from float64 to float32", name)
        return array.astype(dtype)

    def _check_finite(self, feed: dict[str, np.ndarray], offset: int) -> None:
        for name, array in feed.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                flat = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
                first = offset + int(np.argmax(flat))
                raise DataError(
                    f"data {self.path}: {name} holds NaN or Inf (first at sample {first})",
                    "remove or fix those samples",
                )


def open_data(path: str | os.PathLike, specs: Sequence[InputSpec]) -> Dataset:
    """Open ``path`` and check it against the model's inputs."""
    data = Dataset(path)
    data.check(specs)
    return data
