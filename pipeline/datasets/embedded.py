"""Offline synthetic image-caption dataset with embedded text and "parrot captions".

Why this exists: the curation pipeline must be exercised end to end (real HTTP download
with img2dataset, OCR text detection, parrot-caption scoring, small CLIP training)
without touching the internet.  This module draws simple, learnable objects on
characteristic backgrounds, renders text in the styles found in web images (signs,
labels, poster titles, overlays, watermarks), writes captions that either describe the
image, spell its text ("parrot"), or mix both, and keeps exact ground truth aside so
the pipeline stages can be scored against it.  Some of the text names another class
("STAR Cinema" above a drawn fish), as web text names things: parrot captions spelling
it are what teaches an unfiltered CLIP to read, and to fall for typographic attacks.

Everything is seeded: sample ``i`` of seed ``s`` depends only on ``(s, i)``, so
``generate(10, s)`` is a prefix of ``generate(300, s)`` and repeated calls are
byte-identical.
"""

from __future__ import annotations

import functools
import http.server
import io
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow

__all__ = [
    "BACKGROUNDS",
    "BROKEN_KINDS",
    "CAPTION_KINDS",
    "CLASSES",
    "CLASS_WORD_TEXT_FRACTION",
    "COMMON_BACKGROUND",
    "COMMON_FRACTION",
    "OBJECT_SIZE_NO_TEXT",
    "PARROT_FILLERS",
    "TEXT_VOCABULARY",
    "DrawnScene",
    "EmbeddedSample",
    "EmbeddedServer",
    "caption_tokens",
    "central_square",
    "choose_background",
    "describe",
    "draw_scene",
    "encode_jpeg",
    "generate",
    "ground_truth_table",
    "load_font",
    "render_preview",
    "sample_url",
]

# ---------------------------------------------------------------------------
# Public constants
# ---------------------------------------------------------------------------

CLASSES: tuple[str, ...] = ("apple", "car", "house", "tree", "fish", "star", "boat", "flower")
BACKGROUNDS: tuple[str, ...] = ("grass", "sand", "sky", "water", "snow", "indoor")
# Each class appears on its "common" background COMMON_FRACTION of the time so that a later
# evaluation can measure how much a model leans on the background (spurious feature).
COMMON_FRACTION = 0.8
COMMON_BACKGROUND: dict[str, str] = {
    "apple": "indoor",
    "car": "sand",
    "house": "snow",
    "tree": "grass",
    "fish": "water",
    "star": "sky",
    "boat": "water",
    "flower": "grass",
}
CAPTION_KINDS: tuple[str, ...] = ("descriptive", "parrot", "mixed")
BROKEN_KINDS: tuple[str, ...] = ("http_404", "timeout", "corrupt", "html")
# The only words a parrot caption may add to the rendered text (at most one of them).
PARROT_FILLERS: tuple[str, ...] = ("the", "a", "and", "with")

TEXT_FRACTION = 0.55  # LAION-2B: 54.6% of images contain text
ROTATED_FRACTION = 0.25  # share of text images whose regions are rotated
# Web text often names things ("APPLE Store", "Fish Market") and parrot captions spell it: that
# is how an unfiltered CLIP learns to read and so falls for typographic attacks (Less is More).
# In this share of text images one region names a class other than the drawn one.
CLASS_WORD_TEXT_FRACTION = 0.5
# Cap height of a class-word region as a share of the shorter side: 0.08-0.13 brackets the
# typographic attack's label (50 px Arial on a ~375 px ImageNet image, cap height ~0.1), so the
# word stays legible once the image is shrunk to a tiny CLIP's 96 px input.
_CLASS_WORD_CAP: tuple[float, float] = (0.08, 0.13)
_CLASS_WORD_STYLES: tuple[str, ...] = ("sign", "poster", "overlay")
# Object size (its drawing scale) as a share of the shorter side: large enough that a tiny CLIP
# sees the shape at 96 px. Text images draw it a little smaller to leave room for the text.
OBJECT_SIZE_NO_TEXT: tuple[float, float] = (0.5, 0.72)
_OBJECT_SIZE_WITH_TEXT: tuple[float, float] = (0.45, 0.6)
MAX_SIDE = 512
JPEG_QUALITY = 92
_SIZES: tuple[tuple[int, int], ...] = (
    (512, 384), (384, 512), (448, 448), (512, 320), (320, 512), (480, 360), (400, 400), (512, 448),
)

# ---------------------------------------------------------------------------
# Caption vocabulary (descriptive side).  Text words are filtered against it so that a
# descriptive caption can never accidentally "spell" the image text.
# ---------------------------------------------------------------------------

_OBJECT_COLOURS: dict[str, tuple[tuple[str, tuple[int, int, int]], ...]] = {
    "apple": (("red", (200, 30, 35)), ("green", (110, 190, 50)), ("yellow", (235, 200, 40))),
    "car": (("red", (205, 35, 40)), ("blue", (40, 80, 200)), ("yellow", (240, 200, 30)),
            ("green", (40, 150, 70)), ("black", (35, 35, 40)), ("white", (238, 238, 238))),
    "house": (("red", (190, 60, 50)), ("yellow", (235, 205, 110)), ("blue", (100, 140, 210)),
              ("white", (240, 238, 230)), ("brown", (150, 100, 60))),
    "tree": (("green", (50, 140, 50)), ("orange", (225, 125, 30)), ("dark green", (25, 95, 45))),
    "fish": (("orange", (245, 130, 30)), ("blue", (50, 110, 220)), ("yellow", (245, 210, 40)),
             ("purple", (140, 70, 190)), ("red", (215, 45, 45))),
    "star": (("yellow", (250, 215, 30)), ("red", (220, 40, 40)), ("blue", (40, 90, 215)),
             ("orange", (245, 140, 25)), ("purple", (150, 70, 200))),
    "boat": (("red", (195, 40, 40)), ("blue", (35, 70, 170)), ("brown", (130, 80, 40)),
             ("white", (240, 240, 240)), ("black", (40, 40, 45))),
    "flower": (("pink", (240, 120, 180)), ("red", (215, 30, 50)), ("yellow", (250, 210, 40)),
               ("purple", (150, 80, 200)), ("white", (245, 245, 245)), ("blue", (70, 110, 230))),
}

_BG_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on green grass", "in a grassy field", "on the lawn", "in a green meadow"),
    "sand": ("on the sand", "on a sandy beach", "in the desert", "on sandy ground"),
    "sky": ("in the blue sky", "against the sky", "up in the sky", "among the clouds"),
    "water": ("on the water", "in the sea", "on a blue lake", "in the ocean"),
    "snow": ("in the snow", "on a snowy field", "on white snow", "in a winter landscape"),
    "indoor": ("in a room", "indoors", "on a table in a room", "inside a house"),
}
_BG_NOUN: dict[str, str] = {
    "grass": "grass", "sand": "sand", "sky": "sky", "water": "water", "snow": "snow", "indoor": "wall",
}
_CLASS_PHRASES: dict[str, tuple[str, ...]] = {
    "apple": ("apple", "apple", "fruit"),
    "car": ("car", "car", "vehicle"),
    "house": ("house", "house", "home", "building"),
    "tree": ("tree", "tree"),
    "fish": ("fish", "fish"),
    "star": ("star", "star"),
    "boat": ("boat", "boat", "sailboat"),
    "flower": ("flower", "flower", "blossom"),
}
_DESCRIPTIVE_TEMPLATES: tuple[str, ...] = (
    "{art} {colour} {obj} {bg}",
    "{art} {size}{obj} {bg}",
    "a photo of {art} {colour} {obj}",
    "an illustration of {art} {colour} {obj} {bg}",
    "{colour} {obj} against a {bgnoun} background",
    "{art} {size}{colour} {obj}",
    "drawing of {art} {obj} {bg}",
    "simple picture of {art} {colour} {obj}",
    "{art} {colour} {obj}, {bg}",
    "there is {art} {obj} {bg}",
)
_MIXED_TEMPLATES: tuple[str, ...] = (
    "a {medium} of {art} {obj} that says {text}",
    "{desc} with the words {text}",
    "{desc} and a sign reading {text}",
    "{text} - {desc}",
    "{desc} next to the text {text}",
    "{desc} with a label {text}",
    "{art} {colour} {obj} and text {text}",
)
_MEDIUMS: tuple[str, ...] = ("poster", "picture", "sign", "card", "photo")
_SIZE_WORDS: tuple[str, ...] = ("small", "little", "large", "big")


