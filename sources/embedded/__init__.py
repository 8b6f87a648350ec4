"""Offline synthetic image-caption dataset with embedded text and "parrot captions".

Why this exists: the curation pipeline must be exercised end to end (real HTTP download
with img2dataset, OCR text detection, parrot-caption scoring, small CLIP training)
without touching the internet.  This package draws simple, learnable objects on
characteristic backgrounds, renders text in the styles found in web images (signs,
labels, poster titles, overlays, watermarks), writes captions that either describe the
image, spell its text ("parrot"), or mix both, and keeps exact ground truth aside so
the pipeline stages can be scored against it.  Some of the text names another class
("STAR Cinema" above a drawn fish), as web text names things: parrot captions spelling
it are what teaches an unfiltered CLIP to read, and to fall for typographic attacks.

Everything is seeded: sample ``i`` of seed ``s`` depends only on ``(s, i)``, so
``generate(10, s)`` is a prefix of ``generate(300, s)`` and repeated calls are
byte-identical.

Modules (imports point one way: server -> generate -> captions -> scene -> vocabulary):

- ``vocabulary``: classes, backgrounds, caption words and the (disjoint) words drawn in images;
- ``scene``: fonts, backgrounds, objects and text regions, i.e. everything that draws pixels;
- ``captions``: descriptive, parrot and mixed captions;
- ``generate``: deterministic samples, the ground-truth table and a preview contact sheet;
- ``server``: the loopback HTTP server, with URLs that fail on purpose.

Import from the package (``from sources.embedded import generate``); the modules are its
internals.
"""

from __future__ import annotations

from sources.embedded.captions import CAPTION_KINDS, caption_tokens, describe
from sources.embedded.generate import (
    CLASS_WORD_TEXT_FRACTION,
    DEFAULT_SETTINGS,
    OBJECT_SIZE_NO_TEXT,
    EmbeddedSample,
    GeneratorSettings,
    _make_sample,
    choose_background,
    generate,
    ground_truth_table,
    render_preview,
    sample_url,
)
from sources.embedded.scene import (
    Box,
    DrawnScene,
    _background,
    _font_dir,
    central_square,
    draw_scene,
    encode_jpeg,
    load_font,
)
from sources.embedded.server import BROKEN_KINDS, EmbeddedServer
from sources.embedded.vocabulary import (
    _CAPTION_VOCAB,
    _CLASS_PHRASES,
    BACKGROUNDS,
    CLASSES,
    COMMON_BACKGROUND,
    COMMON_FRACTION,
    PARROT_FILLERS,
    TEXT_VOCABULARY,
    _class_word_choices,
)

# The private names imported above (_make_sample, _background, _font_dir, _CAPTION_VOCAB,
# _CLASS_PHRASES, _class_word_choices) are not public API: tests reach them as attributes
# of this package (``E._make_sample``), so they stay importable from here.

__all__ = [
    "BACKGROUNDS",
    "BROKEN_KINDS",
    "CAPTION_KINDS",
    "CLASSES",
    "CLASS_WORD_TEXT_FRACTION",
    "COMMON_BACKGROUND",
    "COMMON_FRACTION",
    "DEFAULT_SETTINGS",
    "OBJECT_SIZE_NO_TEXT",
    "PARROT_FILLERS",
    "TEXT_VOCABULARY",
    "Box",
    "DrawnScene",
    "EmbeddedSample",
    "EmbeddedServer",
    "GeneratorSettings",
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
