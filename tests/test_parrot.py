"""Parrot-caption scoring (CoTR): caption cleaning, word normalisation, stop words, the paper's
CoTR beside the project's score, fuzzy matching of OCR misreads (but not of distinct real words),
merged OCR tokens, and separation of parrot from descriptive captions on the embedded dataset's
ground-truth text.

No models: the ground-truth ``box_texts`` stand in for OCR, so these tests measure the scoring
rule itself, not an OCR engine.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections import defaultdict

import ftfy
import numpy as np
import pyarrow as pa
import pytest

from manifests.schemas import schema_for
from pipeline.config import ParrotConfig
from sources.embedded import CAPTION_KINDS, generate
from stages.parrot import (
    ENGLISH_STOP_WORDS,
    ParrotStage,
    clean_caption,
    clip_vocab_words,
    levenshtein_within,
    normalise_text,
    split_words,
)

DEFAULT = ParrotConfig()


def _stage(**overrides) -> ParrotStage:
    return ParrotStage(dataclasses.replace(DEFAULT, **overrides))


def _one(stage: ParrotStage, caption: str, texts: list[str] | None, status: str = "ok") -> dict:
    out = stage.process_batch({"uid": ["u"], "caption": [caption], "ocr_status": [status], "texts": [texts]})
    return {k: v[0] for k, v in out.items()}


def auc(positives: list[float], negatives: list[float]) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic, ties counted half (rank based)."""
    scores = np.asarray(list(positives) + list(negatives), dtype=float)
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over runs of ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = len(positives), len(negatives)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def test_auc_helper() -> None:
    assert auc([2, 3], [0, 1]) == 1.0
    assert auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 1], [1, 1]) == 0.5
    assert auc([0.9, 0.4], [0.5, 0.1]) == 0.75


# -- normalisation -----------------------------------------------------------------------------


def test_normalisation_folds_case_punctuation_unicode() -> None:
    assert split_words("Café, CAFE! cafe.") == ["cafe", "cafe", "cafe"]
    assert split_words("naïve NAÏVE Naive") == ["naive"] * 3
    assert split_words("Ｃａｆé ﬁne") == ["cafe", "fine"]  # full-width forms and ligatures (NFKC)
    assert split_words("STRASSE straße") == ["strasse", "strasse"]  # casefold, not lower
    assert split_words("hello_world--foo/bar 24/7") == ["hello", "world", "foo", "bar", "24", "7"]
    assert split_words("") == [] and split_words(None) == []
    assert normalise_text("Crème Brûlée") == "creme brulee"


def test_caption_words_dedup_in_order_and_accent_match() -> None:
    stage = _stage()
    assert stage.caption_words("Coffee, the COFFEE and Tea coffee") == ["coffee", "tea"]
    row = _one(stage, "Café Paris", ["CAFE", "PARIS"])
    assert row["parrot_score"] == 1.0 and row["parrot_score_exact"] == 1.0
    assert row["parroted_words"] == ["cafe", "paris"]


def test_stop_words_on_and_off() -> None:
    assert len(ENGLISH_STOP_WORDS) >= 100 and {"the", "a", "an", "of", "on", "in", "with", "and"} <= ENGLISH_STOP_WORDS
    caption, texts = "the coffee shop of the town", ["COFFEE SHOP"]
    on = _one(_stage(stop_words="english"), caption, texts)
    assert on["caption_words"] == ["coffee", "shop", "town"]
    assert on["parrot_score"] == pytest.approx(2 / 3)
    off = _one(_stage(stop_words="none"), caption, texts)
    assert off["caption_words"] == ["the", "coffee", "shop", "of", "town"]
    assert off["parrot_score"] == pytest.approx(2 / 5)
    assert json.loads(on["parrot_params"])["stop_words"] == "english"
    assert json.loads(off["parrot_params"])["n_stop_words"] == 0


def test_sign_words_are_not_stop_words_and_all_stop_caption_keeps_its_words() -> None:
    assert _one(_stage(), "ONLY", ["ONLY"])["parrot_score"] == 1.0  # "only" is typical sign text
    assert _one(_stage(), "NO EXIT", ["no exit"])["parrot_score"] == 1.0
    row = _one(_stage(), "The Who", ["THE WHO"])  # nothing but stop words: keep them
    assert row["caption_words"] == ["the", "who"] and row["parrot_score"] == 1.0


def test_min_word_length() -> None:
    row = _one(_stage(min_word_length=3, stop_words="none"), "go to my big shop", ["BIG SHOP"])
    assert row["caption_words"] == ["big", "shop"] and row["parrot_score"] == 1.0


