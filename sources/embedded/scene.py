"""Drawing one image: fonts, backgrounds, objects, and text regions with exact ground-truth quads.

Everything that puts pixels on a canvas lives here, so the training generator
(``sources.embedded.generate``) and the held-out evaluation sets (``sources.eval_sets``) draw
with the same code. Randomness comes only from the ``random.Random`` / numpy generators
passed in, so a caller's seeded streams decide every pixel.
"""

from __future__ import annotations

import functools
import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sources.embedded.vocabulary import _OBJECT_COLOURS

JPEG_QUALITY = 92
# Ground-truth geometry: a text region's four corners, and an axis-aligned box.
Quad = tuple[tuple[float, float], ...]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


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
# Scenes: a background with one object, encoded as the dataset stores it
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
