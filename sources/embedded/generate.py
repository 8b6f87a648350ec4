"""Deterministic sample generation and its ground truth.

``generate(n, seed)`` builds image-caption pairs whose RNG streams depend only on
``(seed, index)``, so any run is a byte-identical prefix of a longer one; ``ground_truth_table``
keeps what was drawn and said (keyed by URL) for scoring the pipeline stages, and
``render_preview`` draws it on a contact sheet for eyeballing.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from sources.embedded.captions import _mixed, _parrot, describe
from sources.embedded.scene import (
    _STYLE_WEIGHTS,
    _STYLES,
    Quad,
    _place_region,
    _Scene,
    central_square,
    draw_scene,
    encode_jpeg,
    load_font,
)
from sources.embedded.vocabulary import (
    BACKGROUNDS,
    CLASSES,
    COMMON_BACKGROUND,
    COMMON_FRACTION,
    _class_word_choices,
    _phrase,
)

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow

# ---------------------------------------------------------------------------
# Generation settings
# ---------------------------------------------------------------------------

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
# Caption kinds of a text image: parrot below PARROT_FRACTION, mixed below PARROT + MIXED.
PARROT_FRACTION = 0.4
MIXED_FRACTION = 0.3
_CLASS_WORD_STYLES: tuple[str, ...] = ("sign", "poster", "overlay")
# Object size (its drawing scale) as a share of the shorter side: large enough that a tiny CLIP
# sees the shape at 96 px. Text images draw it a little smaller to leave room for the text.
OBJECT_SIZE_NO_TEXT: tuple[float, float] = (0.5, 0.72)
_OBJECT_SIZE_WITH_TEXT: tuple[float, float] = (0.45, 0.6)
MAX_SIDE = 512
_SIZES: tuple[tuple[int, int], ...] = (
    (512, 384), (384, 512), (448, 448), (512, 320), (320, 512), (480, 360), (400, 400), (512, 448),
)




@dataclass(frozen=True)
class GeneratorSettings:
    """The proportions a run draws its samples with; the defaults are the dataset the tests know.

    Why a parameter: the ablation (issue 17) needs an unfiltered CLIP that learns to read, which
    at CPU scale takes more parrot pairs naming a class than the defaults give, while the OCR,
    parrot and curation tests are calibrated on the defaults. Each field keeps its RNG draw, so
    changing a fraction changes which samples get text, never the order of the draws.
    """

    text_fraction: float = TEXT_FRACTION
    class_word_fraction: float = CLASS_WORD_TEXT_FRACTION  # of text images
    class_word_cap: tuple[float, float] = _CLASS_WORD_CAP  # cap height / shorter side
    parrot_fraction: float = PARROT_FRACTION  # of text images
    mixed_fraction: float = MIXED_FRACTION  # of text images
    mixed_quotes_class_word: bool = False  # a mixed caption quotes the class word's region, when written

    def problems(self) -> list[str]:
        """Out-of-range fields, as readable messages (empty when fine)."""
        lo, hi = self.class_word_cap
        checks = (
            (0.0 <= self.text_fraction <= 1.0, "text_fraction must be within [0, 1]"),
            (0.0 <= self.class_word_fraction <= 1.0, "class_word_fraction must be within [0, 1]"),
            (0.0 < lo <= hi <= 0.5, "class_word_cap must be 0 < low <= high <= 0.5"),
            (self.parrot_fraction >= 0 and self.mixed_fraction >= 0
             and self.parrot_fraction + self.mixed_fraction <= 1.0,
             "parrot_fraction + mixed_fraction must be within [0, 1]"),
        )
        return [message for ok, message in checks if not ok]


DEFAULT_SETTINGS = GeneratorSettings()

# ---------------------------------------------------------------------------
# Sample record
# ---------------------------------------------------------------------------


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
# Sample generation
# ---------------------------------------------------------------------------


def choose_background(obj: str, rng: random.Random) -> str:
    """The class's common background with probability COMMON_FRACTION, else another at random."""
    common = COMMON_BACKGROUND[obj]
    return common if rng.random() < COMMON_FRACTION else rng.choice([b for b in BACKGROUNDS if b != common])


def _make_sample(seed: int, index: int, debug: bool = False,
                 settings: GeneratorSettings = DEFAULT_SETTINGS) -> tuple[EmbeddedSample, _Scene]:
    """Build sample ``index``; its RNG streams depend only on (seed, index) (and ``settings``)."""
    rng = random.Random(f"embedded-v1:{seed}:{index}")
    nrng = np.random.default_rng([int(seed) & 0xFFFFFFFF, index, 0xE3B])
    W, H = rng.choice(_SIZES)
    obj = rng.choice(CLASSES)
    bg = choose_background(obj, rng)
    wants_text = rng.random() < settings.text_fraction
    class_word = None
    if wants_text and rng.random() < settings.class_word_fraction:
        class_word = rng.choice(_class_word_choices(obj, bg))
    drawn = draw_scene(obj, bg, W, H, rng.uniform(*(_OBJECT_SIZE_WITH_TEXT if wants_text else OBJECT_SIZE_NO_TEXT)),
                       rng, nrng)
    img = drawn.image
    m = min(W, H)
    # a class word is big and inside the central square, where a 96 px CLIP can read it
    cap_lo, cap_hi = settings.class_word_cap
    class_placement: dict[str, Any] = {"cap_range": (cap_lo * m, cap_hi * m),
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
        mixed_below = settings.parrot_fraction + settings.mixed_fraction
        kind = "parrot" if r < settings.parrot_fraction else ("mixed" if r < mixed_below else "descriptive")
    else:
        kind = "descriptive"
    if kind == "parrot":
        caption = _parrot(regions, rng)
    elif kind == "mixed":
        salient = text_class if settings.mixed_quotes_class_word else None
        caption = _mixed(regions, obj, drawn.colour_name, drawn.size_word, bg, rng, salient)
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


def generate(n: int = 300, seed: int = 0, settings: GeneratorSettings = DEFAULT_SETTINGS) -> list[EmbeddedSample]:
    """Generate ``n`` samples; identical (n, seed, settings) give byte-identical output."""
    if n < 0:
        raise ValueError("n must be >= 0")
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return [_make_sample(seed, i, settings=settings)[0] for i in range(n)]


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
