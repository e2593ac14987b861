"""Structured pruning with torch-pruning (DepGraph): whole Conv channels and Linear neurons
are removed, with every layer coupled to them (residual adds, concats, reshapes, norms)
pruned together, so the model gets smaller *and* faster.

What this module adds around the library: the model's output layers are found by running it
and kept whole, ``--ignore REGEX`` keeps matching layers whole, and a model the library
pruned into something that no longer runs is reported naming the layer where it broke.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from converter.core.errors import BadInputError

__all__ = ["PruneSettings", "IMPORTANCES", "prune_structured", "output_layers", "count"]

logger = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "taylor")
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class PruneSettings:
    """``keep`` is the fraction of channels/neurons kept per group, in (0, 1]; ``importance``
    ranks them by weight magnitude (l1, l2) or first-order Taylor (needs a gradient, from the
    distillation loss on one batch); kept counts round to multiples of ``round_to``; layers
    whose qualified name matches any ``ignore`` regex keep their outputs whole."""

    keep: float = 0.5
    importance: str = "l2"
    round_to: int = 8
    ignore: tuple[str, ...] = ()

    def check(self) -> None:
        if not 0 < self.keep <= 1:
            raise BadInputError(
                f"--keep {self.keep} is outside (0, 1]",
                "give the fraction of channels to keep, e.g. --keep 0.5",
            )
        if self.importance not in IMPORTANCES:
            raise BadInputError(
                f"unknown importance {self.importance!r}", f"use one of {', '.join(IMPORTANCES)}"
            )
        if self.round_to < 1:
            raise BadInputError(f"--round-to {self.round_to} is < 1", "use 1 (no rounding) or 8")
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as e:
                raise BadInputError(f"bad --ignore regex {pattern!r} ({e})", "fix the regex") from e


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def output_layers(model: nn.Module, example: Sequence[torch.Tensor]) -> list[nn.Module]:
    """The Conv/Linear layers whose output is a model output (e.g. the classifier); when
    the outputs are computed after the last such layer, that last layer."""
    ran: list[tuple[nn.Module, object]] = []
    hooks = [
        m.register_forward_hook(lambda mod, _, out: ran.append((mod, out)))
        for m in model.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            outputs = model(*example)
    finally:
        for h in hooks:
            h.remove()
    flat = _flatten(outputs)
    found = [m for m, out in ran if any(out is o for o in flat)]
    return found or [m for m, _ in ran[-1:]]


def _flatten(obj) -> list:
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _flatten(item)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flatten(v)]
    return [obj]


def ignored_layers(model: nn.Module, settings: PruneSettings) -> list[nn.Module]:
    """The modules matched by ``settings.ignore``; a regex matching nothing is an error."""
    patterns = [re.compile(p) for p in settings.ignore]
    chosen = [m for n, m in model.named_modules() if n and any(p.search(n) for p in patterns)]
    unmatched = [
        p.pattern for p in patterns if not any(p.search(n) for n, _ in model.named_modules() if n)
    ]
    if unmatched:
        raise BadInputError(
            f"--ignore {unmatched} match no layer of the model",
            "use regexes over qualified names such as features.0 or blocks.1.qkv",
        )
    return chosen


def _importance(name: str):
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def prune_structured(
    model: nn.Module,
    example: Sequence[torch.Tensor],
    settings: PruneSettings,
    taylor_loss=None,
) -> dict:
    """Prune ``model`` in place; returns stats (the layers kept whole and each pruned
    layer's channels before → after). ``taylor_loss(model)`` gives the loss whose gradient
    Taylor importance needs."""
    import torch_pruning as tp

    names = _names(model)
    outputs = output_layers(model, example)
    ignored = outputs + [m for m in ignored_layers(model, settings) if m not in outputs]
    before = _widths(model)
    pruner = tp.pruner.MetaPruner(
        model,
        tuple(example),
        importance=_importance(settings.importance),
        pruning_ratio=1 - settings.keep,
        round_to=settings.round_to if settings.round_to > 1 else None,
        ignored_layers=ignored,
    )
    if settings.importance == "taylor":
        model.zero_grad()
        taylor_loss(model).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    _check_runs(model, example, names)
    after = _widths(model)
    changed = {n: f"{before[n]} → {after[n]}" for n in after if before.get(n) != after[n]}
    logger.info("pruned %d layers, kept whole: %s", len(changed), [names[m] for m in outputs])
    return {"kept_whole": sorted({names[m] for m in ignored}), "layers": changed}


def _widths(model: nn.Module) -> dict[str, str]:
    """Each Conv/Linear layer's in → out channels, as text."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = f"{m.in_features}x{m.out_features}"
        elif isinstance(m, _PRUNABLE):
            out[name] = f"{m.in_channels}x{m.out_channels}"
    return out


def _check_runs(model: nn.Module, example: Sequence[torch.Tensor], names: dict) -> None:
    """Run the pruned model; a failure names the innermost module whose forward broke and
    the last layer that ran before, the one to keep whole."""
    entered: list[nn.Module] = []
    last: list[nn.Module] = []

    def done(mod: nn.Module, *_) -> None:  # a forward hook returning a value replaces the output
        entered.pop()
        last.append(mod)

    hooks = []
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, _: entered.append(mod)))
        hooks.append(m.register_forward_hook(done))
    try:
        with torch.no_grad():
            model(*example)
    except RuntimeError as e:
        broke = names.get(entered[-1], "the model") if entered else "the model"
        culprit = next((names[m] for m in reversed(last) if isinstance(m, _PRUNABLE)), broke)
        raise BadInputError(
            f"torch-pruning cannot prune {culprit}: the pruned model fails in the forward of "
            f"{broke or 'the model'} ({str(e).splitlines()[0][:160]})",
            f"keep that layer whole with --ignore '{_pattern(culprit)}'",
        ) from e
    finally:
        for h in hooks:
            h.remove()


def _pattern(name: str) -> str:
    """A regex for ``name`` and its siblings in repeated blocks: blocks.0.qkv →
    blocks\\.\\d+\\.qkv$ (torch-pruning fails alike in every copy of a block)."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")]
    return r"\.".join(parts) + "$"


def count(model: nn.Module, example: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on ``example``, by torch-pruning's counter."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, tuple(example))
    return int(macs), int(params)
