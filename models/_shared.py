"""Shared by the reference models: the digits data, deterministic training, and the cache.

scikit-learn ships the 8×8 handwritten digits (1797 images), so nothing is downloaded.
Trained weights are produced by code and cached under build/models/<name>/, keyed by the
hash of the model's source, so no binary checkpoint lives in git.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "models"
SEED = 0
CALIB_SAMPLES = 256


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed split: (x_train, y_train, x_test, y_test); pixels as ints 0..16, labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images.astype(np.int64), digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def train(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    epochs: int,
    lr: float = 3e-3,
    batch: int = 64,
) -> torch.nn.Module:
    """Seeded, single-threaded Adam training: the same weights on every run and machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for lo in range(0, len(labels), batch):
                idx = order[lo : lo + batch]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    model(*(t[idx] for t in inputs)), labels[idx]
                )
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor
) -> float:
    with torch.no_grad():
        return float((model(*inputs).argmax(-1) == labels).double().mean())


def source_key(*files: str | Path) -> str:
    """Hash of the files that define a model and its training: the cache key."""
    digest = hashlib.sha256()
    for f in (*files, __file__):
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:16]


def cached(
    name: str,
    key: str,
    build: Callable[[], torch.nn.Module],
    fit: Callable[[torch.nn.Module], None],
) -> torch.nn.Module:
    """``build()`` with weights from the cache, training them with ``fit`` on a miss."""
    path = BUILD / name / f"weights-{key}.pt"
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    fit(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    for stale in path.parent.glob("weights-*.pt"):  # weights of earlier source versions
        if stale != path:
            stale.unlink()
    return model.eval()


def trained_digits(
    name: str,
    source: str | Path,
    build: Callable[[], torch.nn.Module],
    to_inputs: Callable[[np.ndarray], dict[str, np.ndarray]],
    epochs: int,
    lr: float = 3e-3,
) -> torch.nn.Module:
    """The trained digits model ``name`` (cached), writing its calib.npz and test.npz."""
    x_tr, y_tr, x_te, y_te = digits_split()
    inputs = to_inputs(x_tr)
    write_data(name, inputs, to_inputs(x_te), y_te)

    def fit(model: torch.nn.Module) -> None:
        tensors = tuple(torch.from_numpy(a) for a in inputs.values())
        train(model, tensors, torch.from_numpy(y_tr), epochs=epochs, lr=lr)

    return cached(name, source_key(source), build, fit)


def digits_test_accuracy(
    model: torch.nn.Module, to_inputs: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> float:
    _, _, x_te, y_te = digits_split()
    tensors = tuple(torch.from_numpy(a) for a in to_inputs(x_te).values())
    return accuracy(model, tensors, torch.from_numpy(y_te))


def write_data(
    name: str, train: dict[str, np.ndarray], test: dict[str, np.ndarray], y_test: np.ndarray
) -> dict[str, Path]:
    """calib.npz (first CALIB_SAMPLES training samples) and test.npz (with labels)."""
    folder = BUILD / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"calib": folder / "calib.npz", "test": folder / "test.npz"}
    arrays = {
        "calib": {k: v[:CALIB_SAMPLES] for k, v in train.items()},
        "test": {**test, "labels": y_test},
    }
    for split, path in paths.items():
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
        os.close(fd)
        np.savez(tmp, **arrays[split])
        os.replace(tmp, path)
    return paths
