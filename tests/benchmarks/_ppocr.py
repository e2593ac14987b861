"""PP-OCRv4 text detection for the int8 benchmarks: the real model, real photos, a task metric.

* Models: ``rapidocr-onnxruntime`` 1.4.4 ships them as ONNX files written by paddle2onnx —
  opset 12, every weight in a ``Constant`` node: a model from another exporter
  (``pip install --no-deps rapidocr-onnxruntime==1.4.4``; only the files are used, so its
  OpenCV dependency is not needed). :func:`det_model` is the detector (4.7 MB, depthwise,
  DB head: ``x`` NCHW float32 → a text probability map ``1×1×H×W``); :func:`rec_model` and
  :func:`cls_model` the recogniser and the text-direction classifier.
* Inputs as rapidocr feeds the detector (its ``config.yaml`` and ``ch_ppocr_det/utils.py``):
  BGR, ``(x / 255 − 0.5) / 0.5``, the shorter side scaled up to 736, both sides rounded to
  multiples of 32.
* Photos: scikit-image's bundled ones. :data:`TEXT_PHOTOS` (all hold text) are for testing
  only; calibration uses :data:`CALIB_PHOTOS` (disjoint), random crops, with printed words
  drawn on them by :func:`with_words` (Pillow's built-in font) unless ``words=False`` — a
  detector is deployed on images that hold text, and its calibration should see some.
* Metric (:func:`text_map_scores`): the map binarised at 0.3 — the threshold of rapidocr's
  DB post-processing — as IoU against the fp32 model's, the number of text regions
  (connected components) in each, and the map's peak. A cosine over maps that are zero on
  most pixels says little.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

THRESHOLD = 0.3  # rapidocr's DBPostProcess thresh
LIMIT_SIDE = 736  # rapidocr's Det.limit_side_len (limit_type: min)

# scikit-image photos that hold text (a printed page, handwriting, the project's logo): test
# only. The calibration photos hold none; none is in both sets.
TEXT_PHOTOS = ("page", "text", "logo")
CALIB_PHOTOS = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass",
    "hubble_deep_field", "moon", "colorwheel", "immunohistochemistry", "gravel",
)  # fmt: skip
WORDS = (
    "OPEN", "Exit", "SALE 50%", "Main Street", "No parking", "Platform 2", "total 12.40",
    "onnxship", "Quantization", "WARNING", "Cafe", "2024-05-17", "Room 101", "Tel. 555-0199",
    "Department of Physics", "www.example.org", "PUSH", "Lot 7", "Best before", "INVOICE",
)  # fmt: skip


def _model(name: str) -> Path:
    """A model file of the installed package, found without importing it (its __init__
    imports OpenCV)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0] if folders else ".") / "models" / name
    if not folders or not path.is_file():
        raise FileNotFoundError(f"{path}: pip install --no-deps rapidocr-onnxruntime==1.4.4")
    return path


def det_model() -> Path:
    """PP-OCRv4 text detector (paddle2onnx, opset 12, weights in Constant nodes)."""
    return _model("ch_PP-OCRv4_det_infer.onnx")


def rec_model() -> Path:
    """PP-OCRv4 text recogniser (``x`` 1×3×48×W → character probabilities)."""
    return _model("ch_PP-OCRv4_rec_infer.onnx")


def cls_model() -> Path:
    """Text-direction classifier (``x`` N×3×48×192 → 0° / 180°)."""
    return _model("ch_ppocr_mobile_v2.0_cls_infer.onnx")


def photo(name: str) -> np.ndarray:
    """One bundled scikit-image photo as uint8 H×W×3 RGB."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-12)).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def det_size(h: int, w: int, limit: int = LIMIT_SIDE) -> tuple[int, int]:
    """rapidocr's detector resize: shorter side up to ``limit``, sides multiples of 32."""
    ratio = limit / min(h, w) if min(h, w) < limit else 1.0
    return (max(32, round(int(h * ratio) / 32) * 32), max(32, round(int(w * ratio) / 32) * 32))


