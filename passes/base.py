"""The pass interface: small classes with typed settings, and a runner.

A pass declares its settings once, as a dataclass of :func:`passes.options.option` fields
(``Settings``; see ``passes/settings.py``): ``__init__`` takes them as keyword arguments,
checks them against the declaration and sets each as an attribute, then ``setup`` derives
what the pass needs from them. It checks its preconditions in
``requires``, does its work in ``call`` and returns a :class:`PassResult`; ``ensures`` runs
the onnx checker on the result. Every pass here is functional: it never edits the model it
is given, it returns a new one (``__call__`` checks that on the graph's structure, and on
every byte under --debug).

Before ``requires``, ``accept`` makes a model from another exporter fit, on a copy
(``passes/normalize.py``): float weights held in ``Constant`` nodes become initializers, and
the opset is upgraded to what the pass needs (``min_opset``); ``stats["normalized"]`` says
what was done.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx

from converter.core.errors import InternalError, OnnxshipError, first_line
from converter.core.onnxio import check_output_path, load_model, save_model
from converter.core.packed import dense_model
from passes.normalize import (
    OpsetNeed,
    describe,
    named_nodes,
    opset_of,
    upgrade_opset,
    weights_as_initializers,
)
from passes.options import NoSettings, check_keys, has_calibration, needs_calibration, options_of

__all__ = [
    "Pass",
    "PassResult",
    "PassRunner",
    "make_pass",
    "fingerprint",
    "apply_to_file",
    "quiet_passes",
]

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


def fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the deterministic serialization: equal bytes ⇔ equal fingerprint."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def structure(model: onnx.ModelProto) -> tuple:
    """What a pass would change if it edited its input in place, read without serializing:
    the graph's nodes (op, inputs, outputs, attribute count), initializers (name, type,
    shape), inputs and outputs. Cheap enough to check on every pass call; the full byte
    fingerprint is checked too under --debug."""
    g = model.graph
    return (
        tuple((n.op_type, tuple(n.input), tuple(n.output), len(n.attribute)) for n in g.node),
        tuple((t.name, t.data_type, tuple(t.dims)) for t in g.initializer),
        tuple(v.name for v in g.input),
        tuple(v.name for v in g.output),
        tuple((o.domain, o.version) for o in model.opset_import),
    )


class Pass:
    """Base class. Subclasses set ``name`` and ``Settings`` (their declaration) and implement
    ``call``; they may extend ``setup`` (derived state), ``requires`` (preconditions on the
    input) and ``ensures`` (postconditions)."""

    name = "pass"
    Settings: ClassVar[type] = NoSettings
    # whether ``accept`` names unnamed or duplicate-named nodes (passes that tell nodes apart
    # by name: quantization's exclusions, bias correction's float twins)
    names_nodes: ClassVar[bool] = False
    # Reads weights as initializers: the runner unpacks packed weights (core/packed.py) first.
    dense_weights = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = inspect.signature(cls.Settings)  # what help() and IDEs show

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The settings ``Settings`` declares, checked there (BadInputError), as attributes."""
        given = self.Settings(*args, **kwargs)
        for o in options_of(self.Settings):
            setattr(self, o.name, getattr(given, o.name))
        self.setup()

    def setup(self) -> None:
        """Derive state from the settings (compiled patterns, a resolved target...)."""

    def missing_calibration(self) -> bool:
        """Whether this pass needs calibration data (its declaration says so) and has none."""
        return needs_calibration(self.Settings) and not has_calibration(
            self.Settings, self.settings()
        )

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise an OnnxshipError when ``model`` cannot go through this pass."""

    def min_opset(self, model: onnx.ModelProto) -> OpsetNeed:
        """The ai.onnx opset this pass (with these settings) needs for ``model``; older models
        are upgraded by ``accept``. Default: any."""
        return OpsetNeed(0, "")

    def accept(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
        """(``model`` as ``call`` takes it, what was done to it or None). Float ``Constant``
        weights moved to initializers, the opset upgraded to :meth:`min_opset`, unnamed nodes
        named (``names_nodes``), then ``requires`` checked — each on a copy, only when needed.
        Idempotent: accepting the result again changes nothing (calibration ranges
        fingerprint it)."""
        moved, count = weights_as_initializers(model)
        need = self.min_opset(moved)
        try:
            ready, had = upgrade_opset(moved, need.opset, need.why, need.alternative)
        except OnnxshipError:
            self.requires(moved)  # a more basic refusal (already quantized...) comes first
            raise
        # named last: the opset converter adds nodes of its own, often without names (named
        # before it, a second accept named those and the ranges' fingerprint no longer fit)
        ready, named = named_nodes(ready) if self.names_nodes else (ready, 0)
        self.requires(ready)
        if ready is model:
            return model, None
        normalized = {
            "constants_moved": count,
            "nodes_named": named,
            "opset_from": had,
            "opset_to": opset_of(ready),
            "opset_reason": need.why if opset_of(ready) != had else "",
        }
        # moving weights and upgrading change what the user wrote; names are bookkeeping
        level = logging.INFO if count or had != opset_of(ready) else logging.DEBUG
        logger.log(level, "%s: %s", self.name, "; ".join(describe(normalized)))
        return ready, normalized

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def ensures(self, result: PassResult) -> None:
        try:
            onnx.checker.check_model(result.model, full_check=False)
        except onnx.checker.ValidationError as e:
            raise InternalError(
                f"pass {self.name} produced an invalid model: {first_line(e)}"
            ) from e

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        ready, normalized = self.accept(model)
        thorough = logger.isEnabledFor(logging.DEBUG)  # --debug: hash every byte too
        before = (structure(ready), fingerprint(ready) if thorough else None)
        result = self.call(ready)
        after = (structure(ready), fingerprint(ready) if thorough else None)
        if after != before:
            raise InternalError(f"pass {self.name} modified its input model")
        if normalized:
            result.stats["normalized"] = normalized
            result.modified = True
        self.ensures(result)
        return result

    def settings(self) -> dict[str, Any]:
        """The settings this pass was made with, as resolved (for manifests and cache keys):
        one entry per declared option."""
        return {o.name: getattr(self, o.name) for o in options_of(self.Settings)}


@contextlib.contextmanager
def quiet_passes() -> Iterator[None]:
    """Only errors from the passes' loggers for the duration: a search that runs a pass many
    times (sensitivity's variants, auto's candidates) keeps its own lines readable; what
    each call would have said is in its stats."""
    log = logging.getLogger("passes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def make_pass(kind: type[Pass], settings: Mapping[str, Any]) -> Pass:
    """Build ``kind(**settings)`` (recipes, ``auto``, sensitivity): an unknown or missing
    setting is an error naming the allowed ones, a bad value one naming what is allowed."""
    check_keys(kind.Settings, settings, f"pass {kind.name}")
    return kind(**settings)


class PassRunner:
    """Apply passes in order; a failure names the passes that had already run."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassResult]]:
        results: list[PassResult] = []
        for p in self.passes:
            try:
                if p.dense_weights:
                    model = dense_model(model)
                result = p(model)
            except OnnxshipError as e:
                done = ", ".join(q.name for q in self.passes[: len(results)]) or "none"
                e.what = f"pass {p.name} failed (already ran: {done}): {e.what}"
                raise
            logger.debug("pass %s: modified=%s", p.name, result.modified)
            results.append(result)
            model = result.model
        return model, results


def apply_to_file(
    passes: Sequence[Pass],
    source: str | os.PathLike,
    output: str | os.PathLike,
    *other_inputs: str | os.PathLike | None,
) -> list[PassResult]:
    """Load ``source``, run ``passes``, write ``output`` atomically; the source (and any
    ``other_inputs``, e.g. calibration data) is never the output and never modified."""

    out = check_output_path(output, source, *other_inputs)
    model, results = PassRunner(passes).run(load_model(source))
    save_model(model, out)
    return results