def _template_words(templates: Sequence[str]) -> set[str]:
    words: set[str] = set()
    for t in templates:
        words.update(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t.lower())))
    return words


def _caption_vocab() -> frozenset[str]:
    """All words a non-parrot caption can contain apart from the inserted image text."""
    words: set[str] = set(CLASSES) | set(BACKGROUNDS) | set(_SIZE_WORDS) | set(_MEDIUMS)
    words |= {"a", "an"} | set(PARROT_FILLERS)
    for phrases in list(_BG_PHRASES.values()) + list(_CLASS_PHRASES.values()):
        for p in phrases:
            words.update(p.split())
    for colours in _OBJECT_COLOURS.values():
        for name, _ in colours:
            words.update(name.split())
    words.update(_BG_NOUN.values())
    words |= _template_words(_DESCRIPTIVE_TEMPLATES) | _template_words(_MIXED_TEMPLATES)
    return frozenset(words)


_CAPTION_VOCAB = _caption_vocab()

# ---------------------------------------------------------------------------
# Text vocabulary (what is rendered in images)
# ---------------------------------------------------------------------------

_NOUNS = (
    "hotel coffee bakery market pizza cafe diner pharmacy bank garage studio cinema theatre "
    "museum library gallery bistro pub grill kitchen salon barber books records music travel "
    "tours fitness gym taxi parking station airport harbor motel inn lounge club shop store "
    "outlet deli burger tacos sushi noodles bagels donuts tea juice wine beer candy chocolate "
    "pets toys games shoes fashion jewelry optics dental clinic school academy insurance realty "
    "bookstore laundry bikes tickets radio news"
).split()
_PROMO = (
    "sale open closed new free now today exit stop welcome hello deals discount special offer "
    "best only limited final clearance sold vacancy enter push pull info help menu order fresh "
    "hot cold organic local daily weekly vintage deluxe express premium classic original super "
    "mega ultra"
).split()
_CITIES = (
    "paris london tokyo berlin rome madrid vienna prague dublin oslo boston chicago denver austin "
    "seattle miami sydney toronto lisbon athens cairo delhi seoul lima havana milan venice geneva "
    "zurich munich"
).split()
_ADJECTIVES = (
    "grand royal golden happy lucky sunny urban modern cozy quiet wild bright magic sweet crazy "
    "famous friendly simple smart rapid global united central northern eastern western southern "
    "pacific atlantic imperial elegant noble brave gentle rustic"
).split()
_BRANDS = (
    "apex nova zenith orbit vertex pixel echo summit pioneer horizon atlas phoenix falcon titan "
    "aurora vortex nexus quantum stellar cosmo velvet crystal maple cedar willow comet rocket "
    "jet alpha omega delta sigma"
).split()


def _clean(words: Sequence[str]) -> tuple[str, ...]:
    """Drop words that the descriptive caption templates could produce (keeps them disjoint)."""
    out: list[str] = []
    for w in words:
        if w not in _CAPTION_VOCAB and w not in out and w.isalpha():
            out.append(w)
    return tuple(out)


_WORDS_BY_CAT: dict[str, tuple[str, ...]] = {
    "noun": _clean(_NOUNS),
    "promo": _clean(_PROMO),
    "city": _clean(_CITIES),
    "adj": _clean(_ADJECTIVES),
    "brand": _clean(_BRANDS),
}
TEXT_VOCABULARY: tuple[str, ...] = tuple(sorted({w for ws in _WORDS_BY_CAT.values() for w in ws}))

# Word patterns of one text region (one line, 1-3 words).
_PHRASE_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("adj", "noun"), ("city", "noun"), ("promo",), ("promo", "promo"), ("brand",),
    ("brand", "noun"), ("adj", "noun", "noun"), ("city",), ("adj", "city", "noun"),
    ("promo", "promo", "promo"), ("noun",), ("brand", "adj", "noun"),
)
# What may follow a class word in its region ("FISH Market", "Star", "Car Sale"). The class word
# comes first so that shortening a phrase to make it fit never drops it.
_CLASS_PHRASE_TAILS: tuple[tuple[str, ...], ...] = ((), ("noun",), ("promo",), ("brand",))


@functools.lru_cache(maxsize=None)
def _class_word_choices(obj: str, bg: str) -> tuple[str, ...]:
    """Classes an image of ``obj`` on ``bg`` may have written on it: not the drawn one, and none
    that a description of it can say (the indoor phrase "inside a house"), so that a descriptive
    caption, or the descriptive half of a mixed one, never spells the image text."""
    pieces = (*_BG_PHRASES[bg], _BG_NOUN[bg], *_CLASS_PHRASES[obj])
    said = {w for p in pieces for w in p.split()} | _template_words(_DESCRIPTIVE_TEMPLATES + _MIXED_TEMPLATES)
    return tuple(c for c in CLASSES if c != obj and c not in said)

# ---------------------------------------------------------------------------
# Fonts
# ---------------------------------------------------------------------------

_FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneralBol.ttf",
)
_BOLD_FONTS: tuple[str, ...] = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf",
                                "STIXGeneralBol.ttf")


@functools.lru_cache(maxsize=1)
def _font_dir() -> Path:
    """matplotlib ships the same DejaVu/STIX TTFs everywhere, which keeps renders reproducible."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=512)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """One of matplotlib's bundled TTFs (e.g. "DejaVuSans-Bold.ttf") at ``size`` px, cached."""
    return ImageFont.truetype(str(_font_dir() / name), size)


@functools.lru_cache(maxsize=64)
def _cap_ratio(name: str) -> float:
    """Cap height / em size, so styles can ask for a cap height in pixels."""
    left, top, right, bottom = load_font(name, 200).getbbox("H", anchor="ls")
    return (bottom - top) / 200.0


def _font_for_cap(name: str, cap: float) -> ImageFont.FreeTypeFont:
    return load_font(name, max(8, int(round(cap / _cap_ratio(name)))))


# ---------------------------------------------------------------------------
# Sample record
# ---------------------------------------------------------------------------

Quad = tuple[tuple[float, float], ...]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


@dataclass(frozen=True)
class EmbeddedSample:
    """One image-caption pair plus its ground truth (never shown to pipeline stages)."""

    sample_id: str
    image: bytes
    caption: str
    caption_kind: str
    has_text: bool
    words: tuple[str, ...]
    boxes: tuple[Quad, ...]
    box_texts: tuple[str, ...]
    object_class: str
    background: str
    width: int
    height: int
    text_class: str | None  # the class name written in the image (never object_class), if any


