"""The dataset's words: classes, backgrounds, caption vocabulary and the text drawn in images.

Kept apart from drawing and caption writing because every other module reads it, and because
its one invariant lives here: the words a descriptive caption can say and the words rendered
in an image are disjoint (``_clean`` filters the text vocabulary against ``_CAPTION_VOCAB``),
so a descriptive caption never spells the image text by accident.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Sequence

# ---------------------------------------------------------------------------
# Classes and backgrounds
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
# The only words a parrot caption may add to the rendered text (at most one of them).
PARROT_FILLERS: tuple[str, ...] = ("the", "a", "and", "with")


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
