"""Parrot-caption stage: how much of a caption merely spells the text rendered in its image.

Two families of scores, from one word matcher:

- The Parrot Captions paper's co-emb. text rate, **as the paper defines it** (``cotr``, exact
  word matches, and ``cotr_fuzzy``): the set of distinct caption words found among the image's
  OCR words, divided by the number of distinct caption words, every word counted (no stop-word
  removal). Only these are comparable with the paper's LAION-2B figures.
- The project's score (``parrot_score``, and ``parrot_score_exact``): the same share over the
  caption words left after the configured stop-word and length filters, so that "the", "of" and
  "a" neither dilute a parrot nor make one. ``is_parrot`` is ``parrot_score >= threshold``.

Both fold case, compatibility forms and accents and split on non-alphanumerics (the paper gives
no rule; "The CAFÉ" and "cafe" are the same word to a CLIP text encoder). Captions are first
cleaned as open_clip cleans them before tokenising (ftfy, then HTML entities twice), so that
``Tom &amp; Jerry`` has no word "amp" and mojibake reads as the word it was.

A caption word counts as spelled (fuzzy) when OCR shows it exactly, or misread by one edit, or run
together with its neighbours in one token ("GOLDENTOKYO"). Edit distance alone turns distinct
English words into parrots (live/LOVE, hostel/HOTEL), so only OCR tokens that are *not*
themselves words are taken for misreads: OCR that reads a real word read that word. A merged
token must be two or more consecutive caption words, whole and in order, so it needs no such
guard ("blackpanther" is a web word, and still a parrot of "Black Panther"). "Word" means a whole-word token of CLIP's BPE vocabulary (about 34k words of web text, shipped
inside open_clip_torch, so nothing is downloaded). The rule and its threshold were chosen by
measurement on 10,000 real LAION captions (tests/test_parrot_real.py).

Pure CPU and no model: exact matches are one set intersection; rapidfuzz checks edit distance.

When OCR failed for a sample we do not know whether the image has text, so the row is
``parrot_status = "failed"`` with null scores (the caption words are still recorded): scoring it 0
would silently pass unverified samples through an ``is_parrot == False`` filter. When OCR is ok
but found nothing (null/empty ``texts``), the image has no text and every score is 0.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftfy
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from core.settings import config_section, require
from manifests.schemas import schema_for
from stages.base import BatchStage, Resources, optional_column


@config_section
class ParrotConfig:
    """Parrot-caption scoring (stages/parrot.py): how caption words are matched to OCR words.

    Defaults chosen on 10,000 real LAION captions (tests/test_parrot_real.py): with the dictionary
    guard, one edit from four letters on no longer makes live/LOVE parrots, and merged tokens
    catch what easyocr runs together. The threshold is the paper's line, CoTR >= 0.3 (subsets
    above it collapse); there it still flags <= 0.1% of captions against unrelated text.
    """

    stop_words: str = "english"  # "english" (a fixed built-in list) | "none"; parrot_score only
    fuzzy_max_distance: int = 1  # edit distance at which a caption word still counts as spelled
    fuzzy_min_length: int = 4  # words shorter than this must match exactly (short words collide)
    fuzzy_dictionary: str = "clip_bpe"  # OCR tokens in this word list are never misreads | "none"
    merged_min_length: int = 6  # an OCR token this long may be caption words run together; 0 = off
    min_word_length: int = 1  # caption words shorter than this are ignored (parrot_score only)
    parrot_threshold: float = 0.3  # is_parrot when parrot_score >= this (the paper: CoTR >= 0.3 collapses training)

    def problems(self) -> list[str]:
        """What types cannot say: ranges and choices, as readable messages (empty when fine)."""
        problems = require(
            (self.stop_words in {"english", "none"}, "parrot.stop_words must be 'english' or 'none'"),
            (self.fuzzy_max_distance >= 0, "parrot.fuzzy_max_distance must be >= 0"),
            (self.fuzzy_min_length >= 1, "parrot.fuzzy_min_length must be >= 1"),
            (self.fuzzy_dictionary in {"clip_bpe", "none"}, "parrot.fuzzy_dictionary must be 'clip_bpe' or 'none'"),
            (self.merged_min_length == 0 or self.merged_min_length >= 2,
             "parrot.merged_min_length must be 0 (off) or >= 2 (two words of one letter)"),
            (self.min_word_length >= 1, "parrot.min_word_length must be >= 1"),
            (0 < self.parrot_threshold <= 1, "parrot.parrot_threshold must be within (0, 1]"),
        )
        return problems

PARAMS_VERSION = 2

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

# open_clip's BPE merges file: its whole-word tokens are the dictionary of fuzzy_dictionary="clip_bpe".
CLIP_VOCAB_PACKAGE = "open_clip"
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_MERGES = 49152 - 256 - 2  # the merges open_clip's tokenizer uses (the file holds more)
WORD_END = "</w>"

# Parrot is cheap and row-wise; ParrotConfig has no resource keys, so these are fixed here.
# The batch is small on purpose: in the streaming DAG this stage sits between OCR and CLIP, and a
# batch is handed on only once it is full (or the input ends). At 256, with 64-sample shards, CLIP
# waited for four shards of OCR at a time and OCR and CLIP barely overlapped; a row costs ~0.1 ms
# here (real LAION captions), so small calls cost nothing and keep the stream moving (see
# BENCHMARKS.md, dag). 8, an OCR batch: at 32 the run's first images waited for four OCR batches
# before CLIP saw any (issue 27).
PARROT_BATCH_SIZE = 8
PARROT_CPUS = 0.25  # a fraction, so it never starves the model stages of a whole core


# -- text --------------------------------------------------------------------------------------


def clean_caption(text: str) -> str:
    """open_clip's ``basic_clean`` (ftfy, then HTML entities twice), without importing open_clip
    (which imports torch). Printable ASCII without "&" skips ftfy: nothing in it can be mojibake,
    an entity or a terminal escape (checked: ftfy leaves all 9,041 such real captions unchanged),
    and ftfy costs ~150 us a caption, ten times the rest of the scoring."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip()