# ---------------------------------------------------------------------------
# Colour helpers
# ---------------------------------------------------------------------------

RGB = tuple[int, int, int]


def _rel_lum(c: Sequence[float]) -> float:
    """WCAG relative luminance: used to guarantee legible text colours."""
    out = []
    for v in c[:3]:
        v = v / 255.0
        out.append(v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4)
    return 0.2126 * out[0] + 0.7152 * out[1] + 0.0722 * out[2]


def _rel_lum_array(px: np.ndarray) -> np.ndarray:
    v = px[:, :3].astype(np.float64) / 255.0
    v = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    return v @ np.array([0.2126, 0.7152, 0.0722])


def _contrast(l1: float, l2: float) -> float:
    hi, lo = max(l1, l2), min(l1, l2)
    return (hi + 0.05) / (lo + 0.05)


def _jitter(c: RGB, rng: random.Random, amount: int = 18) -> RGB:
    return tuple(int(min(255, max(0, v + rng.randint(-amount, amount)))) for v in c)  # type: ignore[return-value]


def _darker(c: RGB, f: float = 0.55) -> RGB:
    return (int(c[0] * f), int(c[1] * f), int(c[2] * f))


_TEXT_COLOURS: tuple[RGB, ...] = (
    (255, 255, 255), (15, 15, 20), (255, 222, 0), (200, 20, 25), (20, 35, 130),
    (250, 140, 0), (0, 110, 60), (120, 0, 120), (240, 240, 200),
)
_SIGN_COLOURS: tuple[RGB, ...] = (
    (190, 25, 30), (20, 50, 140), (20, 110, 60), (25, 25, 30), (245, 245, 240),
    (250, 205, 20), (240, 120, 20), (90, 40, 120), (0, 120, 140),
)
_LABEL_COLOURS: tuple[RGB, ...] = ((250, 250, 245), (255, 240, 200), (230, 240, 255), (255, 255, 255))


# ---------------------------------------------------------------------------
# Backgrounds (numpy, fast)
# ---------------------------------------------------------------------------


