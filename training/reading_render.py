"""Rendered words for the reading start (training/reading.py): one word per image, drawn the many
ways web images write text, on real photographs and on flat or graded colours.

Every image is a pure function of (seed, index): the training stream and the held-out renders are
two seeds of the same drawing, and a rerun draws the same pixels.
"""

from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sources.embedded.scene import _BOLD_FONTS, _FONT_FILES, load_font

WORDS_FILE = Path(__file__).with_name("reading_words.txt")
DRAW_SCALE = 2  # drawn at twice the model's side, then halved: anti-aliased like a downscaled web image
# scikit-image's bundled real photographs without text (BSD-3-Clause; each image's licence in its
# README.txt): the backgrounds a word is written on half the time.
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
          "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg",
          "cell.png", "clock_motion.png")
CASES = ("lower", "capitalised", "upper")
PHOTO_SIDE = 384  # the photographs' longest side once loaded (twice the drawing side of a 96 px model)


@functools.cache
def reading_words() -> tuple[str, ...]:
    """The vocabulary, in file order (the class index of each word)."""
    lines = WORDS_FILE.read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    try:
        import skimage.data
    except ImportError as err:  # pragma: no cover - installed by `make` with the project
        raise RuntimeError("the reading start draws words on scikit-image's photographs: pip install scikit-image") from err
    folder = Path(skimage.data.__file__).parent
    photos = []
    for name in PHOTOS:
        if (folder / name).is_file():
            photo = Image.open(folder / name).convert("RGB")
            photo.thumbnail((PHOTO_SIDE, PHOTO_SIDE))  # crops are drawn at most this big: resize once, not per draw
            photos.append(np.asarray(photo))
    return tuple(photos)


def _rng(seed: int, index: int) -> random.Random:
    digest = hashlib.sha256(f"reading-v1:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _background(rng: random.Random, side: int, hard: float) -> Image.Image:
    kind = rng.random()
    if kind < 0.5 * hard:
        photos = _photos()
        photo = photos[rng.randrange(len(photos))]
        h, w = photo.shape[:2]
        crop = rng.randint(min(h, w) // 4, min(h, w))
        y, x = rng.randint(0, h - crop), rng.randint(0, w - crop)
        return Image.fromarray(photo[y:y + crop, x:x + crop]).resize((side, side), Image.BILINEAR)
    a = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    if kind >= 0.5 * hard + 0.25:
        return Image.new("RGB", (side, side), tuple(int(v) for v in a))
    b = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    grad = a + (b - a) * t
    image = np.broadcast_to(grad, (side, side, 3)) if rng.random() < 0.5 else np.broadcast_to(grad.transpose(1, 0, 2), (side, side, 3))
    return Image.fromarray(np.ascontiguousarray(image).astype(np.uint8))


def draw(seed: int, index: int, side: int, hard: float = 1.0, first_words: int = 0) -> tuple[Image.Image, int]:
    """Draw ``index`` of stream ``seed``: a word chosen uniformly from the vocabulary (from its
    ``first_words`` most frequent when given), rendered; returns the image and the word's index.
    ``hard`` in [0, 1] scales what makes a word hard to read (photographs behind it, slant, blur,
    small size): 1 is the full mix, 0 big flat words."""
    rng = _rng(seed, index)
    words = reading_words()
    label = rng.randrange(min(first_words, len(words)) if first_words else len(words))
    return _render(words[label], rng, side, hard), label


def render_word(word: str, seed: int, index: int, side: int = 96) -> Image.Image:
    """``word`` written once on a ``side`` x ``side`` image (the drawing of :func:`draw`)."""
    return _render(word, _rng(seed, index), side, 1.0)


def _render(word: str, rng: random.Random, side: int, hard: float) -> Image.Image:
    """``word`` written once: a random font, case, size, colour, placement and slant, on a
    photograph, a flat colour or a gradient."""
    big = side * DRAW_SCALE
    image = _background(rng, big, hard)
    case = rng.choice(CASES)
    text = word.upper() if case == "upper" else word.capitalize() if case == "capitalised" else word
    font_name = rng.choice(_BOLD_FONTS) if rng.random() < 0.5 else rng.choice(_FONT_FILES)
    # the word spans 35-95% of the width, its height at most 45% of the side
    probe = load_font(font_name, 100)
    x0, y0, x1, y1 = probe.getbbox(text)
    width = rng.uniform(0.35 + 0.35 * (1 - hard), 0.95) * big
    size = max(10, int(100 * min(width / max(1, x1 - x0), 0.45 * big / max(1, y1 - y0))))
    font = load_font(font_name, size)
    x0, y0, x1, y1 = font.getbbox(text)
    tw, th = x1 - x0, y1 - y0
    at = (rng.randint(0, max(0, big - tw)) - x0, rng.randint(0, max(0, big - th)) - y0)
    # ink against the background under the word: dark on light, light on dark, sometimes a colour
    region = np.asarray(image.crop((max(0, at[0] + x0), max(0, at[1] + y0),
                                    min(big, at[0] + x1), min(big, at[1] + y1)))).reshape(-1, 3)
    light = float(region.mean()) > 128 if region.size else True
    ink = tuple(rng.randint(0, 70) if light else rng.randint(185, 255) for _ in range(3))
    if rng.random() < 0.3:  # a saturated colour (red, blue, ...) as signs and labels use
        ink = tuple(rng.choice((0, 30, 220, 255)) for _ in range(3))
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    outline = rng.random() < 0.3
    stroke = max(1, size // 12) if outline else 0
    stroke_fill = tuple(255 - c for c in ink) if outline else None
    draw.text(at, text, font=font, fill=(*ink, 255), stroke_width=stroke, stroke_fill=stroke_fill)
    angle = rng.uniform(-12, 12) if rng.random() < 0.4 * hard else 0.0
    if angle:
        layer = layer.rotate(angle, resample=Image.BILINEAR, center=(at[0] + x0 + tw / 2, at[1] + y0 + th / 2))
    image.paste(layer, (0, 0), layer)
    if rng.random() < 0.2 * hard:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return image.resize((side, side), Image.BILINEAR)