# -- matching ----------------------------------------------------------------------------------


def test_levenshtein_within_matches_full_dp() -> None:
    def full(a: str, b: str) -> int:
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    rng = np.random.default_rng(0)
    for _ in range(3000):
        a = "".join(rng.choice(list("abc"), rng.integers(0, 7)))
        b = "".join(rng.choice(list("abc"), rng.integers(0, 7)))
        d = int(rng.integers(0, 4))
        assert levenshtein_within(a, b, d) == (full(a, b) <= d), (a, b, d)


def test_fuzzy_match_of_ocr_misreads() -> None:
    stage = _stage()  # fuzzy_max_distance=1, fuzzy_min_length=4
    for misread in ("c0ffee", "coffe", "cofffee", "cofee"):
        row = _one(stage, "fresh coffee", ["FRESH", misread])
        assert row["parroted_words"] == ["fresh", "coffee"], misread
        assert row["parrot_score"] == 1.0 and row["parrot_score_exact"] == 0.5
    far = _one(stage, "fresh coffee", ["FRESH", "c0ffe"])  # two edits: not the same word
    assert far["parroted_words"] == ["fresh"]
    exact_only = _one(_stage(fuzzy_max_distance=0), "fresh coffee", ["FRESH", "c0ffee"])
    assert exact_only["parrot_score"] == 0.5


def test_short_words_are_not_fuzzily_matched() -> None:
    stage = _stage()
    row = _one(stage, "cat bar", ["CAT", "HAT", "CAR"])  # "bar"~"car" is one edit, but short
    assert row["parroted_words"] == ["cat"]
    # A long caption word is not fuzzily matched to a short OCR fragment either.
    assert _one(stage, "cars", ["CAR"])["parroted_words"] == []
    # With the length rule alone, "bar"~"car" would match at fuzzy_min_length=3; "car" is a real
    # word, so the dictionary guard (on by default) refuses it (changed on purpose, issue #14).
    assert _one(_stage(fuzzy_min_length=3), "cat bar", ["CAT", "CAR"])["parroted_words"] == ["cat"]
    no_guard = _stage(fuzzy_min_length=3, fuzzy_dictionary="none")
    assert _one(no_guard, "cat bar", ["CAT", "CAR"])["parroted_words"] == ["cat", "bar"]


FALSE_PARROTS = [("live", "LOVE"), ("hostel", "HOTEL"), ("sale", "SOLE"), ("poster", "POTTER"), ("black", "BLANK")]


def test_distinct_words_one_edit_apart_are_not_parrots() -> None:
    stage = _stage()
    for caption_word, ocr_word in FALSE_PARROTS:
        row = _one(stage, caption_word, [ocr_word])
        assert row["parroted_words"] == [] and row["cotr_fuzzy"] == 0.0, (caption_word, ocr_word)
    row = _one(stage, "live music", ["LOVE", "MUSE"])  # two words, no exact match: not a parrot
    assert row["parrot_score"] == 0.0 and row["is_parrot"] is False
    # The guard is what refuses them: edit distance alone calls every pair a parrot.
    no_guard = _stage(fuzzy_dictionary="none")
    assert all(_one(no_guard, c, [o])["parroted_words"] == [c] for c, o in FALSE_PARROTS)
    assert {"live", "love", "hostel", "hotel", "sale", "sole", "poster", "potter", "black", "blank"} <= clip_vocab_words()


def test_numbers_one_digit_apart_are_not_misreads() -> None:
    stage = _stage(fuzzy_dictionary="none")  # whatever the dictionary holds
    assert _one(stage, "calendar 2014", ["CALENDAR", "2015"])["parroted_words"] == ["calendar"]


def test_merged_ocr_tokens_match_consecutive_caption_words() -> None:
    stage = _stage()
    row = _one(stage, "Golden Tokyo", ["GOLDENTOKYO"])
    assert row["parroted_words"] == ["golden", "tokyo"] and row["is_parrot"] is True
    assert row["cotr"] == 0.0 and row["cotr_fuzzy"] == 1.0  # not an exact word match
    assert _one(stage, "Golden Tokyo", ["G0LDENTOKYO"])["parroted_words"] == ["golden", "tokyo"]  # plus a misread
    pursuit = _one(stage, "The Pursuit of God", ["THE", "PURSUITOF", "GOD"])
    assert pursuit["cotr_fuzzy"] == 1.0  # "of" found inside the merged token, beside "pursuit"
    # A token that happens to be a web word still counts when it is the caption's words run together.
    assert _one(stage, "Black Panther Necklace", ["BLACKPANTHER"])["parroted_words"] == ["black", "panther"]


