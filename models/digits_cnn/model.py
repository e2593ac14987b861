"""A small CNN on scikit-learn's 8×8 digits: the bundled default model of `make demo`.

`build()` returns the untrained architecture; `trained()` returns it with weights trained
deterministically in seconds (cached under build/models/digits_cnn/) and writes the data the
recipe uses: calib.npz (training samples) and test.npz (held-out samples with labels).
Run `python models/digits_cnn/model.py` to train and print the test accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _shared  # noqa: E402

NAME = "digits_cnn"


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build() -> nn.Module:
    torch.manual_seed(_shared.SEED)
    return DigitsCNN()


def _inputs(images: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": (images.reshape(-1, 1, 8, 8) / 16.0).astype("float32")}


def trained() -> nn.Module:
    return _shared.trained_digits(NAME, __file__, build, _inputs, epochs=15)


def test_accuracy(model: nn.Module) -> float:
    return _shared.digits_test_accuracy(model, _inputs)


if __name__ == "__main__":
    print(f"{NAME}: PyTorch test accuracy {test_accuracy(trained()):.4f}")
