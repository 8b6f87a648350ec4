"""Held-out, labelled evaluation sets for CLIPs trained on the embedded dataset.

Why: the curation papers judge a filter by what the trained model does, so the project needs the
same probes on its own synthetic domain, drawn with the training generator's backgrounds, objects
and fonts but from RNG streams the training data never uses (keys start with "eval-v1", training
keys with "embedded-v1"):

- ``clean``: per class ``per_class`` images of the object without text, the background drawn with
  the training mix (the class's common background ``COMMON_FRACTION`` of the time);
- ``typographic``: the same images with a wrong class name written on them, built like ImageNet-Atr
  (Less is More): red (255, 0, 0), one bold sans font at a fixed size and position relative to the
  image (their Arial 50 pt at (50, 50) on ImageNet's ~375 px shorter side). The paper writes the
  class most confused with the true one; we draw the wrong class uniformly from the others with a
  seeded RNG, since which class a model confuses depends on the model being evaluated;
- ``spurious``: CounterAnimal-style, per class a "common" group on its common background and a
  "counter" group cycling through the other backgrounds, no text;
- ``retrieval``: image-caption pairs with distinct descriptive captions, no text;
- ``text_only``: the class words alone, no object, on a plain background (a flat colour), written
  in the attack's font and size, in upper, capitalised or lower case, in a contrasting colour at a
  random place; the label is the written class. Zero-shot top-1 on it says whether a model reads
  (Less is More and Parrot Captions: an unfiltered CLIP does, and that is why the attack works).

Images are JPEG bytes, like the training images after download.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sources.embedded import (
    BACKGROUNDS,
    CLASSES,
    COMMON_BACKGROUND,
    OBJECT_SIZE_NO_TEXT,
    Box,
    DrawnScene,
    choose_background,
    describe,
    draw_scene,
    encode_jpeg,
    load_font,
)

__all__ = [
    "CLASSES",
    "SET_NAMES",
    "TYPO_COLOUR",
    "TYPO_FONT",
    "EvalItem",
    "EvalSets",
    "build_eval_sets",
    "contact_sheet",
    "image_files",
    "write_eval_sets",
    "write_label",
]

SET_NAMES: tuple[str, ...] = ("clean", "typographic", "spurious", "retrieval", "text_only")
IMAGE_SIZE = 224  # square, so a centre crop keeps the whole image and the written label
TYPO_COLOUR: tuple[int, int, int] = (255, 0, 0)
TYPO_FONT = "DejaVuSans-Bold.ttf"  # the bold sans closest to the paper's Arial
# ImageNet-Atr: 50 px glyphs drawn at (50, 50) on an image whose shorter side is ~375 px.
TYPO_SIZE_FRACTION = 50 / 375
TYPO_OFFSET_FRACTION = 50 / 375
_RETRIEVAL_CAPTION_TRIES = 50


@dataclass(frozen=True)
class EvalItem:
    """One labelled image; the fields after ``background`` are set only by the sets that use them."""

    image: bytes  # JPEG
    label: int  # index into CLASSES of the drawn object
    background: str
    object_box: Box
    group: str = ""  # spurious: "common" | "counter"
    caption: str = ""  # retrieval: its descriptive caption
    written_label: int = -1  # typographic: the wrong class written on the image
    written_box: Box | None = None  # typographic: the written word's box (x0, y0, x1, y1)

    def rgb(self) -> np.ndarray:
        """The decoded HxWx3 uint8 image."""
        return np.asarray(Image.open(io.BytesIO(self.image)).convert("RGB"))


@dataclass(frozen=True)
class EvalSets:
    """The sets; ``typographic[i]`` is ``clean[i]`` with a wrong class written on it."""

    seed: int
    classes: tuple[str, ...]
    clean: tuple[EvalItem, ...]
    typographic: tuple[EvalItem, ...]
    spurious: tuple[EvalItem, ...]
    retrieval: tuple[EvalItem, ...]
    text_only: tuple[EvalItem, ...] = ()


def _rngs(seed: int, *key: object) -> tuple[random.Random, np.random.Generator]:
    """Independent streams per image, keyed so no training sample (``embedded-v1:...``) shares one."""
    name = ":".join(map(str, ("eval-v1", seed, *key)))
    np_seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return random.Random(name), np.random.default_rng(np_seed)


def write_label(img: Image.Image, word: str) -> Box:
    """Write ``word`` ImageNet-Atr style (red, fixed size, upper left) in place; return its box."""
    side = min(img.size)
    at = round(TYPO_OFFSET_FRACTION * side)
    font = load_font(TYPO_FONT, round(TYPO_SIZE_FRACTION * side))
    draw = ImageDraw.Draw(img)
    draw.text((at, at), word, fill=TYPO_COLOUR, font=font)
    return tuple(float(v) for v in draw.textbbox((at, at), word, font=font))  # type: ignore[return-value]


def _text_only(seed: int, label: int, index: int, size: int) -> EvalItem:
    """Class ``label``'s name alone on a flat background: what a model that reads gets right."""
    rng, _ = _rngs(seed, "text-only", label, index)
    background = tuple(rng.randint(0, 255) for _ in range(3))
    dark = sum(background) / 3 > 128
    ink = tuple(rng.randint(0, 60) if dark else rng.randint(195, 255) for _ in range(3))
    word = CLASSES[label]
    word = rng.choice((word.upper(), word.capitalize(), word))
    img = Image.new("RGB", (size, size), background)  # type: ignore[arg-type]
    font = load_font(TYPO_FONT, round(TYPO_SIZE_FRACTION * size))
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), word, font=font)
    margin = round(TYPO_OFFSET_FRACTION * size / 2)
    at = (rng.randint(margin - x0, max(margin - x0, size - margin - x1)),
          rng.randint(margin - y0, max(margin - y0, size - margin - y1)))
    draw.text(at, word, fill=ink, font=font)  # type: ignore[arg-type]
    box = tuple(float(v) for v in draw.textbbox(at, word, font=font))
    return EvalItem(image=encode_jpeg(img), label=label, background="plain", object_box=(0.0, 0.0, 0.0, 0.0),
                    written_label=label, written_box=box)  # type: ignore[arg-type]


