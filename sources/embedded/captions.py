"""Writing captions: descriptive, parrot (spells the image text) and mixed.

The three caption kinds are what the parrot-caption stage must tell apart; their wording
comes from ``sources.embedded.vocabulary`` and the text they spell from the rendered regions.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from sources.embedded.scene import _Region
from sources.embedded.vocabulary import (
    _BG_NOUN,
    _BG_PHRASES,
    _CLASS_PHRASES,
    _DESCRIPTIVE_TEMPLATES,
    _MEDIUMS,
    _MIXED_TEMPLATES,
    PARROT_FILLERS,
)

CAPTION_KINDS: tuple[str, ...] = ("descriptive", "parrot", "mixed")


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


def _mixed(regions: Sequence[_Region], obj: str, colour: str, size_word: str, bg: str, rng: random.Random,
           salient: str | None = None) -> str:
    """Describe the image and quote one region's text: a random one, or the one led by the word
    ``salient`` when given and written (the biggest text, which a caption writer would quote)."""
    region = rng.choice(list(regions))
    if salient is not None:  # after the draw, so the RNG stream is the same either way
        region = next((r for r in regions if r.words and r.words[0].lower() == salient), region)
    text = " ".join(_case(region.words, rng))
    desc = describe(obj, colour, size_word, bg, rng)
    tmpl = rng.choice(_MIXED_TEMPLATES)
    out = tmpl.format(medium=rng.choice(_MEDIUMS), art="@@", obj=rng.choice(_CLASS_PHRASES[obj]),
                      colour=colour, text=text, desc=desc)
    return _fix_articles(out)