def test_words_inside_longer_tokens_are_not_merges() -> None:
    stage = _stage()
    assert _one(stage, "car", ["SCARF"])["parroted_words"] == []  # a short word inside a long token
    assert _one(stage, "party art", ["PARTYART"])["parroted_words"] == ["party", "art"]  # both words, in order: a merge
    assert _one(stage, "art party", ["PARTYART"])["parroted_words"] == []  # OCR reads in order
    assert _one(stage, "art", ["PARTY"])["parroted_words"] == []
    assert _one(stage, "golden hotel tokyo", ["GOLDENTOKYO"])["parroted_words"] == []  # not consecutive
    assert _one(stage, "log in to", ["INTO"])["cotr_fuzzy"] == 0.0  # shorter than merged_min_length
    assert _one(_stage(merged_min_length=0), "Golden Tokyo", ["GOLDENTOKYO"])["parroted_words"] == []


# -- the paper's CoTR and cleaning ---------------------------------------------------------------


def test_paper_cotr_counts_every_word_beside_the_project_score() -> None:
    row = _one(_stage(), "to be or not to be", ["NOT"])
    assert row["cotr"] == 0.25 and row["cotr_fuzzy"] == 0.25  # {to, be, or, not}: one of four
    assert row["caption_words"] == ["not"] and row["parrot_score"] == 1.0  # stop words removed
    row = _one(_stage(), "the coffee shop of the town", ["COFFEE", "SH0P"])
    assert row["cotr"] == pytest.approx(1 / 5) and row["cotr_fuzzy"] == pytest.approx(2 / 5)
    assert row["parrot_score_exact"] == pytest.approx(1 / 3) and row["parrot_score"] == pytest.approx(2 / 3)
    assert _one(_stage(), "grand hotel", [])["cotr"] == 0.0
    assert _one(_stage(), "grand hotel", None, status="failed")["cotr"] is None


def test_captions_are_cleaned_like_open_clip() -> None:
    stage = _stage(stop_words="none")
    assert stage.caption_words("Tom &amp; Jerry &#39;Don&#39;t Stop&#39;") == ["tom", "jerry", "don", "t", "stop"]
    assert stage.caption_words("Fish &amp;amp; Chips") == ["fish", "chips"]  # escaped twice
    assert stage.caption_words("cafÃ© Ã  la carte") == ["cafe", "a", "la", "carte"]  # mojibake
    assert _one(stage, "Caf&eacute; M&Uuml;ller", ["CAFE", "MULLER"])["cotr"] == 1.0
    # The same text as open_clip.tokenizer.basic_clean, including where we skip ftfy for speed.
    for text in ("plain ascii", " Tom &amp; Jerry ", "cafÃ© Ã  la carte", "tab\there", "&lt;b&gt;x", "ﬁne Ｃａｆé"):
        assert clean_caption(text) == html.unescape(html.unescape(ftfy.fix_text(text))).strip(), text


def test_params_record_the_rule() -> None:
    params = json.loads(_stage().params_json)
    assert params["version"] >= 2 and params["fuzzy_dictionary"] == "clip_bpe"
    assert params["merged_min_length"] == DEFAULT.merged_min_length and params["clean"]


def test_config_problems() -> None:
    assert DEFAULT.problems() == []
    assert any("fuzzy_dictionary" in p for p in dataclasses.replace(DEFAULT, fuzzy_dictionary="x").problems())
    assert any("merged_min_length" in p for p in dataclasses.replace(DEFAULT, merged_min_length=1).problems())
    assert dataclasses.replace(DEFAULT, merged_min_length=0).problems() == []


def test_score_zero_without_text_and_failed_ocr_is_unknown() -> None:
    stage = _stage()
    for texts in (None, [], [""], ["!!!"]):
        row = _one(stage, "grand hotel", texts)
        assert row["parrot_status"] == "ok"
        assert row["parrot_score"] == 0.0 and row["parrot_score_exact"] == 0.0
        assert row["is_parrot"] is False and row["parroted_words"] == []
        assert row["n_caption_words"] == 2
    empty = _one(stage, "", ["HOTEL"])
    assert empty["n_caption_words"] == 0 and empty["parrot_score"] == 0.0 and empty["is_parrot"] is False
    failed = _one(stage, "grand hotel", None, status="failed")
    assert failed["parrot_status"] == "failed"
    assert failed["parrot_score"] is None and failed["is_parrot"] is None
    assert failed["caption_words"] == ["grand", "hotel"]