def _lowfreq(rng: np.random.Generator, w: int, h: int, cell: int) -> np.ndarray:
    """Smooth noise in [0, 1] made by upsampling a coarse random grid."""
    small = rng.random((h // cell + 2, w // cell + 2), dtype=np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _clouds(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Soft white blobs: threshold coarse noise at 1/8 scale, blur, upsample (cheap)."""
    sw, sh = max(8, w // 8), max(8, h // 8)
    base = _lowfreq(rng, sw, sh, 7)
    mask = np.clip((base - 0.55) * 4.0, 0, 1)
    img = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.6))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _vgrad(top: Sequence[float], bottom: Sequence[float], h: int, w: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    a = np.asarray(top, dtype=np.float32)[None, None, :]
    b = np.asarray(bottom, dtype=np.float32)[None, None, :]
    return a + (b - a) * t  # (h, 1, 3): the first full-size op broadcasts it


def _background(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Each kind gets a characteristic colour + texture so a CNN can tell them apart."""
    j = lambda c, a=15: np.clip(np.asarray(c) + rng.integers(-a, a + 1, 3), 0, 255)  # noqa: E731
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    if kind == "grass":
        img = _vgrad(j((60, 130, 45)), j((95, 175, 60)), h, w)
        blades = rng.random((h // 5 + 1, w), dtype=np.float32)
        blades = np.repeat(blades, 5, axis=0)[:h]
        img = img + ((blades - 0.5) * 45)[:, :, None] * np.array([0.6, 1.0, 0.4], dtype=np.float32)
        img += ((_lowfreq(rng, w, h, 40) - 0.5) * 40)[:, :, None]
    elif kind == "sand":
        img = _vgrad(j((225, 200, 145)), j((205, 175, 115)), h, w)
        freq = rng.uniform(0.08, 0.14)
        phase = rng.uniform(0, 2 * math.pi)
        ripple = np.sin(yy * freq + 2.0 * np.sin(xx * 0.02 + phase))
        img = img + (ripple * 12)[:, :, None]
        img += rng.standard_normal((h, w, 1), dtype=np.float32) * 7
    elif kind == "sky":
        img = _vgrad(j((60, 120, 205)), j((165, 205, 245)), h, w)
        clouds = _clouds(rng, w, h)
        img = img * (1 - clouds[:, :, None]) + 250 * clouds[:, :, None]
        img += rng.standard_normal((h, w, 1), dtype=np.float32) * 2.5
    elif kind == "water":
        img = _vgrad(j((25, 95, 150)), j((35, 135, 175)), h, w)
        phase = rng.uniform(0, 2 * math.pi)
        waves = np.sin(yy * rng.uniform(0.25, 0.4) + 3.0 * np.sin(xx * 0.03 + phase))
        img = img + (np.clip(waves, 0.6, 1.0) - 0.6)[:, :, None] * np.array([90, 110, 110], dtype=np.float32)
        img += ((_lowfreq(rng, w, h, 48) - 0.5) * 30)[:, :, None]
    elif kind == "snow":
        img = _vgrad(j((200, 212, 230), 8), j((245, 247, 252), 5), h, w)
        img = img + ((_lowfreq(rng, w, h, 56) - 0.5) * 18)[:, :, None]
        flakes = (rng.random((h, w), dtype=np.float32) > 0.985).astype(np.float32)
        img += (flakes * 30)[:, :, None]
    elif kind == "indoor":
        wall = j(rng.choice(np.array([(225, 215, 195), (205, 205, 210), (235, 220, 200), (200, 215, 205)])), 8)
        img = _vgrad(np.asarray(wall) * 0.92, wall, h, w)
        period = int(rng.integers(18, 34))
        stripes = ((xx.astype(np.int32) // period) % 2).astype(np.float32)
        img = img + (stripes * 10 - 5)[:, :, None] * np.ones((h, 1, 1), dtype=np.float32)
        floor_y = int(h * rng.uniform(0.72, 0.82))
        wood = j((140, 95, 55), 12).astype(np.float32)
        plank = ((yy[floor_y:] - floor_y).astype(np.int32) // 14 % 2).astype(np.float32)
        floor = wood[None, None, :] + (plank * 14 - 7)[:, :, None] + np.zeros((1, w, 1), dtype=np.float32)
        floor += ((_lowfreq(rng, w, h - floor_y, 20) - 0.5) * 20)[:, :, None]
        img[floor_y:] = floor
        img[floor_y : floor_y + 3] = wood * 0.6
    else:  # pragma: no cover - guarded by BACKGROUNDS
        raise ValueError(kind)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Objects (PIL primitives)
# ---------------------------------------------------------------------------


def _poly_ellipse(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 24) -> list[tuple[float, float]]:
    ca, sa = math.cos(angle), math.sin(angle)
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x, y = rx * math.cos(t), ry * math.sin(t)
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    return pts


def _draw_apple(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    r = s * 0.42
    ow = max(2, int(s / 70))
    cy += s * 0.06
    d.ellipse((cx - r, cy - r * 0.92, cx + r, cy + r), fill=col, outline=_darker(col), width=ow)
    d.ellipse((cx - r * 0.35, cy - r * 0.98, cx + r * 0.35, cy - r * 0.7), fill=_darker(col, 0.8))
    d.rectangle((cx - r * 0.06, cy - r * 1.3, cx + r * 0.06, cy - r * 0.8), fill=(100, 60, 25))
    d.polygon(_poly_ellipse(cx + r * 0.3, cy - r * 1.1, r * 0.28, r * 0.11, -0.5), fill=(50, 140, 40),
              outline=(25, 80, 20))
    d.ellipse((cx - r * 0.55, cy - r * 0.5, cx - r * 0.3, cy - r * 0.15), fill=tuple(min(255, v + 70) for v in col))


def _draw_car(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    w, h = s, s * 0.55
    x0, y0 = cx - w / 2, cy - h / 2
    ow = max(2, int(s / 80))
    dark = _darker(col)
    d.polygon([(x0 + 0.2 * w, y0 + 0.42 * h), (x0 + 0.32 * w, y0 + 0.02 * h), (x0 + 0.7 * w, y0 + 0.02 * h),
               (x0 + 0.84 * w, y0 + 0.42 * h)], fill=col, outline=dark, width=ow)
    d.rounded_rectangle((x0, y0 + 0.38 * h, x0 + w, y0 + 0.82 * h), radius=int(0.08 * h), fill=col,
                        outline=dark, width=ow)
    glass = (170, 215, 240)
    d.polygon([(x0 + 0.27 * w, y0 + 0.4 * h), (x0 + 0.35 * w, y0 + 0.1 * h), (x0 + 0.49 * w, y0 + 0.1 * h),
               (x0 + 0.49 * w, y0 + 0.4 * h)], fill=glass, outline=dark)
    d.polygon([(x0 + 0.53 * w, y0 + 0.4 * h), (x0 + 0.53 * w, y0 + 0.1 * h), (x0 + 0.68 * w, y0 + 0.1 * h),
               (x0 + 0.78 * w, y0 + 0.4 * h)], fill=glass, outline=dark)
    for fx in (0.22, 0.78):
        wx, wy, wr = x0 + fx * w, y0 + 0.82 * h, 0.12 * w
        d.ellipse((wx - wr, wy - wr, wx + wr, wy + wr), fill=(25, 25, 25))
        d.ellipse((wx - wr * 0.45, wy - wr * 0.45, wx + wr * 0.45, wy + wr * 0.45), fill=(170, 170, 175))
    d.ellipse((x0 + 0.94 * w, y0 + 0.47 * h, x0 + 0.99 * w, y0 + 0.57 * h), fill=(255, 235, 120))


def _draw_house(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    a = s * 0.66
    top = cy - a / 2 + s * 0.16
    ow = max(2, int(s / 80))
    roof = rng.choice([(150, 40, 35), (90, 60, 40), (70, 70, 80), (40, 70, 120)])
    d.rectangle((cx + a * 0.2, top - a * 0.45, cx + a * 0.33, top - a * 0.1), fill=(120, 70, 50))
    d.rectangle((cx - a / 2, top, cx + a / 2, top + a), fill=col, outline=_darker(col), width=ow)
    d.polygon([(cx - a / 2 - s * 0.08, top + 2), (cx, top - a * 0.55), (cx + a / 2 + s * 0.08, top + 2)],
              fill=roof, outline=_darker(roof), width=ow)
    d.rectangle((cx - a * 0.1, top + a * 0.55, cx + a * 0.12, top + a), fill=(110, 65, 35), outline=(60, 35, 20))
    for wx in (cx - a * 0.33, cx + a * 0.2):
        d.rectangle((wx, top + a * 0.2, wx + a * 0.15, top + a * 0.38), fill=(175, 215, 240), outline=(60, 60, 70))
        d.line((wx + a * 0.075, top + a * 0.2, wx + a * 0.075, top + a * 0.38), fill=(60, 60, 70), width=2)


def _draw_tree(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    trunk = (115, 75, 40)
    d.rectangle((cx - s * 0.07, cy + s * 0.05, cx + s * 0.07, cy + s * 0.5), fill=trunk, outline=_darker(trunk))
    if rng.random() < 0.7:
        blobs = [(0.0, -0.2, 0.27), (-0.2, -0.02, 0.2), (0.2, -0.02, 0.2), (0.0, 0.05, 0.2), (0.0, -0.32, 0.17)]
        for bx, by, br in blobs:
            x, y, r = cx + bx * s, cy + by * s, br * s * rng.uniform(0.9, 1.1)
            d.ellipse((x - r, y - r, x + r, y + r), fill=col, outline=_darker(col, 0.7), width=2)
    else:  # pine
        for k, (yt, half) in enumerate(((-0.5, 0.18), (-0.3, 0.26), (-0.1, 0.34))):
            d.polygon([(cx, cy + yt * s), (cx - half * s, cy + (yt + 0.3) * s), (cx + half * s, cy + (yt + 0.3) * s)],
                      fill=col, outline=_darker(col, 0.7))


def _draw_fish(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    f = -1.0 if rng.random() < 0.5 else 1.0  # facing direction
    X = lambda v: cx + f * v * s  # noqa: E731
    dark = _darker(col)
    d.polygon([(X(0.22), cy), (X(0.5), cy - 0.24 * s), (X(0.45), cy), (X(0.5), cy + 0.24 * s)], fill=col,
              outline=dark, width=2)
    d.polygon([(X(-0.1), cy - 0.18 * s), (X(0.05), cy - 0.33 * s), (X(0.15), cy - 0.15 * s)], fill=dark)
    xs = sorted((X(-0.45), X(0.3)))
    d.ellipse((xs[0], cy - 0.22 * s, xs[1], cy + 0.22 * s), fill=col, outline=dark, width=max(2, int(s / 80)))
    ex, ey, er = X(-0.27), cy - 0.05 * s, 0.05 * s
    d.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255), outline=(0, 0, 0))
    d.ellipse((ex - er * 0.45, ey - er * 0.45, ex + er * 0.45, ey + er * 0.45), fill=(0, 0, 0))
    d.arc((min(X(-0.15), X(0.0)), cy - 0.15 * s, max(X(-0.15), X(0.0)), cy + 0.15 * s),
          start=-60 if f > 0 else 120, end=60 if f > 0 else 240, fill=dark, width=2)


def _draw_star(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    ro, ri = s * 0.5, s * 0.5 * rng.uniform(0.38, 0.48)
    rot = math.radians(rng.uniform(-15, 15)) - math.pi / 2
    pts = []
    for k in range(10):
        r = ro if k % 2 == 0 else ri
        t = rot + k * math.pi / 5
        pts.append((cx + r * math.cos(t), cy + 0.04 * s + r * math.sin(t)))
    d.polygon(pts, fill=col, outline=_darker(col), width=max(2, int(s / 70)))


def _draw_boat(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    dark = _darker(col)
    sail = rng.choice([(250, 250, 245), (235, 60, 50), (250, 215, 60), (240, 240, 220)])
    d.line((cx, cy + 0.18 * s, cx, cy - 0.5 * s), fill=(90, 60, 30), width=max(3, int(s / 45)))
    d.polygon([(cx + 0.03 * s, cy - 0.46 * s), (cx + 0.03 * s, cy + 0.1 * s), (cx + 0.4 * s, cy + 0.1 * s)],
              fill=sail, outline=_darker(sail, 0.6))
    d.polygon([(cx - 0.03 * s, cy - 0.36 * s), (cx - 0.03 * s, cy + 0.1 * s), (cx - 0.3 * s, cy + 0.1 * s)],
              fill=sail, outline=_darker(sail, 0.6))
    d.polygon([(cx - 0.5 * s, cy + 0.14 * s), (cx + 0.5 * s, cy + 0.14 * s), (cx + 0.36 * s, cy + 0.38 * s),
               (cx - 0.36 * s, cy + 0.38 * s)], fill=col, outline=dark, width=max(2, int(s / 70)))


def _draw_flower(d: ImageDraw.ImageDraw, cx: float, cy: float, s: float, col: RGB, rng: random.Random) -> None:
    hy = cy - 0.12 * s
    d.line((cx, hy, cx, cy + 0.5 * s), fill=(40, 130, 40), width=max(3, int(s / 35)))
    d.polygon(_poly_ellipse(cx + 0.12 * s, cy + 0.28 * s, 0.13 * s, 0.05 * s, -0.5), fill=(50, 150, 50),
              outline=(25, 90, 25))
    n = rng.randint(5, 8)
    off = rng.uniform(0, 2 * math.pi)
    pr = 0.14 * s
    for k in range(n):
        t = off + 2 * math.pi * k / n
        px, py = cx + 0.2 * s * math.cos(t), hy + 0.2 * s * math.sin(t)
        d.ellipse((px - pr, py - pr, px + pr, py + pr), fill=col, outline=_darker(col, 0.7), width=2)
    cr = 0.11 * s
    centre = rng.choice([(250, 200, 30), (120, 70, 30)])
    d.ellipse((cx - cr, hy - cr, cx + cr, hy + cr), fill=centre, outline=_darker(centre))


_DRAWERS: dict[str, Callable[..., None]] = {
    "apple": _draw_apple, "car": _draw_car, "house": _draw_house, "tree": _draw_tree,
    "fish": _draw_fish, "star": _draw_star, "boat": _draw_boat, "flower": _draw_flower,
}

# ---------------------------------------------------------------------------
# Text regions
# ---------------------------------------------------------------------------

_STYLES: tuple[str, ...] = ("sign", "label", "poster", "overlay", "watermark")
_STYLE_WEIGHTS: tuple[float, ...] = (0.27, 0.16, 0.2, 0.25, 0.12)
_CAP_RANGE: dict[str, tuple[int, int]] = {
    "sign": (22, 48), "label": (18, 30), "poster": (34, 64), "overlay": (22, 50), "watermark": (18, 22),
}


@dataclass
class _Layer:
    """A text region rendered in its own frame: coloured masks + exact text ink box."""

    masks: list[tuple[Image.Image, RGB, float]]
    ink: tuple[int, int, int, int]
    size: tuple[int, int]
    text_mask: Image.Image
    effect: str = "plain"  # "plain" | "stroke" | "shadow" | "box" (sign/label backing)


@dataclass
class _Region:
    text: str
    words: tuple[str, ...]
    style: str
    quad: Quad
    footprint: tuple[float, float, float, float]


@dataclass
class _Scene:
    img: Image.Image
    object_box: tuple[float, float, float, float]
    regions: list[_Region] = field(default_factory=list)
    ink: Image.Image | None = None


def _phrase(rng: random.Random, class_word: str | None = None) -> tuple[str, ...]:
    """One region's words in one case style; a given class word leads the phrase."""
    if class_word is None:
        pattern, out = rng.choice(_PHRASE_PATTERNS), []
    else:
        pattern, out = rng.choice(_CLASS_PHRASE_TAILS), [class_word]
    for cat in pattern:
        choices = [w for w in _WORDS_BY_CAT[cat] if w not in out]
        out.append(rng.choice(choices))
    case = rng.random()
    if case < 0.45:
        return tuple(w.upper() for w in out)
    if case < 0.85:
        return tuple(w.capitalize() for w in out)
    return tuple(out)


def _render_layer(text: str, style: str, font_name: str, cap: float, rng: random.Random) -> _Layer:
    """Render one line in its own frame.  Colours that depend on the background are
    chosen later (placeholder colours are replaced in _colourise)."""
    font = _font_for_cap(font_name, cap)
    stroke = 0
    if style == "poster" and rng.random() < 0.4:
        stroke = max(1, int(cap / 16))
    elif style == "overlay" and rng.random() < 0.35:
        stroke = max(1, int(cap / 18))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    l, t, r, b = probe.textbbox((0, 0), text, font=font, stroke_width=stroke)
    if style in ("sign", "label"):
        px, py = int(cap * rng.uniform(0.35, 0.6)), int(cap * rng.uniform(0.3, 0.45))
    else:
        px, py = int(cap * 0.12) + 2, int(cap * 0.12) + 2
    shadow = int(max(2, cap * 0.07)) if style == "poster" and stroke == 0 else 0
    lw, lh = (r - l) + 2 * px + shadow, (b - t) + 2 * py + shadow
    ox, oy = px - l, py - t
    text_mask = Image.new("L", (lw, lh), 0)
    ImageDraw.Draw(text_mask).text((ox, oy), text, font=font, fill=255, stroke_width=stroke)
    ink = text_mask.getbbox() or (px, py, lw - px, lh - py)
    masks: list[tuple[Image.Image, RGB, float]] = []
    if style in ("sign", "label"):
        rect = Image.new("L", (lw, lh), 0)
        rd = ImageDraw.Draw(rect)
        radius = int(cap * 0.25) if style == "label" or rng.random() < 0.5 else 0
        rd.rounded_rectangle((0, 0, lw - 1, lh - 1), radius=radius, fill=255)
        if style == "sign":
            fill = rng.choice(_SIGN_COLOURS)
            border = rng.choice([_darker(fill), (255, 255, 255), (20, 20, 20)])
        else:
            fill = rng.choice(_LABEL_COLOURS)
            border = rng.choice([(40, 40, 40), (150, 40, 40), (30, 60, 140)])
        bw = max(2, int(cap / 12))
        inner = Image.new("L", (lw, lh), 0)
        ImageDraw.Draw(inner).rounded_rectangle((bw, bw, lw - 1 - bw, lh - 1 - bw), radius=max(0, radius - bw),
                                                fill=255)
        masks.append((rect, border, 1.0))
        masks.append((inner, fill, 1.0))
        lum = _rel_lum(fill)
        good = [c for c in _TEXT_COLOURS if _contrast(_rel_lum(c), lum) >= 4.5]
        colour = rng.choice(good) if good else ((0, 0, 0) if lum > 0.3 else (255, 255, 255))
        masks.append((text_mask, colour, 1.0))
    else:
        if shadow:
            sh = Image.new("L", (lw, lh), 0)
            ImageDraw.Draw(sh).text((ox + shadow, oy + shadow), text, font=font, fill=255)
            masks.append((sh, (0, 0, 0), 0.6))  # colours are fixed up in _colourise
        alpha = rng.uniform(0.65, 0.8) if style == "watermark" else 1.0
        if stroke:
            fill_only = Image.new("L", (lw, lh), 0)
            ImageDraw.Draw(fill_only).text((ox, oy), text, font=font, fill=255)
            masks.append((text_mask, (0, 0, 0), 1.0))  # glyphs+outline in the outline colour
            masks.append((fill_only, (255, 255, 255), 1.0))
        else:
            masks.append((text_mask, (255, 255, 255), alpha))
    effect = "box" if style in ("sign", "label") else ("stroke" if stroke else ("shadow" if shadow else "plain"))
    return _Layer(masks=masks, ink=ink, size=(lw, lh), text_mask=text_mask, effect=effect)


def _colourise(layer: _Layer, style: str, patch: np.ndarray, rng: random.Random) -> None:
    """Pick text colours with good contrast against the pixels actually under the text."""
    if layer.effect == "box":
        return  # colours were chosen against the sign/label backing
    lum = _rel_lum_array(patch.reshape(-1, 3))
    lo, hi = float(np.percentile(lum, 10)), float(np.percentile(lum, 90))

    def ok(c: RGB, need: float) -> bool:
        lc = _rel_lum(c)
        return _contrast(lc, lo) >= need and _contrast(lc, hi) >= need

    if style == "watermark":
        colour = (255, 255, 255) if _contrast(1.0, hi) >= _contrast(0.0, lo) else (0, 0, 0)
        m, _, a = layer.masks[-1]
        layer.masks[-1] = (m, colour, a)
        return
    good = [c for c in _TEXT_COLOURS if ok(c, 3.5)] or [c for c in _TEXT_COLOURS if ok(c, 2.5)]
    if good:
        colour = rng.choice(good)
    else:
        colour = max(((0, 0, 0), (255, 255, 255)), key=lambda c: min(_contrast(_rel_lum(c), lo),
                                                                       _contrast(_rel_lum(c), hi)))
    if layer.effect == "stroke":  # outline in the opposite polarity of the fill
        stroke_c = (255, 255, 255) if _rel_lum(colour) < 0.3 else (0, 0, 0)
        layer.masks[-2] = (layer.masks[-2][0], stroke_c, 1.0)
        layer.masks[-1] = (layer.masks[-1][0], colour, 1.0)
        return
    m, _, a = layer.masks[-1]
    layer.masks[-1] = (m, colour, a)
    if layer.effect == "shadow":  # poster drop shadow: opposite of the text colour
        sm = layer.masks[0][0]
        layer.masks[0] = (sm, (0, 0, 0) if _rel_lum(colour) > 0.3 else (255, 255, 255), 0.6)


def _rotation(size: tuple[int, int], angle_deg: float) -> tuple[tuple[int, int], Callable[[float, float], tuple[float, float]], tuple[float, ...]]:
    """Return output size, forward point map and PIL inverse-affine coefficients for a CCW
    rotation about the frame centre.  Using one explicit matrix for both pixels and box
    corners is what keeps the ground-truth quads exact."""
    lw, lh = size
    th = math.radians(angle_deg)
    c, s = math.cos(th), math.sin(th)
    ow = int(math.ceil(abs(lw * c) + abs(lh * s))) + 2
    oh = int(math.ceil(abs(lw * s) + abs(lh * c))) + 2
    cx, cy, ocx, ocy = lw / 2, lh / 2, ow / 2, oh / 2

    def fwd(x: float, y: float) -> tuple[float, float]:
        dx, dy = x - cx, y - cy
        return (c * dx + s * dy + ocx, -s * dx + c * dy + ocy)

    inv = (c, -s, cx - c * ocx + s * ocy, s, c, cy - s * ocx - c * ocy)
    return (ow, oh), fwd, inv


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float], margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _area(a: tuple[float, float, float, float]) -> float:
    return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def _intersection(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def _place_region(scene: _Scene, words: tuple[str, ...], style: str, angle: float, rng: random.Random,
                  cap_range: tuple[float, float] | None = None, area: Box | None = None) -> bool:
    """Try to render and place one region; False if it does not fit anywhere.

    ``cap_range`` overrides the style's cap heights (px); ``area`` (x0, y0, x1, y1) confines the
    region, by default to the whole image."""
    W, H = scene.img.size
    ax0, ay0, ax1, ay1 = area or (0.0, 0.0, float(W), float(H))
    aw, ah = ax1 - ax0, ay1 - ay0
    font_name = rng.choice(_BOLD_FONTS) if style in ("poster", "sign") and rng.random() < 0.7 else rng.choice(_FONT_FILES)
    lo, hi = cap_range or _CAP_RANGE[style]
    cap = rng.uniform(lo, hi)
    text = " ".join(words)
    margin = 3.0
    may_cover_object = style in ("sign", "label")
    for size_try in range(5):
        if size_try:
            if cap <= 18.0:
                return False
            cap = max(18.0, cap * 0.8)
        layer = _render_layer(text, style, font_name, cap, rng)
        (ow, oh), fwd, inv = _rotation(layer.size, angle)
        if ow > aw - 2 * margin or oh > ah - 2 * margin:
            continue
        allow_obj = may_cover_object and size_try >= 2
        for _ in range(16):
            if style == "watermark":
                x = rng.choice([ax0 + margin + rng.uniform(0, 10), ax1 - ow - margin - rng.uniform(0, 10)])
                y = rng.choice([ay0 + margin + rng.uniform(0, 10), ay1 - oh - margin - rng.uniform(0, 10)])
            elif style == "poster" and rng.random() < 0.7:
                x = rng.uniform(ax0 + margin, ax1 - ow - margin)
                lo_y = max(ay0 + margin, min(ay1 - oh - margin, ay0 + rng.choice((0.0, 0.78 * ah - oh))))
                y = rng.uniform(lo_y, max(lo_y, min(ay1 - oh - margin, lo_y + 0.22 * ah)))
            else:
                x = rng.uniform(ax0 + margin, ax1 - ow - margin)
                y = rng.uniform(ay0 + margin, ay1 - oh - margin)
            x, y = float(int(x)), float(int(y))
            foot = (x, y, x + ow, y + oh)
            if any(_overlaps(foot, r.footprint, 6.0) for r in scene.regions):
                continue
            if _overlaps(foot, scene.object_box, 0.0) and (
                    not allow_obj or _intersection(foot, scene.object_box) > 0.2 * _area(scene.object_box)):
                continue  # keep the object recognisable: signs/labels may cover at most 20% of it
            _commit(scene, layer, style, angle, inv, fwd, (ow, oh), (int(x), int(y)), words, text, rng)
            return True
    return False


def _commit(scene: _Scene, layer: _Layer, style: str, angle: float, inv: tuple[float, ...],
            fwd: Callable[[float, float], tuple[float, float]], out_size: tuple[int, int], pos: tuple[int, int],
            words: tuple[str, ...], text: str, rng: random.Random) -> None:
    x, y = pos
    ow, oh = out_size
    patch = np.asarray(scene.img.crop((x, y, x + ow, y + oh)))
    _colourise(layer, style, patch, rng)

    def warp(m: Image.Image) -> Image.Image:
        if angle == 0:
            out = Image.new("L", out_size, 0)
            out.paste(m, (1, 1))  # _rotation adds a 1 px border on each side
            return out
        return m.transform(out_size, Image.Transform.AFFINE, inv, resample=Image.Resampling.BICUBIC)

    for mask, colour, alpha in layer.masks:
        m = warp(mask)
        if alpha < 1.0:
            m = m.point(lambda v, a=alpha: int(v * a))
        scene.img.paste(colour, (x, y, x + ow, y + oh), m)
    if scene.ink is not None:
        scene.ink.paste(255, (x, y, x + ow, y + oh), warp(layer.text_mask))
    x0, y0, x1, y1 = layer.ink
    if angle == 0:
        corners = [(x0 + 1.0, y0 + 1.0), (x1 + 1.0, y0 + 1.0), (x1 + 1.0, y1 + 1.0), (x0 + 1.0, y1 + 1.0)]
    else:
        corners = [fwd(px, py) for px, py in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    W, H = scene.img.size
    quad = tuple((round(min(W, max(0.0, cx + x)), 2), round(min(H, max(0.0, cy + y)), 2)) for cx, cy in corners)
    scene.regions.append(_Region(text=text, words=words, style=style, quad=quad,
                                 footprint=(float(x), float(y), float(x + ow), float(y + oh))))


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def caption_tokens(caption: str) -> list[str]:
    """Lower-case alphabetic tokens: the unit in which caption/text overlap is measured."""
    return re.findall(r"[a-z]+", caption.lower())


def _fix_articles(text: str) -> str:
    """Replace the article placeholder by "a"/"an" depending on the following word."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"@@ (\w+)", lambda m: f"{_article(m.group(1))} {m.group(1)}", text)


def describe(obj: str, colour: str, size_word: str, bg: str, rng: random.Random) -> str:
    """A descriptive caption: the object, its colour and size, and the background, never image text."""
    tmpl = rng.choice(_DESCRIPTIVE_TEMPLATES)
    size = f"{size_word} " if size_word else ""
    text = tmpl.format(art="@@", colour=colour, size=size, obj=rng.choice(_CLASS_PHRASES[obj]),
                       bg=rng.choice(_BG_PHRASES[bg]), bgnoun=_BG_NOUN[bg])
    return _fix_articles(text)


def _case(words: Sequence[str], rng: random.Random) -> list[str]:
    r = rng.random()
    if r < 0.4:
        return list(words)
    if r < 0.75:
        return [w.lower() for w in words]
    if r < 0.9:
        return [w.upper() for w in words]
    return [w.capitalize() for w in words]


def _parrot(regions: Sequence[_Region], rng: random.Random) -> str:
    """Spell every region in reading order; maybe one filler at the start or between lines."""
    lines = [" ".join(_case(r.words, rng)) for r in regions]
    if rng.random() < 0.35:
        at = rng.randint(0, len(lines) - 1)
        lines.insert(at, rng.choice(PARROT_FILLERS[:2] if at == 0 else PARROT_FILLERS[2:]))
    return " ".join(lines)


def _mixed(regions: Sequence[_Region], obj: str, colour: str, size_word: str, bg: str, rng: random.Random) -> str:
    region = rng.choice(list(regions))
    text = " ".join(_case(region.words, rng))
    desc = describe(obj, colour, size_word, bg, rng)
    tmpl = rng.choice(_MIXED_TEMPLATES)
    out = tmpl.format(medium=rng.choice(_MEDIUMS), art="@@", obj=rng.choice(_CLASS_PHRASES[obj]),
                      colour=colour, text=text, desc=desc)
    return _fix_articles(out)


# ---------------------------------------------------------------------------
# Sample generation
# ---------------------------------------------------------------------------


def encode_jpeg(img: Image.Image) -> bytes:
    """JPEG at the dataset's quality, as every generated image is stored."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def central_square(width: int, height: int) -> Box:
    """The centred square a CLIP transform's centre crop keeps: objects and class words stay inside."""
    m = min(width, height)
    return ((width - m) / 2, (height - m) / 2, (width + m) / 2, (height + m) / 2)


def choose_background(obj: str, rng: random.Random) -> str:
    """The class's common background with probability COMMON_FRACTION, else another at random."""
    common = COMMON_BACKGROUND[obj]
    return common if rng.random() < COMMON_FRACTION else rng.choice([b for b in BACKGROUNDS if b != common])


@dataclass
class DrawnScene:
    """A background with one object drawn on it, and what a caption may say about it."""

    image: Image.Image
    colour_name: str
    size_word: str  # "" or small/little/large/big, from the object's relative size
    object_box: Box


def draw_scene(obj: str, bg: str, width: int, height: int, rel: float, rng: random.Random,
               np_rng: np.random.Generator) -> DrawnScene:
    """Draw ``bg`` and ``obj`` at scale ``rel`` x the shorter side, inside the central square."""
    img = Image.fromarray(_background(bg, width, height, np_rng), "RGB")
    colour_name, colour = rng.choice(_OBJECT_COLOURS[obj])
    colour = _jitter(colour, rng, 12)
    s = rel * min(width, height)
    half = 0.55 * s
    x0, y0, x1, y1 = central_square(width, height)
    cx = rng.uniform(x0 + half + 4, x1 - half - 4)
    cy = rng.uniform(y0 + half + 4, y1 - half - 4)
    _DRAWERS[obj](ImageDraw.Draw(img), cx, cy, s, colour, rng)
    size_word = ""
    if rel < 0.5:
        size_word = rng.choice(("small", "little"))
    elif rel > 0.64:
        size_word = rng.choice(("large", "big"))
    return DrawnScene(image=img, colour_name=colour_name, size_word=size_word,
                      object_box=(cx - half, cy - half, cx + half, cy + half))


def _make_sample(seed: int, index: int, debug: bool = False) -> tuple[EmbeddedSample, _Scene]:
    """Build sample ``index``; its RNG streams depend only on (seed, index)."""
    rng = random.Random(f"embedded-v1:{seed}:{index}")
    nrng = np.random.default_rng([int(seed) & 0xFFFFFFFF, index, 0xE3B])
    W, H = rng.choice(_SIZES)
    obj = rng.choice(CLASSES)
    bg = choose_background(obj, rng)
    wants_text = rng.random() < TEXT_FRACTION
    class_word = None
    if wants_text and rng.random() < CLASS_WORD_TEXT_FRACTION:
        class_word = rng.choice(_class_word_choices(obj, bg))
    drawn = draw_scene(obj, bg, W, H, rng.uniform(*(_OBJECT_SIZE_WITH_TEXT if wants_text else OBJECT_SIZE_NO_TEXT)),
                       rng, nrng)
    img = drawn.image
    m = min(W, H)
    # a class word is big and inside the central square, where a 96 px CLIP can read it
    class_placement: dict[str, Any] = {"cap_range": (_CLASS_WORD_CAP[0] * m, _CLASS_WORD_CAP[1] * m),
                                       "area": central_square(W, H)}
    scene = _Scene(img=img, object_box=drawn.object_box, ink=Image.new("L", (W, H), 0) if debug else None)
    if wants_text:
        n_regions = rng.choices((1, 2, 3), weights=(0.45, 0.35, 0.2))[0]
        rotated = rng.random() < ROTATED_FRACTION
        used_watermark = False
        for k in range(n_regions):
            with_class = k == 0 and class_word is not None
            style = rng.choice(_CLASS_WORD_STYLES) if with_class else rng.choices(_STYLES, weights=_STYLE_WEIGHTS)[0]
            if style == "watermark" and used_watermark:
                style = "label"
            used_watermark |= style == "watermark"
            words = _phrase(rng, class_word if with_class else None)
            placement = class_placement if with_class else {}
            angle = 0.0
            if rotated and style != "watermark":
                angle = rng.choice((-1, 1)) * rng.uniform(5, 25)
            while not _place_region(scene, words, style, angle, rng, **placement):
                if style == "watermark":
                    style = "label"
                elif len(words) > 1:
                    words = words[:-1]
                elif k == 0 and style != "label":
                    style = "label"  # small and allowed over the object: always finds a spot
                else:
                    break
    # reading order (top to bottom, then left to right) defines the order of words/boxes
    scene.regions.sort(key=lambda r: (round(sum(p[1] for p in r.quad) / 4 / 24), sum(p[0] for p in r.quad) / 4))
    regions = scene.regions
    has_text = bool(regions)
    text_class = class_word if any(w.lower() == class_word for r in regions for w in r.words) else None
    if has_text:
        r = rng.random()
        kind = "parrot" if r < 0.4 else ("mixed" if r < 0.7 else "descriptive")
    else:
        kind = "descriptive"
    if kind == "parrot":
        caption = _parrot(regions, rng)
    elif kind == "mixed":
        caption = _mixed(regions, obj, drawn.colour_name, drawn.size_word, bg, rng)
    else:
        caption = describe(obj, drawn.colour_name, drawn.size_word, bg, rng)

    sample = EmbeddedSample(
        sample_id=f"s{index:06d}",
        image=encode_jpeg(img),
        caption=caption,
        caption_kind=kind,
        has_text=has_text,
        words=tuple(w for r in regions for w in r.words),
        boxes=tuple(r.quad for r in regions),
        box_texts=tuple(r.text for r in regions),
        object_class=obj,
        background=bg,
        width=W,
        height=H,
        text_class=text_class,
    )
    return sample, scene


def generate(n: int = 300, seed: int = 0) -> list[EmbeddedSample]:
    """Generate ``n`` samples; identical (n, seed) give byte-identical output."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return [_make_sample(seed, i)[0] for i in range(n)]


# ---------------------------------------------------------------------------
# Ground truth table
# ---------------------------------------------------------------------------


def sample_url(base_url: str, sample_id: str) -> str:
    return f"{base_url.rstrip('/')}/images/{sample_id}.jpg"


def ground_truth_table(samples: Sequence[EmbeddedSample], base_url: str) -> "pyarrow.Table":
    """Ground truth keyed by URL (the key img2dataset keeps), for scoring later stages."""
    import pyarrow as pa

    schema = pa.schema([
        ("url", pa.string()),
        ("caption", pa.string()),
        ("caption_kind", pa.string()),
        ("has_text", pa.bool_()),
        ("words", pa.list_(pa.string())),
        ("boxes", pa.list_(pa.list_(pa.list_(pa.float64())))),
        ("box_texts", pa.list_(pa.string())),
        ("object_class", pa.string()),
        ("background", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("text_class", pa.string()),
    ])
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for s in samples:
        cols["url"].append(sample_url(base_url, s.sample_id))
        cols["caption"].append(s.caption)
        cols["caption_kind"].append(s.caption_kind)
        cols["has_text"].append(s.has_text)
        cols["words"].append(list(s.words))
        cols["boxes"].append([[list(map(float, p)) for p in quad] for quad in s.boxes])
        cols["box_texts"].append(list(s.box_texts))
        cols["object_class"].append(s.object_class)
        cols["background"].append(s.background)
        cols["width"].append(s.width)
        cols["height"].append(s.height)
        cols["text_class"].append(s.text_class)
    return pa.table(cols, schema=schema)


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------

_BROKEN_PREFIX: dict[str, str] = {"http_404": "missing", "timeout": "slow", "corrupt": "corrupt", "html": "page"}
_BROKEN_PER_KIND = 2


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: img2dataset opens thread_count connections per
    # shard task and several tasks run at once, so a backlog of 5 overflows and clients see
    # "connection reset by peer" on good URLs. Room for every concurrent request of a run.
    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: D401
        """Client hang-ups (e.g. a timed-out slow download) are expected; stay silent."""


class EmbeddedServer:
    """Serves the samples over HTTP on 127.0.0.1 (ThreadingHTTPServer in a daemon thread).

    Besides the good images it serves the failure modes a real crawl meets (404s,
    timeouts, truncated JPEGs, HTML instead of an image) so the downloader's error
    handling is exercised too.
    """

    def __init__(self, samples: Sequence[EmbeddedSample], host: str = "127.0.0.1", port: int = 0,
                 slow_seconds: float = 4.0) -> None:
        self.samples = list(samples)
        self.host = host
        self.port = port
        self.slow_seconds = float(slow_seconds)
        self._images: dict[str, bytes] = {s.sample_id: s.image for s in self.samples}
        self._fallback_jpeg = self.samples[0].image if self.samples else encode_jpeg(
            Image.new("RGB", (64, 64), (128, 128, 128)))
        self._stopping = threading.Event()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url = ""

    # -- lifecycle -------------------------------------------------------
    def start(self) -> "EmbeddedServer":
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _QuietServer((self.host, self.port), self._handler_class())
        self.port = self._server.server_address[1]
        self.base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="embedded-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ---------------------------------------------------------
    def _real_jpeg(self, i: int) -> bytes:
        if not self.samples:
            return self._fallback_jpeg
        return self.samples[i % len(self.samples)].image

    def url_rows(self) -> list[dict]:
        """Rows for img2dataset: every sample, then 2 URLs of each broken kind."""
        if not self.base_url:
            raise RuntimeError("server not started")
        rows = [{"url": sample_url(self.base_url, s.sample_id), "caption": s.caption} for s in self.samples]
        for kind in BROKEN_KINDS:
            for i in range(_BROKEN_PER_KIND):
                rows.append({"url": f"{self.base_url}/broken/{_BROKEN_PREFIX[kind]}-{i}.jpg",
                             "caption": f"a broken link of kind {kind.replace('_', ' ')} number {i}"})
        return rows

    def _route(self, path: str) -> tuple[int, str, bytes, float]:
        """Map a path to (status, content type, body, delay seconds)."""
        path = path.split("?", 1)[0]
        m = re.fullmatch(r"/images/(s\d+)\.jpg", path)
        if m and m.group(1) in self._images:
            return 200, "image/jpeg", self._images[m.group(1)], 0.0
        m = re.fullmatch(r"/broken/(missing|slow|corrupt|page)-(\d+)\.jpg", path)
        if m:
            kind, i = m.group(1), int(m.group(2))
            if kind == "slow":
                return 200, "image/jpeg", self._real_jpeg(i), self.slow_seconds
            if kind == "corrupt":
                data = self._real_jpeg(i)
                return 200, "image/jpeg", data[: int(len(data) * 0.4)], 0.0
            if kind == "page":
                html = (f"<!DOCTYPE html><html><head><title>Image {i}</title></head>"
                        f"<body><h1>Not an image</h1><p>page {i}</p></body></html>").encode()
                return 200, "text/html; charset=utf-8", html, 0.0
        return 404, "text/plain; charset=utf-8", b"not found", 0.0

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "EmbeddedServer/1.0"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def _serve(self, with_body: bool) -> None:
                status, ctype, body, delay = outer._route(self.path)
                if delay > 0:
                    end = time.monotonic() + delay
                    while time.monotonic() < end:
                        if outer._stopping.wait(min(0.05, max(0.0, end - time.monotonic()))):
                            return  # shutting down: drop the request
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if with_body:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass

            def do_GET(self) -> None:  # noqa: N802
                self._serve(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(False)

        return Handler


# ---------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------


def render_preview(samples: Sequence[EmbeddedSample], cols: int = 6, cell: int = 256) -> Image.Image:
    """Contact sheet with ground-truth quads drawn, for eyeballing box tightness."""
    rows = max(1, math.ceil(len(samples) / cols))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 28)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    small = load_font("DejaVuSans.ttf", 10)
    for k, s in enumerate(samples):
        im = Image.open(io.BytesIO(s.image)).convert("RGB")
        dd = ImageDraw.Draw(im)
        for quad in s.boxes:
            dd.polygon([tuple(p) for p in quad], outline=(255, 0, 255), width=2)
        scale = cell / max(s.width, s.height)
        im = im.resize((max(1, int(s.width * scale)), max(1, int(s.height * scale))), Image.Resampling.LANCZOS)
        x0, y0 = (k % cols) * cell, (k // cols) * (cell + 28)
        sheet.paste(im, (x0, y0))
        d.text((x0 + 2, y0 + cell + 1), f"{s.sample_id} {s.object_class}/{s.background} [{s.caption_kind}]",
               font=small, fill=(0, 0, 0))
        d.text((x0 + 2, y0 + cell + 14), s.caption[:44], font=small, fill=(60, 60, 160))
    return sheet
