"""Recognition on real scene text, per engine and setting (issue 29, "measure first").

    python bench/ocr_real_bench.py        (or: make bench ARGS="--only ocr-real")

Every real image in ``../shared/realdata/scenetext`` (bench/realdata.py) goes through the OCR
stage as the pipeline calls it (batches of 8, one thread: one replica of the shipped pool), once
per setting:

- word crops (mmocr's 10, deep-text-recognition-benchmark's 10): a crop is *read* when its word
  is among the joined runs of the stage's texts (``spaceless_words_found``: case, spaces and
  punctuation ignored); *within one edit* also counts a word of >= 5 letters whose closest run
  is one edit away; CER is the edit distance from the word to everything read on the crop,
  joined, over the word's length (capped at 1).
- receipts (2 photos, 82 annotated words, at the 512 px the download stores): words read, within
  one edit, and the CER of each annotated box that a predicted region matches (IoU >= 0.5).
- text-free photos (scikit-image's): regions found (should be none).
- seconds: CPU seconds per image of the stage, per set.

Targets (issue 29): each crop set >= 8 of 10 (exact, or within one edit for words of >= 5
letters), receipts >= 30 of 82 words, no region on text-free photos.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BenchResult, Context, Ratio, quiet_warnings, standalone_main  # noqa: E402

NAME = "ocr-real"
TITLE = "Recognition on real scene text: word crops, receipts, text-free photos, per engine and setting"
TARGET_CROPS = 8  # of 10 per set
TARGET_RECEIPT_WORDS = 30  # of 82
LONG_WORD = 5  # letters from which one edit still counts as read


def settings() -> dict[str, Any]:
    """name -> a loaded engine, one per setting measured (the shipped one first)."""
    from models.ocr import EasyOcrEngine, RapidOcrEngine, make_engine
    from stages.ocr import OcrConfig

    return {
        "ppocr-v6 (shipped)": make_engine(OcrConfig(device="cpu"), cuda_available=False),
        "ppocr-v6 without the small-image rules": RapidOcrEngine(num_threads=1, models="v6", small_images=False),
        "easyocr (CRAFT int8, recogniser int8)": make_engine(OcrConfig(engine="easyocr", device="cpu"),
                                                             cuda_available=False),
        "easyocr, CRAFT fp32": EasyOcrEngine(device="cpu", num_threads=1, quantize_detector=False),
        "rapidocr (PP-OCRv4)": make_engine(OcrConfig(engine="rapidocr", device="cpu"), cuda_available=False),
    }


def _distance(a: str, b: str) -> int:
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def word_scores(texts: list[str], word: str) -> tuple[bool, bool, float]:
    """(read, read within one edit, CER) of one true word against one image's texts."""
    from pipeline.ocr_accuracy import joined_runs, normalise_word

    truth = normalise_word(word.replace(" ", ""))
    runs = joined_runs(texts)
    exact = truth in runs
    near = exact or (len(truth) >= LONG_WORD and any(_distance(truth, r) <= 1 for r in runs))
    everything = "".join(normalise_word(t.replace(" ", "")) for t in texts)
    cer = min(1.0, _distance(truth, everything) / max(1, len(truth)))
    return exact, near, cer


def measure(engine: Any) -> dict[str, Any]:
    from bench.realdata import dtrb_crops, mmocr_crops, receipts, stage_rows, text_free_photos
    from pipeline.ocr_accuracy import match_regions, normalise_word
    from stages.ocr import OcrConfig, OcrStage

    stage = OcrStage(OcrConfig(engine=engine.engine, device="cpu", cpus_per_replica=1.0), engine=engine)
    stage_rows(stage, [c.image for c in mmocr_crops()[:2]])  # warm-up, untimed
    out: dict[str, Any] = {}
    for name, crops in (("mmocr", mmocr_crops()), ("dtrb", dtrb_crops())):
        rows, seconds = stage_rows(stage, [c.image for c in crops])
        scores = [word_scores(r["texts"] or [], c.word) for r, c in zip(rows, crops)]
        out[name] = {"n": len(crops), "exact": sum(s[0] for s in scores), "near": sum(s[1] for s in scores),
                     "cer": sum(s[2] for s in scores) / len(scores), "cpu_s_per_image": seconds,
                     "readings": [" ".join(r["texts"] or []) for r in rows], "words": [c.word for c in crops]}
    truth = receipts()
    rows, seconds = stage_rows(stage, [r.image for r in truth])
    exact = near = n = 0
    cers: list[float] = []
    for row, receipt in zip(rows, truth):
        texts = row["texts"] or []
        for word in receipt.words:
            e, m, _ = word_scores(texts, word)
            exact, near, n = exact + e, near + m, n + 1
        for p, g, _ in match_regions(row["quads"] or [], receipt.quads, 0.5):
            want = normalise_word(receipt.words[g].replace(" ", ""))
            got = normalise_word(texts[p].replace(" ", ""))
            cers.append(min(1.0, _distance(want, got) / max(1, len(want))))
    out["receipts"] = {"n": n, "exact": exact, "near": near, "matched_regions": len(cers),
                       "cer_matched": sum(cers) / len(cers) if cers else None, "cpu_s_per_image": seconds}
    rows, seconds = stage_rows(stage, text_free_photos())
    out["text_free"] = {"n": len(rows), "regions": sum(r["n_regions"] for r in rows), "cpu_s_per_image": seconds}
    return out


