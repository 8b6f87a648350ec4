"""The dedup tiers' measured quality (bench/dedup_quality.py) on a handful of real photographs.

The photos are real, written by others: mmocr's wildreceipt receipt (open-mmlab/mmocr
tests/data/kie_toy_dataset, Apache-2.0) and RapidOCR's and deep-text-recognition-benchmark's test
images (RapidAI/RapidOCR python/tests; clovaai/deep-text-recognition-benchmark demo_image; both
Apache-2.0), kept in ../shared/realdata/scenetext (see its README), and scikit-image's bundled
photographs (skimage.data, BSD-3-Clause; each image's own licence in its README.txt). The planted
copies are made by the measurement itself, which also runs every file through img2dataset's
resizer and the pipeline's decode and the semantic tier through the real clip_score stage.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import dedup_quality as dq

ROOT = Path(__file__).resolve().parents[1]
HANDFUL = (  # small ones (at most 709 px), so the test takes seconds
    "realdata/mmocr_wildreceipt/2.jpeg",
    "realdata/rapidocr_tests/en.jpg",
    "realdata/dtrb_demo/demo_9.jpg",
    "skimage/astronaut.png",
    "skimage/chelsea.png",
    "skimage/coffee.png",
)


@pytest.fixture(scope="module")
def report() -> dq.Report:
    if not dq.SCENETEXT.is_dir():
        pytest.skip(f"the real photos are not there: {dq.SCENETEXT} (shared/ must sit beside the checkout)")
    photos = [p for p in dq.real_photos() if p.name in HANDFUL]
    assert len(photos) == len(HANDFUL)
    return dq.measure(photos)


def test_originals_are_real_photos_not_word_crops() -> None:
    if not dq.SCENETEXT.is_dir():
        pytest.skip(f"the real photos are not there: {dq.SCENETEXT} (shared/ must sit beside the checkout)")
    names = [p.name for p in dq.real_photos()]
    assert "realdata/mmocr_wildreceipt/1.jpeg" in names and "skimage/astronaut.png" in names
    # word crops (short side < 100 px) and the stereo partner are left out
    assert "realdata/mmocr_rec_toy/1036169.jpg" not in names and "realdata/dtrb_demo/demo_1.png" not in names
    assert "skimage/motorcycle_right.png" not in names
    assert len(names) == len(set(names)) >= 30


def test_exact_tier_finds_identical_bytes_only(report: dq.Report) -> None:
    exact = report.tiers["exact"]
    assert exact.recall["identical-bytes"] == 1.0
    assert exact.recall["jpeg-q50"] == 0.0  # a re-encode is other bytes
    assert all(exact.recall[t] == 0.0 for t in dq.TRANSFORMS if t != "identical-bytes")
    assert exact.precision == 1.0 and exact.false_pairs == 0
    assert exact.linked.get("different-text", 0) == 0  # the two texts are two files


def test_phash_tier_keeps_reencodes_and_resizes_and_no_different_photo(report: dq.Report) -> None:
    phash = report.tiers["phash"]
    for transform in ("identical-bytes", "jpeg-q50", "resize-50", "resize-200"):
        assert phash.recall[transform] == 1.0, (transform, phash.distances.get(transform))
    # precision 1.0 on the photos and their copies: no two different photos within the radius
    assert phash.linked.get("different-photo", 0) == 0, phash.false_examples
    assert phash.distances["different-photo"]["min"] > report.radius
    # a mirror flips the sign of every odd horizontal frequency: pHash does not see it as the same picture
    assert phash.recall["mirror"] == 0.0


def test_semantic_tier_reads_the_clip_stage_embeddings(report: dq.Report) -> None:
    semantic = report.tiers["semantic"]
    assert report.clip_model == "ViT-S-32 random-init(seed=0)" and report.clip_meaningful is False
    # the same bytes give the same stored embedding, whatever the weights
    assert semantic.recall["identical-bytes"] == 1.0
    assert semantic.distances["identical-bytes"]["min"] == pytest.approx(1.0, abs=1e-3)
    assert semantic.rule == "cosine >= 0.95"


def test_the_scores_catch_a_broken_tier() -> None:
    """A tier that links everything, or nothing, is caught by the numbers the table reports."""
    items = [dq.Item("a", "original", b"1"), dq.Item("a", "jpeg-q50", b"2"),
             dq.Item("b", "original", b"3"), dq.Item("b", "template-a", b"4"), dq.Item("b", "template-b", b"5")]
    everything = dq.score("t", "all", np.ones((5, 5), bool), items)
    assert everything.recall["jpeg-q50"] == 1.0 and everything.false_pairs == 7  # 6 cross-photo + the two texts
    assert everything.precision == pytest.approx(1 / 8)
    nothing = dq.score("t", "none", np.eye(5, dtype=bool), items)
    assert nothing.recall["jpeg-q50"] == 0.0 and nothing.precision is None and nothing.false_pairs == 0
    assert dq.pair_class(items[3], items[4]) == "different-text"
    assert dq.pair_class(items[2], items[3]) == "text-added"


def test_markdown_and_json_name_every_tier_and_transform(report: dq.Report, tmp_path: Path) -> None:
    table = dq.markdown(report)
    assert all(t in table for t in dq.TRANSFORMS)
    assert "| exact | same sha256 of the fetched bytes | 1.00 | 0.00 |" in table
    path = tmp_path / "q.json"
    dq.write_json(report, path)
    import json

    data = json.loads(path.read_text())
    assert data["tiers"]["phash"]["recall"]["resize-50"] == 1.0 and data["n_images"] == 6 * 11


def test_bad_argument_is_one_line_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.dedup_quality", "--eps", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --eps must be within (0, 2) (a cosine distance), got 3.0"]


def test_text_split_keeps_different_text_templates_apart(report: dq.Report) -> None:
    """split_by_text: the same photo with two different large words is two samples; the cost, copies of photos
    with text split by OCR noise, is why it is off by default."""
    phash, with_text = report.tiers["phash"], report.tiers["phash+text"]
    merged = lambda s: s.linked.get("different-text", 0)  # noqa: E731
    # on these 6 photos pHash merges 5 of the 6 template pairs; with the words, 1
    assert merged(phash) >= 4 and merged(with_text) <= 1
    # text-free photos keep every re-encode; photos with text lose some to OCR noise (measured: 0.67)
    assert with_text.recall["jpeg-q50"] >= 0.5 and phash.recall["jpeg-q50"] == 1.0
