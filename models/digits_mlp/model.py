"""An MLP on scikit-learn's 8×8 digits (64 pixels in, 10 logits out).

`build()` returns the untrained architecture; `trained()` the trained, cached model, and
writes build/models/digits_mlp/{calib,test}.npz. `python models/digits_mlp/model.py` trains
and prints the test accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _shared  # noqa: E402

NAME = "digits_mlp"


def build() -> nn.Module:
    torch.manual_seed(_shared.SEED)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _inputs(images: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": (images.reshape(-1, 64) / 16.0).astype("float32")}


def trained() -> nn.Module:
    return _shared.trained_digits(NAME, __file__, build, _inputs, epochs=30)


def test_accuracy(model: nn.Module) -> float:
    return _shared.digits_test_accuracy(model, _inputs)


if __name__ == "__main__":
    print(f"{NAME}: PyTorch test accuracy {test_accuracy(trained()):.4f}")