def normalise_text(text: str) -> str:
    """NFKC + casefold + accents stripped: "Ｃａｆé", "CAFE" and "café" all become "cafe".
    ASCII needs only lower-casing, and most OCR and caption text is ASCII (a third of the cost)."""
    if text.isascii():
        return text.lower()
    text = unicodedata.normalize("NFKC", text).casefold()
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", stripped)


def split_words(text: str | None) -> list[str]:
    """Normalised words of ``text`` in order (duplicates kept); empty for None."""
    if not text:
        return []
    return _WORD.findall(normalise_text(str(text)))


def caption_word_sequence(caption: str | None) -> list[str]:
    """Every word of a cleaned caption, in order, duplicates kept (merged tokens need the order)."""
    return split_words(clean_caption(str(caption))) if caption else []


def levenshtein_within(a: str, b: str, max_distance: int) -> bool:
    """Whether the edit distance of ``a`` and ``b`` is <= ``max_distance`` (rapidfuzz stops
    counting past the bound, so a far pair costs no more than a near one)."""
    return Levenshtein.distance(a, b, score_cutoff=max_distance) <= max_distance


# -- the dictionary of fuzzy_dictionary="clip_bpe" ----------------------------------------------


def _bpe_byte_decoder() -> dict[str, int]:
    """CLIP's BPE spells bytes as printable characters (GPT-2's table); this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def clip_vocab_path() -> Path:
    """open_clip's vocabulary file, found without importing open_clip (its import loads torch)."""
    spec = importlib.util.find_spec(CLIP_VOCAB_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / CLIP_VOCAB_FILE
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{CLIP_VOCAB_FILE} not found in an installed {CLIP_VOCAB_PACKAGE} package "
        "(install open_clip_torch, or set parrot.fuzzy_dictionary = 'none')"
    )


