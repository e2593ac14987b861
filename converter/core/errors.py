"""The one exception family of onnxship.

Every error carries what went wrong and how to fix it; the CLI prints
``error: <what> — <fix>`` and maps the class to an exit code.
"""

from __future__ import annotations

__all__ = [
    "OnnxshipError",
    "BadInputError",
    "ExportError",
    "DataError",
    "PassError",
    "GateFailed",
    "VerificationFailed",
    "InternalError",
    "INTERNAL_FIX",
    "Interrupted",
    "first_line",
]


class OnnxshipError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for it."""

    exit_code = 2

    def __init__(self, what: str, fix: str = "") -> None:
        self.what = what
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.what} — {self.fix}" if self.fix else self.what

    def __str__(self) -> str:  # what/fix may be amended on the way up (e.g. by a runner)
        return self.message


class BadInputError(OnnxshipError):
    """A file, flag or setting the user gave cannot be used."""


class ExportError(OnnxshipError):
    """The model could not be exported by any exporter tried."""


class DataError(BadInputError):
    """Data (.npz file or folder of shards) does not fit the model."""


class PassError(OnnxshipError):
    """A graph pass could not run; names the passes that already ran."""


class GateFailed(OnnxshipError):
    """A numeric gate failed (validation, verification, accuracy budget)."""

    exit_code = 1


class VerificationFailed(GateFailed):
    """The exported ONNX model does not compute what the PyTorch model computes; ``report``
    holds every output's diffs."""

    report: object | None = None


INTERNAL_FIX = "rerun with --debug and report it"


class InternalError(OnnxshipError):
    """A bug of onnxship, not a verdict on the input: onnxruntime refuses a model onnxship
    built, a pass breaks its own contract. Exit 3 (as the environment: no verdict on the
    model), printed as ``internal error: <what> — rerun with --debug and report it``; the
    CLI reports any exception it did not expect the same way."""

    exit_code = 3

    def __init__(self, what: str, fix: str = INTERNAL_FIX) -> None:
        super().__init__(what, fix)

    @property
    def message(self) -> str:
        return f"internal error: {self.what} — {self.fix}"


class Interrupted(KeyboardInterrupt):
    """A signal asked the process to stop (SIGTERM, as CI runners and ``timeout`` send, or
    SIGINT). Raised where the process is, so that every ``with`` block unwinds and removes
    its temporaries; the CLI exits 128 + the signal's number."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(name)
        self.signum = signum
        self.name = name


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first non-empty line of the message`` (at most ``limit`` characters of it);
    just the type's name for an exception with no message. Never raises."""
    for line in str(e).splitlines():
        if line.strip():
            return f"{type(e).__name__}: {line.strip()[:limit]}"
    return type(e).__name__
