"""Where independent pieces of work run: in this process, or as Ray tasks on a cluster.

Work is written once as ``fn(shared, item)``: a pure function of one piece (a data shard, a
candidate model, a node) and of the context every piece shares (model bytes, settings). An
executor maps it over the pieces and returns the results in input order, so whatever merges
them sees the same sequence whichever executor ran it.

* :class:`InProcess` (the default) calls ``fn`` here, one item after the other.
* :class:`RayExecutor` puts ``shared`` into Ray's object store once (``ray.put``), runs one
  task per item (``@ray.remote(max_retries=...)``: a task whose worker process dies is run
  again, so no item is lost or counted twice) and gathers the results in input order. An
  OnnxshipError raised inside a task (bad data in a shard) is re-raised here as itself.

This is the only module that imports Ray, and only when a RayExecutor is made; scoring code
never does. Use an executor as a context manager: a RayExecutor that started a local Ray
stops it on exit, one that found Ray running (a cluster, a test fixture) leaves it running.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

from converter.core.errors import BadInputError, OnnxshipError
from converter.core.render import progress_bar

__all__ = [
    "EXECUTORS",
    "Executor",
    "InProcess",
    "RayExecutor",
    "make_executor",
    "import_ray",
    "DEFAULT_MAX_RETRIES",
]

logger = logging.getLogger(__name__)

EXECUTORS = ("in-process", "ray")
# A worker lost to a node failure or an out-of-memory kill is retried this many times; a
# fourth death in a row points at the task itself (it kills its worker every time).
DEFAULT_MAX_RETRIES = 3

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Maps ``fn(shared, item)`` over ``items``, results in input order."""

    name: str
    width: int  # how many items run at the same time (CPU slots)

    def map(
        self,
        fn: Callable[[Any, T], R],
        items: Sequence[T],
        shared: Any = None,
        desc: str = "",
        unit: str = "item",
        progress: bool = False,
    ) -> list[R]: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


def _bar(total: int, desc: str, unit: str, progress: bool) -> tqdm:
    return progress_bar(total=total, desc=desc, unit=unit, progress=progress)


class InProcess:
    """Runs every item here, in order: the default, and what the others must equal."""

    name = "in-process"
    width = 1

    def map(self, fn, items, shared=None, desc="", unit="item", progress=False):
        results = []
        with _bar(len(items), desc, unit, progress) as bar:
            for item in items:
                results.append(fn(shared, item))
                bar.update()
        return results

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def import_ray():
    """The ``ray`` module, or the error telling how to install it."""
    try:
        import ray
    except ImportError as e:
        raise BadInputError("--executor ray needs Ray", "pip install 'onnxship[ray]'") from e
    return ray


class RayExecutor:
    """Runs each item as a Ray task. ``address``: an existing cluster (``ray start --head``
    prints it; "auto" finds a local one); None starts a local Ray with ``num_cpus`` CPUs
    (default: this machine's cores). ``max_retries``: how often a task whose worker died is
    run again."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        self.ray = import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.width = 1
        self._started = False

    def __enter__(self) -> RayExecutor:
        ray = self.ray
        if not ray.is_initialized():
            if self.address:
                _check_reachable(self.address)
            options = {"address": self.address} if self.address else {"num_cpus": self.num_cpus}
            try:
                ray.init(
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    **options,
                )
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise BadInputError(
                    f"cannot connect to Ray at {self.address or 'a new local instance'}: "
                    f"{str(e).splitlines()[0][:200]}",
                    "start the cluster with `ray start --head` and pass the address it prints",
                ) from e
            self._started = True
        self.width = max(1, int(ray.cluster_resources().get("CPU", 1)))
        logger.info("Ray: %d CPUs in the cluster", self.width)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False

    def map(self, fn, items, shared=None, desc="", unit="item", progress=False):
        ray = self.ray
        shared_ref = ray.put(shared)  # once: every task reads it from the object store
        task = ray.remote(max_retries=self.max_retries)(fn)
        futures = [task.remote(shared_ref, item) for item in items]
        position = {future: i for i, future in enumerate(futures)}
        results, pending = {}, list(futures)
        with _bar(len(futures), desc, unit, progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:  # the first failure stops the run, without waiting for the others
                    for future in done:
                        i = position[future]
                        results[i] = self._get(ray, future, i, desc)
                except BaseException:
                    for future in pending:
                        ray.cancel(future)
                    raise
                bar.update(len(done))
        return [results[i] for i in range(len(futures))]

    def _get(self, ray, future, index: int, desc: str):
        """One result; a task's own OnnxshipError comes back as itself."""
        try:
            return ray.get(future)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, OnnxshipError):
                raise e.cause from e
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
            raise OnnxshipError(
                f"{desc or 'task'} {index}: its Ray worker process died, "
                f"{self.max_retries + 1} time(s) in a row",
                "check the workers' memory and logs (`ray logs`)",
            ) from e


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT nobody listens on fails here, in seconds: Ray itself retries for minutes.
    Other forms ("auto", "ray://...") are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise BadInputError(
            f"no Ray cluster answers at {address} ({e.strerror or e})",
            "start it with `ray start --head` and pass the address it prints to --ray-address",
        ) from e


def make_executor(name: str = "in-process", address: str | None = None) -> Executor:
    """The executor a CLI flag or recipe key names (``address`` only with ray)."""
    if name not in EXECUTORS:
        raise BadInputError(f"unknown executor {name!r}", f"use one of {', '.join(EXECUTORS)}")
    if name == "in-process":
        if address:
            raise BadInputError(
                "a Ray address was given without --executor ray", "add --executor ray"
            )
        return InProcess()
    return RayExecutor(address=address)
