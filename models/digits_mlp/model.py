"""An MLP on scikit-learn's 8×8 digits (64 pixels in, 10 logits out).

`build()` returns the untrained architecture; `trained()` the trained, cached model, and
writes build/models/digits_mlp/{calib,test}.npz. `python models/digits_mlp/model.py` trains
and prints the test accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def _inputs(images):
    return (images.reshape(-1, 64) / 16.0).astype("float32")


def trained() -> nn.Module:
    x_tr, y_tr, x_te, y_te = _shared.digits_split()
    _shared.write_data(NAME, {"x": _inputs(x_tr)}, {"x": _inputs(x_te)}, y_te)

    def fit(model: nn.Module) -> None:
        _shared.train(model, (torch.from_numpy(_inputs(x_tr)),), torch.from_numpy(y_tr), epochs=30)

    return _shared.cached(NAME, _shared.source_key(__file__), build, fit)


def test_accuracy(model: nn.Module) -> float:
    _, _, x_te, y_te = _shared.digits_split()
    return _shared.accuracy(model, (torch.from_numpy(_inputs(x_te)),), torch.from_numpy(y_te))


if __name__ == "__main__":
    print(f"{NAME}: PyTorch test accuracy {test_accuracy(trained()):.4f}")
