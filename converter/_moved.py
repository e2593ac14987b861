"""Old module paths of the flat ``converter/`` (before the layers: core, torch, check, search,
recipes), kept importable as aliases of the new modules. Deprecated: importing one warns
with the new path. Remove in 0.3.

``import converter.validation`` gives the module ``converter.check.validate`` itself (not a
copy), so monkeypatching through either name patches the same thing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED: dict[str, str] = {
    "converter.errors": "converter.core.errors",
    "converter.defaults": "converter.core.defaults",
    "converter.data": "converter.core.data",
    "converter.inputs": "converter.core.inputs",
    "converter.onnxio": "converter.core.onnxio",
    "converter.runtime": "converter.core.runtime",
    "converter.metrics": "converter.core.metrics",
    "converter.executor": "converter.core.executor",
    "converter.render": "converter.core.render",
    "converter.gates": "converter.core.gates",
    "converter.targets": "converter.core.machine",
    "converter.provenance": "converter.core.machine",
    "converter.torchload": "converter.torch.load",
    "converter.exporter": "converter.torch.export",
    "converter.verify": "converter.torch.verify",
    "converter.structured": "converter.torch.structured",
    "converter.distill": "converter.torch.distill",
    "converter.shrinker": "converter.torch.shrink",
    "converter.validation": "converter.check.validate",
    "converter.benchmark": "converter.check.bench",
    "converter.bench_gates": "converter.check.bench_gates",
    "converter.node_error": "converter.check.node_error",
    "converter.sensitivity": "converter.check.sensitivity",
    "converter.profile": "converter.check.profile",
    "converter.auto": "converter.search.auto",
    "converter.auto_tasks": "converter.search.tasks",
    "converter.recipe": "converter.recipes.schema",
    "converter.pipeline": "converter.recipes.pipeline",
    "converter.report": "converter.recipes.report",
    "converter.auto_report": "converter.recipes.auto_report",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names only; loads them as the new module, with a DeprecationWarning."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> None:
        return None  # a placeholder module; exec_module replaces it

    def exec_module(self, module: ModuleType) -> None:
        """Replace the placeholder in ``sys.modules`` by the new module (the import system
        returns what ``sys.modules`` holds after this)."""
        new = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} moved to {new}; import that instead (the alias goes in 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` once (``converter/__init__`` calls this)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
