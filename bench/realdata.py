"""Real scene text from ``../shared/realdata/scenetext``, as the pipeline sees it: loaders that the
real-photo OCR tests (tests/test_ocr_real.py) and benchmarks (bench/ocr_real_bench.py) share.

- ``mmocr_rec_toy``: 10 real scene-text word crops with their words (open-mmlab/mmocr,
  tests/data/rec_toy_dataset, Apache-2.0).
- ``dtrb_demo``: 10 real scene-text word crops (clovaai/deep-text-recognition-benchmark,
  demo_image, Apache-2.0); their labels are a published model's readings, checked by eye (9 of
  10 right; demo_9 shows BALLYS, scored as "ballys").
- ``mmocr_wildreceipt``: 2 real receipt photos with annotated boxes and texts (open-mmlab/mmocr,
  tests/data/kie_toy_dataset/wildreceipt, Apache-2.0), through img2dataset's resizer at the
  download stage's settings, boxes scaled with them; boxes without text left out.
- text-free photos: scikit-image's bundled samples (BSD-3 / public domain).
"""

from __future__ import annotations

import functools
import io
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import pipeline  # noqa: F401  (environment for easyocr's and img2dataset's imports)
from stages.download import DownloadConfig

SCENETEXT = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "scenetext"
_DTRB_BY_EYE = {"demo_9.jpg": "ballys"}  # the image reads BALLYS; the model's "bally" drops the S
TEXT_FREE = ("chelsea.png", "coffee.png", "motorcycle_left.png", "brick.png", "retina.jpg")


def _rgb(data: bytes | Path) -> np.ndarray:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return np.asarray(Image.open(source).convert("RGB"))


def as_downloaded(raw: bytes) -> bytes:
    """The bytes the download stage would store: img2dataset's resizer with the stage's settings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # img2dataset imports imghdr (py3.13)
        from img2dataset.resizer import Resizer

    cfg = DownloadConfig()
    resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=True,
                      encode_quality=cfg.encode_quality, encode_format="jpg")
    image, _, _, _, _, error = resizer(io.BytesIO(raw))
    assert error is None, error
    return image


@dataclass(frozen=True)
class WordCrop:
    name: str
    image: np.ndarray
    word: str


@dataclass(frozen=True)
class Receipt:
    """One annotated photo at the pipeline's input size; quads scaled to that size."""

    name: str
    image: np.ndarray
    quads: list[list[list[float]]]
    words: list[str]


@functools.cache
def mmocr_crops() -> list[WordCrop]:
    folder = SCENETEXT / "mmocr_rec_toy"
    rows = [line.split(maxsplit=1) for line in (folder / "labels.txt").read_text().splitlines() if line.strip()]
    return [WordCrop(name, _rgb(folder / name), word) for name, word in rows]


@functools.cache
def dtrb_crops() -> list[WordCrop]:
    folder = SCENETEXT / "dtrb_demo"
    lines = (folder / "readme_predictions.tsv").read_text().splitlines()[1:]  # header: image, uncased, cased
    rows = [line.split("\t") for line in lines if line.strip()]
    return [WordCrop(name, _rgb(folder / name), _DTRB_BY_EYE.get(name, uncased)) for name, uncased, _ in rows]


@functools.cache
def receipts() -> list[Receipt]:
    folder = SCENETEXT / "mmocr_wildreceipt"
    out = []
    for line in (folder / "data.txt").read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        name = Path(record["file_name"]).name
        image = _rgb(as_downloaded((folder / name).read_bytes()))
        sx, sy = image.shape[1] / record["width"], image.shape[0] / record["height"]
        annotations = [a for a in record["annotations"] if a["text"]]  # empty text: unreadable box
        quads = [[[a["box"][k] * sx, a["box"][k + 1] * sy] for k in range(0, 8, 2)] for a in annotations]
        out.append(Receipt(name, image, quads, [a["text"] for a in annotations]))
    return out


@functools.cache
def text_free_photos() -> list[np.ndarray]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    paths = [folder / name for name in TEXT_FREE if (folder / name).is_file()]
    return [_rgb(as_downloaded(_png_bytes(p))) for p in paths]


def stage_rows(stage: Any, images: list[np.ndarray], batch: int = 8) -> tuple[list[dict], float]:
    """An OCR stage over ``images`` in batches, as the pipeline calls it: one row dict per image,
    and the stage's CPU seconds per image."""
    rows: list[dict] = []
    started = time.process_time()
    for lo in range(0, len(images), batch):
        chunk = images[lo:lo + batch]
        out = stage.process_batch({"uid": [str(lo + k) for k in range(len(chunk))], "image": chunk,
                                   "decode_error": [None] * len(chunk)})
        rows.extend({c: out[c][k] for c in out} for k in range(len(chunk)))
    return rows, (time.process_time() - started) / max(1, len(images))


def _png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "PNG")
    return buf.getvalue()