def test_ocr_text_fallback_and_missing_ocr_columns() -> None:
    stage = _stage()
    out = stage.process_batch(
        {"uid": ["a"], "caption": ["grand hotel"], "ocr_status": ["ok"], "texts": [None], "ocr_text": ["GRAND HOTEL"]}
    )
    assert out["parrot_score"] == [1.0]
    out = stage.process_batch({"uid": ["a", "b"], "caption": ["grand hotel", "x"]})  # OCR never ran
    assert out["parrot_status"] == ["failed", "failed"]


def test_batch_keeps_order_accepts_numpy_cells_and_casts_to_schema() -> None:
    stage = _stage()
    batch = {
        "uid": np.array(["u0", "u1", "u2"], dtype=object),
        "caption": np.array(["GRAND HOTEL", "a red car on the sand", "hotel paris sale"], dtype=object),
        "ocr_status": np.array(["ok", "ok", "failed"], dtype=object),
        "texts": [np.array(["Grand", "Hotel"], dtype=object), None, None],
        "n_regions": [2, 0, None],
    }
    out = stage.process_batch({k: list(v) for k, v in batch.items()})
    assert list(out) == schema_for("parrot").names
    assert out["uid"] == ["u0", "u1", "u2"]
    assert out["parrot_score"][:2] == [1.0, 0.0] and out["is_parrot"] == [True, False, None]
    table = pa.Table.from_pydict(out, schema=schema_for("parrot"))
    assert table.num_rows == 3
    res = stage.resources(gpus_available=True)
    assert res.gpus == 0 and res.batch_size >= 1 and res.cpus > 0


# -- separation on the embedded dataset ---------------------------------------------------------


def _misread(text: str) -> str:
    """Classic OCR confusions, at most one per word: o->0, l->1, e->c."""
    out = []
    for word in text.split():
        for src, dst in (("o", "0"), ("O", "0"), ("l", "1"), ("L", "1"), ("e", "c"), ("E", "C")):
            if src in word:
                word = word.replace(src, dst, 1)
                break
        out.append(word)
    return " ".join(out)


@pytest.fixture(scope="module")
def embedded_samples():
    return generate(200, 0)


def _scores_by_kind(samples, texts_of) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    stage = _stage()
    out = stage.process_batch(
        {
            "uid": [s.sample_id for s in samples],
            "caption": [s.caption for s in samples],
            "ocr_status": ["ok"] * len(samples),
            "texts": [texts_of(s) for s in samples],
        }
    )
    fuzzy: dict[str, list[float]] = defaultdict(list)
    exact: dict[str, list[float]] = defaultdict(list)
    for s, f, e in zip(samples, out["parrot_score"], out["parrot_score_exact"]):
        fuzzy[s.caption_kind].append(f)
        exact[s.caption_kind].append(e)
    return fuzzy, exact


def test_separates_parrot_from_descriptive_on_ground_truth(embedded_samples) -> None:
    fuzzy, _ = _scores_by_kind(embedded_samples, lambda s: list(s.box_texts))
    assert set(fuzzy) == set(CAPTION_KINDS)
    means = {k: float(np.mean(v)) for k, v in fuzzy.items()}
    separation = auc(fuzzy["parrot"], fuzzy["descriptive"])
    print(f"\nparrot score means on GT text: {means}; AUC parrot vs descriptive = {separation:.3f}")
    assert means["parrot"] > 0.8
    assert means["descriptive"] < 0.1
    assert means["descriptive"] < means["mixed"] < means["parrot"]
    assert separation > 0.95


def test_fuzzy_score_survives_ocr_misreads(embedded_samples) -> None:
    fuzzy, exact = _scores_by_kind(embedded_samples, lambda s: [_misread(t) for t in s.box_texts])
    means = {k: float(np.mean(v)) for k, v in fuzzy.items()}
    exact_means = {k: float(np.mean(v)) for k, v in exact.items()}
    print(f"\nwith simulated misreads: fuzzy means {means}; exact means {exact_means}")
    assert means["parrot"] > 0.8 and means["descriptive"] < 0.1
    assert exact_means["parrot"] < means["parrot"] - 0.3  # the misreads really break exact matching
    assert auc(fuzzy["parrot"], fuzzy["descriptive"]) > 0.95
