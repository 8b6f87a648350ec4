"""Parrot matching on real web captions: false parrots and recall, measured rather than assumed.

Data: 10,000 real LAION alt-text captions, ``shared/realdata/laion_captions10k/test_10000.parquet``
(rom1504/img2dataset tests/test_files/test_10000.parquet, MIT). The images are not there, so the
OCR words are simulated from caption text with the noise easyocr shows on web images (issue #14):
per word, one character substituted or dropped, or the word run together with the next, and the
case changed. At one error in every word, the edit-distance-only rule this replaced caught 48.5%
of parrots, as it caught 7 of 15 on 100 real LAION pairs.

On a fixed, seeded sample:

- unrelated: each caption against another caption's words (1-8 of them, one in three misread), or
  against common sign words: an unrelated image. Target <= 0.5% flagged ``is_parrot``.
- near miss: captions whose every content word has a *different* real word one edit away in the
  corpus (live/LOVE, hostel/HOTEL; plurals excluded, they are the same word), against those words.
  Edit distance alone flags ~86% of them.
- recall: each caption against its own words, every word misread once. Target >= 95% flagged.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.parrot import ENGLISH_STOP_WORDS, ParrotConfig, ParrotStage, caption_word_sequence

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
CAPTIONS = REALDATA / "laion_captions10k" / "test_10000.parquet"
SEED = 14
SAMPLE = 3000  # captions per measure: ~5 s on one core
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
SIGN_WORDS = """open closed sale exit entrance stop hotel cafe bar shop store free new hot cold push
pull parking no smoking welcome toilet restaurant pizza coffee beer bank pharmacy police taxi bus
station street road avenue menu special offer off best price only today now sold out fresh food
market love home house city park school church club studio salon beauty fashion art gallery museum
books music live news sport tickets wine grill kitchen bakery deli""".split()

pytestmark = pytest.mark.skipif(not CAPTIONS.exists(), reason=f"real captions not found at {CAPTIONS}")


def with_ocr_noise(words: list[str], error_rate: float, rng: random.Random) -> list[str]:
    """What OCR reads of ``words``: each, with probability ``error_rate``, gets one character
    substituted or dropped, or is run together with the next word; every case is changed."""
    read, i = [], 0
    while i < len(words):
        word = words[i]
        if rng.random() < error_rate:
            kind = rng.choice(("substitute", "drop", "merge"))
            at = rng.randrange(len(word))
            if kind == "substitute":
                word = word[:at] + rng.choice([c for c in CHARACTERS if c != word[at]]) + word[at + 1 :]
            elif kind == "drop" and len(word) > 1:
                word = word[:at] + word[at + 1 :]
            elif kind == "merge" and i + 1 < len(words):
                word, i = word + words[i + 1], i + 1
        read.append(rng.choice((word.upper(), word.title(), word)))
        i += 1
    return read


def same_word_inflected(a: str, b: str) -> bool:
    """A plural or past tense of the other word: matching it is right, not a false parrot."""
    short, long = sorted((a, b), key=len)
    return long.startswith(short) and long[len(short) :] in ("s", "d")


def one_edit_neighbours(sequences: list[list[str]]) -> Callable[[str], list[str]]:
    """Real words of the corpus (seen in two captions or more, 4+ letters) one edit from a word,
    found through shared single-deletion keys (two words are one edit apart iff they share one)."""
    seen = Counter(w for words in sequences for w in set(words))
    by_key: dict[str, set[str]] = defaultdict(set)
    for word, count in seen.items():
        if count >= 2 and len(word) >= 4 and word.isascii() and word.isalpha():
            for key in {word, *(word[:k] + word[k + 1 :] for k in range(len(word)))}:
                by_key[key].add(word)

    def neighbours(word: str) -> list[str]:
        keys = {word, *(word[:k] + word[k + 1 :] for k in range(len(word)))}
        return sorted(set().union(*(by_key.get(k, set()) for k in keys)) - {word})

    return neighbours


def near_miss_ocr(words: list[str], neighbours: Callable[[str], list[str]], rng: random.Random) -> list[str] | None:
    """A distinct real word one edit from each content word, or None when a content word has none."""
    read = []
    for word in dict.fromkeys(words):
        options = [n for n in neighbours(word) if n not in words and not same_word_inflected(word, n)]
        if options:
            read.append(rng.choice(options).upper())
        elif word not in ENGLISH_STOP_WORDS:
            return None
    return read or None


@dataclasses.dataclass
class Pairs:
    captions: list[str]
    ocr: list[list[str]]


@pytest.fixture(scope="module")
def measures() -> dict[str, Pairs]:
    captions = [c or "" for c in pq.read_table(CAPTIONS, columns=["TEXT"]).column("TEXT").to_pylist()]
    sequences = [caption_word_sequence(c) for c in captions]
    rng = random.Random(SEED)
    sample = rng.sample([i for i, words in enumerate(sequences) if words], SAMPLE)
    others = sample[1:] + sample[:1]
    neighbours = one_edit_neighbours(sequences)
    near = [(i, near_miss_ocr(sequences[i], neighbours, rng)) for i in range(len(captions))]
    near = [(i, ocr) for i, ocr in near if ocr]
    return {
        "unrelated": Pairs(
            [captions[i] for i in sample],
            [with_ocr_noise(sequences[j][: rng.randint(1, 8)], 1 / 3, rng) for j in others],
        ),
        "signs": Pairs([captions[i] for i in sample], [rng.sample(SIGN_WORDS, rng.randint(1, 5)) for _ in sample]),
        "near_miss": Pairs([captions[i] for i, _ in near], [ocr for _, ocr in near]),
        "recall": Pairs([captions[i] for i in sample], [with_ocr_noise(sequences[i], 1.0, rng) for i in sample]),
    }


def flagged(stage: ParrotStage, pairs: Pairs) -> float:
    """Share of the pairs flagged is_parrot."""
    out = stage.process_batch(
        {"uid": list(range(len(pairs.captions))), "caption": pairs.captions,
         "ocr_status": ["ok"] * len(pairs.captions), "texts": pairs.ocr}
    )
    return sum(out["is_parrot"]) / len(pairs.captions)


def test_few_false_parrots_against_unrelated_text(measures) -> None:
    stage = ParrotStage(ParrotConfig())
    unrelated, signs = flagged(stage, measures["unrelated"]), flagged(stage, measures["signs"])
    print(f"\nflagged against unrelated text: another caption {unrelated:.2%}, sign words {signs:.2%}")
    assert unrelated <= 0.005 and signs <= 0.005


def test_distinct_real_words_one_edit_apart_are_not_parrots(measures) -> None:
    pairs = measures["near_miss"]
    guarded = flagged(ParrotStage(ParrotConfig()), pairs)
    edit_distance_only = flagged(ParrotStage(ParrotConfig(fuzzy_dictionary="none", parrot_threshold=0.5)), pairs)
    print(f"\nnear misses ({len(pairs.captions)} captions): flagged {guarded:.1%}, "
          f"edit distance alone at 0.5: {edit_distance_only:.1%}")
    assert len(pairs.captions) >= 100
    assert edit_distance_only > 0.6  # the measure sees the problem the issue reported (88%)
    assert guarded <= 0.05


def test_recall_with_every_word_misread(measures) -> None:
    stage = ParrotStage(ParrotConfig())
    recall = flagged(stage, measures["recall"])
    without_merges = flagged(ParrotStage(ParrotConfig(merged_min_length=0)), measures["recall"])
    print(f"\nparrots caught with every word misread: {recall:.1%} (without merged tokens {without_merges:.1%})")
    assert recall >= 0.95
    assert recall > without_merges + 0.1  # merged tokens are what rescues run-together OCR


def test_real_captions_spelled_on_real_photos_are_caught_by_the_shipped_ocr() -> None:
    """The whole chain on real pixels: 16 real alt-texts drawn as signs onto real text-free photos,
    stored as JPEG, read by the shipped OCR engine, scored by the shipped parrot stage
    (bench/parrot_real_bench.py measures 60, both styles, every engine)."""
    from bench.parrot_real_bench import STYLES, measure, ocr_stage, pick_captions, rendered_set
    from bench.realdata import text_free_photos
    from stages.ocr import OcrConfig

    photos = text_free_photos()
    captions = pick_captions(16)
    images, _ = rendered_set(captions, photos, STYLES["sign"])
    parrot = ParrotStage(ParrotConfig())
    parrot.setup()
    m = measure(ocr_stage(OcrConfig().engine), captions, images, photos, parrot)
    print(f"\nshipped OCR on 16 real captions drawn as signs: recall {m['recall']:.2f}, "
          f"false {m['false_unrelated']}/16 unrelated, {m['false_text_free']}/5 text-free")
    assert m["recall"] >= 0.9
    assert m["false_unrelated"] == 0 and m["false_text_free"] == 0
