"""Loading the user's model code and weights. Imports torch: only export uses this."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from converter.core.errors import BadInputError

logger = logging.getLogger(__name__)

__all__ = ["load_module", "load_weights"]

_SPEC_HELP = "use path/to/file.py:callable, e.g. models/digits_cnn/model.py:trained"


def _split_spec(spec: str) -> tuple[Path, str]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise BadInputError(f"bad model SPEC {spec!r}", _SPEC_HELP)
    return Path(path), name


def _import_file(path: Path) -> Any:
    """Import a .py file by path as a script would run: its folder first on sys.path."""
    if not path.is_file():
        raise BadInputError(f"model file {path} does not exist", _SPEC_HELP)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(f"onnxship_user_{digest}", path)
    if module_spec is None or module_spec.loader is None:
        raise BadInputError(f"model file {path} is not a Python file", _SPEC_HELP)
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[module_spec.name] = module  # dataclasses and pickling look the module up
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's code may raise anything while importing
        del sys.modules[module_spec.name]
        raise BadInputError(
            f"importing {path} failed: {type(e).__name__}: {e}",
            _fix_for(e, f"fix the file; `python {path}` shows the same error"),
        ) from e
    finally:
        sys.path.remove(folder)
    return module


def _fix_for(e: Exception, otherwise: str) -> str:
    """The fix for an error raised by the user's code: a module it imports that this Python
    does not have is installed, not fixed in the file."""
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        return (
            f"install the package that provides {top!r} into the Python that runs onnxship "
            f"({sys.executable} -m pip install ...), or build the model without it"
        )
    return otherwise


def load_module(spec: str) -> torch.nn.Module:
    """Call ``file.py:callable`` and return its nn.Module in eval mode."""
    path, name = _split_spec(spec)
    module = _import_file(path)
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise BadInputError(
            f"{path} has no callable {name!r}",
            f"name one of {found[:12]}" if found else "define a function that returns the model",
        )
    try:
        model = factory()
    except Exception as e:  # the user's factory may raise anything
        raise BadInputError(
            f"calling {name}() from {path} failed: {type(e).__name__}: {e}",
            _fix_for(e, "make it callable with no arguments and returning an nn.Module"),
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(
            f"{name}() from {path} returned {type(model).__name__}, not a torch.nn.Module",
            "return the model instance, e.g. `return MyNet()`",
        )
    return model.eval()


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise BadInputError(f"weights file {path} does not exist", "check the --weights path")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise BadInputError(
                "reading .safetensors needs the safetensors package", "pip install safetensors"
            ) from e
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise BadInputError(
                f"weights file {path} is not valid safetensors ({e})",
                "re-save it with safetensors.torch.save_file",
            ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadInputError(
            f"weights file {path} needs unpickling of arbitrary objects; refused, nothing in it "
            "was executed",
            "save only tensors: torch.save(model.state_dict(), path)",
        ) from e
    except Exception as e:  # zip/EOF/format errors of a file that is no checkpoint
        raise BadInputError(
            f"weights file {path} is not a PyTorch checkpoint ({type(e).__name__})",
            "save it with torch.save(model.state_dict(), path)",
        ) from e


def _tensors(obj: Any) -> bool:
    """A non-empty mapping of names to tensors: a state_dict."""
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _as_state_dict(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    """The state_dict in a checkpoint: the checkpoint itself, or the one state_dict it holds
    beside other things (a training checkpoint: ``{"model_state": ..., "optimizer_state":
    ..., "step": ...}`` as resemblyzer ships, ``{"state_dict": ...}``, ``{"model": ...}``)."""
    if isinstance(obj, Mapping) and not _tensors(obj):
        nested = sorted(k for k, v in obj.items() if isinstance(k, str) and _tensors(v))
        if len(nested) > 1:
            raise BadInputError(
                f"weights file {path} holds {len(nested)} state_dicts ({', '.join(nested)})",
                "save the one to load on its own: torch.save(checkpoint[KEY], path)",
            )
        if nested:
            logger.info("weights: the state_dict under %r in %s", nested[0], path)
            obj = obj[nested[0]]
    if not _tensors(obj):
        raise BadInputError(
            f"weights file {path} holds a {type(obj).__name__}, not a state_dict of tensors",
            "save it with torch.save(model.state_dict(), path)",
        )
    return obj


def _unwrapped(state: Mapping[str, torch.Tensor], own: Mapping[str, Any]) -> Mapping:
    """``state`` without the ``module.`` prefix ``torch.nn.DataParallel`` puts on every key
    (easyocr's CRAFT weights), when that makes its keys the model's."""
    prefix = "module."
    if set(state) == set(own) or not all(k.startswith(prefix) for k in state):
        return state
    stripped = {k[len(prefix) :]: v for k, v in state.items()}
    if set(stripped) != set(own):
        return state
    logger.info("weights: the %r prefix of every key (DataParallel) removed", prefix)
    return stripped


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a state_dict into ``model`` strictly, naming missing/unexpected/mis-shaped keys."""
    path = Path(path)
    own = model.state_dict()
    state = _unwrapped(_as_state_dict(_read_checkpoint(path), path), own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise BadInputError(
            f"weights {path} do not match the model: " + "; ".join(problems),
            "pass the checkpoint saved from this model class (model.state_dict())",
        )
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', … {len(items) - n} more' if len(items) > n else ''}]"
