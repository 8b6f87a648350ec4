"""Parrot-caption stage: how much of a caption merely spells the text rendered in its image.

This is the Parrot Captions paper's co-emb. text rate (CoTR), measured caption-side: the share of
(normalised, de-duplicated) caption words that also occur among the OCR words of the image. The
paper gives no normalisation rule; we fold case, compatibility forms and accents, split on
non-alphanumerics and optionally drop English stop words, because "The CAFÉ" and "cafe" are the
same word to a CLIP text encoder but not to ``str.__eq__``. OCR misreads a letter now and then
("c0ffee"), so a *fuzzy* match (small Levenshtein distance, long words only) also counts; the
exact-only score is kept beside it.

Pure CPU and no model: exact matches are one set intersection per sample, and the Levenshtein
check runs only on the caption words left unmatched, against OCR words of compatible length.

When OCR failed for a sample we do not know whether the image has text, so the row is
``parrot_status = "failed"`` with null scores (the caption words are still recorded): scoring it 0
would silently pass unverified samples through an ``is_parrot == False`` filter. When OCR is ok
but found nothing (null/empty ``texts``), the image has no text and the score is 0.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from core.settings import config_section, require
from manifests.schemas import schema_for
from stages.base import BatchStage, Resources, optional_column


@config_section
class ParrotConfig:
    """Parrot-caption scoring (stages/parrot.py): how caption words are matched to OCR words."""

    stop_words: str = "english"  # "english" (a fixed built-in list) | "none"
    fuzzy_max_distance: int = 1  # edit distance at which a caption word still counts as spelled
    fuzzy_min_length: int = 4  # words shorter than this must match exactly (short words collide)
    min_word_length: int = 1  # caption words shorter than this are ignored
    parrot_threshold: float = 0.5  # is_parrot when parrot_score >= this

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.stop_words in {"english", "none"}, "parrot.stop_words must be 'english' or 'none'"),
            (self.fuzzy_max_distance >= 0, "parrot.fuzzy_max_distance must be >= 0"),
            (self.fuzzy_min_length >= 1, "parrot.fuzzy_min_length must be >= 1"),
            (self.min_word_length >= 1, "parrot.min_word_length must be >= 1"),
            (0 < self.parrot_threshold <= 1, "parrot.parrot_threshold must be within (0, 1]"),
        )
        return problems

PARAMS_VERSION = 1

# A fixed list, so that a score never depends on which NLP library (or which version of its list)
# is installed. Function words only: content words such as "photo" or "sign" stay countable, and
# so do the function words that are typical sign text ("no", "not", "now", "only", "off", "open",
# "up", "down", "out", "over", "all", "more", "most"): "ONLY" or "NO EXIT" on a sign, spelled in
# the caption, is exactly what this stage must catch.
ENGLISH_STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against also am an and any are as at be because been before being
    below between both but by can could did do does doing during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself
    just me my myself nor of on once or other our ours ourselves own same she should so some
    such than that the their theirs them themselves then there these they this those through to
    too under until very was we were what when where which while who whom why will with would
    you your yours yourself yourselves s t d ll m re ve
    """.split()
)

_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits in any script; "_" counts as a separator

# Parrot is cheap and row-wise; ParrotConfig has no resource keys, so these are fixed here.
# The batch is small on purpose: in the streaming DAG this stage sits between OCR and CLIP, and a
# batch is handed on only once it is full (or the input ends). At 256, with 64-sample shards, CLIP
# waited for four shards of OCR at a time and OCR and CLIP barely overlapped; a row costs ~15 us
# here, so 32 rows per call cost nothing and keep the stream moving (see BENCHMARKS.md, dag).
PARROT_BATCH_SIZE = 32
PARROT_CPUS = 0.25  # a fraction, so it never starves the model stages of a whole core