@functools.lru_cache(maxsize=1)
def clip_vocab_words() -> frozenset[str]:
    """Normalised whole-word tokens of CLIP's BPE vocabulary: the words frequent enough in web
    text to be one token, so a real word more than a misread. Once per process (~0.4 s)."""
    decoder = _bpe_byte_decoder()
    with gzip.open(clip_vocab_path(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1 : CLIP_VOCAB_MERGES + 1]
    words: set[str] = set()
    for merge in merges:
        token = merge.replace(" ", "")
        if not token.endswith(WORD_END):
            continue
        try:
            text = bytes(decoder[ch] for ch in token[: -len(WORD_END)]).decode("utf-8")
        except (KeyError, UnicodeDecodeError):  # a token that is part of a multi-byte character
            continue
        split = split_words(text)
        if len(split) == 1:
            words.add(split[0])
    return frozenset(words)


# -- matching ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spelled:
    """Which distinct caption words the image spells: ``exact`` as OCR words, ``matched`` also as
    misreads or merged tokens (a superset of ``exact``)."""

    exact: frozenset[str]
    matched: frozenset[str]


NOTHING_SPELLED = Spelled(frozenset(), frozenset())


def merged_runs(words: Sequence[str], max_length: int) -> list[tuple[str, Sequence[str]]]:
    """Every run of two or more consecutive caption words written without spaces, up to
    ``max_length`` characters, with its words: what OCR reads when it misses the spaces
    ("GOLDENTOKYO"). Built once per caption, then scanned per OCR token by rapidfuzz."""
    runs = []
    for start in range(len(words) - 1):
        joined = words[start]
        for end in range(start + 1, len(words)):
            joined += words[end]
            if len(joined) > max_length:
                break
            runs.append((joined, words[start : end + 1]))
    return runs


def share(words: set[str], found: frozenset[str]) -> float:
    """Share of ``words`` (distinct) in ``found``; 0 for no words (nothing to parrot)."""
    return len(words & found) / len(words) if words else 0.0


def ocr_words(texts: Iterable[Any] | None, ocr_text: str | None = None) -> set[str]:
    """Every normalised word the OCR read (``texts`` per region, else the joined ``ocr_text``)."""
    if texts is not None:  # one split of the joined regions: a regex call per region cost more
        return set(split_words(" ".join(str(t) for t in texts if t is not None)))
    return set(split_words(ocr_text))


class ParrotStage(BatchStage):
    """Scores each caption against its image's OCR words (needs the OCR stage's columns)."""

    name = "parrot"
    reads = ("caption", "ocr_status", "texts", "ocr_text")  # text only: a parrot-only rerun decodes no image
    output_schema = schema_for("parrot")
    status_column = "parrot_status"
    rides_along = True  # runs in the actor before it, on CPU (pipeline.sample_runner.pools)

    def __init__(self, config: ParrotConfig) -> None:
        self.config = config
        self.stop_words = ENGLISH_STOP_WORDS if config.stop_words == "english" else frozenset()
        self.params_json = json.dumps(
            {
                "version": PARAMS_VERSION,
                "clean": "ftfy+html_unescape_x2",
                "normalise": "nfkc+casefold+strip_accents",
                "split": "non_alphanumeric",
                "stop_words": config.stop_words,
                "n_stop_words": len(self.stop_words),
                "min_word_length": config.min_word_length,
                "fuzzy_max_distance": config.fuzzy_max_distance,
                "fuzzy_min_length": config.fuzzy_min_length,
                "fuzzy_dictionary": config.fuzzy_dictionary,
                "merged_min_length": config.merged_min_length,
                "parrot_threshold": config.parrot_threshold,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def resources(self, gpus_available: bool) -> Resources:
        return Resources(cpus=PARROT_CPUS, gpus=0.0, batch_size=PARROT_BATCH_SIZE, replicas=1)

    def setup(self) -> None:
        """Load the dictionary once per worker, not on the first batch."""
        self.dictionary()

    def dictionary(self) -> frozenset[str]:
        """OCR tokens that are real words, so never taken for a misread or a merge."""
        return clip_vocab_words() if self.config.fuzzy_dictionary == "clip_bpe" else frozenset()

    # -- words -------------------------------------------------------------------------------

    def caption_words(self, caption: str | None) -> list[str]:
        """The words parrot_score counts: cleaned, normalised, first occurrence order,
        de-duplicated, filtered per config.

        A caption made only of stop words (a band called "The Who") keeps them: dropping all of
        its words would give it no words and so a score of 0 whatever the image says.
        """
        return self.scored_words(caption_word_sequence(caption))

    def scored_words(self, sequence: Sequence[str]) -> list[str]:
        """``caption_words`` from an already split caption."""
        long_enough = [w for w in sequence if len(w) >= self.config.min_word_length]
        content = [w for w in long_enough if w not in self.stop_words]
        return list(dict.fromkeys(content or long_enough))

    def spelled(self, sequence: Sequence[str], ocr: set[str]) -> Spelled:
        """The distinct words of ``sequence`` (a caption's words in order) that ``ocr`` spells."""
        if not sequence or not ocr:
            return NOTHING_SPELLED
        cfg = self.config
        distinct = set(sequence)
        exact = distinct & ocr
        # OCR tokens that may be a misread: neither a caption word nor a real word.
        dictionary = self.dictionary()
        unread = [o for o in ocr if o not in exact and o not in dictionary]
        found = set(exact)
        if cfg.fuzzy_max_distance > 0:
            candidates = [o for o in unread if len(o) >= cfg.fuzzy_min_length]
            if candidates:
                for word in distinct - exact:
                    # Numbers one digit apart are different numbers (2014/2015), not misreads.
                    if len(word) < cfg.fuzzy_min_length or word.isdigit():
                        continue
                    if process.extractOne(word, candidates, scorer=Levenshtein.distance,
                                          score_cutoff=cfg.fuzzy_max_distance) is not None:
                        found.add(word)
        if cfg.merged_min_length and len(sequence) > 1:
            # No dictionary guard here: a token that is two caption words run together is a parrot
            # even when the web made it a word of its own ("blackpanther" is one CLIP token).
            tokens = [t for t in ocr - exact if len(t) >= cfg.merged_min_length]
            runs = merged_runs(sequence, max(map(len, tokens)) + cfg.fuzzy_max_distance) if tokens else []
            if runs:
                joined = [text for text, _ in runs]
                for token in tokens:
                    for _, _, index in process.extract(token, joined, scorer=Levenshtein.distance,
                                                       score_cutoff=cfg.fuzzy_max_distance, limit=None):
                        found.update(runs[index][1])
        return Spelled(frozenset(exact), frozenset(found))

    # -- batch ---------------------------------------------------------------------------------

    def process_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """One PARROT row per input row, same order (see the module docstring for OCR failures)."""
        uids = list(batch["uid"])
        n = len(uids)
        captions = optional_column(batch, "caption", n)
        statuses = optional_column(batch, "ocr_status", n)
        texts_col = optional_column(batch, "texts", n)
        joined_col = optional_column(batch, "ocr_text", n)
        scores = ("parroted_words", "parrot_score", "parrot_score_exact", "is_parrot", "cotr", "cotr_fuzzy")
        out: dict[str, list] = {name: [] for name in self.output_schema.names}
        out["uid"] = [str(u) for u in uids]
        out["parrot_params"] = [self.params_json] * n
        for caption, status, texts, joined in zip(captions, statuses, texts_col, joined_col):
            sequence = caption_word_sequence(caption)
            words = self.scored_words(sequence)
            out["caption_words"].append(words)
            out["n_caption_words"].append(len(words))
            if status is None or str(status) != "ok":
                for column in scores:
                    out[column].append(None)
                out["parrot_status"].append("failed")
                continue
            spelled = self.spelled(sequence, ocr_words(texts, joined))
            scored, paper_words = set(words), set(sequence)  # the paper counts every distinct word
            score = share(scored, spelled.matched)
            out["parrot_status"].append("ok")
            out["parroted_words"].append([w for w in words if w in spelled.matched])
            out["parrot_score"].append(score)
            out["parrot_score_exact"].append(share(scored, spelled.exact))
            out["is_parrot"].append(score >= self.config.parrot_threshold)
            out["cotr"].append(share(paper_words, spelled.exact))
            out["cotr_fuzzy"].append(share(paper_words, spelled.matched))
        return out