def det_input(img: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB uint8 image as the detector's input: 1×3×H×W float32, BGR, (x/255−0.5)/0.5, at
    ``size`` (default :func:`det_size`)."""
    from skimage.transform import resize

    size = size or det_size(*img.shape[:2])
    x = resize(img, size, preserve_range=True, anti_aliasing=False).astype(np.float32)
    x = (x[..., ::-1] / 255.0 - 0.5) / 0.5  # RGB → BGR, as cv2 reads it
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def with_words(img: np.ndarray, rng: np.random.Generator, count: int = 6) -> np.ndarray:
    """``img`` with ``count`` printed words drawn on it: random text from :data:`WORDS`, size,
    place and a light or dark colour (Pillow's built-in scalable font)."""
    from PIL import Image, ImageDraw, ImageFont

    out = Image.fromarray(img)
    draw = ImageDraw.Draw(out)
    h, w = img.shape[:2]
    for _ in range(count):
        font = ImageFont.load_default(size=int(rng.integers(max(10, h // 40), max(12, h // 8))))
        text = str(rng.choice(WORDS))
        x, y = int(rng.integers(0, max(1, w * 3 // 4))), int(rng.integers(0, max(1, h - 10)))
        shade = int(rng.integers(0, 60)) if rng.random() < 0.5 else int(rng.integers(200, 256))
        draw.text((x, y), text, fill=(shade, shade, shade), font=font)
    return np.asarray(out)


def calibration(
    count: int, seed: int = 0, size: int = 640, words: bool = True, photos: Sequence[str] = ()
) -> np.ndarray:
    """``count`` random crops (⅓ to all of the shorter side) of the calibration photos,
    resized to ``size``×``size`` (a multiple of 32), with printed words drawn on each unless
    ``words`` is False, as detector inputs: N×3×size×size float32."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    images = [photo(n) for n in (photos or CALIB_PHOTOS)]
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(1 / 3, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = resize(img[y : y + side, x : x + side], (size, size), preserve_range=True)
        crop = crop.astype(np.uint8)
        out[i] = det_input(with_words(crop, rng) if words else crop, (size, size))[0]
    return out


def test_inputs(photos: Sequence[str] = TEXT_PHOTOS) -> dict[str, np.ndarray]:
    """Each text photo as rapidocr feeds it (batch 1, its own size): name → 1×3×H×W."""
    return {name: det_input(photo(name)) for name in photos}


def test_tiles(size: int = LIMIT_SIDE, photos: Sequence[str] = TEXT_PHOTOS) -> np.ndarray:
    """The text photos at the detector's size, cut into ``size``×``size`` tiles (no overlap;
    the last row/column of a side not divisible is dropped): N×3×size×size, for tools that
    need one shape (``onnxship validate``). Pick tiles with text by the fp32 map."""
    tiles = []
    for x in test_inputs(photos).values():
        _, _, h, w = x.shape
        for y0 in range(0, h - size + 1, size):
            for x0 in range(0, w - size + 1, size):
                tiles.append(x[0, :, y0 : y0 + size, x0 : x0 + size])
    return np.stack(tiles).astype(np.float32)


def text_map_scores(ref: np.ndarray, got: np.ndarray, thresh: float = THRESHOLD) -> dict:
    """The task metric of one probability map (``1×1×H×W`` or ``H×W``) against the fp32
    model's: IoU of the maps binarised at ``thresh`` (1.0 when both are empty), text regions
    (8-connected components) in each, each map's peak, the maps' correlation."""
    from skimage.measure import label

    ref, got = np.squeeze(ref), np.squeeze(got)
    a, b = ref > thresh, got > thresh
    union = int(np.count_nonzero(a | b))
    iou = float(np.count_nonzero(a & b) / union) if union else 1.0
    corr = float(np.corrcoef(ref.ravel(), got.ravel())[0, 1]) if ref.std() and got.std() else 0.0
    return {
        "iou": iou,
        "text_pixels": (int(a.sum()), int(b.sum())),
        "regions": (int(label(a, connectivity=2).max()), int(label(b, connectivity=2).max())),
        "peak": (float(ref.max()), float(got.max())),
        "corr": corr,
    }