def normalise_text(text: str) -> str:
    """NFKC + casefold + accents stripped: "Ｃａｆé", "CAFE" and "café" all become "cafe"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", stripped)


def split_words(text: str | None) -> list[str]:
    """Normalised words of ``text`` in order (duplicates kept); empty for None."""
    if not text:
        return []
    return _WORD.findall(normalise_text(str(text)))


def levenshtein_within(a: str, b: str, max_distance: int) -> bool:
    """Whether the edit distance of ``a`` and ``b`` is <= ``max_distance``.

    Banded dynamic programme with an early exit as soon as a whole row exceeds the bound, so a
    check costs O(len * max_distance) rather than O(len^2).
    """
    if a == b:
        return True
    if abs(len(a) - len(b)) > max_distance:
        return False
    if len(a) > len(b):
        a, b = b, a
    if not a:
        return len(b) <= max_distance
    big = max_distance + 1
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        lo, hi = max(1, i - max_distance), min(len(b), i + max_distance)
        current = [big] * (len(b) + 1)
        current[0] = i if i <= max_distance else big
        row_min = current[0]
        for j in range(lo, hi + 1):
            cost = 0 if ca == b[j - 1] else 1
            value = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            current[j] = value if value < big else big
            if current[j] < row_min:
                row_min = current[j]
        if row_min > max_distance:
            return False
        previous = current
    return previous[len(b)] <= max_distance


class ParrotStage(BatchStage):
    """Scores each caption against its image's OCR words (needs the OCR stage's columns)."""

    name = "parrot"
    reads = ("caption", "ocr_status", "texts", "ocr_text")  # text only: a parrot-only rerun decodes no image
    output_schema = schema_for("parrot")
    status_column = "parrot_status"

    def __init__(self, config: ParrotConfig) -> None:
        self.config = config
        self.stop_words = ENGLISH_STOP_WORDS if config.stop_words == "english" else frozenset()
        self.params_json = json.dumps(
            {
                "version": PARAMS_VERSION,
                "normalise": "nfkc+casefold+strip_accents",
                "split": "non_alphanumeric",
                "stop_words": config.stop_words,
                "n_stop_words": len(self.stop_words),
                "min_word_length": config.min_word_length,
                "fuzzy_max_distance": config.fuzzy_max_distance,
                "fuzzy_min_length": config.fuzzy_min_length,
                "parrot_threshold": config.parrot_threshold,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=PARROT_CPUS, gpus=0.0, batch_size=PARROT_BATCH_SIZE, replicas=1)

    def setup(self) -> None:
        """Nothing to load: the stop-word list is a module constant."""

    # -- words -------------------------------------------------------------------------------

    def caption_words(self, caption: str | None) -> list[str]:
        """Normalised caption words, first occurrence order, de-duplicated, filtered per config.

        A caption made only of stop words (a band called "The Who") keeps them: dropping all of
        its words would give it no words and so a score of 0 whatever the image says.
        """
        long_enough = [w for w in split_words(caption) if len(w) >= self.config.min_word_length]
        content = [w for w in long_enough if w not in self.stop_words]
        return list(dict.fromkeys(content or long_enough))

    @staticmethod
    def ocr_words(texts: Iterable[Any] | None, ocr_text: str | None = None) -> set[str]:
        """Every normalised word the OCR read (``texts`` per region, else the joined ``ocr_text``)."""
        if texts is not None:
            words: set[str] = set()
            for text in texts:
                if text is not None:
                    words.update(split_words(text))
            return words
        return set(split_words(ocr_text))

    def parroted(self, caption_words: Sequence[str], ocr_words: set[str]) -> tuple[list[str], int]:
        """Caption words spelled in the image (caption order) and how many matched exactly."""
        if not caption_words or not ocr_words:
            return [], 0
        exact = ocr_words.intersection(caption_words)
        cfg = self.config
        fuzzy: set[str] = set()
        if cfg.fuzzy_max_distance > 0:
            long_ocr = [w for w in ocr_words if len(w) >= cfg.fuzzy_min_length]
            if long_ocr:
                for word in caption_words:
                    if word in exact or len(word) < cfg.fuzzy_min_length:
                        continue
                    if any(levenshtein_within(word, o, cfg.fuzzy_max_distance) for o in long_ocr):
                        fuzzy.add(word)
        matched = exact | fuzzy
        return [w for w in caption_words if w in matched], len(exact)

    # -- batch ---------------------------------------------------------------------------------

    def process_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """One PARROT row per input row, same order (see the module docstring for OCR failures)."""
        uids = list(batch["uid"])
        n = len(uids)
        captions = optional_column(batch, "caption", n)
        statuses = optional_column(batch, "ocr_status", n)
        texts_col = optional_column(batch, "texts", n)
        joined_col = optional_column(batch, "ocr_text", n)
        out: dict[str, list] = {
            "uid": [str(u) for u in uids],
            "parrot_status": [],
            "caption_words": [],
            "parroted_words": [],
            "n_caption_words": [],
            "parrot_score": [],
            "parrot_score_exact": [],
            "is_parrot": [],
            "parrot_params": [self.params_json] * n,
        }
        for caption, status, texts, joined in zip(captions, statuses, texts_col, joined_col):
            words = self.caption_words(caption)
            out["caption_words"].append(words)
            out["n_caption_words"].append(len(words))
            if status is None or str(status) != "ok":
                for column in ("parroted_words", "parrot_score", "parrot_score_exact", "is_parrot"):
                    out[column].append(None)
                out["parrot_status"].append("failed")
                continue
            spelled, n_exact = self.parroted(words, self.ocr_words(texts, joined))
            score = len(spelled) / len(words) if words else 0.0
            out["parrot_status"].append("ok")
            out["parroted_words"].append(spelled)
            out["parrot_score"].append(score)
            out["parrot_score_exact"].append(n_exact / len(words) if words else 0.0)
            out["is_parrot"].append(score >= self.config.parrot_threshold)
        return out