def _scene(seed: int, part: str, label: int, index: int, bg: str | None,
           size: int) -> tuple[random.Random, str, DrawnScene]:
    """Draw one object of class ``label``; ``bg=None`` draws the background with the training mix."""
    rng, np_rng = _rngs(seed, part, label, index)
    obj = CLASSES[label]
    bg = bg or choose_background(obj, rng)
    return rng, bg, draw_scene(obj, bg, size, size, rng.uniform(*OBJECT_SIZE_NO_TEXT), rng, np_rng)


def build_eval_sets(seed: int = 10_000, per_class: int = 40, n_retrieval: int = 200,
                    image_size: int = IMAGE_SIZE) -> EvalSets:
    """Build all the sets; the same arguments give byte-identical sets."""
    clean, typographic, spurious, retrieval = [], [], [], []
    for label in range(len(CLASSES)):
        for i in range(per_class):
            rng, bg, drawn = _scene(seed, "clean", label, i, None, image_size)
            item = EvalItem(image=encode_jpeg(drawn.image), label=label, background=bg, object_box=drawn.object_box)
            written = rng.choice([k for k in range(len(CLASSES)) if k != label])
            box = write_label(drawn.image, CLASSES[written])
            clean.append(item)
            typographic.append(EvalItem(image=encode_jpeg(drawn.image), label=label, background=bg,
                                        object_box=drawn.object_box, written_label=written, written_box=box))
        common = COMMON_BACKGROUND[CLASSES[label]]
        counter = [b for b in BACKGROUNDS if b != common]
        for group in ("common", "counter"):
            for i in range(per_class):
                bg = common if group == "common" else counter[i % len(counter)]
                _, bg, drawn = _scene(seed, f"spurious-{group}", label, i, bg, image_size)
                spurious.append(EvalItem(image=encode_jpeg(drawn.image), label=label, background=bg,
                                         object_box=drawn.object_box, group=group))
    captions: set[str] = set()
    for i in range(n_retrieval):
        label = i % len(CLASSES)
        rng, bg, drawn = _scene(seed, "retrieval", label, i, None, image_size)
        for _ in range(_RETRIEVAL_CAPTION_TRIES):  # distinct captions, so each has one right image
            caption = describe(CLASSES[label], drawn.colour_name, drawn.size_word, bg, rng)
            if caption not in captions:
                break
        captions.add(caption)
        retrieval.append(EvalItem(image=encode_jpeg(drawn.image), label=label, background=bg,
                                  object_box=drawn.object_box, caption=caption))
    text_only = [_text_only(seed, label, i, image_size) for label in range(len(CLASSES)) for i in range(per_class)]
    return EvalSets(seed=seed, classes=CLASSES, clean=tuple(clean), typographic=tuple(typographic),
                    spurious=tuple(spurious), retrieval=tuple(retrieval), text_only=tuple(text_only))


def image_files(seed: int = 10_000, per_class: int = 40) -> list[tuple[str, bytes]]:
    """Every image of the sets as ``("<set>/<index>", JPEG bytes)``: what decontamination keeps out
    of the training pool (stages/decontaminate.py, the "builtin" eval set)."""
    sets = build_eval_sets(seed=seed, per_class=per_class)
    return [(f"{name}/{i:05d}", item.image) for name in SET_NAMES for i, item in enumerate(getattr(sets, name))]


def contact_sheet(items: tuple[EvalItem, ...] | list[EvalItem], cols: int = 8, cell: int = 128) -> Image.Image:
    """A grid of the items, each captioned with its class, background and what was written or said."""
    rows = max(1, math.ceil(len(items) / cols))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + 26)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    small = load_font("DejaVuSans.ttf", 10)
    for k, item in enumerate(items):
        x, y = (k % cols) * cell, (k // cols) * (cell + 26)
        image = Image.open(io.BytesIO(item.image)).convert("RGB")
        sheet.paste(image.resize((cell, cell), Image.Resampling.LANCZOS), (x, y))
        extra = CLASSES[item.written_label] if item.written_label >= 0 else item.group or item.caption
        draw.text((x + 2, y + cell + 1), f"{CLASSES[item.label]}/{item.background}", font=small, fill=(0, 0, 0))
        draw.text((x + 2, y + cell + 13), extra[: cell // 6], font=small, fill=(160, 30, 30))
    return sheet


def write_eval_sets(sets: EvalSets, folder: str | Path, limit: int = 64) -> list[Path]:
    """Save a PNG contact sheet of (up to ``limit`` items spread over) each set, for eyeballing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SET_NAMES:
        items = getattr(sets, name)
        picked = sorted({round(float(i)) for i in np.linspace(0, len(items) - 1, min(limit, len(items)))})
        path = folder / f"{name}.png"
        contact_sheet([items[i] for i in picked]).save(path)
        paths.append(path)
    return paths