def run(ctx: Context) -> BenchResult:
    from bench.realdata import SCENETEXT

    result = BenchResult(NAME, TITLE)
    if not SCENETEXT.is_dir():
        result.markdown = f"Skipped: the real scene-text data is not at {SCENETEXT}."
        return result
    with quiet_warnings():
        engines = settings()
        measured = {name: measure(engine) for name, engine in engines.items()}
    for name, m in measured.items():
        ctx.log(f"  {name}: mmocr {m['mmocr']['exact']}/{m['mmocr']['near']} of 10, dtrb {m['dtrb']['exact']}/"
                f"{m['dtrb']['near']} of 10, receipts {m['receipts']['exact']}/{m['receipts']['near']} of "
                f"{m['receipts']['n']}, text-free regions {m['text_free']['regions']}")
    shipped = next(iter(measured))
    m = measured[shipped]
    for name in ("mmocr", "dtrb"):
        result.rows.append(Ratio(NAME, f"{shipped}: {name} word crops read (exact, or one edit at >= {LONG_WORD} letters)",
                                 m[name]["near"], f"of {m[name]['n']}", f">= {TARGET_CROPS}",
                                 m[name]["near"] >= TARGET_CROPS,
                                 f"exact {m[name]['exact']}, CER {m[name]['cer']:.2f}"))
    result.rows.append(Ratio(NAME, f"{shipped}: receipt words read", m["receipts"]["exact"], f"of {m['receipts']['n']}",
                             f">= {TARGET_RECEIPT_WORDS}", m["receipts"]["exact"] >= TARGET_RECEIPT_WORDS,
                             f"within one edit {m['receipts']['near']}"))
    result.rows.append(Ratio(NAME, f"{shipped}: regions on {m['text_free']['n']} text-free photos",
                             m["text_free"]["regions"], "", "0", m["text_free"]["regions"] == 0, ""))
    result.data = measured
    result.markdown = _markdown(measured)
    return result


def _markdown(measured: dict[str, Any]) -> str:
    lines = [
        "Each real image through the OCR stage (batches of 8, one thread), per setting. Crops: read = the word "
        "among the joined runs of what the stage read (case, spaces, punctuation ignored); +1 edit also counts a "
        f"word of >= {LONG_WORD} letters one edit away; CER = edit distance to everything read, over the word's "
        "length. Receipts: 82 annotated words at 512 px; CER over the annotated boxes a predicted region matches "
        "(IoU >= 0.5). Seconds: CPU seconds per image.",
        "",
        "| setting | mmocr read / +1 edit | mmocr CER | dtrb read / +1 edit | dtrb CER | receipt words / +1 edit "
        "| receipt regions matched | CER matched | text-free regions | CPU s/img crops | CPU s/img receipts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in measured.items():
        r = m["receipts"]
        cer = f"{r['cer_matched']:.2f}" if r["cer_matched"] is not None else "—"
        crops_s = (m["mmocr"]["cpu_s_per_image"] + m["dtrb"]["cpu_s_per_image"]) / 2
        lines.append(f"| {name} | {m['mmocr']['exact']} / {m['mmocr']['near']} | {m['mmocr']['cer']:.2f} | "
                     f"{m['dtrb']['exact']} / {m['dtrb']['near']} | {m['dtrb']['cer']:.2f} | {r['exact']} / {r['near']} "
                     f"| {r['matched_regions']} | {cer} | {m['text_free']['regions']} | {crops_s:.2f} | "
                     f"{r['cpu_s_per_image']:.2f} |")
    lines += ["", "What each setting read on the crops (word: reading):", ""]
    for name, m in measured.items():
        for crop_set in ("mmocr", "dtrb"):
            pairs = ", ".join(f"{w}: {r or '∅'}" for w, r in zip(m[crop_set]["words"], m[crop_set]["readings"]))
            lines.append(f"- {name}, {crop_set}: {pairs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
